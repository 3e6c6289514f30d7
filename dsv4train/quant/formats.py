"""FP8 (E4M3) and FP4 (E2M1) quantisation with power-of-two (UE8M0) block scales, in pure torch (arch ref §7).

Every function here is a fake-quant: it returns the dequantised values (what the low-precision GEMM would
see, times its scale) in float32, plus the scales where a caller needs them. All of it is exact:

- E4M3 (`torch.float8_e4m3fn`): finite max 448, smallest subnormal 2^-9, no Inf. `cast_e4m3` clamps to ±448
  first (saturation is explicit, independent of how a torch build treats overflow) and then uses torch's cast,
  which rounds to nearest, ties to even.
- E2M1: values {0, 0.5, 1, 1.5, 2, 3, 4, 6} and their negatives, rounded on that explicit grid, ties to the
  grid point whose mantissa bit is 0 ("even"): 0, 1, 2, 4 are even and 0.5, 1.5, 3, 6 odd, so 0.25 -> 0,
  0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4. Magnitudes above 6 saturate to 6.
- Block scale: s = 2^ceil(log2(amax / qmax)), the smallest power of two with amax / s <= qmax (exact, not via a
  rounded division), with amax floored at qmax * 2^-126 so all-zero blocks get s = 2^-126 and stay zero.
  qmax = 448 for E4M3, 6 for E2M1.
- Non-finite values: a NaN or ±Inf anywhere in a block makes that block's amax non-finite, and the whole block
  dequantises to NaN (as the reference kernels do: their amax-derived scale becomes Inf/NaN). Nothing is
  silently saturated, so the trainer's non-finite check sees it. `cast_e4m3` / `round_e2m1` on their own
  (no scale) keep NaN and saturate ±Inf to the format's max, like `satfinite` casts.
"""

from __future__ import annotations

import math

import torch

E4M3_MAX = 448.0
E2M1_MAX = 6.0
E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # index parity == mantissa-bit parity
_MIN_EXP = -126  # smallest block-scale exponent (amax floor = qmax * 2^-126)


def cast_e4m3(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest E4M3 value (ties to even), saturating at ±448; NaN stays NaN. Returns float32."""
    x = x.float()
    return x.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float()


def round_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest E2M1 value, ties to the even mantissa, saturating at ±6; NaN stays NaN. float32.

    The grid is evenly spaced per binade: step 0.5 on [0, 2), 1 on [2, 4), 2 on [4, 6], and a grid point's
    mantissa bit is the parity of its multiple of the step, so round(a / step) · step (torch.round: half to even)
    is the rounding. Only scalars and elementwise ops, so a TP-sharded weight rounds like a plain tensor."""
    x = x.float()
    a = x.abs().clamp(max=E2M1_MAX)
    step = torch.where(a < 2.0, 0.5, torch.where(a < 4.0, 1.0, 2.0))  # powers of two: a / step is exact
    q = torch.round(a / step) * step * torch.sign(x)
    return torch.where(torch.isnan(x), x, q)


def pow2_scale(amax: torch.Tensor, qmax: float) -> torch.Tensor:
    """s = 2^ceil(log2(amax/qmax)): the smallest power of two with amax/s <= qmax; amax floored at qmax·2^-126.

    Exact, without log2 or a rounded division: with amax = m·2^e and qmax = m_q·2^e_q (frexp, m in [0.5, 1)),
    amax <= qmax·2^k  <=>  k >= e - e_q + [m > m_q]. The float32 2^k is built from its exponent bits.
    Non-finite amax gives a NaN scale (the block becomes NaN)."""
    m_q, e_q = math.frexp(qmax)
    a = amax.float().clamp_min(qmax * 2.0**_MIN_EXP)
    finite = torch.isfinite(a)
    m, e = torch.frexp(torch.where(finite, a, torch.ones_like(a)))
    k = e.to(torch.int32) - e_q + (m > m_q).to(torch.int32)
    # 2^k for -126 <= k <= 127 (k <= 120 for finite float32 amax): the exponent bits, k + 127, times 2^23 (a
    # multiply, not `<< 23`: torch 2.13's distributed tensors return `t << 23` unshifted, which broke FP8 under TP).
    s = ((k + 127) * (1 << 23)).view(torch.float32)
    return torch.where(finite, s, torch.full_like(s, float("nan")))


def _tiles(x: torch.Tensor, block: int, what: str) -> torch.Tensor:
    """[..., K] -> [..., K/block, block]; K must be a multiple of block."""
    if block <= 0 or x.shape[-1] % block:
        raise ValueError(f"{what}: last dim {x.shape[-1]} is not a multiple of the block size {block}")
    return x.reshape(*x.shape[:-1], x.shape[-1] // block, block)


def quant_e4m3_rows(x: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Activation fake-quant, one scale per 1×block tile along the last dim (per row).

    x [..., K] -> (x̂ [..., K] float32, s [..., K/block]), x̂ = s · E4M3(x / s), s = pow2_scale(amax_tile, 448)."""
    t = _tiles(x.float(), block, f"FP8 1x{block} tiles")
    s = pow2_scale(t.abs().amax(-1, keepdim=True), E4M3_MAX)
    q = cast_e4m3(t / s) * s
    return q.reshape(x.shape), s.squeeze(-1)


def quant_e4m3_rows_padded(x: torch.Tensor, block: int = 128) -> torch.Tensor:
    """As `quant_e4m3_rows`, but a last dim that is not a multiple of block gets a shorter final tile (zero
    padding, which changes no amax). Used along the token dim, whose length the model does not fix."""
    K = x.shape[-1]
    pad = (-K) % block
    if pad:
        x = torch.nn.functional.pad(x.float(), (0, pad))
    return quant_e4m3_rows(x, block)[0][..., :K]


def quant_e4m3_blocks(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight fake-quant, one scale per block×block tile of the last two dims (leading dims, e.g. experts, kept).

    w [..., N, K] -> (ŵ [..., N, K] float32, s [..., N/block, K/block])."""
    *lead, N, K = w.shape
    if block <= 0 or N % block or K % block:
        raise ValueError(
            f"FP8 {block}x{block} blocks: weight shape {tuple(w.shape)} has a last-two dim that is "
            f"not a multiple of {block}"
        )
    t = w.float().reshape(*lead, N // block, block, K // block, block)
    s = pow2_scale(t.abs().amax(dim=(-3, -1), keepdim=True), E4M3_MAX)
    q = cast_e4m3(t / s) * s
    return q.reshape(w.shape), s.squeeze(-1).squeeze(-2)


def quant_e2m1(w: torch.Tensor, block: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """FP4 (MXFP4-style) fake-quant, one scale per 1×block along the last (input) dim.

    w [..., K] -> (codes [..., K] on the E2M1 grid, s [..., K/block]); the dequantised weight is codes · s,
    s = pow2_scale(amax_block, 6) with amax floored at 6·2^-126."""
    t = _tiles(w.float(), block, f"FP4 1x{block} blocks")
    s = pow2_scale(t.abs().amax(-1, keepdim=True), E2M1_MAX)
    codes = round_e2m1(t / s)
    return codes.reshape(w.shape), s.squeeze(-1)
