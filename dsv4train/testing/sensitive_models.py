"""Random-weight models whose outputs depend strongly on every input: what tests of cached, packed or sharded paths
compare, so that a key, entry or mask taken from the wrong place shows."""

from __future__ import annotations

import torch

from dsv4train.config.model import ModelConfig
from dsv4train.models.model import DSV4Model

# init_std 0.15 / hc_init_std 0.2 instead of the training init's 0.006 / 0.02: changing token 0 then moves the last
# logits of a tiny model by ~20%.
SENSITIVE_INIT = dict(init_std=0.15, hc_init_std=0.2)


def sensitive_model(cfg: ModelConfig, seed: int = 1, noise_seed: int | None = None) -> DSV4Model:
    """`DSV4Model(cfg)` (build cfg with SENSITIVE_INIT) initialised with `seed`, in eval mode, with every tensor the
    init sets to a constant (sinks, the compressors' position biases, norms, mHC base/scale, router biases) perturbed
    by 0.1·N(0, 1) drawn from `noise_seed` (default seed + 1), so a sink or a position bias taken at the wrong place
    shows too."""
    model = DSV4Model(cfg)
    model.init_weights(seed=seed)
    gen = torch.Generator().manual_seed(seed + 1 if noise_seed is None else noise_seed)
    with torch.no_grad():
        for value in model.state_dict().values():
            if value.is_floating_point() and (value.numel() == 1 or value.std() == 0):
                value.add_(0.1 * torch.randn(value.shape, generator=gen))
    return model.eval()
