"""Model configuration: every architectural default lives here, checked in __post_init__.

Field names follow the official DeepSeek-V4 `inference/config.json` (ModelArgs) where one exists, so a
released config maps onto this one by renaming only. See ../shared/reference/dsv4-architecture.md §1.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dsv4train.config.errors import require, require_ranges

LAYER_TYPES = ("swa", "csa", "hca")
INDEXER_MODES = ("dense", "sparse")
# The allowed range of every numeric field ("(0, inf)": > 0; finite numbers only). tests/unit/test_bad_input.py
# sets every int and float field of ModelConfig to -1 (and NaN, inf) and expects a ConfigError naming it.
RANGES = {
    "vocab_size": "(0, inf)",
    "dim": "(0, inf)",
    "n_heads": "(0, inf)",
    "head_dim": "(0, inf)",
    "rope_head_dim": "(0, inf)",
    "q_lora_rank": "(0, inf)",
    "o_groups": "(0, inf)",
    "o_lora_rank": "(0, inf)",
    "window_size": "(0, inf)",
    "csa_ratio": "(0, inf)",
    "hca_ratio": "(0, inf)",
    # rope: base^(-2i/d) falls with i only for a base > 1 (YaRN's correction range divides by log(base)); YaRN
    # stretches by factor >= 1 (1: none), original_seq_len 0 turns it off, and its beta_* are rotation counts > 0
    "rope_theta": "(1, inf)",
    "compress_rope_theta": "(1, inf)",
    "rope_factor": "[1, inf)",
    "original_seq_len": "[0, inf)",
    "beta_fast": "(0, inf)",
    "beta_slow": "(0, inf)",
    "index_n_heads": "[0, inf)",
    "index_head_dim": "[0, inf)",
    "index_topk": "[0, inf)",  # > 0 with csa layers
    "n_routed_experts": "(0, inf)",
    "n_shared_experts": "[0, 1]",
    "n_activated_experts": "(0, inf)",
    "moe_inter_dim": "(0, inf)",
    "route_scale": "(0, inf)",
    "n_hash_layers": "[0, inf)",
    "swiglu_limit": "[0, inf)",  # 0 turns the clamp off
    "hc_mult": "(0, inf)",
    "hc_sinkhorn_iters": "(0, inf)",
    "hc_eps": "(0, 1)",
    "norm_eps": "(0, 1)",
    "n_mtp_layers": "[0, 1]",
    "max_seq_len": "(0, inf)",
    "init_std": "(0, 1]",
    "hc_init_std": "[0, 1]",
    "hc_init_scale": "[0, 1]",
}


@dataclass(frozen=True)
class ModelConfig:
    """One DeepSeek-V4-style model. `layer_types[i]` picks the attention of layer i:
    `swa` (sliding window only), `csa` (window + overlapping compression at `csa_ratio` with the lightning
    indexer) or `hca` (window + non-overlapping compression at `hca_ratio`, dense)."""

    name: str = "custom"
    vocab_size: int = 129280
    dim: int = 4096
    layer_types: list[str] = field(default_factory=lambda: ["swa", "swa"] + ["csa", "hca"] * 20 + ["csa"])
    # attention
    n_heads: int = 64
    head_dim: int = 512
    rope_head_dim: int = 64
    q_lora_rank: int = 1024
    o_groups: int = 8
    o_lora_rank: int = 1024
    window_size: int = 128
    csa_ratio: int = 4
    hca_ratio: int = 128
    # rope: `rope_theta` for swa layers; `compress_rope_theta` + YaRN for csa/hca layers
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    rope_factor: float = 16.0
    original_seq_len: int = 65536  # 0 turns YaRN off
    beta_fast: int = 32
    beta_slow: int = 1
    # lightning indexer (csa layers)
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    indexer_mode: str = "sparse"  # dense: attend to every visible compressed entry; sparse: top-k
    # MoE
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    n_activated_experts: int = 6
    moe_inter_dim: int = 2048
    route_scale: float = 1.5
    n_hash_layers: int = 3
    swiglu_limit: float = 10.0
    # mHC
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    # misc
    norm_eps: float = 1e-6
    n_mtp_layers: int = 1
    max_seq_len: int = 4096
    # init (not published for V4; see docs/architecture.md)
    init_std: float = 0.006
    hc_init_std: float = 0.02
    hc_init_scale: float = 0.01

    def __post_init__(self) -> None:
        def need(ok: bool, key: str, msg: str) -> None:
            require(ok, f"model.{key}", msg)

        object.__setattr__(self, "layer_types", list(self.layer_types))  # a tuple from Python callers; frozen: set once
        require_ranges(self, "model", RANGES)
        need(len(self.layer_types) > 0, "layer_types", "needs at least one layer")
        bad = [t for t in self.layer_types if t not in LAYER_TYPES]
        need(not bad, "layer_types", f"entries must be one of {LAYER_TYPES}, got {bad}")
        need(self.rope_head_dim % 2 == 0, "rope_head_dim", f"must be even and > 0, got {self.rope_head_dim}")
        need(
            self.rope_head_dim <= self.head_dim,
            "rope_head_dim",
            f"({self.rope_head_dim}) cannot exceed head_dim ({self.head_dim})",
        )
        need(
            self.n_heads % self.o_groups == 0,
            "o_groups",
            f"n_heads ({self.n_heads}) must be divisible by o_groups ({self.o_groups})",
        )
        need(
            self.n_activated_experts <= self.n_routed_experts,
            "n_activated_experts",
            f"top-k ({self.n_activated_experts}) cannot exceed n_routed_experts ({self.n_routed_experts})",
        )
        need(
            0 <= self.n_hash_layers <= self.n_layers,
            "n_hash_layers",
            f"must be in [0, n_layers={self.n_layers}], got {self.n_hash_layers}",
        )
        need(self.n_shared_experts in (0, 1), "n_shared_experts", "V4 has 0 or 1 shared expert")
        need(self.csa_ratio != self.hca_ratio, "hca_ratio", "must differ from csa_ratio")
        need(self.indexer_mode in INDEXER_MODES, "indexer_mode", f"must be one of {INDEXER_MODES}")
        need(self.n_mtp_layers in (0, 1), "n_mtp_layers", "only MTP depth 0 or 1 is supported")
        need(
            self.beta_fast > self.beta_slow,
            "beta_fast",
            f"({self.beta_fast}) must exceed beta_slow ({self.beta_slow}): YaRN blends between the two",
        )
        if "csa" in self.layer_types:
            need(self.index_n_heads > 0, "index_n_heads", "must be > 0 when csa layers exist")
            need(self.index_topk > 0, "index_topk", "must be > 0 when csa layers exist")
            need(
                self.index_head_dim >= self.rope_head_dim,
                "index_head_dim",
                f"({self.index_head_dim}) must be >= rope_head_dim ({self.rope_head_dim})",
            )

    @property
    def n_layers(self) -> int:
        return len(self.layer_types)

    def compress_ratio(self, layer_type: str) -> int:
        """0 for swa, else the number of tokens pooled into one compressed entry."""
        return {"swa": 0, "csa": self.csa_ratio, "hca": self.hca_ratio}[layer_type]

    @property
    def compress_ratios(self) -> list[int]:
        """The official per-layer list (0 / csa_ratio / hca_ratio), without the MTP entry."""
        return [self.compress_ratio(t) for t in self.layer_types]
