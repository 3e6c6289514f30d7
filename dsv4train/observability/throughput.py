"""Tokens/s and MFU. MFU divides model FLOPs/s by a peak *measured* on this device (a large matmul in the compute
dtype), so CPU and GPU numbers mean the same thing: the share of achievable matmul throughput the step gets."""

from __future__ import annotations

import time

import torch

from dsv4train.utils.device import synchronize


@torch.no_grad()
def measured_matmul_peak(device: torch.device, dtype: torch.dtype, repeats: int = 5) -> float:
    """Best FLOPs/s of an n×n×n matmul (n = 4096 on GPU, 1024 on CPU)."""
    n = 4096 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 1):
        synchronize(device)
        t0 = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def mfu(flops_per_token: float, tokens_per_sec: float, peak_flops: float) -> float:
    return flops_per_token * tokens_per_sec / peak_flops
