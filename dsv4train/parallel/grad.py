"""Gradient-norm clipping for parameters that are DTensors on different meshes (dense weights on "fsdp", experts
on ("efsdp", "ep"), TP weights on "tp"): torch's clip_grad_norm_ cannot mix meshes in one foreach call."""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor


@torch.no_grad()
def clip_grad_norm_(params, max_norm: float, stage_group=None) -> torch.Tensor:
    """Scale gradients so their global L2 norm is at most max_norm; returns the norm before clipping.

    Squared sums are added per (mesh, placements) group and reduced once per group through DTensor, so a
    sharded gradient counts each element once and a replicated one is not counted twice. With pipeline stages,
    `stage_group` (the pp group) adds up the stages' totals: their meshes are per stage, their parameters disjoint."""
    grads = [p.grad for p in params if p.grad is not None]
    groups: dict[tuple, list] = {}
    for g in grads:
        key = (g.device_mesh, g.placements) if isinstance(g, DTensor) else None
        groups.setdefault(key, []).append(g)
    total = None
    for key, gs in groups.items():
        sq = torch.stack(
            [g.float().square().sum() if key is None else g.to_local().float().square().sum() for g in gs]
        ).sum()
        if key is not None:
            sq = _reduce_squares(sq, gs[0])
        total = sq if total is None else total + sq.to(total.device)
    if stage_group is not None:
        import torch.distributed as dist

        total = torch.zeros((), device=grads[0].device if grads else None) if total is None else total.float()
        dist.all_reduce(total, group=stage_group)
    norm = total.sqrt() if total is not None else torch.zeros(())
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.to(g.device))
    return norm


def _reduce_squares(local_sq: torch.Tensor, like: DTensor) -> torch.Tensor:
    """Sum a local squared-sum over the mesh dims where `like` is sharded (replicated dims hold copies)."""
    import torch.distributed as dist

    for dim, placement in enumerate(like.placements):
        if placement.is_shard() or type(placement).__name__ == "_StridedShard":
            dist.all_reduce(local_sq, group=like.device_mesh.get_group(dim))
    return local_sq
