"""Lossless FP4 -> FP8 dequantisation of block-scaled weights (arch ref §7.2), and its check.

An FP4 weight is codes c (E2M1) with one power-of-two scale s_sub per 1×b sub-block along the input dim
(b = fp4 block, 32). The FP8 GEMM wants E4M3 values with one scale per B×B block (B = fp8 block, 128). Per FP8
block:

    S_blk = max(s_sub in the block) / 2^6,      e = E4M3(c · s_sub / S_blk),      ŵ = e · S_blk.

s_sub / S_blk is a power of two <= 2^6 and |c| <= 6, so |c · s_sub / S_blk| <= 384 < 448 never saturates.
It is exact (lossless, ŵ == c · s_sub) while the smallest nonzero product, 0.5 · s_sub / S_blk, is still an
E4M3 value (>= 2^-9), i.e. while max(s_sub) / s_sub <= 2^14 for every sub-block in the block that holds a
nonzero code (all-zero sub-blocks carry the floor scale and do not matter). Past that, the small sub-blocks
lose their low bits or flush to zero; `fp4_to_fp8_report` says where.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsv4train.quant.formats import cast_e4m3

LOSSLESS_RATIO_LOG2 = 14  # max(s_sub) / s_sub beyond 2^14 inside one FP8 block can lose bits


def _block_view(t: torch.Tensor, block: int, cols_per_block: int) -> torch.Tensor:
    """[..., N, C] -> [..., N/block, block, C/cols_per_block, cols_per_block]."""
    *lead, N, C = t.shape
    if N % block or C % cols_per_block:
        raise ValueError(f"FP4->FP8: shape {tuple(t.shape)} does not tile into FP8 {block}x{block} blocks")
    return t.reshape(*lead, N // block, block, C // cols_per_block, cols_per_block)


def fp4_to_fp8(
    codes: torch.Tensor, s_sub: torch.Tensor, fp8_block: int = 128, fp4_block: int = 32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """codes [..., N, K] (E2M1 values), s_sub [..., N, K/fp4_block] -> (e [..., N, K] E4M3 values as float32,
    S_blk [..., N/fp8_block, K/fp8_block], ŵ = e · S_blk [..., N, K])."""
    if fp8_block % fp4_block:
        raise ValueError(f"FP4->FP8: the FP8 block {fp8_block} must be a multiple of the FP4 block {fp4_block}")
    per = fp8_block // fp4_block
    s_blk = _block_view(s_sub, fp8_block, per).amax(dim=(-3, -1), keepdim=True) / 2.0**6  # [.., n, 1, k, 1]
    ratio = _block_view(s_sub, fp8_block, per) / s_blk  # [.., n, B, k, per]
    c = _block_view(codes.float(), fp8_block, fp8_block)  # [.., n, B, k, B]
    c = c.reshape(*c.shape[:-1], per, fp4_block)
    e = cast_e4m3(c * ratio.unsqueeze(-1))
    w = (e * s_blk.unsqueeze(-1)).reshape(codes.shape)
    return e.reshape(codes.shape), s_blk.squeeze(-1).squeeze(-2), w


@dataclass
class Fp4ToFp8Report:
    lossless: bool
    lossy_blocks: int  # FP8 blocks where some value changed
    total_blocks: int
    max_ratio_log2: int  # largest log2(max s_sub / s_sub) over sub-blocks holding a nonzero code
    limit_log2: int = LOSSLESS_RATIO_LOG2

    def __str__(self) -> str:
        if self.lossless:
            return f"FP4->FP8 lossless (max sub-block scale ratio 2^{self.max_ratio_log2} <= 2^{self.limit_log2})"
        return (
            f"FP4->FP8 lossy in {self.lossy_blocks}/{self.total_blocks} FP8 blocks: sub-block scale ratio "
            f"reaches 2^{self.max_ratio_log2}, above the lossless limit 2^{self.limit_log2}"
        )


def fp4_to_fp8_report(
    codes: torch.Tensor, s_sub: torch.Tensor, fp8_block: int = 128, fp4_block: int = 32
) -> Fp4ToFp8Report:
    """Exactness check of `fp4_to_fp8`: compares ŵ with c · s_sub and measures the sub-block scale ratios."""
    per = fp8_block // fp4_block
    _, _, w = fp4_to_fp8(codes, s_sub, fp8_block, fp4_block)
    exact = codes.float() * s_sub.repeat_interleave(fp4_block, dim=-1)
    diff = _block_view((w != exact) & ~torch.isnan(exact), fp8_block, fp8_block).any(-1).any(-2)
    nonzero = _block_view(codes.reshape(*codes.shape[:-1], -1, fp4_block).ne(0).any(-1), fp8_block, per)
    s = _block_view(s_sub, fp8_block, per)
    s_min = torch.where(nonzero, s, torch.full_like(s, float("inf"))).amin(dim=(-3, -1))
    ratio = (s.amax(dim=(-3, -1)) / s_min).clamp_min(1.0)
    finite = torch.isfinite(ratio)
    max_log2 = int(torch.log2(ratio[finite]).max().item()) if finite.any() else 0
    lossy = int(diff.sum().item())
    return Fp4ToFp8Report(lossy == 0, lossy, diff.numel(), max_log2)
