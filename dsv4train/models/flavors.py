"""The one registry of model flavors. `toy` trains on CPU in seconds; `flash` and `pro` are the released
sizes (build them on the meta device only)."""

from __future__ import annotations

from dataclasses import asdict, replace

from dsv4train.config.errors import ConfigError
from dsv4train.config.model import ModelConfig

_FLAVORS: dict[str, ModelConfig] = {
    # CPU-sized. Every layer type, a hash layer, 4 mHC streams, MTP; HCA ratio cut to 16 so it fires on short
    # inputs and the indexer's top-k (8) is well below the number of compressed entries at seq 256.
    "toy": ModelConfig(
        name="toy",
        vocab_size=4096,
        dim=64,
        layer_types=["swa", "csa", "hca", "csa"],
        n_heads=4,
        head_dim=32,
        rope_head_dim=8,
        q_lora_rank=32,
        o_groups=2,
        o_lora_rank=16,
        window_size=16,
        csa_ratio=4,
        hca_ratio=16,
        compress_rope_theta=40000.0,
        rope_factor=4.0,
        original_seq_len=1024,
        index_n_heads=2,
        index_head_dim=16,
        index_topk=8,
        n_routed_experts=8,
        n_activated_experts=2,
        moe_inter_dim=64,
        n_hash_layers=1,
        route_scale=1.5,
        max_seq_len=256,
    ),
    "tiny": ModelConfig(
        name="tiny",
        vocab_size=8192,
        dim=128,
        layer_types=["swa", "swa", "csa", "hca", "csa", "hca"],
        n_heads=4,
        head_dim=64,
        rope_head_dim=16,
        q_lora_rank=64,
        o_groups=2,
        o_lora_rank=64,
        window_size=32,
        csa_ratio=4,
        hca_ratio=32,
        compress_rope_theta=40000.0,
        rope_factor=4.0,
        original_seq_len=2048,
        index_n_heads=4,
        index_head_dim=32,
        index_topk=16,
        n_routed_experts=8,
        n_activated_experts=2,
        moe_inter_dim=128,
        n_hash_layers=2,
        max_seq_len=512,
    ),
    "small": ModelConfig(
        name="small",
        vocab_size=32768,
        dim=512,
        layer_types=["swa", "swa"] + ["csa", "hca"] * 5,
        n_heads=8,
        head_dim=128,
        rope_head_dim=32,
        q_lora_rank=256,
        o_groups=4,
        o_lora_rank=256,
        window_size=64,
        csa_ratio=4,
        hca_ratio=64,
        compress_rope_theta=160000.0,
        rope_factor=4.0,
        original_seq_len=4096,
        index_n_heads=8,
        index_head_dim=64,
        index_topk=64,
        n_routed_experts=16,
        n_activated_experts=4,
        moe_inter_dim=256,
        n_hash_layers=2,
        max_seq_len=2048,
    ),
    # One-GPU reduced flavor (~1B total), following §14 of the architecture reference.
    "1b": ModelConfig(
        name="1b",
        vocab_size=129280,
        dim=1024,
        layer_types=["swa", "swa"] + ["csa", "hca"] * 5,
        n_heads=16,
        head_dim=256,
        rope_head_dim=32,
        q_lora_rank=512,
        o_groups=4,
        o_lora_rank=512,
        window_size=64,
        csa_ratio=4,
        hca_ratio=128,
        index_n_heads=16,
        index_head_dim=64,
        index_topk=64,
        n_routed_experts=32,
        n_activated_experts=4,
        moe_inter_dim=512,
        n_hash_layers=3,
        max_seq_len=4096,
    ),
    "flash": ModelConfig(
        name="flash",
        vocab_size=129280,
        dim=4096,
        layer_types=["swa", "swa"] + ["csa", "hca"] * 20 + ["csa"],
        n_heads=64,
        head_dim=512,
        rope_head_dim=64,
        q_lora_rank=1024,
        o_groups=8,
        o_lora_rank=1024,
        window_size=128,
        index_n_heads=64,
        index_head_dim=128,
        index_topk=512,
        n_routed_experts=256,
        n_activated_experts=6,
        moe_inter_dim=2048,
        route_scale=1.5,
        n_hash_layers=3,
        max_seq_len=1048576,
    ),
    "pro": ModelConfig(
        name="pro",
        vocab_size=129280,
        dim=7168,
        layer_types=["hca", "hca"] + ["csa", "hca"] * 29 + ["csa"],
        n_heads=128,
        head_dim=512,
        rope_head_dim=64,
        q_lora_rank=1536,
        o_groups=16,
        o_lora_rank=1024,
        window_size=128,
        index_n_heads=64,
        index_head_dim=128,
        index_topk=1024,
        n_routed_experts=384,
        n_activated_experts=6,
        moe_inter_dim=3072,
        route_scale=2.5,
        n_hash_layers=3,
        max_seq_len=1048576,
    ),
}


def flavor_names() -> list[str]:
    return list(_FLAVORS)


def get_flavor(name: str, **overrides) -> ModelConfig:
    """A fresh copy of a registered flavor, with field overrides applied (and re-validated)."""
    if name not in _FLAVORS:
        raise ConfigError(f"model.name: unknown flavor {name!r}; choose one of {flavor_names()}")
    return replace(_FLAVORS[name], **overrides)


def flavor_yaml(name: str) -> str:
    """The flavor as a Hydra `dsv4train/conf/model/<name>.yaml` (every field, lists inline)."""
    import yaml

    header = (
        f"# model={name}: generated from dsv4train/models/flavors.py; regenerate with\n"
        "#   python -m dsv4train.models.flavors dsv4train/conf/model\n"
    )
    return header + yaml.safe_dump(asdict(get_flavor(name)), default_flow_style=None, sort_keys=False, width=120)


if __name__ == "__main__":  # python -m dsv4train.models.flavors dsv4train/conf/model
    import sys
    from pathlib import Path

    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    for flavor in flavor_names():
        (out / f"{flavor}.yaml").write_text(flavor_yaml(flavor))
        print(f"wrote {out / flavor}.yaml")
