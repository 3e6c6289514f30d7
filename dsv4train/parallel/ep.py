"""Expert parallelism: routed experts split over the "ep" mesh dim, tokens moved to them by all-to-all.

Rank r of the EP group holds experts [r·E/ep, (r+1)·E/ep) as a DTensor `Shard(0)` of the full [E, n, m] stacks,
so state dicts and DCP checkpoints keep the global shapes and load in any other layout. One MoE call:

1. sort this rank's (token, expert) pairs by expert: rows for EP rank 0's experts come first, then rank 1's...
2. all-to-all the per-expert row counts, then the rows themselves (uneven splits);
3. received rows arrive grouped by source rank, each group sorted by local expert: a stable sort by local expert
   puts them in grouped-GEMM order (source rank is the tie order, so the result does not depend on timing);
4. run the local experts, undo the sort, all-to-all the outputs back, weight and sum them per token.

The all-to-alls are autograd functions (their backward is the reverse all-to-all), so expert gradients collect
the contributions of every rank's tokens. With FSDP on top, expert gradients are averaged over dp·cp·ep like the
dense ones (FSDP divides by dp·cp, `_local_weight` by ep), which gives the one-process gradient.
"""

from __future__ import annotations

import types

import torch
import torch.distributed as dist
from torch.distributed._functional_collectives import all_to_all_single_autograd, wait_tensor
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from torch import nn

from dsv4train.models.moe import Experts


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


def _ep_forward(self: Experts, x_ND: torch.Tensor, idx_NK: torch.Tensor, w_NK: torch.Tensor) -> torch.Tensor:
    group, ep = self.ep_group, self.ep_size
    w1, w2, w3 = (_local_weight(w, ep) for w in (self.w1, self.w2, self.w3))
    n_local = w1.shape[0]
    K = idx_NK.shape[1]
    flat = idx_NK.reshape(-1)
    order = torch.argsort(flat, stable=True)
    token_of = torch.div(order, K, rounding_mode="floor")
    sent_RE = torch.bincount(flat, minlength=ep * n_local).view(ep, n_local)  # rows to rank r's expert e
    recv_RE = torch.empty_like(sent_RE)
    dist.all_to_all_single(recv_RE, sent_RE, group=group)  # row r: what rank r sends to each of my experts
    in_splits, out_splits = sent_RE.sum(1).tolist(), recv_RE.sum(1).tolist()

    xs = _all_to_all(x_ND.index_select(0, token_of), out_splits, in_splits, group)
    local_e = torch.repeat_interleave(torch.arange(n_local, device=xs.device).repeat(ep), recv_RE.reshape(-1))
    by_expert = torch.argsort(local_e, stable=True)
    ys = self.mlp(xs.index_select(0, by_expert), recv_RE.sum(0), w1, w2, w3)
    ys = ys.index_select(0, torch.argsort(by_expert))  # back to arrival order (inverse permutation)
    ys = _all_to_all(ys, in_splits, out_splits, group)
    ys = ys * w_NK.reshape(-1)[order].unsqueeze(-1).to(ys.dtype)
    return torch.zeros_like(x_ND).index_add_(0, token_of, ys.to(x_ND.dtype))


def apply_expert_parallel(model: nn.Module, ep_mesh: DeviceMesh) -> int:
    """Split every `Experts` module of `model` over `ep_mesh` (in place); returns how many were split."""
    n = 0
    for module in model.modules():
        if not isinstance(module, Experts):
            continue
        for name in ("w1", "w2", "w3"):
            full = getattr(module, name)
            setattr(module, name, nn.Parameter(distribute_tensor(full.data, ep_mesh, [Shard(0)])))
        module.ep_group, module.ep_size = ep_mesh.get_group(), ep_mesh.size()
        module.forward = types.MethodType(_ep_forward, module)
        n += 1
    return n
