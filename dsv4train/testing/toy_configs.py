"""Small model configs for tests: every layer type, hash layers, several hc_mult values."""

from __future__ import annotations

from dsv4train.config.model import ModelConfig

TINY_BASE = dict(
    vocab_size=300, dim=64, n_heads=4, head_dim=32, rope_head_dim=8, q_lora_rank=32, o_groups=2, o_lora_rank=16,
    window_size=8, csa_ratio=4, hca_ratio=8, compress_rope_theta=40000.0, rope_factor=4.0, original_seq_len=64,
    index_n_heads=2, index_head_dim=16, index_topk=3, n_routed_experts=4, n_activated_experts=2, moe_inter_dim=48,
    n_hash_layers=1, n_mtp_layers=1,
)


def tiny_config(layer_types=("swa", "csa", "hca", "csa"), **overrides) -> ModelConfig:
    kw = {**TINY_BASE, **overrides}
    kw["n_hash_layers"] = min(kw["n_hash_layers"], len(layer_types))
    return ModelConfig(layer_types=list(layer_types), **kw)
