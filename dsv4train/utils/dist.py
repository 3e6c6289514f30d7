"""Process-group set-up from torchrun's environment. With no WORLD_SIZE (a plain `dsv4 pretrain`) it is a no-op."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from dsv4train.utils.device import bind_local_device, dist_backend


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device: torch.device, timeout_s: float) -> torch.device:
    """Join the process group torchrun describes (if any) and return this process's device. A collective that
    does not complete within `timeout_s` raises instead of hanging (a misconfigured layout fails fast)."""
    if env_world_size() == 1:
        return device
    device = bind_local_device(device, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group(
            dist_backend(device),
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=device if device.type == "cuda" else None,
        )
    return device
