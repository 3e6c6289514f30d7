"""Building the DeviceMesh for a ParallelDims (see dims.py for the axes and what each one splits)."""

from __future__ import annotations

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from dsv4train.parallel.dims import AXES, ParallelDims


def build_mesh(dims: ParallelDims, device_type: str | None = None) -> DeviceMesh:
    """World mesh with dims ("pp", "dp", "cp", "ep", "tp") plus flattened "fsdp" (dp·cp·ep, dense weights)
    and "efsdp" (dp·cp, routed experts). Needs an initialised process group of dims.world_size ranks."""
    if device_type is None:
        device_type = "cuda" if dist.get_backend() == dist.Backend.NCCL else "cpu"
    mesh = init_device_mesh(device_type, dims.shape, mesh_dim_names=AXES)
    mesh["dp", "cp", "ep"]._flatten("fsdp")
    mesh["dp", "cp"]._flatten("efsdp")
    return mesh


def data_rank(dims: ParallelDims, mesh: DeviceMesh) -> int:
    """Index of this rank's batch among the dp·ep different batches of a step."""
    return mesh["dp"].get_local_rank() * dims.ep + mesh["ep"].get_local_rank()
