"""Turn the plain one-process model into its parallel form for a layout, from outside the model code.
Order (as torchtitan's): PP split -> TP -> EP -> CP -> activation checkpointing -> compile -> FSDP; this module
only sequences the steps, each lives in its own file. With pp > 1 the result is the model holding only this rank's
stages (pp.py)."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from dsv4train.models.sequence import WHOLE_SEQUENCE, WholeSequence
from dsv4train.parallel.cp import apply_context_parallel
from dsv4train.parallel.dims import ParallelDims
from dsv4train.parallel.ep import apply_expert_parallel
from dsv4train.parallel.fsdp import apply_fsdp
from dsv4train.parallel.mesh import fsdp_meshes
from dsv4train.parallel.pp import split_stages, stage_specs
from dsv4train.parallel.tp import apply_tensor_parallel


def parallelize(
    model: nn.Module,
    dims: ParallelDims,
    mesh: DeviceMesh,
    param_dtype: torch.dtype = torch.float32,
    seq: WholeSequence = WHOLE_SEQUENCE,
) -> nn.Module:
    """Shard `model` (built and initialised identically on every rank) in place for `dims` on `mesh` (the world
    mesh `build_mesh(dims)` made, `ParallelRuntime.mesh`); returns it, or with pp > 1 the part of it this rank's
    pipeline stages hold (the rest is dropped). `seq`: this rank's sequence shard under context parallelism
    (`ParallelRuntime.seq`, which also cuts the batches and scales the losses)."""
    if dims.pp > 1:
        model = split_stages(model, stage_specs(dims, model.cfg.n_layers, mesh["pp"].get_local_rank()))
    if dims.tp > 1:
        apply_tensor_parallel(model, mesh["tp"])
    if dims.ep > 1:
        apply_expert_parallel(model, mesh["ep"])
    if dims.cp > 1:
        if seq.shards != dims.cp:
            raise ValueError(
                f"parallelize: cp = {dims.cp} needs this rank's sequence shard (ParallelRuntime.seq), "
                f"got one of {seq.shards} shards"
            )
        apply_context_parallel(model, seq)
    if dims.dp * dims.cp * dims.ep > 1:
        dense_mesh, expert_mesh = fsdp_meshes(dims, mesh)
        apply_fsdp(model, dense_mesh, expert_mesh if dims.ep > 1 else None, param_dtype)
    return model
