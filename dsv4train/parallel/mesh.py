"""Building the DeviceMesh for a ParallelDims (see dims.py for the axes and what each one splits). The mesh is
built once per process, by `ParallelRuntime` (runtime.py), which holds it; `ParallelDims` stays a plain value."""

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


def fsdp_meshes(dims: ParallelDims, mesh: DeviceMesh) -> tuple[DeviceMesh, DeviceMesh]:
    """The meshes FSDP2 shards on: (dense weights, routed experts). 1-D "fsdp" / "efsdp" for plain FSDP; with
    dp_replicate = r > 1, the same ranks as 2-D (replicate r, shard n/r) meshes, which FSDP2 treats as HSDP
    (reduce-scatter within a replica, all-reduce across replicas). dp is the outermost factor of both flattened
    dims, so its leading factor r is the replica index. Call once: unflattening creates process groups."""
    r = dims.dp_replicate
    if r == 1:
        return mesh["fsdp"], mesh["efsdp"]
    return tuple(
        mesh[name]._unflatten(0, (r, mesh[name].size() // r), (f"{name}_replicate", f"{name}_shard"))
        for name in ("fsdp", "efsdp")
    )
