"""What the trainer needs to know about the layout it runs in, with the same interface on one process and many:
which slice of each batch this rank reads, how to average a metric over the data ranks, how to clip gradients
and how to shard the model. On one process every method is the identity."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from dsv4train.parallel.dims import ParallelDims
from dsv4train.parallel.grad import clip_grad_norm_


@dataclass
class ParallelRuntime:
    dims: ParallelDims = field(default_factory=ParallelDims)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where collectives run

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
        from dsv4train.parallel.mesh import data_rank

        return data_rank(self.dims, self.dims.mesh)

    @property
    def is_main(self) -> bool:
        return not self.distributed or dist.get_rank() == 0

    def parallelize(self, model: nn.Module) -> nn.Module:
        if not self.distributed:
            return model
        from dsv4train.parallel.parallelize import parallelize

        return parallelize(model, self.dims)

    def distribute_optimizer(self, optimizer):
        """Muon on sharded matrices needs whole matrices for Newton-Schulz: swap in the owner-compute version."""
        if not self.distributed:
            return optimizer
        from dsv4train.parallel.muon import make_distributed

        return make_distributed(optimizer)

    def _data_group(self):
        return self.dims.mesh["fsdp"].get_group()  # dp·cp·ep: cp ranks hold equal shares of one batch

    def _all_reduce(self, t: torch.Tensor, op=dist.ReduceOp.SUM, group=None) -> torch.Tensor:
        """All-reduce a copy of t on the collective device; returned on t's device."""
        out = t.detach().to(self.device, copy=True)
        dist.all_reduce(out, op=op, group=group)
        return out.to(t.device)

    def mean_over_data(self, t: torch.Tensor) -> torch.Tensor:
        """Average of a per-rank value over the ranks that hold different data."""
        if not self.distributed:
            return t
        return self._all_reduce(t, group=self._data_group()) / (self.dims.dp * self.dims.cp * self.dims.ep)

    def sum_over_data(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over the data ranks of a per-rank count (cp ranks each count their share of one batch)."""
        if not self.distributed:
            return t
        return self._all_reduce(t, group=self._data_group())

    def clip_grad_norm(self, params, max_norm: float) -> torch.Tensor:
        if not self.distributed:
            return torch.nn.utils.clip_grad_norm_(params, max_norm)
        return clip_grad_norm_(list(params), max_norm)

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
