"""Expert parallelism: routed experts split over the "ep" mesh dim, tokens moved to them by all-to-all.

Rank r of the EP group holds experts [r·E/ep, (r+1)·E/ep) as a DTensor `Shard(0)` of the full [E, n, m] stacks,
so state dicts and DCP checkpoints keep the global shapes and load in any other layout. `apply_expert_parallel`
shards the weights and sets each `Experts.dispatch` (the seam of dsv4train/models/moe.py, called as
`dispatch(x_ND, idx_NK, w_NK, experts) -> y_ND`) to an `AllToAllDispatch`. One MoE call:

1. sort this rank's (token, expert) pairs by expert: rows for EP rank 0's experts come first, then rank 1's...
2. all-to-all the per-expert row counts, then the rows themselves (uneven splits);
3. received rows arrive grouped by source rank, each group sorted by local expert: a stable sort by local expert
   puts them in grouped-GEMM order (source rank is the tie order, so the result does not depend on timing);
4. run the local experts (`experts.mlp`, so FP8/FP4 experts compose), undo the sort, all-to-all the outputs back,
   weight and sum them per token.

The all-to-alls are autograd functions (their backward is the reverse all-to-all), so expert gradients collect
the contributions of every rank's tokens. With FSDP on top, expert gradients are averaged over dp·cp·ep like the
dense ones (FSDP divides by dp·cp, `_local_weight` by ep), which gives the one-process gradient.

Shape suffixes: N tokens on this rank, K experts per token, M = N·K rows sent, A rows received (arrived),
R the ep ranks, L the experts per rank (local), D the model dim.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd, wait_tensor
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from dsv4train.models.moe import Experts, combine_rows, sort_rows_by_expert


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by `factor`."""

    @staticmethod
    def forward(ctx, t, factor):
        ctx.factor = factor
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def _local_weight(t: torch.Tensor, ep: int) -> torch.Tensor:
    """This rank's experts as a plain tensor. Their gradient gathers the tokens of all `ep` ranks' batches,
    while FSDP averages over efsdp = dp·cp only, so it is scaled by 1/ep here (gloo has no pre-scaled
    reduce-scatter, so this is done in autograd rather than with FSDP's gradient divide factor)."""
    local = t.to_local() if isinstance(t, DTensor) else t
    return _ScaleGrad.apply(local, 1.0 / ep)


def _all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    return wait_tensor(all_to_all_single_autograd(x.contiguous(), out_splits, in_splits, group))


def _exchange_counts(sent_RL: torch.Tensor, group) -> torch.Tensor:
    """recv_RL[r, e]: how many rows rank r sends to my local expert e, from sent_RL[r, e] (mine to rank r's e)."""
    recv_RL = torch.empty_like(sent_RL)
    dist.all_to_all_single(recv_RL, sent_RL, group=group)
    return recv_RL


def _by_local_expert(recv_RL: torch.Tensor) -> torch.Tensor:
    """The permutation that puts received rows (grouped by source rank, each group by local expert) in local-expert
    order; stable, so rows of one expert keep the source-rank order and the result does not depend on timing."""
    R, L = recv_RL.shape
    local_e_A = torch.repeat_interleave(torch.arange(L, device=recv_RL.device).repeat(R), recv_RL.reshape(-1))
    return torch.argsort(local_e_A, stable=True)


class AllToAllDispatch:
    """`Experts.dispatch` under expert parallelism: rows go by all-to-all to the `ep` ranks of `group` that hold
    their experts, run through the local experts there, and come back the same way (module docstring)."""

    def __init__(self, group, ep: int):
        self.group, self.ep = group, ep

    def __call__(self, x_ND: torch.Tensor, idx_NK: torch.Tensor, w_NK: torch.Tensor, experts: Experts) -> torch.Tensor:
        w1, w2, w3 = (_local_weight(w, self.ep) for w in (experts.w1, experts.w2, experts.w3))
        order_M, token_M = sort_rows_by_expert(idx_NK)
        sent_RL = torch.bincount(idx_NK.reshape(-1), minlength=self.ep * w1.shape[0]).view(self.ep, -1)
        recv_RL = _exchange_counts(sent_RL, self.group)
        in_splits, out_splits = sent_RL.sum(1).tolist(), recv_RL.sum(1).tolist()

        xs_AD = _all_to_all(x_ND.index_select(0, token_M), out_splits, in_splits, self.group)
        by_expert_A = _by_local_expert(recv_RL)
        ys_AD = experts.mlp(xs_AD.index_select(0, by_expert_A), recv_RL.sum(0), w1, w2, w3)
        ys_AD = ys_AD.index_select(0, torch.argsort(by_expert_A))  # back to arrival order (inverse permutation)
        ys_MD = _all_to_all(ys_AD, in_splits, out_splits, self.group)
        return combine_rows(ys_MD, order_M, token_M, w_NK, x_ND)


def apply_expert_parallel(model: nn.Module, ep_mesh: DeviceMesh) -> int:
    """Split every `Experts` module of `model` over `ep_mesh` (in place) and give it the all-to-all dispatch;
    returns how many were split."""
    n = 0
    dispatch = AllToAllDispatch(ep_mesh.get_group(), ep_mesh.size())
    for module in model.modules():
        if not isinstance(module, Experts):
            continue
        for name in ("w1", "w2", "w3"):
            full = getattr(module, name)
            setattr(module, name, nn.Parameter(distribute_tensor(full.data, ep_mesh, [Shard(0)])))
        module.dispatch = dispatch
        n += 1
    return n
