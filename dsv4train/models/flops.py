"""Efficiency accounting from a ModelConfig alone: parameter counts, training FLOPs per token (for MFU), KV-cache
bytes and the decode comparison against DeepSeek-V3.2 (arch ref §10). Formulas are in docs/efficiency.md.

Conventions (they reproduce the published 284B/13B and 1.6T/49B at the precision they are published with):
- `total` counts the main model without the MTP module, and includes the router buffers (`bias`, `tid2eid`),
  which the model registers as buffers but the checkpoint stores like weights. `total_with_mtp` equals
  `sum(parameters) + sum(buffers)` of `DSV4Model(cfg)`.
- `active` counts the parameters one token touches in the main model, except the input-embedding lookup:
  attention (with compressor and indexer), router, `n_activated_experts` routed experts, the shared expert, mHC,
  norms and the output head. Buffers are not active (the hash table is a lookup, like the embedding).
- FLOPs count a multiply-add as 2 and only causally useful work (no masked-out scores)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from dsv4train.config.model import ModelConfig


# ---------------------------------------------------------------------------------------------- parameters
@dataclass(frozen=True)
class ParamCounts:
    total: int  # main model incl. router buffers, excl. MTP
    active: int  # per token, excl. input embedding, buffers and MTP
    embedding: int
    head: int
    mtp: int  # the MTP module (its head is the shared one, counted in `head`)
    mtp_active: int  # per token in the MTP module, buffers excluded
    router_buffers: int  # router `bias` + hash `tid2eid` entries, main model and MTP
    breakdown: dict[str, int]  # main model by component; sums to `total`

    @property
    def total_with_mtp(self) -> int:
        return self.total + self.mtp


def _compressor(cfg: ModelConfig, head_dim: int, ratio: int, overlap: bool) -> int:
    width = (2 if overlap else 1) * head_dim
    return 2 * cfg.dim * width + ratio * width + head_dim  # wkv, wgate, ape, norm


def _block(cfg: ModelConfig, layer_type: str, hashed: bool) -> dict[str, int]:
    """Total parameters (and buffers, under `router_buffers`) of one block, by component."""
    d, H, c, n = cfg.dim, cfg.n_heads, cfg.head_dim, cfg.hc_mult
    expert = 3 * d * cfg.moe_inter_dim
    parts = {
        "attention": (
            d * cfg.q_lora_rank
            + cfg.q_lora_rank
            + cfg.q_lora_rank * H * c
            + d * c
            + c
            + H * c * cfg.o_lora_rank
            + cfg.o_groups * cfg.o_lora_rank * d
            + H
        ),
        "compressor": 0,
        "indexer": 0,
        "router": cfg.n_routed_experts * d,
        "router_buffers": cfg.vocab_size * cfg.n_activated_experts if hashed else cfg.n_routed_experts,
        "routed_experts": cfg.n_routed_experts * expert,
        "shared_expert": cfg.n_shared_experts * expert,
        "mhc": 2 * ((2 + n) * n * n * d + (2 + n) * n + 3),
        "norms": 2 * d,
    }
    if layer_type != "swa":
        parts["compressor"] = _compressor(cfg, c, cfg.compress_ratio(layer_type), overlap=layer_type == "csa")
    if layer_type == "csa":
        parts["indexer"] = (
            cfg.q_lora_rank * cfg.index_n_heads * cfg.index_head_dim
            + d * cfg.index_n_heads
            + _compressor(cfg, cfg.index_head_dim, cfg.csa_ratio, overlap=True)
        )
    return parts


def _block_active(cfg: ModelConfig, parts: dict[str, int]) -> int:
    routed_active = cfg.n_activated_experts * 3 * cfg.dim * cfg.moe_inter_dim
    return sum(parts.values()) - parts["router_buffers"] - parts["routed_experts"] + routed_active


def param_counts(cfg: ModelConfig) -> ParamCounts:
    d, V, n = cfg.dim, cfg.vocab_size, cfg.hc_mult
    hc_head = n * n * d + n + 1
    breakdown = {"embedding": V * d, "head": V * d, "norms": d, "mhc": hc_head}
    active = V * d + d + hc_head
    for i, layer_type in enumerate(cfg.layer_types):
        parts = _block(cfg, layer_type, hashed=i < cfg.n_hash_layers)
        active += _block_active(cfg, parts)
        for key, value in parts.items():
            breakdown[key] = breakdown.get(key, 0) + value
    mtp_parts = _block(cfg, "swa", hashed=False)
    mtp_extra = 2 * d * d + 3 * d + hc_head  # e_proj, h_proj, enorm/hnorm/norm, own final collapse
    mtp = cfg.n_mtp_layers * (sum(mtp_parts.values()) + mtp_extra)
    mtp_active = cfg.n_mtp_layers * (_block_active(cfg, mtp_parts) + mtp_extra)
    return ParamCounts(
        total=sum(breakdown.values()),
        active=active,
        embedding=V * d,
        head=V * d,
        mtp=mtp,
        mtp_active=mtp_active,
        router_buffers=breakdown["router_buffers"] + cfg.n_mtp_layers * mtp_parts["router_buffers"],
        breakdown=breakdown,
    )


# ---------------------------------------------------------------------------------------------- attention FLOPs
def _sum_min(cap: int, S: int) -> int:
    """sum_{n=1..S} min(cap, n)."""
    return S * (S + 1) // 2 if S <= cap else cap * (cap + 1) // 2 + (S - cap) * cap


def _sum_floor(m: int, S: int) -> int:
    """sum_{n=1..S} floor(n / m)."""
    q, r = divmod(S, m)
    return m * q * (q - 1) // 2 + q * (r + 1)


def _sum_floor_capped(m: int, cap: int, S: int) -> int:
    """sum_{n=1..S} min(cap, floor(n / m)); floor(n/m) reaches cap at n = cap*m."""
    knee = cap * m
    return _sum_floor(m, min(S, knee)) + cap * max(0, S - knee)


def _attention_sums(cfg: ModelConfig, layer_type: str, S: int) -> tuple[int, int]:
    """(main attention, indexer) forward FLOPs summed over the queries that see n = 1..S tokens."""
    per_entry = 4 * cfg.n_heads * cfg.head_dim  # QK and AV over head_dim-wide K=V entries
    entries = _sum_min(cfg.window_size, S)
    indexer = 0
    if layer_type == "hca":
        entries += _sum_floor(cfg.hca_ratio, S)
    elif layer_type == "csa":
        visible = _sum_floor(cfg.csa_ratio, S)
        dense = cfg.indexer_mode == "dense"
        entries += visible if dense else _sum_floor_capped(cfg.csa_ratio, cfg.index_topk, S)
        indexer = 2 * cfg.index_n_heads * cfg.index_head_dim * visible  # scores every visible entry
    return per_entry * entries, indexer


# ---------------------------------------------------------------------------------------------- FLOPs per token
@dataclass(frozen=True)
class FlopsBreakdown:
    linear: float
    attention: float
    indexer: float

    @property
    def total(self) -> float:
        return self.linear + self.attention + self.indexer


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward + backward FLOPs per trained token at sequence length `seq_len`, for MFU:

        6 * N_matmul + 3 * mean_{n=1..seq_len} A(n)

    N_matmul is `active` plus, with MTP, the MTP block, its h_proj on every mHC stream and the second pass
    through the shared head; A(n) is the attention + indexer forward FLOPs of a query that sees n tokens."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    counts = param_counts(cfg)
    matmul = counts.active
    if cfg.n_mtp_layers:
        matmul += counts.mtp_active + counts.head + (cfg.hc_mult - 1) * cfg.dim * cfg.dim
    layers = list(cfg.layer_types) + ["swa"] * cfg.n_mtp_layers
    attention = sum(sum(_attention_sums(cfg, t, seq_len)) for t in layers)
    return 6 * matmul + 3 * attention / seq_len


def decode_flops_per_token(cfg: ModelConfig, context: int) -> FlopsBreakdown:
    """Forward FLOPs of one new token that sees `context` tokens (itself included), main model only."""
    if context < 1:
        raise ValueError(f"context must be >= 1, got {context}")
    attention = indexer = 0
    for t in cfg.layer_types:
        a_now, i_now = _attention_sums(cfg, t, context)
        a_before, i_before = _attention_sums(cfg, t, context - 1)
        attention += a_now - a_before
        indexer += i_now - i_before
    return FlopsBreakdown(2 * param_counts(cfg).active, attention, indexer)


# ---------------------------------------------------------------------------------------------- KV cache
def kv_entry_bytes(cfg: ModelConfig) -> int:
    """One main KV entry: FP8 non-RoPE dims, BF16 RoPE dims, one UE8M0 scale per 64 FP8 dims padded to 8 bytes
    (vLLM's layout; 584 B at head_dim 512)."""
    return (
        (cfg.head_dim - cfg.rope_head_dim)
        + 2 * cfg.rope_head_dim
        + 8 * math.ceil(math.ceil((cfg.head_dim - cfg.rope_head_dim) / 64) / 8)
    )


def index_key_bytes(cfg: ModelConfig) -> int:
    """One FP4 indexer key: half a byte per dim plus one scale byte per 32 dims (68 B at 128 dims)."""
    return cfg.index_head_dim // 2 + math.ceil(cfg.index_head_dim / 32)


@dataclass(frozen=True)
class KVBytesPerToken:
    per_layer_type: dict[str, float]  # bytes one layer of that type adds per context token (window excluded)
    total: float  # summed over the main model's layers
    window: int  # constant bytes of all sliding windows once full


def kv_cache_bytes_per_token(cfg: ModelConfig) -> KVBytesPerToken:
    e, e_idx = kv_entry_bytes(cfg), index_key_bytes(cfg)
    per_type = {"swa": 0.0, "csa": (e + e_idx) / cfg.csa_ratio, "hca": e / cfg.hca_ratio}
    return KVBytesPerToken(per_type, sum(per_type[t] for t in cfg.layer_types), cfg.n_layers * cfg.window_size * e)


def kv_cache_bytes(cfg: ModelConfig, context: int) -> int:
    """KV cache of one sequence of `context` tokens: windows + compressed entries + indexer keys. Compressor
    carry-over state and the MTP layer are left out."""
    e, e_idx = kv_entry_bytes(cfg), index_key_bytes(cfg)
    total = cfg.n_layers * min(cfg.window_size, context) * e
    for t in cfg.layer_types:
        if t != "swa":
            total += (context // cfg.compress_ratio(t)) * (e + (e_idx if t == "csa" else 0))
    return total


# ---------------------------------------------------------------------------------------------- vs DeepSeek-V3.2
@dataclass(frozen=True)
class DeepSeekV32:
    """The V3.2 baseline of the V4 report's Fig. 1. Shapes from the V3 report (arXiv 2412.19437) and the V3.2
    report (arXiv 2512.02556, DSA indexer); cache entry sizes from vLLM PR #48439. See arch ref §10.2."""

    n_layers: int = 61
    n_heads: int = 128
    kv_lora_rank: int = 512  # absorbed MLA: queries score the 512-dim latent + 64 RoPE dims, values are latent
    rope_head_dim: int = 64
    index_topk: int = 2048
    index_n_heads: int = 64
    index_head_dim: int = 128
    # V3's activated parameters incl. embedding (37.55B, from V3's shapes) minus the 129280 x 7168 embedding.
    # The DSA indexer's own linears (~0.85B) are left out, as in the arch ref.
    matmul_params: float = 37.55e9 - 129280 * 7168
    kv_entry_bytes: int = 656  # 512 FP8 latent + 4 fp32 scales + 64 BF16 RoPE dims
    index_key_bytes: int = 132  # 128 FP8 + one fp32 scale


V32 = DeepSeekV32()


def v32_decode_flops_per_token(context: int, v: DeepSeekV32 = V32) -> FlopsBreakdown:
    qk_av = 2 * v.n_heads * ((v.kv_lora_rank + v.rope_head_dim) + v.kv_lora_rank)
    return FlopsBreakdown(
        2 * v.matmul_params,
        v.n_layers * qk_av * min(v.index_topk, context),
        v.n_layers * 2 * v.index_n_heads * v.index_head_dim * context,
    )


def v32_kv_cache_bytes(context: int, v: DeepSeekV32 = V32) -> int:
    return v.n_layers * (v.kv_entry_bytes + v.index_key_bytes) * context


@dataclass(frozen=True)
class V32Comparison:
    context: int
    flops: FlopsBreakdown
    flops_v32: FlopsBreakdown
    kv_bytes: int
    kv_bytes_v32: int

    @property
    def flops_ratio(self) -> float:
        return self.flops.total / self.flops_v32.total

    @property
    def kv_ratio(self) -> float:
        return self.kv_bytes / self.kv_bytes_v32


def compare_with_v32(cfg: ModelConfig, context: int) -> V32Comparison:
    """Single-token decode FLOPs and KV cache at `context`, against V3.2 (the report's 27%/10% for Pro)."""
    return V32Comparison(
        context,
        decode_flops_per_token(cfg, context),
        v32_decode_flops_per_token(context),
        kv_cache_bytes(cfg, context),
        v32_kv_cache_bytes(context),
    )
