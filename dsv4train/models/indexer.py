"""Lightning indexer for CSA layers (arch ref §3.6, §8.4).

score(t, s) = sum_h w_{t,h} * ReLU(q_{t,h} . K_s) / sqrt(c_I), with w = weights_proj(x) / sqrt(n_I).
The indexer never receives gradient from the LM loss: its inputs are detached, top-k is not differentiable.
It is trained by `kl_loss` against the main attention's mass on the compressed entries."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsv4train.config.model import ModelConfig
from dsv4train.models.compressor import Compressor
from dsv4train.models.documents import Documents
from dsv4train.models.rope import apply_rope
from dsv4train.models.sequence import WHOLE_SEQUENCE, WholeSequence


class Indexer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim, self.topk = cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk
        self.wq_b = nn.Linear(cfg.q_lora_rank, cfg.index_n_heads * cfg.index_head_dim, bias=False)
        self.weights_proj = nn.Linear(cfg.dim, cfg.index_n_heads, bias=False)
        self.compressor = Compressor(cfg.dim, cfg.index_head_dim, cfg.csa_ratio, overlap=True, eps=cfg.norm_eps)

    def keys(
        self,
        x_BSD: torch.Tensor,
        freqs: tuple[float, ...],
        seq: WholeSequence = WHOLE_SEQUENCE,
        docs: Documents | None = None,
    ) -> torch.Tensor:
        """The indexer's compressed keys [B, T, c_I], from detached inputs."""
        return self.compressor(x_BSD.detach(), freqs, seq, docs)

    def scores(
        self, x_BSD: torch.Tensor, qlat_BSR: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, keys_BTK: torch.Tensor
    ) -> torch.Tensor:
        """Index scores [B, S, T] of the queries at cos/sin's positions over all T keys (future ones and, in packed
        rows, other documents' included; the caller masks)."""
        x_BSD, qlat_BSR = x_BSD.detach(), qlat_BSR.detach()
        B, S, _ = x_BSD.shape
        q_BSHK = self.wq_b(qlat_BSR).view(B, S, self.n_heads, self.head_dim)
        q_BSHK = apply_rope(q_BSHK, cos.unsqueeze(-2), sin.unsqueeze(-2))
        # one [B, S·H, K] x [B, K, T] batched GEMM: matmul's broadcast of the keys over S would copy them per query
        logits_BSHT = torch.einsum("bshk,btk->bsht", q_BSHK.float(), keys_BTK.float())
        w_BSH = self.weights_proj(x_BSD).float() * self.n_heads**-0.5
        return torch.einsum("bsht,bsh->bst", F.relu(logits_BSHT) * self.head_dim**-0.5, w_BSH)


def select_topk(scores_BST: torch.Tensor, hidden_ST: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k visible entries per query; picks of hidden entries (past the causal limit, or another document's)
    become -1. hidden_ST: [S, T] or [B, S, T]. Returns [B, S, min(k, T)].

    Equal scores go to the earlier entry. Ties are common: a score is exactly 0 whenever every index head's ReLU is,
    and `torch.topk` orders ties as it likes, so a query's picks would depend on how many entries follow (a longer
    padded row, a packed row). With the rule, a document picks the same entries alone, packed or padded. One topk
    over int64 keys does it: the score's order-preserving integer in the high 32 bits, T-1-index in the low ones."""
    T = scores_BST.shape[-1]
    masked = scores_BST.detach().float().masked_fill(hidden_ST, float("-inf")) + 0.0  # -0.0 ties with 0.0
    idx = _ordered_keys(masked).topk(min(k, T), dim=-1).indices
    picked_hidden = hidden_ST.expand_as(scores_BST).gather(-1, idx)
    return torch.where(picked_hidden, torch.full_like(idx, -1), idx)


def _ordered_keys(scores_BST: torch.Tensor) -> torch.Tensor:
    """int64 keys in the order of (score, -index): fp32 bits made monotone (negative floats count down), shifted up
    32 bits, plus T-1-index."""
    bits = scores_BST.contiguous().view(torch.int32).long()
    monotone = torch.where(bits >= 0, bits, -1 - (bits + 2**31))
    T = scores_BST.shape[-1]
    later_first = T - 1 - torch.arange(T, device=scores_BST.device)
    return monotone * 2**32 + later_first


def kl_loss(
    teacher_BSHJ: torch.Tensor,
    student_logits_BSJ: torch.Tensor,
    valid_BSJ: torch.Tensor,
    seq: WholeSequence = WHOLE_SEQUENCE,
) -> torch.Tensor:
    """KL(p || softmax(I)) averaged over queries that see at least one entry (of the whole sequence under
    context parallelism: `seq` sums the count over the shards).

    teacher: main attention probabilities on the same J compressed slots, per head (detached here; summed over
    heads and renormalised). student: index scores on those slots. valid: which slots count."""
    p = teacher_BSHJ.detach().float().sum(dim=2).masked_fill(~valid_BSJ, 0.0)
    mass = p.sum(-1, keepdim=True)
    has_any = valid_BSJ.any(-1)
    p = p / mass.clamp_min(1e-30)
    student = student_logits_BSJ.float().masked_fill(~valid_BSJ, float("-inf"))
    student = torch.where(has_any.unsqueeze(-1), student, torch.zeros_like(student))  # keep empty rows finite
    logq = torch.log_softmax(student, dim=-1)
    terms = torch.where(p > 0, p * (torch.log(p.clamp_min(1e-30)) - logq), torch.zeros_like(p))
    per_query = terms.sum(-1)
    n = seq.total(has_any.sum()).clamp_min(1)
    return seq.share(per_query.masked_fill(~has_any, 0.0).sum()) / n
