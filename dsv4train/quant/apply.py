"""`apply_precision(model, precision_cfg)`: turn a plain DSV4Model into its FP8 / FP8+FP4 training form from
outside, without touching model code (arch ref §7.1, §7.2).

FP8 (E4M3, block scales) — the linears the reference stores in FP8:
    attention wq_a, wq_b, wkv, wo_b; indexer wq_b; shared-expert w1/w2/w3; MTP e_proj/h_proj;
    routed experts w1/w2/w3 (FP4 QAT on top with `fp4_experts`).
High precision (fp32 master, compute dtype in the GEMM) — as in the reference:
    embed, head, router gate, every RMSNorm, mHC (hc_*), attn_sink, compressor and indexer-compressor
    wkv/wgate/ape, indexer weights_proj, attention core and softmax.
    wo_a too: the model uses it through its `.weight` in an einsum inside `Attention._project_out`, so its
    activation operand cannot be quantised from outside; the reference itself dequantises wo_a to BF16
    (convert.py), so we keep it there rather than quantise only half of that GEMM.

Modules are replaced by subclasses holding the same Parameter objects, so state-dict keys, the optimizer
(built before or after) and checkpoints are unchanged; loading a bf16/fp32 checkpoint into it just works.
"""

from __future__ import annotations

import math

from torch import nn

from dsv4train.config.errors import ConfigError
from dsv4train.config.pretrain import PrecisionConfig
from dsv4train.models.moe import Experts
from dsv4train.quant.modules import FP8Experts, FP8Linear

FP8_LINEARS = (
    "attn.wq_a",
    "attn.wq_b",
    "attn.wkv",
    "attn.wo_b",
    "attn.indexer.wq_b",
    "shared_experts.w1",
    "shared_experts.w2",
    "shared_experts.w3",
    "e_proj",
    "h_proj",
)


def _is_fp8_linear(name: str) -> bool:
    return any(name == s or name.endswith("." + s) for s in FP8_LINEARS)


def _block_fit(name: str, dims: dict[str, int], block: int) -> None:
    """ConfigError (a ValueError) naming the layer when a dim is not a multiple of the FP8 block, with a block that
    would fit."""
    for what, n in dims.items():
        if n % block:
            fit = 2 ** min(int(math.log2(block)), *((d & -d).bit_length() - 1 for d in dims.values()))
            raise ConfigError(
                f"{name}: {what} {n} is not a multiple of the FP8 block {block}; use "
                f"precision.fp8_block={fit} or a model dim divisible by {block}"
            )


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def apply_precision(model: nn.Module, cfg: PrecisionConfig) -> nn.Module:
    """Swap the FP8 linears and the routed experts in place (no-op unless cfg.fp8); returns the model.

    backend `emulated`: FP8Linear / FP8Experts (exact fake-quant, any device). backend `te`: the dense FP8
    linears become transformer-engine Linears (blockwise FP8 recipe); the routed experts keep the emulated
    path, since their grouped GEMM is ours. Raises ValueError naming the layer if a dim does not tile."""
    if not cfg.fp8:
        return model
    make_linear = None
    if cfg.backend == "te":
        from dsv4train.quant.te_backend import require_te, te_linear

        require_te()  # fail before touching the model
        make_linear = te_linear
    fp4 = cfg.fp4_block if cfg.fp4_experts else None
    for name, m in list(model.named_modules()):
        if isinstance(m, (FP8Linear, FP8Experts)):
            continue
        if isinstance(m, nn.Linear) and _is_fp8_linear(name):
            _block_fit(name, {"in_features": m.in_features, "out_features": m.out_features}, cfg.fp8_block)
            new = make_linear(m) if make_linear else FP8Linear(m, cfg.fp8_block)
            _set_submodule(model, name, new)
        elif isinstance(m, Experts):
            E, inter, dim = m.w1.shape
            _block_fit(f"{name}.w1/w2/w3", {"dim": dim, "moe_inter_dim": inter}, cfg.fp8_block)
            if fp4 is not None:
                _block_fit(f"{name}.w1/w2/w3 (FP4)", {"dim": dim, "moe_inter_dim": inter}, fp4)
            _set_submodule(model, name, FP8Experts(m, cfg.fp8_block, fp4))
    return model


def describe_precision(model: nn.Module) -> dict[str, str]:
    """Module name -> 'fp8' / 'fp8+fp4' / 'te-fp8' for every quantised module (for logs and tests)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, FP8Experts):
            out[name] = "fp8+fp4" if m.fp4_block else "fp8"
        elif isinstance(m, FP8Linear):
            out[name] = "fp8"
        elif type(m).__name__ == "TELinear":
            out[name] = "te-fp8"
    return out
