"""V4 attention shared by all layer types (arch ref §3): low-rank query with q_norm, per-head unweighted
RMS norm, a single K=V head with kv_norm, partial interleaved RoPE and output de-rotation, per-head sinks,
a sliding window plus (csa/hca) compressed entries, and the grouped low-rank output projection."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dsv4train.config.model import ModelConfig
from dsv4train.models import kv_cache
from dsv4train.models.attention_core import CompressedKeys, decode_attention, hybrid_attention
from dsv4train.models.compressor import Compressor, visible_entries
from dsv4train.models.documents import Documents
from dsv4train.models.indexer import Indexer, kl_loss, select_topk
from dsv4train.models.norms import RMSNorm, unweighted_rms_norm
from dsv4train.models.rope import apply_rope, inv_freq, rope_cos_sin
from dsv4train.models.sequence import WHOLE_SEQUENCE


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """A parameter as this process holds it. Under tensor parallelism (dsv4train/parallel/tp.py) `attn_sink` and
    `wo_a.weight` are distributed shards, and `to_local()` gives the local heads / output groups; `Attention`
    reads how many heads and output groups it runs from their shapes, so tensor parallelism writes no counts."""
    to_local = getattr(t, "to_local", None)
    return t if to_local is None else to_local()


@dataclass
class AttentionAux:
    indexer_loss: torch.Tensor | None = None


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_type: str):
        super().__init__()
        self.layer_type = layer_type
        self.head_dim, self.window, self.o_lora_rank = cfg.head_dim, cfg.window_size, cfg.o_lora_rank
        self.eps = cfg.norm_eps
        self.freqs = inv_freq(cfg, layer_type)
        self.ratio = cfg.compress_ratio(layer_type)
        self.indexer_mode = cfg.indexer_mode
        self.indexer_kl = True  # compute the indexer KL loss when training (the trainer may turn it off)
        self.sum_over_head_shards = None  # tensor parallelism's seam: sums a head-reduced tensor over TP ranks
        self.seq = WHOLE_SEQUENCE  # context parallelism replaces it with this rank's shard (models/sequence.py)
        H, c = cfg.n_heads, cfg.head_dim
        self.wq_a = nn.Linear(cfg.dim, cfg.q_lora_rank, bias=False)
        self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.norm_eps)
        self.wq_b = nn.Linear(cfg.q_lora_rank, H * c, bias=False)
        self.wkv = nn.Linear(cfg.dim, c, bias=False)
        self.kv_norm = RMSNorm(c, cfg.norm_eps)
        self.wo_a = nn.Linear(H * c // cfg.o_groups, cfg.o_groups * cfg.o_lora_rank, bias=False)
        self.wo_b = nn.Linear(cfg.o_groups * cfg.o_lora_rank, cfg.dim, bias=False)
        self.attn_sink = nn.Parameter(torch.zeros(H))
        if layer_type != "swa":
            self.compressor = Compressor(cfg.dim, c, self.ratio, overlap=layer_type == "csa", eps=cfg.norm_eps)
        if layer_type == "csa":
            self.indexer = Indexer(cfg)

    @property
    def local_heads(self) -> int:
        """Query heads this process runs: all of them, or under tensor parallelism its shard (one sink per head).
        Read in forward, where FSDP (if any) has gathered its shard of the parameters back."""
        return local_shard(self.attn_sink).shape[0]

    @property
    def local_o_groups(self) -> int:
        """Output groups this process projects: wo_a holds o_lora_rank rows per group (all, or its TP shard)."""
        return local_shard(self.wo_a.weight).shape[0] // self.o_lora_rank

    def forward(
        self, x_BSD: torch.Tensor, docs: Documents | None = None, cache: kv_cache.LayerStep | None = None
    ) -> tuple[torch.Tensor, AttentionAux]:
        """docs: the documents of packed rows (models/documents.py); None = one document per row. cache: generation
        (models/kv_cache.py): a prefill runs this forward and copies its state into the cache, a decode step takes
        one token per row through `decode`."""
        if cache is not None and not cache.step.prefill:
            return self.decode(x_BSD, cache), AttentionAux()
        B, S, _ = x_BSD.shape
        if docs is None:
            start = self.seq.offset(S)
            positions = torch.arange(start, start + S, device=x_BSD.device)
        elif self.seq.shards > 1:
            raise ValueError("packed documents (positions=...) are not supported under context parallelism: use cp=1")
        else:
            positions = docs.positions_BS
        cos, sin = rope_cos_sin(self.freqs, positions)
        qlat_BSR, q_BSHC, kv_BSC = self._queries_and_kv(x_BSD, cos, sin)

        comp, index_scores, index_keys = None, None, None
        if self.layer_type != "swa":
            comp = self._compressed_keys(x_BSD, positions, docs)
            has_entries = comp.kv_BTC.shape[1] > 0
            if self.layer_type == "csa" and (has_entries or cache is not None):  # a cache needs the indexer's ring
                with torch.set_grad_enabled(torch.is_grad_enabled() and self._want_kl()):
                    index_keys = self.indexer.keys(x_BSD, self.freqs, self.seq, docs)
                    if has_entries:
                        index_scores = self.indexer.scores(x_BSD, qlat_BSR, cos, sin, index_keys)
                if has_entries and self.indexer_mode == "sparse":
                    comp.topk_BSK = select_topk(index_scores, comp.hidden(), self.indexer.topk)
        if cache is not None:
            self._fill_cache(cache, x_BSD, kv_BSC, comp, index_keys)

        kv_ext_BXC = self.seq.with_previous(kv_BSC, self.window)  # the W keys before ours: zeros, or the last shard's
        o_BSHC, p_comp = hybrid_attention(
            q_BSHC,
            kv_ext_BXC,
            local_shard(self.attn_sink),
            self.window,
            comp,
            sees_previous=self.seq.has_previous,
            first_key_BS=None if docs is None else docs.first_token_BS,
        )
        o_BSHC = apply_rope(o_BSHC, cos.unsqueeze(-2), sin.unsqueeze(-2), inverse=True)
        aux = AttentionAux()
        if index_scores is not None and index_scores.requires_grad:
            aux.indexer_loss = self._indexer_loss(p_comp, index_scores, comp)
        return self._project_out(o_BSHC), aux

    def _queries_and_kv(self, x_BSD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """(query latent [B, S, R], rotated queries [B, S, H, C], the rotated K=V entry [B, S, C])."""
        B, S, _ = x_BSD.shape
        H, c = self.local_heads, self.head_dim
        qlat_BSR = self.q_norm(self.wq_a(x_BSD))
        q_BSHC = unweighted_rms_norm(self.wq_b(qlat_BSR).view(B, S, H, c), self.eps)
        q_BSHC = apply_rope(q_BSHC, cos.unsqueeze(-2), sin.unsqueeze(-2))
        kv_BSC = apply_rope(self.kv_norm(self.wkv(x_BSD)), cos, sin)
        return qlat_BSR, q_BSHC, kv_BSC

    def _fill_cache(self, lc: kv_cache.LayerStep, x_BSD, kv_BSC, comp: CompressedKeys | None, index_keys) -> None:
        kv_cache.prefill_window(lc, kv_BSC)
        if comp is not None:
            kv_cache.prefill_compressor(lc, lc.cache.compressed, self.compressor, x_BSD, comp.kv_BTC)
        if index_keys is not None:
            kv_cache.prefill_compressor(lc, lc.cache.index, self.indexer.compressor, x_BSD, index_keys)

    def decode(self, x_R1D: torch.Tensor, lc: kv_cache.LayerStep) -> torch.Tensor:
        """One new token per row at `lc.step.positions_R`, through the layer's cache (extended with it)."""
        R = x_R1D.shape[0]
        t_R1 = lc.step.positions_R.view(R, 1)
        cos, sin = rope_cos_sin(self.freqs, t_R1)
        qlat_R1R, q_R1HC, kv_R1C = self._queries_and_kv(x_R1D, cos, sin)
        window_RWC, window_hidden_RW = kv_cache.append_window(lc, kv_R1C[:, 0])
        comp_RKC, comp_hidden_RK = None, None
        if self.layer_type != "swa":
            x_RD = x_R1D[:, 0]
            comp_RKC, comp_hidden_RK = kv_cache.append_compressor(
                lc, lc.cache.compressed, self.compressor, x_RD, self.freqs
            )
            if self.layer_type == "csa":
                keys_RTK, _ = kv_cache.append_compressor(lc, lc.cache.index, self.indexer.compressor, x_RD, self.freqs)
                if self.indexer_mode == "sparse":
                    scores_R1T = self.indexer.scores(x_R1D, qlat_R1R, cos, sin, keys_RTK)
                    picks_RK = select_topk(scores_R1T, comp_hidden_RK.unsqueeze(1), self.indexer.topk)[:, 0]
                    comp_RKC = comp_RKC.gather(
                        1, picks_RK.clamp_min(0).unsqueeze(-1).expand(-1, -1, comp_RKC.shape[-1])
                    )
                    comp_hidden_RK = picks_RK < 0
        o_RHC = decode_attention(
            q_R1HC[:, 0], window_RWC, window_hidden_RW, comp_RKC, comp_hidden_RK, local_shard(self.attn_sink)
        )
        o_R1HC = apply_rope(o_RHC.unsqueeze(1), cos.unsqueeze(-2), sin.unsqueeze(-2), inverse=True)
        return self._project_out(o_R1HC)

    def _compressed_keys(self, x_BSD: torch.Tensor, positions: torch.Tensor, docs: Documents | None) -> CompressedKeys:
        entries_BTC = self.compressor(x_BSD, self.freqs, self.seq, docs)
        if docs is None:
            return CompressedKeys(entries_BTC, visible_entries(positions, self.ratio))
        blocks = docs.blocks(self.ratio)
        return CompressedKeys(entries_BTC, blocks.end_visible_BS, first_visible_BS=blocks.first_visible_BS)

    def _want_kl(self) -> bool:
        return self.training and self.indexer_kl

    def _project_out(self, o_BSHC: torch.Tensor) -> torch.Tensor:
        """Grouped low-rank output: each of g head groups gets its own d_g map, then one map to d."""
        B, S = o_BSHC.shape[:2]
        g = self.local_o_groups
        grouped_BSGI = o_BSHC.reshape(B, S, g, -1)
        wa_GOI = local_shard(self.wo_a.weight).view(g, self.o_lora_rank, -1)
        mid_BSGO = torch.einsum("bsgi,goi->bsgo", grouped_BSGI, wa_GOI)
        return self.wo_b(mid_BSGO.flatten(2))

    def _indexer_loss(self, p_comp: torch.Tensor, scores_BST: torch.Tensor, comp: CompressedKeys) -> torch.Tensor:
        if self.sum_over_head_shards is not None:  # the teacher is the mass of ALL heads, not only the local ones
            p_comp = self.sum_over_head_shards(p_comp.detach().sum(2, keepdim=True))
        if comp.topk_BSK is None:
            return kl_loss(p_comp, scores_BST, ~comp.hidden().expand_as(scores_BST), self.seq)
        idx = comp.topk_BSK
        student = torch.gather(scores_BST, -1, idx.clamp_min(0))
        return kl_loss(p_comp, student, idx >= 0, self.seq)
