"""Muon on sharded parameters: FSDP2 / TP DTensors and EP-local expert stacks (arch ref §8.1, docs/parallelism.md).

Newton–Schulz needs whole matrices, the momentum and the update do not. `DistributedMuon.step`:

1. momentum + Nesterov on the local shards (the buffers are DTensors placed like their parameters);
2. orthogonalisation of every logically independent matrix:
   - local, no communication, when the shards of a parameter hold whole matrices: plain tensors (EP-local
     expert stacks), fully replicated DTensors, 3-D stacks sharded on the expert dim, `row_blocks` matrices whose
     shards hold whole blocks;
   - owner-compute otherwise: the parameter's whole Nesterov input is gathered onto ONE rank of its shard group
     (owners balanced by NS cost, largest first onto the least loaded rank, identical on every rank), which runs
     NS and sends each rank its block back. All gathers of a step go through one `all_to_all_single`, all
     scatters through a second one;
3. weight decay and the update on the local shards.

The result equals single-process `Muon` on the full tensors (to rounding). The first step builds a plan with one
`all_gather_object` (who holds which block of what); every later step costs two all-to-alls (only when some
parameter needs owner-compute) and one async all-reduce of two numbers (the global `last_update_rms`).
Every rank of the process group must call `step()` (SPMD), and a sharded parameter has a gradient on all ranks of
its shard group or on none.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from dsv4train.optim.combined import CombinedOptimizer
from dsv4train.optim.muon import (
    NS_COEFFICIENTS,
    Muon,
    apply_update,
    as_matrices,
    momentum_input,
    newton_schulz,
    resolve_ns_dtype,
)

__all__ = ["DistributedMuon", "make_distributed", "assign_owners", "ns_cost", "model_ns_costs"]

# same-shape matrices are concatenated into one newton_schulz call up to this many elements (bounds the extra
# memory of the concatenation and of NS's temporaries; one larger parameter still runs alone)
NS_BATCH_ELEMENTS = 1 << 25


def ns_cost(n_mats: int, n: int, m: int) -> float:
    """Multiply-adds of one Newton–Schulz iteration on n_mats matrices [n, m] (on the wide side, a <= b):
    X X^T is a²b, (XX^T)² is a³, the product with X is a²b."""
    a, b = min(n, m), max(n, m)
    return float(n_mats) * (2 * a * a * b + a**3)


def model_ns_costs(model: torch.nn.Module, optim_cfg=None) -> list[float]:
    """NS cost of each Muon parameter of `model` as one owner job (an expert stack or a row-block matrix is one
    job), as if none were whole on any rank: the worst case of the owner assignment (bench, tests)."""
    from dsv4train.optim.groups import describe_groups

    labels = describe_groups(model, optim_cfg)
    o_groups = getattr(getattr(model, "cfg", None), "o_groups", 1)
    costs = []
    for name, p in model.named_parameters():
        if labels.get(name, "").startswith("muon"):
            g = o_groups if labels[name] == "muon:row_blocks" else 1
            costs.append(
                ns_cost(p.shape[0], p.shape[1], p.shape[2]) if p.ndim == 3 else ns_cost(g, p.shape[0] // g, p.shape[1])
            )
    return costs


def assign_owners(jobs: list[tuple[object, float, tuple[int, ...]]], loads: list[float]) -> dict:
    """Deterministic balanced owners: jobs (key, cost, candidate ranks) largest cost first (ties by key), each onto
    its least loaded candidate (ties by rank). `loads` (per rank, e.g. the local NS work) is updated in place.
    Returns key -> owner rank. Every rank calls it on the same input, so all get the same answer."""
    owners = {}
    for key, cost, ranks in sorted(jobs, key=lambda j: (-j[1], j[0])):
        owner = min(ranks, key=lambda r: (loads[r], r))
        loads[owner] += cost
        owners[key] = owner
    return owners


def _is_sharded(placement) -> bool:
    if placement.is_partial():
        raise ValueError("DistributedMuon: a parameter with a Partial placement cannot be optimised; reduce it first")
    return not placement.is_replicate()  # Shard, and FSDP2's _StridedShard (whose is_shard() is False)


def _local(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Local shard of t laid out like the parameter `like` (a gradient placed differently is redistributed)."""
    if isinstance(t, DTensor):
        if isinstance(like, DTensor) and (t.device_mesh != like.device_mesh or t.placements != like.placements):
            t = t.redistribute(like.device_mesh, like.placements)
        return t.to_local()
    if isinstance(like, DTensor):
        raise TypeError("DistributedMuon: the parameter is a DTensor but its gradient/state is a plain tensor")
    return t


