"""Emulated FP8 GEMMs with block scaling, and FP4 quantisation-aware weights (arch ref §7.1, §7.2).

`fp8_linear(x, w)` is y = Q_r(x) · Q_b(w)^T, where Q_r quantises per 1×B tile along the GEMM's reduction dim
and Q_b per B×B block (B = `block`, 128 in V3/V4). Every GEMM of the step uses FP8 operands, as in DeepSeek-V3:

    forward  y  = Q_r(x)  · Q_b(w)^T          tiles of x along K (per token, B channels)
    dgrad    dx = Q_r(dy) · Q_b(w)            tiles of dy along N (per token, B output channels)
    wgrad    dw = Q_r(dy^T) · Q_r(x^T)^T      tiles of dy and x along the token dim (B tokens per channel);
                                              a token count that is not a multiple of B gets a shorter last tile

The quantiser's derivative is taken as the identity (straight-through); the gradients land on the fp32
master weight. The emulation dequantises (exact in fp32) and multiplies in fp32, i.e. FP32 accumulation;
the output is in the compute dtype (the autocast dtype when autocast is on, else x's dtype).

FP4 QAT (`fp4_fake_quant`): w -> E2M1 codes with 1×b scales -> losslessly to E4M3 with B×B scales (fp4_fp8.py)
-> ŵ; forward uses ŵ, backward passes the gradient straight to w. Feeding ŵ to `fp8_linear` re-quantises it
to the same values (its B×B scale is S_blk again), so the FP4 weight reaches the GEMM unchanged.
"""

from __future__ import annotations

import torch

from dsv4train.quant.formats import quant_e2m1, quant_e4m3_blocks, quant_e4m3_rows, quant_e4m3_rows_padded
from dsv4train.quant.fp4_fp8 import fp4_to_fp8


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


class _FP8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, block: int) -> torch.Tensor:
        out_dtype = _compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            x_MK = x.reshape(-1, x.shape[-1])
            w_hat_NK = quant_e4m3_blocks(w, block)[0]
            y_MN = quant_e4m3_rows(x_MK, block)[0] @ w_hat_NK.t()
        ctx.save_for_backward(x_MK, w_hat_NK)
        ctx.block, ctx.x_shape, ctx.x_dtype, ctx.w_dtype = block, x.shape, x.dtype, w.dtype
        return y_MN.to(out_dtype).reshape(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x_MK, w_hat_NK = ctx.saved_tensors
        B = ctx.block
        dx = dw = None
        with torch.autocast(dy.device.type, enabled=False):
            dy_MN = dy.reshape(-1, dy.shape[-1]).float()
            if ctx.needs_input_grad[0]:
                dx = (quant_e4m3_rows(dy_MN, B)[0] @ w_hat_NK).to(ctx.x_dtype).reshape(ctx.x_shape)
            if ctx.needs_input_grad[1]:
                dyT_NM = quant_e4m3_rows_padded(dy_MN.t(), B)
                xT_KM = quant_e4m3_rows_padded(x_MK.float().t(), B)
                dw = (dyT_NM @ xT_KM.t()).to(ctx.w_dtype)
        return dx, dw, None


def fp8_linear(x: torch.Tensor, w: torch.Tensor, block: int = 128) -> torch.Tensor:
    """x [..., K], w [N, K] -> y [..., N] = Q_r(x) · Q_b(w)^T with FP8 (E4M3) operands in all three GEMMs."""
    if x.numel() == 0:
        return (x.reshape(-1, x.shape[-1]) @ w.t().to(x.dtype)).reshape(*x.shape[:-1], w.shape[0])
    return _FP8Linear.apply(x, w, block)


def fp4_weight(w: torch.Tensor, fp4_block: int = 32, fp8_block: int = 128) -> torch.Tensor:
    """The FP4 weight as the FP8 GEMM sees it: E2M1 codes · 1×fp4_block scales, carried to E4M3 with
    fp8_block² scales (lossless while the sub-block scale ratio allows, see fp4_fp8.py). No gradient."""
    with torch.no_grad():
        codes, s_sub = quant_e2m1(w, fp4_block)
        return fp4_to_fp8(codes, s_sub, fp8_block, fp4_block)[2].to(w.dtype)


def fp4_fake_quant(w: torch.Tensor, fp4_block: int = 32, fp8_block: int = 128) -> torch.Tensor:
    """Straight-through FP4 QAT: value `fp4_weight(w)`, gradient d/dw = identity."""
    return w + (fp4_weight(w, fp4_block, fp8_block) - w).detach()
