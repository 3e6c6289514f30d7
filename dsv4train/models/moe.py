"""DeepSeekMoE with V4's changes (arch ref §5): sqrt(softplus) scores, aux-loss-free bias used for selection
only, top-k weights normalised then scaled, hash-routed first layers, clamped SwiGLU experts, one shared
expert, and the sequence-wise balance loss."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dsv4train.config.model import ModelConfig
from dsv4train.models.grouped_gemm import grouped_linear
from dsv4train.models.sequence import WHOLE_SEQUENCE, WholeSequence


def clamped_swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float) -> torch.Tensor:
    """SiLU(min(gate, limit)) * clamp(up, -limit, limit); limit <= 0 disables the clamp."""
    if limit > 0:
        gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
    return F.silu(gate) * up


def build_hash_table(
    vocab_size: int, n_experts: int, k: int, seed: int, token_counts: np.ndarray | None = None
) -> torch.Tensor:
    """Deterministic token -> k distinct experts table for hash-routed layers, shape [vocab, k] int64.

    Tokens are visited from most to least frequent (ties by id); each takes the k experts with the least
    token mass so far (ties broken by a seeded permutation of the experts). With a corpus histogram this
    balances routed token mass; without one every token weighs 1 and load is balanced by count."""
    rng = np.random.default_rng(seed)
    tie_break = rng.permutation(n_experts).astype(np.float64) * 1e-9
    weights = np.ones(vocab_size) if token_counts is None else np.asarray(token_counts, dtype=np.float64) + 1.0
    if weights.shape != (vocab_size,):
        raise ValueError(f"token_counts must have shape [{vocab_size}], got {weights.shape}")
    order = np.lexsort((np.arange(vocab_size), -weights))
    load = np.zeros(n_experts)
    table = np.empty((vocab_size, k), dtype=np.int64)
    for tok in order:
        pick = np.argpartition(load + tie_break, k - 1)[:k]
        table[tok] = np.sort(pick)
        load[pick] += weights[tok]
    return torch.from_numpy(table)


@dataclass
class MoEAux:
    counts_E: torch.Tensor  # tokens routed to each expert (detached)
    balance_loss: torch.Tensor | None  # sequence-wise balance loss (None for hash layers)
    routes_BSK: torch.Tensor | None = None  # the k experts each token went to (detached), read by generation


class Gate(nn.Module):
    def __init__(self, cfg: ModelConfig, hashed: bool):
        super().__init__()
        self.hashed, self.k, self.route_scale = hashed, cfg.n_activated_experts, cfg.route_scale
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.dim))
        if hashed:
            self.register_buffer("tid2eid", torch.zeros(cfg.vocab_size, self.k, dtype=torch.long))
        else:
            self.register_buffer("bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))

    def forward(self, x_ND: torch.Tensor, ids_N: torch.Tensor | None, replay_NK: torch.Tensor | None = None):
        """(weights [N,k], expert ids [N,k], scores [N,E]); scores in fp32. replay_NK: experts to use instead of the
        top-k (keep-routing), -1 rows routed by the top-k; the weights are the scores of the experts used."""
        scores = torch.sqrt(F.softplus(F.linear(x_ND.float(), self.weight.float())))
        if self.hashed:
            if ids_N is None:
                raise ValueError("hash-routed MoE layers need input_ids")
            idx = self.tid2eid[ids_N]
        else:
            idx = torch.topk(scores.detach() + self.bias, self.k, dim=-1).indices
            if replay_NK is not None:
                idx = torch.where((replay_NK >= 0).all(-1, keepdim=True), replay_NK, idx)
        w = scores.gather(1, idx)
        w = w / (w.sum(-1, keepdim=True) + 1e-20) * self.route_scale
        return w, idx, scores


def sort_rows_by_expert(idx_NK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The M = N·K (token, expert) rows of a batch in expert order (stable: ties keep token order).

    Returns `order_M` (each sorted row's position in `idx_NK.reshape(-1)`) and `token_M` (its token)."""
    order_M = torch.argsort(idx_NK.reshape(-1), stable=True)
    return order_M, torch.div(order_M, idx_NK.shape[1], rounding_mode="floor")


def combine_rows(
    ys_MD: torch.Tensor, order_M: torch.Tensor, token_M: torch.Tensor, w_NK: torch.Tensor, x_ND: torch.Tensor
) -> torch.Tensor:
    """Expert outputs of rows in `sort_rows_by_expert` order, weighted by their routing weight and summed per
    token: y [N, D] in `x_ND`'s dtype."""
    ys_MD = ys_MD * w_NK.reshape(-1)[order_M].unsqueeze(-1).to(ys_MD.dtype)
    return torch.zeros_like(x_ND).index_add_(0, token_M, ys_MD.to(x_ND.dtype))


