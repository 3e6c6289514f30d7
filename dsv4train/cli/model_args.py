"""The MODEL and --device arguments that `dsv4 eval` and `dsv4 generate` share, checked the same way."""

from __future__ import annotations

from pathlib import Path


def checked_model_and_device(model: Path, device: str):
    """The torch device for `--device`, after checking that MODEL exists; a ConfigError naming what is wrong."""
    from dsv4train.config.errors import ConfigError
    from dsv4train.utils.device import pick_device

    if not model.exists():
        raise ConfigError(f"MODEL {model}: no such file or folder (a dsv4 folder, a run directory or an HF export)")
    try:
        return pick_device(device)
    except ConfigError:
        raise ConfigError(f"--device {device}: no CUDA device is visible; use cpu or auto") from None
