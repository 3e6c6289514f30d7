"""Drop-in FP8 modules that hold the original fp32 Parameters under their original names.

`FP8Linear` replaces an `nn.Linear`; `FP8Experts` replaces the routed `Experts` (stacked w1/w2/w3). Both are
subclasses of what they replace and re-use the very same Parameter objects, so state-dict keys, optimizer
groups and `isinstance` checks do not change.
"""

from __future__ import annotations

import torch
from torch import nn

from dsv4train.models.moe import Experts, clamped_swiglu
from dsv4train.quant.linear import fp4_fake_quant, fp8_linear


class FP8Linear(nn.Linear):
    """y = fp8_linear(x, W) (+ b): E4M3 operands, 1×B activation tiles, B×B weight blocks, fp32 master W."""

    def __init__(self, linear: nn.Linear, block: int):
        nn.Module.__init__(self)
        self.in_features, self.out_features, self.block = linear.in_features, linear.out_features, block
        self.weight = linear.weight
        self.register_parameter("bias", linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = fp8_linear(x, self.weight, self.block)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fp8_block={self.block}"


class FP8Experts(Experts):
    """Routed experts with FP8 grouped GEMMs (one `fp8_linear` per expert's rows) and, with `fp4_block`, FP4 QAT
    of w1/w2/w3 (E2M1 with 1×fp4_block scales -> E4M3, straight-through to the fp32 master).

    Only `mlp` is replaced: the `dispatch` seam (local, or the all-to-all of dsv4train/parallel/ep.py) is taken
    over from the module replaced and calls this `mlp`, so FP8 experts compose with EP."""

    def __init__(self, experts: Experts, block: int, fp4_block: int | None):
        nn.Module.__init__(self)
        self.limit, self.block, self.fp4_block = experts.limit, block, fp4_block
        self.w1, self.w2, self.w3 = experts.w1, experts.w2, experts.w3
        self.dispatch = experts.dispatch

    def _weight(self, w_ENK: torch.Tensor) -> torch.Tensor:
        return w_ENK if self.fp4_block is None else fp4_fake_quant(w_ENK, self.fp4_block, self.block)

    def _linear(self, x_MK: torch.Tensor, w_NK: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x_MK, w_NK, self.block)

    def _grouped(self, x_MK: torch.Tensor, w_ENK: torch.Tensor, counts: list[int]) -> torch.Tensor:
        outs, start = [], 0
        for e, n in enumerate(counts):
            if n:
                outs.append(self._linear(x_MK[start : start + n], w_ENK[e]))
            start += n
        return torch.cat(outs) if outs else x_MK.new_zeros(0, w_ENK.shape[1])

    def mlp(
        self, xs: torch.Tensor, counts_E: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor
    ) -> torch.Tensor:
        """`Experts.mlp` with quantised GEMMs; `dispatch` (one process or expert-parallel) calls it."""
        counts = counts_E.tolist()
        w1, w2, w3 = self._weight(w1), self._weight(w2), self._weight(w3)
        h = clamped_swiglu(self._grouped(xs, w1, counts), self._grouped(xs, w3, counts), self.limit)
        return self._grouped(h, w2, counts)

    def extra_repr(self) -> str:
        fp4 = f", fp4_block={self.fp4_block}" if self.fp4_block else ""
        return f"experts={self.w1.shape[0]}, fp8_block={self.block}{fp4}"
