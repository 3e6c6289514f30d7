"""Grouped expert GEMM: rows of `x` sorted by expert, `offsets` = cumulative row counts per expert.

`grouped_linear(x [N, in], w [E, out, in], offsets [E])` = concat_e x_e @ w_e^T. Uses `torch._grouped_mm` when
the build supports it (its own autograd fails on CPU in torch 2.13, so the backward is written out here, also
as grouped GEMMs); otherwise a loop over experts (correct, slower)."""

from __future__ import annotations

import torch

_HAS_GROUPED_MM = hasattr(torch, "_grouped_mm")


class _GroupedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, offsets):
        ctx.save_for_backward(x, w, offsets)
        return torch._grouped_mm(x, w.transpose(-2, -1), offs=offsets)

    @staticmethod
    def backward(ctx, grad_out):
        x, w, offsets = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_x = torch._grouped_mm(grad_out, w, offs=offsets) if ctx.needs_input_grad[0] else None
        grad_w = torch._grouped_mm(grad_out.t(), x, offs=offsets) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w, None


def _looped(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    bounds = [0] + offsets.tolist()
    return torch.cat([x[a:b] @ w[e].t() for e, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))], dim=0)


def _grouped_mm_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    """torch._grouped_mm needs fp32/bf16 and rows that are whole multiples of 16 bytes."""
    if not _HAS_GROUPED_MM or x.dtype not in (torch.float32, torch.bfloat16) or x.shape[0] == 0:
        return False
    per16 = 16 // x.element_size()
    return all(n % per16 == 0 for n in (w.shape[-1], w.shape[-2]))


def grouped_linear(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, use_grouped_mm: bool = True):
    if w.dtype != x.dtype:  # under autocast x is bf16 while the fp32 master weights are not cast for us
        w = w.to(x.dtype)
    if use_grouped_mm and _grouped_mm_ok(x, w):
        return _GroupedLinear.apply(x.contiguous(), w, offsets.to(torch.int32))
    return _looped(x, w, offsets)
