"""Partial, interleaved rotary embeddings on the trailing `rope_head_dim` channels (arch ref §3.3).

Sliding-window layers use base `rope_theta` with no scaling; CSA/HCA layers (and their compressors and
indexer) use `compress_rope_theta` with the YaRN frequency blend and no mscale."""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from dsv4train.config.model import ModelConfig


@lru_cache(maxsize=64)
def _inv_freq(
    rope_dim: int, base: float, factor: float, original_len: int, beta_fast: int, beta_slow: int
) -> tuple[float, ...]:
    half = rope_dim // 2
    freqs = [base ** (-2.0 * i / rope_dim) for i in range(half)]
    if original_len <= 0 or factor == 1.0:
        return tuple(freqs)

    def correction_dim(rotations: float) -> float:
        return rope_dim * math.log(original_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    lo = max(math.floor(correction_dim(beta_fast)), 0)
    hi = min(math.ceil(correction_dim(beta_slow)), rope_dim - 1)
    span = (hi - lo) if hi != lo else 0.001
    out = []
    for i, f in enumerate(freqs):
        ramp = min(max((i - lo) / span, 0.0), 1.0)
        out.append(f * (1 - ramp) + (f / factor) * ramp)
    return tuple(out)


def inv_freq(cfg: ModelConfig, layer_type: str) -> tuple[float, ...]:
    """One frequency per rotated channel pair, for the rope kind of `layer_type`."""
    if layer_type == "swa":
        return _inv_freq(cfg.rope_head_dim, cfg.rope_theta, 1.0, 0, cfg.beta_fast, cfg.beta_slow)
    return _inv_freq(
        cfg.rope_head_dim, cfg.compress_rope_theta, cfg.rope_factor, cfg.original_seq_len, cfg.beta_fast, cfg.beta_slow
    )


def rope_cos_sin(freqs: tuple[float, ...], positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape [*positions.shape, rope_dim/2], fp32."""
    f = torch.tensor(freqs, dtype=torch.float32, device=positions.device)
    angles = positions.float().unsqueeze(-1) * f
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Rotate the last 2*cos.shape[-1] channels of x, pairing channels (2i, 2i+1).

    cos/sin broadcast against x[..., :-1] once a pair axis is added: for x [B,S,H,C] pass cos [S,r/2] viewed as
    [S,1,r/2] (use `unsqueeze` at the call site). `inverse=True` rotates by the negative angle (output de-rotation).
    """
    rd = 2 * cos.shape[-1]
    nope, rope = x[..., :-rd], x[..., -rd:]
    pairs = rope.float().unflatten(-1, (-1, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    if inverse:
        sin = -sin
    rotated = torch.stack((a * cos - b * sin, b * cos + a * sin), dim=-1).flatten(-2).to(x.dtype)
    return torch.cat((nope, rotated), dim=-1)
