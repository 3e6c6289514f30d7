"""What the trainer needs to know about the layout it runs in, with the same interface on one process and many:
which slice of each batch this rank reads, how to average a metric over the data ranks, how to clip gradients
and how to shard the model. On one process every method is the identity. With pp > 1, `parallelize` returns this
rank's pipeline stages and keeps their schedule in `pipeline` (pp.py), which the Learner (train/learner.py) uses."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from dsv4train.models.sequence import WHOLE_SEQUENCE, WholeSequence
from dsv4train.parallel.dims import ParallelDims
from dsv4train.parallel.grad import clip_grad_norm_
from dsv4train.parallel.mesh import build_mesh, data_rank


@dataclass
class ParallelRuntime:
    dims: ParallelDims = field(default_factory=ParallelDims)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where collectives run
    pipeline: object | None = field(default=None, repr=False)  # pp.Pipeline once parallelize() split the model
    # The world DeviceMesh for `dims` (None on one process), built once here: building it creates process groups,
    # which every rank must do together and in the same order, so it happens at construction and nowhere else.
    mesh: DeviceMesh | None = field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        if self.distributed:
            self.mesh = build_mesh(self.dims)

    @property
    def distributed(self) -> bool:
        return self.dims.world_size > 1

    @property
    def data_ranks(self) -> int:
        return self.dims.data_ranks

    @property
    def data_rank(self) -> int:
        if not self.distributed:
            return 0
        return data_rank(self.dims, self.mesh)

    @cached_property
    def seq(self) -> WholeSequence:
        """The part of each row's sequence this rank computes: all of it, or its context-parallel shard (cp.py)."""
        if self.dims.cp == 1:
            return WHOLE_SEQUENCE
        from dsv4train.parallel.cp import SequenceShard

        return SequenceShard(self.mesh["cp"].get_group())

    @property
    def is_main(self) -> bool:
        return not self.distributed or dist.get_rank() == 0

    def parallelize(self, model: nn.Module) -> nn.Module:
        if not self.distributed:
            return model
        from dsv4train.parallel.parallelize import parallelize

        model = parallelize(model, self.dims, self.mesh, seq=self.seq)
        if self.dims.pp > 1:
            from dsv4train.parallel.pp import Pipeline, stage_specs

            specs = stage_specs(self.dims, model.cfg.n_layers, self.mesh["pp"].get_local_rank())
            self.pipeline = Pipeline(model, specs, self.dims, self._pp_group(), self.device)
        return model

    def distribute_optimizer(self, optimizer):
        """Muon on sharded matrices needs whole matrices for Newton-Schulz: swap in the owner-compute version.
        Every rank steps it (its collectives span the world) though pp ranks hold different parameters; a plain
        parameter is held by the world / pp ranks of its stage."""
        if not self.distributed:
            return optimizer
        from dsv4train.parallel.muon import make_distributed

        return make_distributed(optimizer, plain_copies=self.dims.world_size // self.dims.pp)

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        """The model's whole state dict, the names and shapes of the unsharded model (what a rollout worker or an
        evaluation copy loads), on the main rank; None on the others. On one process `model.state_dict()`. Under
        a layout every rank must call it: each sharded tensor is all-gathered in turn, and the other ranks drop it
        at once (they never hold more than one whole tensor). Not under pipeline parallelism, where a rank holds only
        its stages."""
        if not self.distributed:
            return model.state_dict()
        if self.dims.pp > 1:
            raise NotImplementedError("full_state_dict under pipeline parallelism (a pp rank holds only its stages)")
        full = {}
        for name, t in model.state_dict().items():
            whole = t.full_tensor() if isinstance(t, DTensor) else t
            if self.is_main:
                full[name] = whole
        return full if self.is_main else None

    def _pp_group(self):
        return self.mesh["pp"].get_group()

    def sum_over_stages(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of a per-stage value (loss parts, expert counts of the stage's layers) over the pp ranks."""
        if self.dims.pp == 1:
            return t
        return self._all_reduce(t, group=self._pp_group())

    def _data_group(self):
        return self.mesh["fsdp"].get_group()  # dp·cp·ep: cp ranks hold equal shares of one batch

    def _all_reduce(self, t: torch.Tensor, op=dist.ReduceOp.SUM, group=None) -> torch.Tensor:
        """All-reduce a copy of t on the collective device; returned on t's device."""
        out = t.detach().to(self.device, copy=True)
        dist.all_reduce(out, op=op, group=group)
        return out.to(t.device)

    def sum_over_data(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over the data ranks of a per-rank count (cp ranks each count their share of one batch)."""
        if not self.distributed:
            return t
        return self._all_reduce(t, group=self._data_group())

    def clip_grad_norm(self, params, max_norm: float) -> torch.Tensor:
        if not self.distributed:
            return torch.nn.utils.clip_grad_norm_(params, max_norm)
        return clip_grad_norm_(list(params), max_norm, self._pp_group() if self.dims.pp > 1 else None)

    def any_rank(self, flag: bool) -> bool:
        """True everywhere if True on any rank (a signal that reached one process stops them all together)."""
        if not self.distributed:
            return flag
        return bool(self._all_reduce(torch.tensor([float(flag)]), op=dist.ReduceOp.MAX).item())

    def from_main(self, obj):
        """Rank 0's value of a picklable object, on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()
