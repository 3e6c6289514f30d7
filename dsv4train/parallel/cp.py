"""Context parallelism for the hybrid attention: the sequence of every row is cut into `cp` contiguous shards, one
per rank of the "cp" mesh dim, and every per-token computation (embedding, mHC, MoE, head, losses) stays local.
Attention looks across tokens in only three ways, so only these cross the shards (models/sequence.py is the
interface the model calls):

- sliding window: a query sees the W keys before it, so each rank receives the previous rank's last W keys
  (point-to-point, [B, W, c]); the gradient goes back the same way.
- CSA compressor (and the indexer's): entry i also pools block i-1, so each rank receives the previous rank's last
  block of first-half projections ([B, m, 2c]).
- compressed entries (1/4 of the tokens for CSA, 1/128 for HCA; the indexer keys too) are all-gathered, and their
  gradient reduce-scattered back to the rank that pooled them.

No rank ever holds all keys of the sequence, unlike ring attention; docs/parallelism.md has the volume.
Losses follow the rule in models/sequence.py: each rank's loss is its share of the whole-sequence sum over the
whole-sequence count, scaled by cp, so the average over the fsdp ranks (which include cp) is the one-process loss
and gradient."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from dsv4train.models.attention import Attention
from dsv4train.models.model import DSV4Model
from dsv4train.models.moe import MoE
from dsv4train.models.sequence import WholeSequence


def _shift_to_next(t: torch.Tensor, group, forward: bool) -> torch.Tensor:
    """Send `t` to the next rank of `group` (the previous one when not `forward`) and return what the other
    neighbour sent; zeros on the rank at the end that has no such neighbour."""
    rank, n = dist.get_rank(group), dist.get_world_size(group)
    step = 1 if forward else -1
    received = torch.zeros_like(t)
    ops = []
    if 0 <= rank + step < n:
        ops.append(dist.P2POp(dist.isend, t, group=group, group_peer=rank + step))
    if 0 <= rank - step < n:
        ops.append(dist.P2POp(dist.irecv, received, group=group, group_peer=rank - step))
    for work in dist.batch_isend_irecv(ops):
        work.wait()
    return received


class _FromPrevious(torch.autograd.Function):
    """The previous rank's `tail` on each rank (zeros on the first); the gradient goes back to the sender."""

    @staticmethod
    def forward(ctx, tail: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return _shift_to_next(tail.contiguous(), group, forward=True)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _shift_to_next(grad.contiguous(), ctx.group, forward=False), None


class _GatherSeq(torch.autograd.Function):
    """All-gather along dim 1 in rank order; the gradient is summed over the ranks onto each rank's own slice."""

    @staticmethod
    def forward(ctx, t_BTX: torch.Tensor, group) -> torch.Tensor:
        ctx.group, n = group, dist.get_world_size(group)
        out = t_BTX.new_empty((n * t_BTX.shape[0], *t_BTX.shape[1:]))
        dist.all_gather_single(out, t_BTX.contiguous(), group=group)
        return out.unflatten(0, (n, -1)).transpose(0, 1).flatten(1, 2)  # [n*B, T, X] -> [B, n*T, X]

    @staticmethod
    def backward(ctx, grad_BNX: torch.Tensor):
        n = dist.get_world_size(ctx.group)
        B, NT = grad_BNX.shape[:2]
        stacked = grad_BNX.reshape(B, n, NT // n, *grad_BNX.shape[2:]).transpose(0, 1).flatten(0, 1).contiguous()
        mine = stacked.new_empty((B, *stacked.shape[1:]))
        dist.reduce_scatter_single(mine, stacked, group=ctx.group)
        return mine, None


class SequenceShard(WholeSequence):
    """This rank's shard of the sequence over the cp process group (see models/sequence.py for the contract)."""

    def __init__(self, group):
        self.group = group
        self.rank = dist.get_rank(group)
        self.shards = dist.get_world_size(group)
        self.has_previous = self.rank > 0

    def offset(self, length: int) -> int:
        return self.rank * length

    def with_previous(self, t_BSX: torch.Tensor, n: int) -> torch.Tensor:
        # The first rank keeps (masked) zeros in its graph too: every rank must run the backward exchange, since
        # its own tail's gradient comes back from the next rank.
        return torch.cat((_FromPrevious.apply(t_BSX[:, -n:], self.group), t_BSX), dim=1)

    def gather(self, t_BTX: torch.Tensor) -> torch.Tensor:
        return _GatherSeq.apply(t_BTX, self.group)

    def total(self, t: torch.Tensor) -> torch.Tensor:
        out = t.detach().clone()
        dist.all_reduce(out, group=self.group)
        return out

    def share(self, t: torch.Tensor) -> torch.Tensor:
        return t * self.shards

    def shard(self, t_BS: torch.Tensor) -> torch.Tensor:
        length = t_BS.shape[1] // self.shards
        start = self.offset(length)
        return t_BS[:, start : start + length]


def apply_context_parallel(model: nn.Module, seq: SequenceShard) -> None:
    """Give every attention and MoE module of `model` this rank's shard (the runtime keeps the same object for the
    losses and to cut the batches)."""
    for m in model.modules():
        if isinstance(m, (DSV4Model, Attention, MoE)):
            m.seq = seq
