"""Learning-rate and MTP-weight schedules (arch ref §8.2).

`step` is the 0-based index of the optimizer step about to run. Warm-up is linear and reaches the peak on
its last step: lr * (step + 1) / warmup_steps. Then
- wsd: held at lr until the last `decay_fraction` of the steps, which go to min_lr (cosine or linear);
  the last step (total_steps - 1) runs at min_lr.
- cosine: one cosine from lr to min_lr over all steps after warm-up.
MTP weight: 0.3 while the LR is held, 0.1 from the start of the LR decay [P §4.2.2].
"""

from __future__ import annotations

import math

from dsv4train.config.optim import OptimConfig


def decay_start(cfg: OptimConfig, total_steps: int) -> int:
    """First step of the LR decay."""
    if cfg.schedule == "cosine":
        return min(cfg.warmup_steps, total_steps)
    return max(cfg.warmup_steps, total_steps - round(cfg.decay_fraction * total_steps))


def _decay(frac: float, shape: str) -> float:
    """Multiplier on (lr - min_lr) at decay progress frac in [0, 1]."""
    return 0.5 * (1 + math.cos(math.pi * frac)) if shape == "cosine" else 1 - frac


def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    start = decay_start(cfg, total_steps)
    if step < start:
        return cfg.lr
    frac = min(1.0, (step - start + 1) / max(1, total_steps - start))
    shape = "cosine" if cfg.schedule == "cosine" else cfg.decay_shape
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * _decay(frac, shape)


def mtp_weight_at(step: int, cfg: OptimConfig, total_steps: int, start: float = 0.3, end: float = 0.1) -> float:
    """The MTP loss weight: `start` while the LR is held, `end` from the first step of the decay."""
    return start if step < decay_start(cfg, total_steps) else end
