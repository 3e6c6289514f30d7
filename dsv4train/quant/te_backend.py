"""`precision.backend=te`: the dense FP8 linears run as transformer-engine Linears with its blockwise FP8
recipe (`Float8BlockScaling`: 1×128 activation tiles, 128×128 weight blocks, E4M3; Hopper or newer).

transformer_engine is imported only here and only when this backend is selected. The TE module is kept out
of the module tree (not a registered child) and shares the original fp32 `weight` Parameter, so state-dict
keys stay `...wq_a.weight` (no TE `_extra_state`; the blockwise recipe keeps no amax history to lose).
Each call runs inside its own TE autocast region, so the trainer needs no TE-specific context.
Tested only on GPU hosts (tests/unit/test_quant.py, marked `gpu`).
"""

from __future__ import annotations

import torch
from torch import nn

from dsv4train.config.errors import ConfigError
from dsv4train.utils.device import accelerator_name

_INSTALL = (
    "install transformer-engine on a CUDA host (pip install -e '.[gpu]', i.e. transformer-engine[pytorch]) "
    "or use precision.backend=emulated"
)


def require_te():
    """(transformer_engine.pytorch, Float8BlockScaling), or a ConfigError saying what to install or use instead."""
    try:
        import transformer_engine.pytorch as te
        from transformer_engine.common.recipe import Float8BlockScaling
    except ImportError as err:  # not installed, or installed without its CUDA libraries
        raise ConfigError(
            f"precision.backend: te needs transformer_engine, which does not import ({err}); {_INSTALL}"
        ) from err
    if accelerator_name() is None:
        raise ConfigError(f"precision.backend: te needs a CUDA GPU and none is visible; {_INSTALL}")
    return te, Float8BlockScaling


class TELinear(nn.Linear):
    """nn.Linear-compatible wrapper around `te.Linear` that owns the original weight Parameter."""

    def __init__(self, linear: nn.Linear):
        te, recipe_cls = require_te()
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.register_parameter("bias", None)
        if linear.bias is not None:
            raise ValueError("TELinear: biased linears are not used by DSV4Model and are not supported")
        inner = te.Linear(
            self.in_features, self.out_features, bias=False, params_dtype=torch.float32, device=self.weight.device
        )
        inner.weight = self.weight  # share the master weight; TE reads it by name at each call
        object.__setattr__(self, "_te", inner)  # not a child: keeps the state dict and .parameters() unchanged
        self._recipe = recipe_cls()
        self._autocast = (
            (lambda: te.autocast(enabled=True, recipe=self._recipe))
            if hasattr(te, "autocast")
            else (lambda: te.fp8_autocast(enabled=True, fp8_recipe=self._recipe))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._te.weight is not self.weight:  # FSDP swaps in the gathered Parameter before each forward
            self._te.weight = self.weight
        with self._autocast():
            return self._te(x)


def te_linear(linear: nn.Linear) -> nn.Linear:
    return TELinear(linear)