def _rows_per_matrix(p: torch.Tensor, group: dict) -> int:
    """How many dim-0 indices one independent matrix spans: 1 for a stack [E, n, m], n/g for [g*n, m]."""
    return 1 if p.ndim == 3 else p.shape[0] // group["row_blocks"]


def _holds_whole(offset, shape, global_shape, unit: int) -> bool:
    """True when the block (offset, shape) of a tensor is a run of whole matrices (spans `unit` rows each)."""
    if shape[0] == 0:
        return True
    full_rest = all(o == 0 and s == g for o, s, g in zip(offset[1:], shape[1:], global_shape[1:]))
    return full_rest and offset[0] % unit == 0 and shape[0] % unit == 0


def _slices(offset, shape) -> tuple[slice, ...]:
    return tuple(slice(o, o + s) for o, s in zip(offset, shape))


@dataclass
class _Shared:
    """A parameter orthogonalised on an owner: one replica of it, as all ranks of its shard group see it."""

    index: int  # position in the optimizer's flat parameter list (same model -> same list on every rank)
    ranks: tuple[int, ...]  # ranks (in the process group) whose blocks tile the whole tensor
    blocks: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]  # (offset, shape) per rank in `ranks`
    shape: tuple[int, ...]
    cost: float
    owner: int = -1

    @property
    def key(self):
        return (self.index, self.ranks)


@dataclass
class _Plan:
    signature: tuple
    rank: int
    world: int
    local_rows: dict[int, int | None] = field(default_factory=dict)  # index -> row_blocks of the local shard
    member: list[_Shared] = field(default_factory=list)  # shared params with a block here, global order
    owned: list[_Shared] = field(default_factory=list)  # those this rank orthogonalises
    any_shared: bool = False  # on any rank: then every rank joins the all-to-alls
    transfer_dtype: torch.dtype = torch.float32
    device: torch.device = torch.device("cpu")
    copies: dict[int, float] = field(default_factory=dict)  # index -> ranks holding an identical copy
    loads: list[float] = field(default_factory=list)  # NS multiply-adds per rank (local + owned), for balance


