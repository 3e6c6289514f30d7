"""Several optimizers over disjoint parameter sets, used as one (Muon for matrices + AdamW for the rest).

It is iterable over its optimizers, so torch.distributed.checkpoint's get/set_optimizer_state_dict take it
as they take a list of optimizers.
"""

from __future__ import annotations

import torch
from torch.optim import Optimizer


class CombinedOptimizer:
    def __init__(self, optimizers: dict[str, Optimizer]) -> None:
        seen: set[int] = set()
        for name, opt in optimizers.items():
            ids = {id(p) for g in opt.param_groups for p in g["params"]}
            if ids & seen:
                raise ValueError(f"CombinedOptimizer: optimizer {name!r} shares parameters with another one")
            seen |= ids
        self.optimizers = dict(optimizers)

    def __iter__(self):
        return iter(self.optimizers.values())

    def __len__(self) -> int:
        return len(self.optimizers)

    def __getitem__(self, name: str) -> Optimizer:
        return self.optimizers[name]

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self for g in opt.param_groups]

    @property
    def state(self) -> dict:
        return {p: s for opt in self for p, s in opt.state.items()}

    def muon_update_rms(self) -> float | None:
        """RMS of Muon's last orthogonalised update (before the LR); None without Muon parameters."""
        rms = getattr(self.optimizers.get("muon"), "last_update_rms", None)
        return None if rms is None else float(rms)

    def set_lr(self, lr: float) -> None:
        for group in self.param_groups:
            group["lr"] = lr

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in self:
            opt.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def load_state_dict(self, state_dict: dict) -> None:
        if set(state_dict) != set(self.optimizers):
            raise ValueError(f"optimizer state holds {sorted(state_dict)}, this run has {sorted(self.optimizers)}")
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state_dict[name])
