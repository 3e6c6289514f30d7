"""Small model configs for tests: every layer type, hash layers, several hc_mult values."""

from __future__ import annotations

from dsv4train.config.model import ModelConfig
from dsv4train.config.pretrain import PrecisionConfig

TINY_BASE = dict(
    vocab_size=300,
    dim=64,
    n_heads=4,
    head_dim=32,
    rope_head_dim=8,
    q_lora_rank=32,
    o_groups=2,
    o_lora_rank=16,
    window_size=8,
    csa_ratio=4,
    hca_ratio=8,
    compress_rope_theta=40000.0,
    rope_factor=4.0,
    original_seq_len=64,
    index_n_heads=2,
    index_head_dim=16,
    index_topk=3,
    n_routed_experts=4,
    n_activated_experts=2,
    moe_inter_dim=48,
    n_hash_layers=1,
    n_mtp_layers=1,
)


# Sparse top-k compared with another implementation (transformers, a float64 reference) that uses torch.topk: ours
# breaks equal index scores towards the earlier entry (models/indexer.py select_topk), torch.topk in an unspecified
# order. With tiny's 2 index heads exact ties are common (a score is 0 whenever every head's ReLU is); with 16 a tie
# needs 16 zero ReLUs (2^-16 per score), and the fixed seeds of those tests have none at the cut.
TIE_FREE_INDEX_HEADS = 16


def tiny_config(layer_types=("swa", "csa", "hca", "csa"), **overrides) -> ModelConfig:
    kw = {**TINY_BASE, **overrides}
    kw["n_hash_layers"] = min(kw["n_hash_layers"], len(layer_types))
    return ModelConfig(layer_types=list(layer_types), **kw)


# The README's quantised precisions with blocks that tile `tiny_config` on every rank of the equivalence tests:
# tp2 splits the shared expert's 48 channels into 24 and wo_b's 32 inputs into 16, and the FP8 weight-gradient tiles
# run along tokens (rows of 16 or 24, cp2's 8-token halves), so FP8 tiles are 8; FP4 sub-blocks of 4 give two
# per FP8 block (V4 has four 32s in 128).
TINY_FP8 = PrecisionConfig(name="fp8", fp8=True, fp8_block=8, fp4_block=4)
TINY_FP8_FP4 = PrecisionConfig(name="fp8_fp4", fp8=True, fp4_experts=True, fp8_block=8, fp4_block=4)

# `dsv4 pretrain` overrides that make a toy run take seconds: short rows, small batches, early evaluation and the
# dense-to-sparse indexer switch inside the first steps (the end-to-end tests' runs).
FAST_PRETRAIN_OVERRIDES = (
    "model=toy",
    "train.seq_len=64",
    "train.micro_batch_size=2",
    "train.eval_every=4",
    "train.eval_batches=2",
    "train.dense_indexer_steps=2",
    "optim.warmup_steps=2",
    "train.progress_bar=false",
)