class DistributedMuon(Muon):
    """`Muon` whose parameters may be DTensors (any mix of Shard/_StridedShard/Replicate placements on any mesh
    whose ranks are in `process_group`) or plain local tensors. Same options and state as `Muon`; the momentum
    buffer of a DTensor parameter is a DTensor with the same placements, so DCP's get/set_optimizer_state_dict
    handle it.

    plain_copies: for a plain (non-DTensor) parameter, how many ranks of the group hold an identical copy (an int or
    a function of the parameter); only used to make `last_update_rms` global. Default: all of them (replicated).
    For EP-local expert stacks pass the number of ranks that hold the same experts (world / ep)."""

    def __init__(
        self,
        params,
        *args,
        process_group: dist.ProcessGroup | None = None,
        plain_copies: int | Callable[[torch.Tensor], int] | None = None,
        **kwargs,
    ) -> None:
        self._pg = process_group
        self._plain_copies = plain_copies
        self._plan: _Plan | None = None
        self._rms_stats: torch.Tensor | None = None
        self._rms_work = None
        self._rms: torch.Tensor | None = None
        self.last_comm: dict[str, int] = {}
        super().__init__(params, *args, **kwargs)

    @classmethod
    def from_muon(cls, muon: Muon, **kwargs) -> DistributedMuon:
        """A DistributedMuon over the same parameter groups (options included) and state as `muon`."""
        new = cls([dict(g) for g in muon.param_groups], **{**muon.defaults, **kwargs})
        new.state.update(muon.state)
        return new

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        self._plan = None

    # ---- global RMS of the orthogonalised update (before the LR), like Muon.last_update_rms
    @property
    def last_update_rms(self) -> torch.Tensor | None:
        if self._rms_stats is not None:
            if self._rms_work is not None:
                self._rms_work.wait()
            sq, count = self._rms_stats.tolist()
            self._rms = None if count == 0 else torch.tensor(math.sqrt(sq / count))
            self._rms_stats, self._rms_work = None, None
        return self._rms

    @last_update_rms.setter
    def last_update_rms(self, value) -> None:
        self._rms_stats, self._rms_work, self._rms = None, None, value

    # ---- plan: who holds which block, which parameters are local, who owns the others
    def _flat(self) -> list[tuple[torch.Tensor, dict]]:
        return [(p, g) for g in self.param_groups for p in g["params"]]

    def _group_rank(self, global_rank: int) -> int:
        return global_rank if self._pg is None else dist.get_group_rank(self._pg, global_rank)

    def _copies_of_plain(self, p: torch.Tensor, world: int) -> float:
        c = self._plain_copies
        if c is None:
            return float(world)
        return float(c(p) if callable(c) else c)

    def _build_plan(self, signature: tuple) -> _Plan:
        world, me = dist.get_world_size(self._pg), dist.get_rank(self._pg)
        flat = self._flat()
        plan = _Plan(
            signature=signature, rank=me, world=world, device=flat[0][0].device if flat else torch.device("cpu")
        )
        reports, my_local_cost = {}, 0.0
        for i, (p, group) in enumerate(flat):
            unit = _rows_per_matrix(p, group)
            if isinstance(p, DTensor):
                mesh, coord = p.device_mesh, p.device_mesh.get_coordinate()
                sharded = [_is_sharded(pl) for pl in p.placements]
                plan.copies[i] = float(math.prod(mesh.size(d) for d, s in enumerate(sharded) if not s))
                index = tuple(slice(None) if s else c for s, c in zip(sharded, coord))
                ranks = tuple(self._group_rank(r) for r in mesh.mesh[index].flatten().tolist())
                if len(ranks) > 1:
                    shape, offset = compute_local_shape_and_global_offset(p.shape, mesh, p.placements)
                    if tuple(shape) != tuple(p.to_local().shape):
                        raise RuntimeError(
                            f"DistributedMuon: parameter {i}: local shard {tuple(p.to_local().shape)} "
                            f"is not the block {tuple(shape)} its placements {p.placements} give"
                        )
                    reports[i] = (ranks, tuple(offset), tuple(shape), tuple(p.shape), unit, str(p.dtype))
                    continue
                local = p.to_local()
            else:
                plan.copies[i] = self._copies_of_plain(p, world)
                local = p
            plan.local_rows[i] = None if p.ndim == 3 else group["row_blocks"]
            my_local_cost += _matrices_cost(local.shape, unit)
        gathered = [None] * world
        dist.all_gather_object(gathered, (reports, my_local_cost), group=self._pg)

        loads = [cost for _, cost in gathered]
        shared: dict[tuple, _Shared] = {}
        blocks: dict[tuple, dict[int, tuple]] = {}
        dtypes = set()
        for r, (rep, _) in enumerate(gathered):
            for i, (ranks, offset, shape, gshape, unit, dtype) in rep.items():
                key = (i, ranks)
                if key not in shared:
                    shared[key] = _Shared(i, ranks, (), gshape, 0.0)
                    blocks[key] = {}
                elif shared[key].shape != gshape:
                    raise RuntimeError(
                        f"DistributedMuon: parameter {i} has global shape {gshape} on rank {r} but "
                        f"{shared[key].shape} on another rank of its shard group"
                    )
                blocks[key][r] = (offset, shape, unit)
                dtypes.add(dtype)
        jobs = []
        for key, e in shared.items():
            got = blocks[key]
            if set(got) != set(e.ranks):
                raise RuntimeError(
                    f"DistributedMuon: parameter {e.index}: ranks {sorted(got)} reported blocks but "
                    f"its shard group is {e.ranks}; is the optimizer's parameter list the same on all "
                    "ranks?"
                )
            e.blocks = tuple(got[r][:2] for r in e.ranks)
            if sum(math.prod(s) for _, s in e.blocks) != math.prod(e.shape):
                raise RuntimeError(
                    f"DistributedMuon: the shards of parameter {e.index} do not tile its shape {e.shape}"
                )
            unit = got[e.ranks[0]][2]
            if all(_holds_whole(o, s, e.shape, unit) for o, s in e.blocks):  # whole matrices on every rank: local
                for r, (_, s) in zip(e.ranks, e.blocks):
                    loads[r] += _matrices_cost(s, unit)
                if me in e.ranks:
                    rows = e.blocks[e.ranks.index(me)][1][0]
                    plan.local_rows[e.index] = None if len(e.shape) == 3 else rows // unit
                continue
            e.cost = _matrices_cost(e.shape, unit)
            jobs.append((key, e.cost, e.ranks))
        owners = assign_owners(jobs, loads)
        for key in sorted(owners):
            e = shared[key]
            e.owner = owners[key]
            if me in e.ranks:
                plan.member.append(e)
                if e.owner == me:
                    plan.owned.append(e)
        plan.any_shared = bool(owners)
        plan.transfer_dtype = getattr(torch, dtypes.pop().split(".")[-1]) if len(dtypes) == 1 else torch.float32
        plan.loads = loads
        return plan

    def plan_summary(self) -> dict:
        """Which parameters (flat indices) are orthogonalised locally / by which owner, and the NS load per rank."""
        plan = self._plan
        if plan is None:
            return {}
        return {
            "local": sorted(plan.local_rows),
            "owner": {e.index: e.owner for e in plan.member},
            "loads": list(plan.loads),
        }

    # ---- the step
    def _momentum_buffer(self, p: torch.Tensor) -> torch.Tensor:
        """As Muon's, and a full buffer under a sharded parameter (e.g. loaded from a single-process checkpoint)
        is cut down to this rank's block."""
        buf = super()._momentum_buffer(p)
        if isinstance(p, DTensor) and not isinstance(buf, DTensor):
            buf = self.state[p]["momentum_buffer"] = distribute_tensor(
                buf.to(p.device), p.device_mesh, p.placements, src_data_rank=None
            )
        return buf

    @torch.no_grad()
    def step(self, closure=None):
        if not dist.is_available() or not dist.is_initialized():
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        flat = self._flat()
        signature = tuple((id(p), type(p), tuple(p.shape)) for p, _ in flat)
        if self._plan is None or self._plan.signature != signature:
            self._plan = self._build_plan(signature)
        plan = self._plan

        u: dict[int, torch.Tensor] = {}
        for i, (p, group) in enumerate(flat):
            if p.grad is None:
                continue
            u[i] = momentum_input(
                _local(self._momentum_buffer(p), p), _local(p.grad, p), group["momentum"], group["nesterov"]
            )

        local = [i for i in u if i in plan.local_rows]
        o = dict(zip(local, _orthogonalize([(u[i], flat[i][1], plan.local_rows[i]) for i in local])))
        self.last_comm = {"all_to_all": 0, "sent": 0, "received": 0}
        if plan.any_shared:
            o.update(self._owner_compute(plan, flat, u))

        sq_sum = torch.zeros((), dtype=torch.float64, device=plan.device)
        count = 0.0
        for i, (p, group) in enumerate(flat):
            if i not in u:
                continue
            apply_update(_local(p, p), o[i], group["lr"], group["weight_decay"])
            copies = plan.copies[i]
            sq_sum += o[i].double().square().sum().to(plan.device) / copies
            count += o[i].numel() / copies
        self._rms_stats = torch.stack([sq_sum, torch.tensor(count, dtype=torch.float64, device=plan.device)])
        self._rms_work = dist.all_reduce(self._rms_stats, group=self._pg, async_op=True)
        self._rms = None
        return loss

    def _owner_compute(self, plan: _Plan, flat, u: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Gather each shared parameter's Nesterov input to its owner, NS there, scatter the blocks back."""
        world, dtype, device = plan.world, plan.transfer_dtype, plan.device
        # 1. gather: to each owner, my blocks of what it owns (in global order)
        parts: list[list[torch.Tensor]] = [[] for _ in range(world)]
        for e in plan.member:
            if e.index in u:
                parts[e.owner].append(u[e.index].reshape(-1).to(dtype))
        send_sizes = [sum(t.numel() for t in ts) for ts in parts]
        owned = [e for e in plan.owned if e.index in u]
        recv_sizes = [0] * world
        for e in owned:
            for r, (_, shape) in zip(e.ranks, e.blocks):
                recv_sizes[r] += math.prod(shape)
        recv = self._all_to_all([t for ts in parts for t in ts], send_sizes, recv_sizes, dtype, device)

        # 2. assemble the owned matrices, orthogonalise them (same-shape ones batched)
        cursor = _starts(recv_sizes)
        full = {}
        for e in owned:
            x = torch.empty(e.shape, dtype=dtype, device=device)
            for r, (offset, shape) in zip(e.ranks, e.blocks):
                n = math.prod(shape)
                x[_slices(offset, shape)] = recv[cursor[r] : cursor[r] + n].view(shape)
                cursor[r] += n
            full[e.index] = x
        ortho = _orthogonalize(
            [
                (full[e.index], flat[e.index][1], None if len(e.shape) == 3 else flat[e.index][1]["row_blocks"])
                for e in owned
            ]
        )

        # 3. scatter: back to each rank its block of every matrix I own (the gather's sizes, mirrored)
        back: list[list[torch.Tensor]] = [[] for _ in range(world)]
        for e, oe in zip(owned, ortho):
            for r, (offset, shape) in zip(e.ranks, e.blocks):
                back[r].append(oe[_slices(offset, shape)].reshape(-1))
        mine = self._all_to_all([t for ts in back for t in ts], recv_sizes, send_sizes, dtype, device)
        cursor = _starts(send_sizes)
        out = {}
        for e in plan.member:
            if e.index in u:
                n = u[e.index].numel()
                out[e.index] = mine[cursor[e.owner] : cursor[e.owner] + n].view(u[e.index].shape).to(u[e.index].dtype)
                cursor[e.owner] += n
        return out

    def _all_to_all(self, chunks, send_sizes, recv_sizes, dtype, device) -> torch.Tensor:
        send = torch.cat(chunks) if chunks else torch.empty(0, dtype=dtype, device=device)
        recv = torch.empty(sum(recv_sizes), dtype=dtype, device=device)
        dist.all_to_all_single(recv, send, recv_sizes, send_sizes, group=self._pg)
        me = self._plan.rank
        self.last_comm["all_to_all"] += 1
        self.last_comm["sent"] += sum(send_sizes) - send_sizes[me]
        self.last_comm["received"] += sum(recv_sizes) - recv_sizes[me]
        return recv


def _starts(sizes: list[int]) -> list[int]:
    starts, acc = [], 0
    for s in sizes:
        starts.append(acc)
        acc += s
    return starts


def _matrices_cost(shape, unit: int) -> float:
    """NS cost of a block of a parameter: a stack [E, n, m] (unit 1) or rows of [*, m] in matrices of `unit` rows."""
    if math.prod(shape) == 0:
        return 0.0
    if len(shape) == 3:
        return ns_cost(shape[0], shape[1], shape[2])
    return ns_cost(shape[0] // unit, unit, shape[1])


def _orthogonalize(
    jobs: list[tuple[torch.Tensor, dict, int | None]], max_elements: int = NS_BATCH_ELEMENTS
) -> list[torch.Tensor]:
    """orthogonal_update of each (u, group, row_blocks) (row_blocks None for a stack), matrices of the same
    shape and NS settings batched into newton_schulz calls of at most max_elements input elements."""
    out: list[torch.Tensor | None] = [None] * len(jobs)
    buckets: dict[tuple, list[tuple[int, torch.Tensor]]] = {}
    for k, (u, group, row_blocks) in enumerate(jobs):
        if u.numel() == 0:
            out[k] = u.clone()
            continue
        mats = as_matrices(u, row_blocks or 1)
        key = (
            tuple(mats.shape[1:]),
            u.dtype,
            u.device,
            group["ns"],
            resolve_ns_dtype(group["ns_dtype"], u.device),
            group["eps"],
        )
        buckets.setdefault(key, []).append((k, mats))
    for (_, _, _, ns, ns_dtype, eps), items in buckets.items():
        for batch in _batches(items, max_elements):
            x = torch.cat([m for _, m in batch]) if len(batch) > 1 else batch[0][1]
            orth = newton_schulz(x, NS_COEFFICIENTS[ns], eps, ns_dtype)
            for (k, mats), ok in zip(batch, orth.split([m.size(0) for _, m in batch])):
                u, group, _ = jobs[k]
                scale = math.sqrt(max(mats.size(-2), mats.size(-1))) * group["rms"]
                out[k] = (ok.to(u.dtype) * scale).reshape(u.shape)
    return out


def _batches(items: list[tuple[int, torch.Tensor]], max_elements: int):
    """Consecutive runs of items of at most max_elements in all (an item larger than that runs alone)."""
    batch, size = [], 0
    for item in items:
        n = item[1].numel()
        if batch and size + n > max_elements:
            yield batch
            batch, size = [], 0
        batch.append(item)
        size += n
    if batch:
        yield batch


def make_distributed(
    optimizer,
    process_group: dist.ProcessGroup | None = None,
    plain_copies: int | Callable[[torch.Tensor], int] | None = None,
):
    """Swap the Muon in a CombinedOptimizer (in place; also returned) or a bare Muon for a DistributedMuon over the
    same groups and state. Call it after the model is parallelized and before the first step."""
    kwargs = dict(process_group=process_group, plain_copies=plain_copies)
    if isinstance(optimizer, CombinedOptimizer):
        if "muon" in optimizer.optimizers:
            optimizer.optimizers["muon"] = make_distributed(optimizer.optimizers["muon"], **kwargs)
        return optimizer
    if isinstance(optimizer, DistributedMuon):
        return optimizer
    if isinstance(optimizer, Muon):
        return DistributedMuon.from_muon(optimizer, **kwargs)
    raise TypeError(f"make_distributed takes a CombinedOptimizer or a Muon, got {type(optimizer).__name__}")
