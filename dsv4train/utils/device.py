"""Device choice and the few device-specific calls (CUDA today), in one place; the rest of the code is
device-agnostic."""

from __future__ import annotations

import random

import numpy as np
import torch

from dsv4train.config.errors import ConfigError


def pick_device(name: str) -> torch.device:
    """`auto` = CUDA when visible, else CPU; `cuda` without a GPU is an error that says what to use instead."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: cuda was asked for but no CUDA device is visible; use cpu or auto")
    return torch.device(name)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def accelerator_name() -> str | None:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every RNG a training step may touch, for checkpoints."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def dist_backend(device: torch.device) -> str:
    """The collective backend for a device: NCCL for CUDA, gloo for CPU."""
    return "nccl" if device.type == "cuda" else "gloo"


def bind_local_device(device: torch.device, local_rank: int) -> torch.device:
    """One GPU per process (torchrun's LOCAL_RANK); CPU processes share the host."""
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return device
