"""Optimizer and LR-schedule configuration (arch ref §8.1, §8.2), checked in __post_init__.

Defaults are the V4-Flash recipe: Muon (hybrid Newton–Schulz, RMS 0.18) for matrices and AdamW
(0.9/0.95, eps 1e-20) for the rest, weight decay 0.1, peak LR 2.7e-4 after 2000 warm-up steps, held,
then a cosine decay to 2.7e-5. The decay length is not published; `decay_fraction` is our choice.
"""

from __future__ import annotations

from dataclasses import dataclass

from dsv4train.config.errors import ConfigError, require_ranges

OPTIMIZERS = ("muon", "adamw")  # adamw: every parameter AdamW (a baseline)
NS_SCHEDULES = ("hybrid", "quintic")  # hybrid: 8 + 2 steps (V4); quintic: 5 steps (Keller Jordan, torch.optim.Muon)
NS_DTYPES = ("auto", "bfloat16", "float32")  # auto: bfloat16 on CUDA, float32 on CPU
SCHEDULES = ("wsd", "cosine")
DECAY_SHAPES = ("cosine", "linear")
# The allowed range of every numeric field (finite numbers only); tests/unit/test_bad_input.py checks none is missing.
RANGES = {
    "lr": "(0, inf)",
    "min_lr": "[0, inf)",
    "weight_decay": "[0, inf)",
    "vector_weight_decay": "[0, inf)",
    "adam_beta1": "[0, 1)",
    "adam_beta2": "[0, 1)",
    "adam_eps": "(0, 1)",
    "muon_momentum": "[0, 1)",
    "muon_rms": "(0, inf)",
    "warmup_steps": "[0, inf)",
    "decay_fraction": "[0, 1]",
}


@dataclass(frozen=True)
class OptimConfig:
    name: str = "muon"
    lr: float = 2.7e-4
    min_lr: float = 2.7e-5
    weight_decay: float = 0.1  # Muon matrices and the AdamW embed/head
    # AdamW's vector-like params (norm gains, hc_*_base/scale, attn_sink, compressor ape). 0 follows the
    # mHC/HC practice of not decaying the static mHC parts (arch ref §4.4); set 0.1 to decay them as well.
    vector_weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-20
    muon_momentum: float = 0.95
    muon_nesterov: bool = True
    muon_ns: str = "hybrid"
    muon_ns_dtype: str = "auto"
    muon_rms: float = 0.18
    muon_split_wo_a: bool = True  # orthogonalise each of wo_a's o_groups row blocks on its own (our reading)
    schedule: str = "wsd"
    warmup_steps: int = 2000
    decay_fraction: float = 0.1  # wsd: share of the steps spent decaying to min_lr at the end
    decay_shape: str = "cosine"  # wsd: shape of that decay

    def __post_init__(self) -> None:
        def need(ok: bool, key: str, msg: str) -> None:
            if not ok:
                raise ConfigError(f"optim.{key}: {msg}")

        def one_of(key: str, allowed: tuple[str, ...]) -> None:
            value = getattr(self, key)
            need(value in allowed, key, f"must be one of {allowed}, got {value!r}")

        one_of("name", OPTIMIZERS)
        one_of("muon_ns", NS_SCHEDULES)
        one_of("muon_ns_dtype", NS_DTYPES)
        one_of("schedule", SCHEDULES)
        one_of("decay_shape", DECAY_SHAPES)
        require_ranges(self, "optim", RANGES)
        need(self.min_lr <= self.lr, "min_lr", f"must be in [0, lr={self.lr}], got {self.min_lr}")