class LocalDispatch:
    """Routed rows to the experts and back on one process: sort by expert, run every expert, unsort.

    The dispatch seam of `Experts` (as `seq` is the context-parallel seam): a callable
    `dispatch(x_ND, idx_NK, w_NK, experts) -> y_ND` that moves each token's K rows to the experts it was routed
    to, runs `experts.mlp(xs, counts_E, w1, w2, w3)` on the rows sorted by expert with the weights it holds, and
    returns the routing-weighted sum per token. Expert parallelism (dsv4train/parallel/ep.py) replaces it with
    an all-to-all dispatch over the ranks that hold the experts; FP8/FP4 training replaces `experts.mlp`, so
    both compose."""

    def __call__(self, x_ND: torch.Tensor, idx_NK: torch.Tensor, w_NK: torch.Tensor, experts: Experts) -> torch.Tensor:
        order_M, token_M = sort_rows_by_expert(idx_NK)
        counts_E = torch.bincount(idx_NK.reshape(-1), minlength=experts.w1.shape[0])
        xs_MD = x_ND.index_select(0, token_M)  # backward is index_add (parallel), not index_put (serial on CPU)
        ys_MD = experts.mlp(xs_MD, counts_E, experts.w1, experts.w2, experts.w3)
        return combine_rows(ys_MD, order_M, token_M, w_NK, x_ND)


LOCAL_DISPATCH = LocalDispatch()


class Experts(nn.Module):
    """Routed experts stored stacked: w1 (gate) and w3 (up) [E, I, d], w2 (down) [E, d, I].

    Two seams: `dispatch` moves rows to the experts and back (`LocalDispatch`; expert parallelism sets its
    all-to-all one), `mlp` runs the experts on rows sorted by expert (FP8/FP4 training overrides it)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, I, d = cfg.n_routed_experts, cfg.moe_inter_dim, cfg.dim
        self.limit = cfg.swiglu_limit
        self.w1 = nn.Parameter(torch.empty(E, I, d))
        self.w2 = nn.Parameter(torch.empty(E, d, I))
        self.w3 = nn.Parameter(torch.empty(E, I, d))
        self.dispatch = LOCAL_DISPATCH  # expert parallelism replaces it (dsv4train/parallel/ep.py)

    def forward(self, x_ND: torch.Tensor, idx_NK: torch.Tensor, w_NK: torch.Tensor) -> torch.Tensor:
        """y [N, D]: each token's routed experts, weighted by `w_NK` [N, K], for expert ids `idx_NK` [N, K]."""
        return self.dispatch(x_ND, idx_NK, w_NK, self)

    def mlp(
        self, xs: torch.Tensor, counts_E: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor
    ) -> torch.Tensor:
        """The experts on rows sorted by expert. `dispatch` calls this with the weights this process holds (all of
        them, or under expert parallelism the local experts); FP8/FP4 training overrides it (dsv4train/quant)."""
        return expert_mlp(xs, counts_E, w1, w2, w3, self.limit)


def expert_mlp(
    xs: torch.Tensor, counts_E: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor, limit: float
) -> torch.Tensor:
    """Clamped-SwiGLU experts on rows sorted by expert (`counts_E[e]` rows for expert e, in order)."""
    offsets = torch.cumsum(counts_E, 0)
    h = clamped_swiglu(grouped_linear(xs, w1, offsets), grouped_linear(xs, w3, offsets), limit)
    return grouped_linear(h, w2, offsets)


def decode_experts(x_ND: torch.Tensor, idx_NK: torch.Tensor, w_NK: torch.Tensor, experts: Experts) -> torch.Tensor:
    """y [N, D] as `Experts.forward`, for a decode step's few tokens, with static shapes (one compiled graph, no
    host sync): no sort by expert, no per-expert split; each token gathers its K experts' weights and runs them.
    It reads an expert's weights once per token routed to it (the sorted path: once per step). Running every token
    through every expert with dense routing weights instead (each expert read once) made the compiled step slower
    on the 2-core CPU at batch 16 (docs/generation.md "Speed"), so it is not used."""
    dtype = x_ND.dtype
    w1_NKID, w3_NKID, w2_NKDI = experts.w1[idx_NK], experts.w3[idx_NK], experts.w2[idx_NK]
    gate_NKI = torch.einsum("nd,nkid->nki", x_ND, w1_NKID.to(dtype))
    up_NKI = torch.einsum("nd,nkid->nki", x_ND, w3_NKID.to(dtype))
    y_NKD = torch.einsum("nki,nkdi->nkd", clamped_swiglu(gate_NKI, up_NKI, experts.limit), w2_NKDI.to(dtype))
    return (y_NKD * w_NK.unsqueeze(-1).to(dtype)).sum(1)


class SharedExpert(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.limit = cfg.swiglu_limit
        self.w1 = nn.Linear(cfg.dim, cfg.moe_inter_dim, bias=False)
        self.w2 = nn.Linear(cfg.moe_inter_dim, cfg.dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.moe_inter_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(clamped_swiglu(self.w1(x), self.w3(x), self.limit))


def sequence_balance_loss(
    scores_BSE: torch.Tensor, idx_BSK: torch.Tensor, seq: WholeSequence = WHOLE_SEQUENCE
) -> torch.Tensor:
    """sum_i f_i P_i per sequence, averaged over sequences: f_i = E/(K*S) * #tokens routed to i,
    P_i = mean_t of the scores normalised over all experts. Under context parallelism S and the counts are the
    whole sequence's (`seq` sums them over the shards) and each shard adds its tokens' part of P."""
    B, S, E = scores_BSE.shape
    K = idx_BSK.shape[-1]
    counts = torch.zeros(B, E, device=scores_BSE.device).scatter_add_(
        1, idx_BSK.reshape(B, -1), torch.ones(B, S * K, device=scores_BSE.device)
    )
    S_total = S * seq.shards
    f = seq.total(counts) * (E / (K * S_total))
    p = (scores_BSE / scores_BSE.sum(-1, keepdim=True)).sum(1) / S_total
    return seq.share((f * p).sum(-1).mean())


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, hashed: bool):
        super().__init__()
        self.gate = Gate(cfg, hashed)
        self.experts = Experts(cfg)
        self.shared_experts = SharedExpert(cfg) if cfg.n_shared_experts else None
        self.seq = WHOLE_SEQUENCE  # context parallelism replaces it with this rank's shard (models/sequence.py)

    def forward(
        self,
        x_BSD: torch.Tensor,
        input_ids: torch.Tensor | None,
        decode: bool = False,
        routes_BSK: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, MoEAux]:
        """decode: a generation step's few tokens, through `decode_experts` (static shapes; no balance loss).
        routes_BSK: experts to replay instead of the router's choice (keep-routing; -1 tokens: the router's)."""
        B, S, D = x_BSD.shape
        x_ND = x_BSD.reshape(-1, D)
        replay_NK = None if routes_BSK is None else routes_BSK.reshape(B * S, -1)
        w, idx, scores = self.gate(x_ND, None if input_ids is None else input_ids.reshape(-1), replay_NK)
        if decode:
            y = decode_experts(x_ND, idx, w, self.experts).view(B, S, D)
        else:  # through the module: hooks (FSDP's gather) and the dispatch seam
            y = self.experts(x_ND, idx, w).view(B, S, D)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x_BSD)
        E = scores.shape[-1]
        if decode:  # bincount's output size depends on the data: it would split a compiled graph
            return y, MoEAux(F.one_hot(idx.reshape(-1), E).sum(0), None, idx.view(B, S, -1))
        counts = torch.bincount(idx.reshape(-1), minlength=E).detach()
        bal = None
        if not self.gate.hashed:
            bal = sequence_balance_loss(scores.view(B, S, -1), idx.view(B, S, -1), self.seq)
        return y, MoEAux(counts, bal, idx.view(B, S, -1).detach())


@torch.no_grad()
def update_router_bias(model: nn.Module, expert_counts: torch.Tensor, speed: float) -> None:
    """Aux-loss-free balancing: b_i += speed * sign(mean_load - load_i) for every learned router, in layer
    order (row r of `expert_counts` belongs to the r-th MoE of `model.modules()`; hash rows are skipped)."""
    gates = [m.gate for m in model.modules() if isinstance(m, MoE)]
    if len(gates) != expert_counts.shape[0]:
        raise ValueError(f"expert_counts has {expert_counts.shape[0]} rows but the model has {len(gates)} MoE layers")
    for gate, load in zip(gates, expert_counts.float()):
        if not gate.hashed:
            gate.bias += speed * torch.sign(load.mean() - load).to(gate.bias.device)
