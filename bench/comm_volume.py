"""Communication volume of one training step, per layout: every collective counted at the dispatcher, next to the
formula for it derived from the code (dsv4train/parallel/*, dsv4train/train/step.py).

    PYTHONPATH=. .venv/bin/python bench/comm_volume.py --flavor toy --seq 128 --rows 2 [--write-docs]
    PYTHONPATH=. .venv/bin/python bench/comm_volume.py --flavor toy,tiny --seq 128,256 --rows 2,2 --write-docs

Layouts dp2, ep2, dp2×ep2, cp2, tp2, dp4, dp4 as HSDP with 2 replicas (`parallel.dp_replicate` = 2: FSDP over
2-rank shard groups, gradients all-reduced across replicas), and pp2 with each schedule (1F1B, interleaved 1F1B,
DualPipeV) on gloo CPU processes. Each
runs two optimizer steps of `train_step` on one micro-batch of `--rows` rows × `--seq` tokens per data rank (the
cp ranks of a data rank split its rows' sequence); the second (steady-state) step is reported, and what the first
step adds (DistributedMuon's plan) is listed below it.

How it counts: a `torch.distributed.tensor.debug.CommDebugMode` subclass (a TorchDispatchMode) records every c10d
and functional collective that reaches the dispatcher, with its element count, dtype, group and split sizes.
That sees FSDP2's all-gathers / reduce-scatters (which call `dist.all_gather_single` / `reduce_scatter_single`,
so a shim over `dist.all_gather_into_tensor` would miss them), EP's functional `all_to_all_single_autograd` in
forward and in backward, plain `dist.all_reduce` / `dist.all_to_all_single` (ops `c10d.allreduce_`,
`c10d.alltoall_base_`), and CP's point-to-point sends and receives (`dist.batch_isend_irecv` on gloo issues one
`c10d.send` / `c10d.recv_` per op; CommDebugMode does not count those), and pipelining's sends and receives of
stage activations and gradients (op by op, outside autograd: their own "pipeline" phase); a shim over
`dist.all_reduce`, `dist.all_to_all_single`, `dist.isend` and `dist.irecv` cross-checks the count. A collective
issued from dsv4train/parallel/cp.py (found on the Python stack; forward, or the backward of its autograd
functions) is a CP term: under cp2 alone the cp, fsdp and efsdp meshes are the same process group, so the group
cannot tell CP's all-gathers from FSDP's. CommDebugMode's own module tracker is switched off: it raises IndexError
when the shared output head runs a second time (for MTP) inside the root forward (torch 2.13); its per-op
`comm_counts` is kept and checked against our records.

Bytes are "wire bytes sent per rank" of the bandwidth-optimal algorithm: all-gather (n-1)·shard,
reduce-scatter (1-1/n)·input, all-reduce 2·(1-1/n)·buffer (ring), all-to-all the rows sent to OTHER ranks
(exact, from the split sizes), broadcast the buffer on the root, send the buffer (a receive sends nothing: 0 B,
but it counts as a call). Mean over ranks (max in brackets where ranks differ).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
import shlex
import sys
import tempfile
from collections import defaultdict

import torch
import torch.distributed as dist
from torch.distributed.tensor.debug import CommDebugMode
from torch.utils._python_dispatch import TorchDispatchMode

from dsv4train.config.errors import ConfigError
from dsv4train.config.model import ModelConfig
from dsv4train.config.optim import OptimConfig
from dsv4train.config.pretrain import TrainConfig
from dsv4train.models.flavors import get_flavor
from dsv4train.models.model import DSV4Model
from dsv4train.optim.groups import describe_groups
from dsv4train.parallel import cp as cp_module
from dsv4train.parallel.dims import ParallelDims
from dsv4train.parallel.pp import rank_stages
from dsv4train.parallel.runtime import ParallelRuntime

LAYOUTS = ({"dp": 2}, {"ep": 2}, {"dp": 2, "ep": 2}, {"cp": 2}, {"tp": 2}, {"dp": 4}, {"dp": 4, "dp_replicate": 2},
           {"pp": 2, "pp_microbatches": 2}, {"pp": 2, "pp_schedule": "interleaved_1f1b", "pp_microbatches": 2},
           {"pp": 2, "pp_schedule": "dualpipev"})  # DualPipeV: at least one chunk per stage (4 rows, see render)
P2P_OPS = ("c10d.send", "c10d.recv_")  # not in CommDebugMode's comm_counts
SECTION = "## Communication volume per step"
_EXPERT = re.compile(r"(^|\.)experts\.w[123]$")


# ------------------------------------------------------------------------------------------------ counting
class CommVolumeMode(CommDebugMode):
    """CommDebugMode that also records bytes, group and phase of every collective (module tracker off)."""

    def __init__(self):
        super().__init__()
        tracker = self.advanced_module_tracker
        tracker.name, tracker.module_parents_dict = "Global", {"Global": set()}
        self.records: list[dict] = []
        self.phase, self.term = "step", None

    def __enter__(self):
        self.comm_counts.clear()
        self.comm_module_counts.clear()
        self.comm_module_counts["Global"] = {"forward": defaultdict(int), "backward": defaultdict(int)}
        TorchDispatchMode.__enter__(self)
        return self

    def __exit__(self, *exc):
        return TorchDispatchMode.__exit__(self, *exc)

    @contextlib.contextmanager
    def tagged(self, phase: str, term: str | None = None):
        """Collectives issued inside belong to `phase` (and, if given, to the formula term `term`)."""
        old, self.phase, self.term = (self.phase, self.term), phase, term
        try:
            yield
        finally:
            self.phase, self.term = old

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if out is NotImplemented or isinstance(func, torch._ops.HigherOrderOperator):
            return out
        name = str(func._overloadpacket)
        if name.startswith(("c10d.", "_c10d_functional.")) and _kind(name):
            phase, term, cp = self.phase, self.term, _from_cp()
            if phase == "step" and _kind(name) in ("send", "recv") and not cp:
                # a pipeline stage's activations or their gradients: the schedule sends both outside autograd
                phase, term = "pipeline", "PP point-to-point"
            elif phase == "step":
                phase = "backward" if torch._C._current_graph_task_id() != -1 else "forward"
            self.records.append(_describe(name, args, kwargs or {}, phase) | {"cp": cp, "term": term})
        return out


def _from_cp() -> bool:
    """Whether dsv4train/parallel/cp.py is on this thread's Python stack (a CP forward, or the backward of one of
    its autograd functions, which the engine runs on the thread that issues the collective)."""
    f = sys._getframe(1)
    while f is not None and f.f_code.co_filename != cp_module.__file__:
        f = f.f_back
    return f is not None


def _kind(name: str) -> str | None:
    op = name.split(".", 1)[1]
    for pattern, kind in (("reduce_scatter", "reduce_scatter"), ("allgather|all_gather", "all_gather"),
                          ("allreduce|all_reduce", "all_reduce"), ("alltoall|all_to_all", "all_to_all"),
                          ("broadcast", "broadcast"), ("send", "send"), ("recv", "recv")):
        if re.match(f"_?({pattern})", op):
            return kind
    return None


def _tensors(x) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for y in x for t in _tensors(y)]
    return []


def _group(args) -> dist.ProcessGroup:
    for a in args:
        if isinstance(a, torch.ScriptObject):
            try:
                return dist.ProcessGroup.unbox(a)
            except Exception:  # a ReduceOp or Work object
                continue
    name = next(a for a in reversed(args) if isinstance(a, str))
    return dist.distributed_c10d._resolve_process_group(name)


def _describe(name: str, args, kwargs, phase: str) -> dict:
    kind, functional = _kind(name), name.startswith("_c10d_functional.")
    pg = _group(list(args) + list(kwargs.values()))
    n, me = pg.size(), pg.rank()
    # the input tensors of each op (functional ops: the first argument; c10d ops: see their schemas)
    if functional or kind in ("all_reduce", "broadcast", "send", "recv"):
        inputs = _tensors(args[0])
    else:
        inputs = _tensors(args[1])
    in_bytes = sum(t.numel() * t.element_size() for t in inputs)
    rec = {"op": name, "kind": kind, "phase": phase, "group": pg.group_name, "n": n, "in_bytes": in_bytes}
    if kind == "all_gather":
        rec["wire"] = (n - 1) * in_bytes
    elif kind == "reduce_scatter":
        rec["wire"] = (n - 1) * in_bytes // n
    elif kind == "all_reduce":
        rec["wire"] = 2 * (n - 1) * in_bytes / n
    elif kind == "broadcast":
        root = args[2] if not functional else args[1]
        rec["wire"] = in_bytes if me == root else 0
    elif kind in ("send", "recv"):
        rec["wire"] = in_bytes if kind == "send" else 0
    else:  # all_to_all: rows to other ranks, from the split sizes (empty = equal splits)
        x = inputs[0]
        in_splits = list(args[2] if functional else args[4])
        out_splits = list(args[1] if functional else args[3])
        rows = x.shape[0] if x.dim() else 1
        in_splits = in_splits or [rows // n] * n
        out_splits = out_splits or in_splits
        row_bytes = x.numel() * x.element_size() // max(rows, 1)
        rec["wire"] = sum(s for j, s in enumerate(in_splits) if j != me) * row_bytes
        rec.update(rank=me, ranks=dist.get_process_group_ranks(pg), row_bytes=row_bytes,
                   send_rows=[int(s) for s in in_splits], recv_rows=[int(s) for s in out_splits])
        if not functional and x.dtype == torch.int64 and x.dim() == 2 and x.shape[0] == n:
            rec["histogram"] = x.sum(1).tolist()  # EP's per-destination row counts (this rank's routing)
    return rec


class _TaggedRuntime(ParallelRuntime):
    """The trainer's runtime with the metric and grad-norm collectives tagged with their phase."""

    mode: CommVolumeMode | None = None

    def _tag(self, phase, term=None):
        return self.mode.tagged(phase, term) if self.mode is not None else contextlib.nullcontext()

    def mean_over_data(self, t):
        with self._tag("metrics"):
            return super().mean_over_data(t)

    def sum_over_data(self, t):
        with self._tag("metrics"):
            return super().sum_over_data(t)

    def clip_grad_norm(self, params, max_norm):
        with self._tag("grad_norm"):
            return super().clip_grad_norm(params, max_norm)

    def sum_over_stages(self, t):
        with self._tag("metrics", "PP stage-sum all-reduce"):
            return super().sum_over_stages(t)


# ------------------------------------------------------------------------------------------------ the run
def model_config(flavor: str, seq: int) -> ModelConfig:
    base = get_flavor(flavor)
    return get_flavor(flavor, max_seq_len=max(base.max_seq_len, seq))


def _worker(rank: int, world: int, layout: dict, flavor, seq: int, rows: int, optim: str, out_path: str,
            steps: int = 2):
    from dsv4train.data.loader import rank_rows
    from dsv4train.optim.groups import build_optimizers
    from dsv4train.train.step import train_step

    cfg = flavor if isinstance(flavor, ModelConfig) else model_config(flavor, seq)
    rt = _TaggedRuntime(ParallelDims(**layout))
    model = DSV4Model(cfg)
    model.init_weights(0)
    rt.parallelize(model)
    opt = rt.distribute_optimizer(build_optimizers(model, OptimConfig(name=optim, muon_ns_dtype="float32")))
    mesh = rt.dims.mesh
    groups = {mesh[d].get_group().group_name: d for d in ("tp", "ep", "efsdp", "fsdp")}  # later wins on equal
    # HSDP: FSDP2's 2-D (replicate, shard) meshes are new process groups that `fsdp_meshes` made with `_unflatten`
    # ("fsdp_replicate", "fsdp_shard", and "efsdp_*" for the experts); the sharded parameters' meshes hold them
    for p in model.parameters():
        m = getattr(p, "device_mesh", None)
        for i, dim in enumerate(m.mesh_dim_names or () if m is not None else ()):
            if dim.endswith(("_replicate", "_shard")):
                groups[m.get_group(i).group_name] = dim
    groups.setdefault(dist.group.WORLD.group_name, "world")

    g = torch.Generator().manual_seed(1)
    global_rows = rows * rt.data_ranks
    batches = [{"tokens": torch.randint(0, cfg.vocab_size, (global_rows, seq + 1), generator=g)}
               for _ in range(steps)]
    step_fn = opt.step

    def tagged_step(*a, **k):
        with rt.mode.tagged("optimizer"):
            return step_fn(*a, **k)

    opt.step = tagged_step
    shim = defaultdict(int)
    # point-to-point: every send / receive, one call per op, whether batched (`batch_isend_irecv` runs each op's
    # function), op by op (pipelining's homogeneous batches) or blocking (`dist.send` / `recv` call `isend` /
    # `irecv` in torch 2.13); patched where c10d looks them up too
    p2p = ("isend", "irecv")
    originals = {f: getattr(dist, f) for f in ("all_reduce", "all_to_all_single") + p2p}
    c10d = dist.distributed_c10d

    def _shimmed(fname):
        def call(*a, **k):
            shim["p2p" if fname in p2p else fname] += 1
            return originals[fname](*a, **k)
        return call

    result = []
    for batch in batches:
        shim.clear()
        for f in originals:
            setattr(dist, f, _shimmed(f))
            if f in p2p:
                setattr(c10d, f, getattr(dist, f))
        try:
            with CommVolumeMode() as mode:
                rt.mode = mode
                train_step(model, opt, [rank_rows(batch, rt.data_rank, rt.data_ranks)], 0.3, TrainConfig(),
                           torch.device("cpu"), torch.float32, rt)
        finally:
            rt.mode = None
            for f, fn in originals.items():
                setattr(dist, f, fn)
                if f in p2p:
                    setattr(c10d, f, fn)
        counted = defaultdict(int)
        for r in mode.records:
            counted[r["op"]] += 1
        debug_counts = {str(k).replace("c10d_functional.", "_c10d_functional."): v
                        for k, v in mode.comm_counts.items()}
        collectives = {k: v for k, v in counted.items() if k not in P2P_OPS}
        assert debug_counts == collectives, f"CommDebugMode counts {debug_counts} != records {collectives}"
        assert shim["all_reduce"] == counted["c10d.allreduce_"], (dict(shim), dict(counted))
        assert shim["all_to_all_single"] == counted["c10d.alltoall_base_"], (dict(shim), dict(counted))
        assert shim["p2p"] == sum(counted[k] for k in P2P_OPS), (dict(shim), dict(counted))
        for r in mode.records:
            r["group"] = groups.get(r["group"], f"size {r['n']}")
        muon = getattr(opt, "optimizers", {}).get("muon") if hasattr(opt, "optimizers") else None
        result.append({"records": mode.records, "debug_counts": debug_counts,
                       "muon_last_comm": dict(getattr(muon, "last_comm", {}) or {})})
    everyone = [None] * world
    dist.all_gather_object(everyone, result)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(everyone, f)


def measure(layout: dict, flavor, seq: int, rows: int, optim: str = "muon", steps: int = 2) -> list[list[dict]]:
    """Per rank, per step: {"records": [...], "debug_counts": {...}, "muon_last_comm": {...}}. `flavor` is a
    flavor name or a ModelConfig."""
    from dsv4train.testing.distributed import run_distributed_test

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "out.json")
        run_distributed_test(_worker, world_size=ParallelDims(**layout).world_size,
                             args=(layout, flavor, seq, rows, optim, path, steps), timeout_s=300.0)
        with open(path) as f:
            return json.load(f)


def check_layout(layout: dict, cfg: ModelConfig, seq: int, rows: int) -> str | None:
    """None when the layout can run, else why not (e.g. TP not built yet)."""
    dims = ParallelDims(**layout)
    try:
        dims.validate(dims.world_size, cfg, seq, rows)
    except ConfigError as e:
        return str(e)
    return None


# ------------------------------------------------------------------------------------------------ formulas
def _padded(shape, n: int) -> int:
    """Elements FSDP2 moves for one parameter sharded on dim 0 over n ranks: dim 0 padded to a multiple of n."""
    if len(shape) == 0:
        return n
    d0, rest = shape[0], math.prod(shape[1:])
    return -(-d0 // n) * n * rest


def _blocks(d0: int, n: int) -> list[tuple[int, int]]:
    """(offset, rows) of each rank's FSDP2 block of dim 0 (torch.chunk sizes, empty blocks at the end)."""
    chunk = -(-d0 // n)
    return [(min(r * chunk, d0), max(0, min(chunk, d0 - r * chunk))) for r in range(n)]


def _whole_units(d0: int, unit: int, n: int) -> bool:
    """Whether every rank's dim-0 block of a [d0, ...] matrix split over n ranks is a run of whole `unit`-row
    matrices (then DistributedMuon orthogonalises it locally)."""
    return all(rows == 0 or (off % unit == 0 and rows % unit == 0) for off, rows in _blocks(d0, n))


def param_split(cfg: ModelConfig, ep: int) -> dict:
    """Shapes of the FSDP units: "root", "blocks" (one list per layer) and, with EP, "experts" (one local stack
    per MoE layer incl. MTP, shapes as each rank holds them before efsdp)."""
    with torch.device("meta"):
        model = DSV4Model(cfg)
    units = {"root": [], "blocks": [[] for _ in cfg.layer_types], "experts": defaultdict(list), "names": {}}
    for name, p in model.named_parameters():
        shape = tuple(p.shape)
        if ep > 1 and _EXPERT.search(name):
            shape = (shape[0] // ep,) + shape[1:]
            units["experts"][name.rsplit(".", 1)[0]].append(shape)
        elif name.startswith("layers."):
            units["blocks"][int(name.split(".")[1])].append(shape)
        else:
            units["root"].append(shape)
        units["names"][name] = (shape, "experts" if ep > 1 and _EXPERT.search(name) else "dense")
    units["experts"] = list(units["experts"].values())
    units["model"] = model
    return units


def muon_owner_elements(model, cfg: ModelConfig, optim: OptimConfig, n: int, ep: int) -> tuple[int, int]:
    """(elements, matrices) of Muon parameters that DistributedMuon owner-computes when FSDP2 shards them on
    dim 0 over n ranks: every 2-D matrix whose blocks are not runs of whole matrices (`wo_a` blocks holding whole
    output groups and 3-D expert stacks, sharded on the expert dim, are local). With EP the expert stacks are
    local too."""
    if n == 1 or optim.name != "muon":
        return 0, 0
    total = mats = 0
    for name, label in describe_groups(model, optim).items():
        if not label.startswith("muon"):
            continue
        p = dict(model.named_parameters())[name]
        if p.ndim == 3:
            continue  # expert stacks: whole experts per FSDP / EP block
        unit = p.shape[0] // cfg.o_groups if label == "muon:row_blocks" else p.shape[0]
        if _whole_units(p.shape[0], unit, n):
            continue
        total += p.numel()
        mats += 1
    return total, mats


def formulas(cfg: ModelConfig, layout: dict, seq: int, rows: int, optim: str = "muon") -> dict:
    """term -> {"phase", "calls", "formula", "bytes", "exact": bytes incl. FSDP2 padding or None, "vars"}.
    Bytes are wire bytes sent per rank per step (see the module docstring), fp32 parameters and activations."""
    d = ParallelDims(**layout)
    nf, ne, ep, W = d.dp * d.cp * d.ep, d.dp * d.cp, d.ep, d.world_size
    # HSDP (dp_replicate = r > 1): FSDP2 shards over n_s = n_f/r (n_es = n_e/r) ranks of a replica and all-reduces
    # the sharded gradients across the r replicas; the data (loss, metrics) is still averaged over all n_f ranks
    r, ns, nes = d.dp_replicate, d.fsdp_shards, d.expert_fsdp_shards
    sn, se = ("n_f", "n_e") if r == 1 else ("n_s", "n_es")  # symbol of the shard count in the formula text
    units = param_split(cfg, ep)
    B = 4
    L = len(cfg.layer_types) + cfg.n_mtp_layers  # MoE layers: every block is MoE, MTP too
    E, K, D, N = cfg.n_routed_experts, cfg.n_activated_experts, cfg.dim, rows * seq // d.cp
    numel = lambda shapes: sum(math.prod(s) for s in shapes)
    padded = lambda unit_list, n: sum(_padded(s, n) for u in unit_list for s in u)
    dense_units = [units["root"]] + units["blocks"]
    P_dense, P_root = sum(numel(u) for u in dense_units), numel(units["root"])
    P_dense_pad, P_root_pad = padded(dense_units, ns), padded([units["root"]], ns)
    P_exp_local = sum(numel(u) for u in units["experts"])
    P_exp_pad = padded(units["experts"], nes)
    out = {}

    def term(name, phase, calls, formula, value, exact=None):
        out[name] = {"phase": phase, "calls": calls, "formula": formula, "bytes": value, "exact": exact}

    f, fs = 1 - 1 / nf, 1 - 1 / ns
    if d.tp > 1:  # tensor parallelism alone: no FSDP (a 1-rank mesh issues nothing), TP and its Muon terms
        return _tp_formulas(cfg, d, seq, rows, optim, units, term, out)
    if d.pp > 1:  # pipeline parallelism alone: the stages' point-to-point and the sums over the stages
        return _pp_formulas(cfg, d, seq, rows, optim, term, out)
    term("FSDP all-gather, dense (forward)", "forward", len(dense_units), f"(1-1/{sn})·P_dense·4", fs * P_dense * B,
         (ns - 1) * P_dense_pad // ns * B)
    term("FSDP all-gather, dense (backward)", "backward", len(units["blocks"]), f"(1-1/{sn})·(P_dense-P_root)·4",
         fs * (P_dense - P_root) * B, (ns - 1) * (P_dense_pad - P_root_pad) // ns * B)
    term("FSDP reduce-scatter, dense", "backward", len(dense_units), f"(1-1/{sn})·P_dense·4", fs * P_dense * B,
         (ns - 1) * P_dense_pad // ns * B)
    if r > 1:  # each unit's sharded gradient (padded, P_padded/n_s elements) all-reduced over the replicate group
        term("FSDP all-reduce across replicas, dense", "backward", len(dense_units), "2·(1-1/r)·P_dense·4/n_s",
             2 * (1 - 1 / r) * P_dense * B / ns, 2 * (r - 1) * (P_dense_pad // ns * B) / r)
    if ep > 1:
        fe = 1 - 1 / nes
        ce = len(units["experts"]) if nes > 1 else 0  # FSDP2 issues nothing on a 1-rank mesh
        for phase in ("forward", "backward"):
            term(f"FSDP all-gather, experts ({phase})", phase, ce, f"(1-1/{se})·(P_exp/ep)·4", fe * P_exp_local * B,
                 (nes - 1) * P_exp_pad // nes * B)
        term("FSDP reduce-scatter, experts", "backward", ce, f"(1-1/{se})·(P_exp/ep)·4", fe * P_exp_local * B,
             (nes - 1) * P_exp_pad // nes * B)
        if r > 1:  # measured by tests/dist/test_comm_volume.py (dp2×ep2 as 2 replicas), not among LAYOUTS
            term("FSDP all-reduce across replicas, experts", "backward", len(units["experts"]),
                 "2·(1-1/r)·(P_exp/ep)·4/n_es", 2 * (1 - 1 / r) * P_exp_local * B / nes,
                 2 * (r - 1) * (P_exp_pad // nes * B) / r)
        term("EP counts all-to-all", "forward", L, "L·(ep-1)·(E/ep)·8", L * (ep - 1) * (E // ep) * 8,
             L * (ep - 1) * (E // ep) * 8)
        a2a = L * 2 * N * K * (1 - 1 / ep) * D * B
        term("EP dispatch+combine (forward)", "forward", 2 * L, "L·2·N·K·(1-1/ep)·D·4 (uniform routing)", a2a)
        term("EP dispatch+combine (backward)", "backward", 2 * L, "same as forward", a2a)
    cp_list, cp_vars = cp_terms(cfg, d.cp, seq, rows) if d.cp > 1 else ([], {})
    for t in cp_list:
        term(*t)
    metric_bytes = 5 * 8 + L * E * 8
    term("loss/metric all-reduce", "metrics", 2, "2·(1-1/n_f)·(5·8 + L·E·8)", 2 * f * metric_bytes,
         2 * f * metric_bytes)
    # squared norms are summed over the gradients' sharded mesh dims only: the shard group under HSDP
    gn = 2 * fs * 4 + ((2 * (1 - 1 / nes) * 4 + 2 * (1 - 1 / ep) * 4) if ep > 1 else 0)
    term("grad-norm all-reduce", "grad_norm", 1 + (2 if ep > 1 else 0),
         f"2·(1-1/{sn})·4" + (f" + 2·(1-1/{se})·4 + 2·(1-1/ep)·4" if ep > 1 else ""), gn, gn)
    if optim == "muon":  # owner-compute within each parameter's shard group (its sharded mesh dims)
        P_own, mats = muon_owner_elements(units["model"], cfg, OptimConfig(name=optim), ns, ep)
        term("Muon owner-compute all-to-all", "optimizer", 2 if P_own else 0, f"2·(1-1/{sn})·P_own·4/{sn}",
             2 * fs * P_own * B / ns)
        term("Muon RMS all-reduce", "optimizer", 1, "2·(1-1/W)·16", 2 * (1 - 1 / W) * 16, 2 * (1 - 1 / W) * 16)
    else:
        P_own, mats = 0, 0
    pads = defaultdict(int)  # padding elements by parameter kind (name without the layer index)
    for name, (shape, where) in units["names"].items():
        extra = _padded(shape, nes if where == "experts" else ns) - math.prod(shape)
        if extra:
            pads[re.sub(r"^(layers|mtp)\.\d+\.", r"\1.*.", name)] += extra
    out["_vars"] = dict(padding=dict(sorted(pads.items(), key=lambda kv: -kv[1])), n_f=nf, n_e=ne, ep=ep, W=W,
                        r=r, n_s=ns, n_es=nes,
                        P_dense=P_dense, P_dense_padded=P_dense_pad, P_root=P_root, P_root_padded=P_root_pad,
                        P_exp=P_exp_local * ep, P_exp_local_padded=P_exp_pad, L=L, E=E, K=K, D=D, N=N,
                        P_own=P_own, muon_owner_matrices=mats, units=len(dense_units), cp=cp_vars)
    return out


# The Muon matrices that tensor parallelism splits (parallel/tp.py), by the dim their DTensor is sharded on: a
# dim-1 split never holds whole rows; a dim-0 split is local only when each rank's rows are whole output groups
# (`wo_a`, "muon:row_blocks"), like an FSDP block.
_TP_SPLIT = {"attn.wq_b.weight": 0, "attn.wo_a.weight": 0, "attn.wo_b.weight": 1,
             "ffn.shared_experts.w1.weight": 0, "ffn.shared_experts.w3.weight": 0, "ffn.shared_experts.w2.weight": 1}


def _tp_split_dim(name: str) -> int | None:
    return next((dim for suffix, dim in _TP_SPLIT.items() if name.endswith(suffix)), None)


def tp_muon_owner_elements(model, cfg: ModelConfig, optim: OptimConfig, tp: int) -> tuple[int, int]:
    """(elements, matrices) of the Muon matrices that DistributedMuon owner-computes over the tp group."""
    total = mats = 0
    params = dict(model.named_parameters())
    for name, label in describe_groups(model, optim).items():
        dim = _tp_split_dim(name)
        if not label.startswith("muon") or dim is None:
            continue
        p = params[name]
        unit = p.shape[0] // cfg.o_groups if label == "muon:row_blocks" else p.shape[0]
        if dim == 0 and _whole_units(p.shape[0], unit, tp):
            continue
        total += p.numel()
        mats += 1
    return total, mats


def tp_terms(cfg: ModelConfig, tp: int, seq: int, rows: int) -> tuple[list[tuple], dict]:
    """`formulas()` terms of tensor parallelism (parallel/tp.py), training with the indexer KL on, and their
    symbols. Every one is a fixed shape: the all-reduces of DTensor's Colwise/Rowwise plans and of tp.py's hooks,
    and the head's logits gather."""
    kinds = list(cfg.layer_types) + ["swa"] * cfg.n_mtp_layers  # the MTP block is a sliding-window layer
    n_att, n_csa, n_hca = len(kinds), kinds.count("csa"), kinds.count("hca")
    n_sh = len(kinds) if cfg.n_shared_experts else 0  # MoE layers with a shared expert (every block, MTP too)
    heads = 1 + cfg.n_mtp_layers  # the embedding and the output head run once more for each MTP block
    N, D, V = rows * seq, cfg.dim, cfg.vocab_size
    entries = seq // cfg.csa_ratio
    k_i = min(cfg.index_topk, entries) if cfg.indexer_mode == "sparse" else entries  # KL teacher entries
    ar = 2 * (1 - 1 / tp) * 4  # all-reduce wire bytes per element
    fwd = (n_att + n_sh + heads) * N * D + n_csa * N * k_i
    bwd = (n_att * N * (cfg.q_lora_rank + cfg.head_dim) + rows * cfg.head_dim
           * (n_csa * (seq // cfg.csa_ratio) + n_hca * (seq // cfg.hca_ratio)) + (2 * n_sh + heads) * N * D)
    gather = heads * (tp - 1) * N * V // tp * 4
    terms = [("TP all-reduce (forward)", "forward", n_att + n_sh + heads + n_csa,
              "2·(1-1/tp)·((L_att + L_sh + H_out)·N·D + L_csa·N·k_I)·4", ar * fwd, ar * fwd),
             ("TP all-gather (forward)", "forward", heads, "H_out·(1-1/tp)·N·V·4", gather, gather),
             ("TP all-reduce (backward)", "backward", 2 * n_att + n_csa + n_hca + 2 * n_sh + heads,
              "2·(1-1/tp)·(L_att·N·(r_q+c) + R·c·(L_csa·S/m + L_hca·S/m') + (2·L_sh + H_out)·N·D)·4",
              ar * bwd, ar * bwd)]
    symbols = {"tp": tp, "R": rows, "S": seq, "N": N, "D": D, "V": V, "r_q": cfg.q_lora_rank, "c": cfg.head_dim,
               "k_I": k_i, "m": cfg.csa_ratio, "m'": cfg.hca_ratio, "L_att": n_att, "L_csa": n_csa,
               "L_hca": n_hca, "L_sh": n_sh, "H_out": heads}
    return terms, symbols


def _tp_formulas(cfg: ModelConfig, d: ParallelDims, seq: int, rows: int, optim: str, units: dict, term,
                 out: dict) -> dict:
    """`formulas()` for tensor parallelism alone (every other dim 1)."""
    tp = d.tp
    tp_list, tp_vars = tp_terms(cfg, tp, seq, rows)
    for t in tp_list:
        term(*t)
    term("loss/metric all-reduce", "metrics", 2, "over one data rank: 0", 0, 0)  # the 1-rank data group
    # one squared norm per (mesh, placements) group: TP shards on dim 0 (Colwise, embed, wo_a) and dim 1 (Rowwise)
    norm = 2 * 2 * (1 - 1 / tp) * 4
    term("grad-norm all-reduce", "grad_norm", 2, "2·2·(1-1/tp)·4", norm, norm)
    P_own, mats = 0, 0
    if optim == "muon":
        P_own, mats = tp_muon_owner_elements(units["model"], cfg, OptimConfig(name=optim), tp)
        own = 2 * (1 - 1 / tp) * P_own * 4 / tp
        term("Muon owner-compute all-to-all", "optimizer", 2 if P_own else 0, "2·(1-1/tp)·P_own·4/tp", own, own)
        term("Muon RMS all-reduce", "optimizer", 1, "2·(1-1/W)·16", 2 * (1 - 1 / tp) * 16, 2 * (1 - 1 / tp) * 16)
    out["_vars"] = {"tp": tp_vars, "P_own": P_own, "muon_owner_matrices": mats}
    return out


def pp_terms(cfg: ModelConfig, d: ParallelDims, seq: int, rows: int) -> tuple[list[tuple], dict]:
    """`formulas()` terms of pipeline parallelism (parallel/pp.py) and their symbols. Each boundary between
    consecutive stages held by different ranks carries, per chunk, the streams [R/M, S, N_hc, D] (and with MTP the
    next-token embedding [R/M, S, D]) forward and their gradients back, one send and one receive per tensor; a
    boundary inside one rank (DualPipeV's turn of the V) is a local hand-over."""
    owner = {s: r for r in range(d.pp) for s in rank_stages(d, r)}
    cross = [s for s in range(d.n_stages - 1) if owner[s] != owner[s + 1]]
    m, tensors = d.microbatches, 1 + (cfg.n_mtp_layers > 0)
    width = cfg.hc_mult * cfg.dim + (cfg.dim if cfg.n_mtp_layers else 0)
    calls = max(sum(2 * m * tensors for s in cross if r in (owner[s], owner[s + 1])) for r in range(d.pp))
    p2p = 2 * len(cross) * rows * seq * width * 4 / d.pp
    L, E = len(cfg.layer_types) + cfg.n_mtp_layers, cfg.n_routed_experts
    sums = 2 * (1 - 1 / d.pp) * (4 * 8 + L * E * 8)
    mtp = " + D" if cfg.n_mtp_layers else ""
    terms = [("PP point-to-point", "pipeline", calls, f"2·X·R·S·(N_hc·D{mtp})·4/pp (mean)", p2p, p2p),
             ("PP stage-sum all-reduce", "metrics", 2, "2·(1-1/pp)·(4·8 + L·E·8)", sums, sums)]
    symbols = {"pp": d.pp, "schedule": d.pp_schedule, "stages": d.n_stages, "X": len(cross), "M": m, "R": rows,
               "S": seq, "N_hc": cfg.hc_mult, "D": cfg.dim, "L": L, "E": E}
    return terms, symbols


def _pp_formulas(cfg: ModelConfig, d: ParallelDims, seq: int, rows: int, optim: str, term, out: dict) -> dict:
    """`formulas()` for pipeline parallelism alone (every other dim 1): no FSDP, nothing for Muon to gather."""
    pp_list, pp_vars = pp_terms(cfg, d, seq, rows)
    for t in pp_list:
        term(*t)
    term("loss/metric all-reduce", "metrics", 2, "over one data rank: 0", 0, 0)
    # no DTensor gradients: the stages' squared norms are only added up over pp
    term("grad-norm all-reduce", "grad_norm", 1, "2·(1-1/pp)·4", 2 * (1 - 1 / d.pp) * 4, 2 * (1 - 1 / d.pp) * 4)
    if optim == "muon":
        rms = 2 * (1 - 1 / d.world_size) * 16
        term("Muon RMS all-reduce", "optimizer", 1, "2·(1-1/W)·16", rms, rms)
    out["_vars"] = {"pp": pp_vars}
    return out


def cp_layer_elements(cfg: ModelConfig, kind: str, seq: int, cp: int) -> tuple[int, int]:
    """Elements per row that one rank sends in forward for one attention layer under cp: (point-to-point: the last
    w keys, and for CSA the previous compression block of the compressor and of the indexer's compressor, all
    2·width wide; all-gather: this rank's compressed entries, for CSA with the indexer keys)."""
    c, ci, s = cfg.head_dim, cfg.index_head_dim, seq // cp
    if kind == "csa":
        m = cfg.csa_ratio
        return cfg.window_size * c + m * 2 * (c + ci), (cp - 1) * s // m * (c + ci)
    if kind == "hca":
        return cfg.window_size * c, (cp - 1) * s // cfg.hca_ratio * c
    return cfg.window_size * c, 0


def cp_terms(cfg: ModelConfig, cp: int, seq: int, rows: int) -> tuple[list[tuple], dict]:
    """`formulas()` terms of context parallelism (parallel/cp.py), training with the indexer KL on (the default),
    and the symbols they use."""
    kinds = list(cfg.layer_types) + ["swa"] * cfg.n_mtp_layers  # the MTP block is a sliding-window layer
    n_csa, n_hca = kinds.count("csa"), kinds.count("hca")
    p2p, gather = (sum(x) * rows * 4 for x in zip(*(cp_layer_elements(cfg, k, seq, cp) for k in kinds)))
    n_bal = len(cfg.layer_types) - cfg.n_hash_layers + cfg.n_mtp_layers  # MoE layers with a balance loss
    counts = (1 + cfg.n_mtp_layers + n_csa) * 8 + n_bal * rows * cfg.n_routed_experts * 4
    # one shift per layer (window keys) and two more per CSA layer (compressor and indexer-compressor block);
    # the first and last rank take part in a shift once, a middle rank twice (it sends and receives)
    p2p_calls = (len(kinds) + 2 * n_csa) * min(2, cp - 1)
    mean = (cp - 1) / cp
    terms = [("CP point-to-point (forward)", "forward", p2p_calls,
              "(1-1/cp)·R·(L_att·w·c + L_csa·m·2·(c+c_I))·4 (mean)", mean * p2p, mean * p2p),
             ("CP all-gather, compressed entries (forward)", "forward", 2 * n_csa + n_hca,
              "(cp-1)·R·S/cp·(L_csa·(c+c_I)/m + L_hca·c/m')·4", gather, gather),
             ("CP count all-reduce (forward)", "forward", 1 + cfg.n_mtp_layers + n_csa + n_bal,
              "2·(1-1/cp)·((1 + L_mtp + L_csa)·8 + L_bal·R·E·4)", 2 * mean * counts, 2 * mean * counts),
             ("CP point-to-point (backward)", "backward", p2p_calls, "same as forward", mean * p2p, mean * p2p),
             ("CP reduce-scatter, compressed entries (backward)", "backward", 2 * n_csa + n_hca,
              "same as the all-gather", gather, gather)]
    symbols = {"cp": cp, "R": rows, "S": seq, "w": cfg.window_size, "c": cfg.head_dim, "c_I": cfg.index_head_dim,
               "m": cfg.csa_ratio, "m'": cfg.hca_ratio, "L_att": len(kinds), "L_csa": n_csa, "L_hca": n_hca,
               "L_mtp": cfg.n_mtp_layers, "L_bal": n_bal}
    return terms, symbols


def cp_vs_ring(flavor: str, seq: int, cps: tuple[int, ...], elem_bytes: int = 2) -> list[str]:
    """Markdown paragraph and table, computed from the formulas: bytes one rank sends per row in forward under CP,
    for one layer of each kind and for all layers, next to ring attention passing V4's single K=V head."""
    cfg = get_flavor(flavor)
    kinds = list(cfg.layer_types) + ["swa"] * cfg.n_mtp_layers
    lines = [f"CP next to ring attention, computed from the formulas above (not measured): flavor `{flavor}` (c = "
             f"{cfg.head_dim}, w = {cfg.window_size}, m = {cfg.csa_ratio} with c_I = {cfg.index_head_dim}, m' = "
             f"{cfg.hca_ratio}), one row of seq {seq}, bf16 ({elem_bytes} bytes; the ratios do not depend on it): "
             "bytes one rank sends in forward. CP point-to-point is a sending rank's (every rank but the last); "
             "the backward sends the same back, and its reduce-scatter equals the all-gather. Ring attention "
             "passes every other rank's keys and values around the ring, (cp-1)/cp·S·(K+V width) per layer; V4 has "
             "one shared K=V head of width c, so the ring is taken to pass that one tensor, (cp-1)/cp·S·c (passing K "
             "and V separately doubles it; the compressed entries that CSA/HCA layers also need are left out of "
             "it). A ring's backward usually passes the keys again with their gradients, about twice its forward.", "",
             "| layers | cp | CP point-to-point (sender) | CP all-gather | CP total | ring (K=V) | CP / ring |",
             "|---|---|---|---|---|---|---|"]
    for label, layers in [(k, [k]) for k in ("swa", "csa", "hca")] + [(f"all {len(kinds)} (incl. MTP)", kinds)]:
        for cp in cps:
            p2p, gather = (sum(x) * elem_bytes for x in zip(*(cp_layer_elements(cfg, k, seq, cp) for k in layers)))
            ring = len(layers) * (cp - 1) * seq // cp * cfg.head_dim * elem_bytes
            lines.append(f"| {label} | {cp} | {_fmt_bytes(p2p)} | {_fmt_bytes(gather)} | {_fmt_bytes(p2p + gather)} "
                         f"| {_fmt_bytes(ring)} | {(p2p + gather) / ring:.3f} |")
    return lines


# ------------------------------------------------------------------------------------------------ attribution
def term_of(rec: dict, ep: int) -> str:
    """The formula term a recorded collective belongs to (by phase, kind and group)."""
    kind, phase, group = rec["kind"], rec["phase"], rec["group"]
    if rec.get("term"):
        return rec["term"]
    if rec["cp"]:
        what = {"send": "point-to-point", "recv": "point-to-point", "all_reduce": "count all-reduce",
                "all_gather": "all-gather, compressed entries", "reduce_scatter": "reduce-scatter, compressed entries"}
        return f"CP {what[kind]} ({phase})" if kind in what else f"other: {rec['op']} ({phase}, cp.py)"
    if group == "tp" and phase in ("forward", "backward"):
        return f"TP {kind.replace('_', '-')} ({phase})"
    if phase in ("forward", "backward"):
        unit = "experts" if group in ("efsdp", "efsdp_shard", "efsdp_replicate") and ep > 1 else "dense"
        if kind in ("all_gather", "reduce_scatter"):
            return (f"FSDP all-gather, {unit} ({phase})" if kind == "all_gather"
                    else f"FSDP reduce-scatter, {unit}")
        if kind == "all_reduce" and phase == "backward" and group.endswith("_replicate"):
            return f"FSDP all-reduce across replicas, {unit}"  # HSDP
        if kind == "all_to_all":
            if rec["op"].startswith("_c10d_functional."):
                return f"EP dispatch+combine ({phase})"
            if "histogram" in rec:
                return "EP counts all-to-all"
    if phase == "metrics" and kind == "all_reduce":
        return "loss/metric all-reduce"
    if phase == "grad_norm" and kind == "all_reduce":
        return "grad-norm all-reduce"
    if phase == "optimizer":
        if kind == "all_to_all":
            return "Muon owner-compute all-to-all"
        if kind == "all_reduce":
            return "Muon RMS all-reduce"
        if kind == "all_gather":
            return "Muon plan all_gather_object (first step)"
    return f"other: {rec['op']} ({phase}, {group})"


def summarize(per_rank_steps: list[list[dict]], ep: int, step: int = -1) -> dict:
    """term -> {"calls", "mean", "max", "min", "phase"} over ranks for one step (default: the last)."""
    per_rank = []
    for steps in per_rank_steps:
        acc = defaultdict(lambda: {"calls": 0, "bytes": 0.0, "phase": ""})
        for r in steps[step]["records"]:
            t = acc[term_of(r, ep)]
            t["calls"] += 1
            t["bytes"] += r["wire"]
            t["phase"] = r["phase"]
        per_rank.append(acc)
    terms = {}
    for name in sorted({k for acc in per_rank for k in acc}):
        vals = [acc[name]["bytes"] if name in acc else 0.0 for acc in per_rank]
        calls = {acc[name]["calls"] if name in acc else 0 for acc in per_rank}
        phase = next(acc[name]["phase"] for acc in per_rank if name in acc)
        terms[name] = {"calls": max(calls), "calls_differ": len(calls) > 1, "mean": sum(vals) / len(vals),
                       "max": max(vals), "min": min(vals), "phase": phase}
    return terms


def ep_routing_exact(per_rank_steps: list[list[dict]], step: int = -1) -> list[tuple[float, float]]:
    """Per rank (measured, predicted) EP row all-to-all wire bytes of the step, the prediction from every layer's
    routing histogram (the input of the counts all-to-all, hist[r][j] = rows rank r routes to EP rank j's
    experts): forward dispatch sends Σ_{j≠r} hist[r][j] rows, combine returns the Σ_{j≠r} hist[j][r] rows rank r
    received, and backward runs both again reversed (same rows), so 2·(sent + received) rows of D elements."""
    counts = [[r for r in steps[step]["records"] if "histogram" in r and r["phase"] == "forward"]
              for steps in per_rank_steps]
    out = []
    for g, steps in enumerate(per_rank_steps):
        recs = [r for r in steps[step]["records"] if r["op"] == "_c10d_functional.all_to_all_single"]
        measured = sum(r["wire"] for r in recs)
        row_bytes = recs[0]["row_bytes"] if recs else 0
        rows = 0
        for layer, c in enumerate(counts[g]):
            me = c["rank"]
            rows += sum(x for j, x in enumerate(c["histogram"]) if j != me)
            rows += sum(counts[other][layer]["histogram"][me] for other in c["ranks"] if other != g)
        out.append((measured, 2 * rows * row_bytes))
    return out


def p2p_totals(per_rank_steps: list[list[dict]], step: int = -1) -> tuple[int, int]:
    """(bytes sent, bytes received) by point-to-point ops over all ranks in one step: equal when every send was
    matched by a receive the recorder saw."""
    recs = [r for steps in per_rank_steps for r in steps[step]["records"] if r["kind"] in ("send", "recv")]
    return tuple(sum(r["in_bytes"] for r in recs if r["kind"] == k) for k in ("send", "recv"))


# ------------------------------------------------------------------------------------------------ report
def _fmt_bytes(b: float) -> str:
    if b == 0:
        return "0"
    for unit, div in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(b) >= div:
            return f"{b / div:.2f} {unit}"
    return f"{b:.0f} B"


PHASES = ("forward", "backward", "pipeline", "metrics", "grad_norm", "optimizer")


def layout_table(layout: dict, cfg: ModelConfig, seq: int, rows: int, optim: str, data) -> tuple[str, list[str]]:
    """Markdown table for one layout and the list of findings (formula vs measured)."""
    d = ParallelDims(**layout)
    model_terms = d.world_size in (d.tp * d.pp, d.dp * d.cp * d.ep) and min(d.tp, d.pp) == 1  # TP, PP: alone
    form = formulas(cfg, layout, seq, rows, optim) if model_terms else {"_vars": {}}
    v = form.pop("_vars")
    meas = summarize(data, d.ep)
    first = summarize(data, d.ep, step=0)
    lines = ["| term | phase | calls | formula (per rank) | formula | measured (mean [max]) | measured/formula |",
             "|---|---|---|---|---|---|---|"]
    notes = []
    names = list(form) + [k for k in meas if k not in form]
    totals = defaultdict(lambda: [0.0, 0.0])
    for name in names:
        f, m = form.get(name), meas.get(name)
        if f is None and (m is None or name.endswith("(first step)")):
            continue
        calls_m = m["calls"] if m else 0
        calls = f"{calls_m}" if f is None or f["calls"] == calls_m else f"{calls_m} (formula {f['calls']})"
        mb = m["mean"] if m else 0.0
        mtxt = _fmt_bytes(mb) + (f" [{_fmt_bytes(m['max'])}]" if m and m["max"] != m["min"] else "")
        fb = f["bytes"] if f else None
        ratio = "—" if not fb else f"{mb / fb:.4f}"
        phase = f["phase"] if f else m["phase"]
        totals[phase][0] += fb or 0.0
        totals[phase][1] += mb
        lines.append(f"| {name} | {phase} | {calls} | {f['formula'] if f else '—'} | "
                     f"{_fmt_bytes(fb) if f else '—'} | {mtxt} | {ratio} |")
        if f and f["exact"] is not None and m and abs(m["mean"] - f["exact"]) > 0.5:
            notes.append(f"{name}: measured {m['mean']:.0f} B ≠ exact formula {f['exact']:.0f} B")
    for phase in PHASES:
        if phase in totals:
            fb, mb = totals[phase]
            lines.append(f"| **{phase} total** | | | | {_fmt_bytes(fb)} | {_fmt_bytes(mb)} | "
                         f"{mb / fb:.4f} |" if fb else f"| **{phase} total** | | | | — | {_fmt_bytes(mb)} | — |")
    fb, mb = sum(t[0] for t in totals.values()), sum(t[1] for t in totals.values())
    lines.append(f"| **step total** | | | | {_fmt_bytes(fb) if form else '—'} | {_fmt_bytes(mb)} | "
                 + (f"{mb / fb:.4f} |" if fb else "— |"))
    extra = [f"{k}: {x['calls']} calls, {_fmt_bytes(x['mean'])}"
             + (f" [{_fmt_bytes(x['max'])}]" if x["max"] != x["min"] else "")
             for k, x in first.items() if k not in meas]
    changed = [f"{k}: {x['calls']} calls, {_fmt_bytes(x['mean'])} vs {meas[k]['calls']} calls, "
               f"{_fmt_bytes(meas[k]['mean'])}" for k, x in first.items()
               if k in meas and (abs(x["mean"] - meas[k]["mean"]) > 0.5 or x["calls"] != meas[k]["calls"])]
    notes.append("first step adds: " + ("; ".join(extra) or "nothing")
                 + ("; differs from the steady step: " + "; ".join(changed) if changed else ""))
    if v and "tp" in v:
        notes.append("TP: " + ", ".join(f"{k}={x}" for k, x in v["tp"].items()) + "; P_own={P_own:,} in "
                     "{muon_owner_matrices} matrices (H_out: the embedding / output head calls, one more per MTP "
                     "block; L_sh: MoE layers with a shared expert, MTP included)".format(**v))
        _muon_note(data, meas, notes)
    elif v and "pp" in v:
        notes.append("PP: " + ", ".join(f"{k}={x}" for k, x in v["pp"].items()) + " (X: stage boundaries between "
                     "ranks, M: chunks per micro-batch; the MTP block's next-token embedding travels with the streams)")
    elif v:
        notes.append("n_f={n_f}, n_e={n_e}, ep={ep}, W={W}; P_dense={P_dense:,} (FSDP2-padded {P_dense_padded:,}), "
                     "P_exp={P_exp:,}, P_own={P_own:,} in {muon_owner_matrices} matrices, L={L}, E={E}, K={K}, "
                     "D={D}, N={N}, P_root={P_root:,}".format(**v)
                     + ("; HSDP: r={r} replicas, FSDP shard group n_s={n_s}, n_es={n_es} (P_dense_padded and "
                        "P_own are for n_s)".format(**v) if v["r"] > 1 else ""))
        if v["cp"]:
            notes.append("CP: " + ", ".join(f"{k}={x}" for k, x in v["cp"].items()) + " (L_att counts the MTP "
                         "block, a sliding-window layer; L_bal: the MoE layers with a balance loss)")
        if v["padding"]:
            notes.append("FSDP2 padding (elements, all units): " + ", ".join(
                f"`{k}` +{x}" for k, x in v["padding"].items())
                + "; measured FSDP bytes equal the padded formula exactly"
                + ("" if not any(n.endswith("exact formula") or "≠ exact" in n for n in notes) else " EXCEPT above"))
        if d.ep > 1:
            pairs = ep_routing_exact(data)
            same = all(abs(m - p) < 0.5 for m, p in pairs)
            notes.append("EP row all-to-all per rank, measured vs routing-exact prediction from the counts "
                         "exchange: " + ", ".join(f"{m:.0f} / {p:.0f} B" for m, p in pairs)
                         + (" — equal on every rank" if same else " — DIFFER"))
        if d.cp > 1:
            sent, received = p2p_totals(data)
            notes.append(f"CP point-to-point over all ranks: {sent} B sent, {received} B received"
                         + (" — every send matched" if sent == received else " — DIFFER"))
        _muon_note(data, meas, notes)
    else:
        notes.append("no formulas for this layout (TP and PP are modelled alone): measured only")
    return "\n".join(lines), notes


def _muon_note(data, meas: dict, notes: list[str]) -> None:
    muon = [s[-1]["muon_last_comm"] for s in data]
    if muon and muon[0]:
        sent = sum(m.get("sent", 0) for m in muon) / len(muon) * 4
        mm = meas.get("Muon owner-compute all-to-all", {}).get("mean", 0.0)
        notes.append(f"DistributedMuon.last_comm sent·4 = {sent:.0f} B per rank (mean) vs measured {mm:.0f} B"
                     + (" — equal" if abs(sent - mm) < 0.5 else " — DIFFER"))


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {os.cpu_count()} cores visible, torch {torch.__version__}, gloo, one process per rank with "
            "1 thread")


EXPLANATIONS = """\
TP and PP are modelled alone (tp2, pp2); layouts that mix them with other dims are measured only.

Symbols: n_f = dp·cp·ep (the "fsdp" mesh, dense weights), n_e = dp·cp ("efsdp", routed experts under EP),
W = world size, P_dense = elements in the dense FSDP units (root + blocks; with ep = 1 the routed experts are
inside the blocks and counted here), P_root = those of the root unit, P_exp = routed-expert elements (all MoE
layers incl. MTP; each EP rank holds P_exp/ep), L = MoE layers incl. the MTP block, E experts, K = top-k,
D = dim, N = rows·seq/cp tokens per rank, P_own = elements of the Muon matrices that DistributedMuon
owner-computes. CP terms: R = rows per data rank, S = seq, w = window, c = head_dim, c_I = index_head_dim, m / m' =
CSA / HCA ratio, L_att / L_csa / L_hca = attention / CSA / HCA layers (L_att counts the MTP block), L_mtp = MTP
blocks, L_bal = MoE layers with a balance loss (not hash-routed; MTP included). HSDP (`parallel.dp_replicate` = r):
n_s = n_f/r and n_es = n_e/r, the FSDP shard group of one replica. All weights, gradients and activations are fp32
(4 bytes); metric buffers are float64/int64.

Where the formulas come from, and why measured differs where it does:

- **FSDP all-gather twice per block, once for the root.** `apply_fsdp` passes `reshard_after_forward=True` to
  the blocks and experts, so each is all-gathered in forward and again in backward. The root call keeps
  torch's default (`None`: `_fsdp_state.py` `_auto_reshard_after_forward`), so the root unit (embedding, head,
  final norm, hc_head and the whole MTP block) stays unsharded from forward into backward, where it is needed
  first: it is gathered once per step, and the backward all-gather is (1-1/n_f)·(P_dense-P_root)·4, one call
  per block. The root is the largest unit (embed + head are 2·V·D), so this saves the biggest all-gather.
- **FSDP2 padding.** Each parameter's dim 0 is padded to a multiple of the shard count before the all-gather /
  reduce-scatter, so the measured bytes are (1-1/n)·P_padded·4, where P_padded = Σ ceil(d0/n)·n·(numel/d0);
  the bench checks measured == that exactly (the "exact" value in `formulas()`), and the ratio to the unpadded
  formula is the padding overhead; each layout lists the padded parameters: the mHC gains `hc_*_scale` ([3],
  [1]) at every n, and from n = 4 on any tensor whose dim 0 is not a multiple of n, such as the indexer's
  `weights_proj` [index_n_heads = 2, D] (padded to 4 rows: half of it is zeros on the wire).
- **Reduce-scatter = all-gather volume** because every parameter receives a gradient in this step (hash-routed
  gates too: their weights still produce the routing weights; the embedding gets its gradient as a dense
  [V, D] tensor, not sparse); a unit whose parameters had no gradient would skip its reduce-scatter.
- **Experts under EP** are their own FSDP units on efsdp; with dp = cp = 1 (ep2) that mesh has one rank and
  FSDP2 issues no collective for them at all (0 calls, 0 bytes), but `clip_grad_norm_` still all-reduces their
  squared norm over the 1-rank efsdp group (1 call, 0 bytes) and over ep.
- **EP all-to-all.** Per MoE layer (hash layers and the MTP block included) `_ep_forward` makes one
  `dist.all_to_all_single` of the [ep, E/ep] int64 counts (forward only, no autograd) and two functional
  all-to-alls of rows (dispatch, combine), each of which runs again reversed in backward. A rank sends the rows
  routed to other ranks' experts (dispatch) and returns the rows it received (combine); under uniform routing
  each is N·K·(1-1/ep) rows of D fp32. The measured/formula ratio is the routing's deviation from uniform (hash
  layers follow the token ids, learned layers the router at init); the routing-exact prediction, built from
  the counts each rank exchanged, matches the measured bytes exactly.
- **Muon owner-compute** (docs/parallelism.md "Distributed Muon"): per owner-computed matrix 2·(1-1/n)·|W|
  elements across the shard group, so 2·(1-1/n_f)·P_own/n_f per rank on average; ranks differ (an owner sends
  n-1 blocks, a non-owner one), hence the [max]. Uneven FSDP2 blocks (dim 0 not divisible by n_f) move
  |W| − |owner's block| rather than (1-1/n)|W|, which is where the mean departs from the formula. Expert stacks
  (3-D, sharded on the expert dim) and `wo_a` when each FSDP block holds whole output groups are local. The
  first step adds the plan's `all_gather_object` (two `allgather_` calls: sizes, pickled plan).
- **Metrics and grad norm** are all-reduces of a few scalars over the data ranks (loss parts: 5 float64;
  expert counts: [L, E] int64) and one fp32 squared norm per (mesh, placements) group per sharded mesh dim.
- **HSDP** (dp4 as r = 2 replicas; mesh.py `fsdp_meshes` unflattens "fsdp" into ("fsdp_replicate",
  "fsdp_shard"), new process groups that the bench names from the parameters' DTensor meshes). FSDP2 all-gathers
  and reduce-scatters inside a replica, so every FSDP term above has n_s = n_f/r for n_f (and pads dim 0 to a
  multiple of n_s); after each unit's reduce-scatter it issues one `dist.all_reduce` of that unit's sharded,
  padded gradient (P_padded/n_s elements) over the replicate group, 2·(1-1/r)·P_dense·4/n_s per step (one call
  per unit, root included). The loss/metric all-reduce still spans all n_f data ranks (`mean_over_data` uses the
  flattened "fsdp" group); the grad norm reduces over the gradients' sharded mesh dim only (the shard group:
  `grad.py` skips the Replicate dim); DistributedMuon's owner-compute gathers each matrix within its shard group
  (the DTensor's sharded mesh dims), so each replica runs its own plan: P_own is counted for n_s ranks and the
  all-to-all, though issued over the world group, sends only inside the replica; its RMS all-reduce spans the
  world. All of these are exact. Per rank per step the FSDP bytes go from (1-1/n_f)·(3·P_dense-P_root)·4 to
  (1-1/n_s)·(3·P_dense-P_root)·4 + 2·(1-1/r)·P_dense·4/n_s, i.e. for dp4 from 0.75·(3P-P_root) to
  0.5·(3P-P_root) + 0.5·P: HSDP sends slightly fewer bytes per rank (8/9 of plain FSDP's when P_root is small),
  only the all-reduce (a quarter of them when P_root is small) crosses replicas, and each rank holds twice the
  shard.
  <HSDP_MEASURED>
- **Context parallelism** (dsv4train/parallel/cp.py; each rank holds S/cp tokens of every row; the dense weights
  are sharded over n_f = dp·cp·ep, so cp adds to the FSDP terms as dp does). Every CP term is a fixed shape, so
  measured equals the formula exactly:
  - point-to-point (`dist.batch_isend_irecv`): per attention layer the previous rank's last w keys [R, w, c] come
    forward and their gradient goes back; per CSA layer also the previous compression block of the compressor
    [R, m, 2c] and of the indexer's compressor [R, m, 2c_I] (the first halves of kv and gate). The first rank
    has no previous rank and the last no next one, so ranks differ: in forward every rank but the last sends
    R·(L_att·w·c + L_csa·m·2·(c+c_I))·4 (the [max]) and the last sends nothing; in backward the gradients go
    back, every rank but the first sending. The table gives the mean, (1-1/cp) of that; over a step each rank
    of cp2 sends the same (rank 0 in forward, rank 1 in backward), while with cp > 2 a middle rank sends in both.
    A receive counts as a call with 0 bytes.
  - all-gather of the compressed entries in forward, each rank's [R, S/cp/m, c] plus the indexer keys
    [R, S/cp/m, c_I] per CSA layer and [R, S/cp/m', c] per HCA layer; backward reduce-scatters their gradient
    to the rank that pooled them, the same bytes. The indexer keys (and their compressor's block, m·2·c_I per
    CSA layer of the backward send) get a gradient only because the step trains the indexer through its KL loss
    (`Attention.indexer_kl`, on by default in training; the indexer's inputs are detached, so without the KL
    nothing flows back to it): with it off those backward terms go. Dense or sparse indexer: same volume.
  - count all-reduces in forward (`SequenceShard.total`, no gradient): the labelled tokens of CE and of MTP
    (int64 each), the KL's queries with an entry per CSA layer (int64), and the [R, E] fp32 expert counts per
    MoE layer with a balance loss.
  - under cp2 alone the cp, fsdp and efsdp meshes are one process group; CP's collectives are told apart by
    coming from cp.py (the module docstring).
- **Tensor parallelism** (dsv4train/parallel/tp.py; tp ranks see the same N = R·S tokens; symbols in each tp
  layout's note). Every term is a fixed shape, so measured equals the formula exactly:
  - forward all-reduces of [N, D]: the output of `wo_b` (RowwiseParallel) per attention layer (L_att, MTP
    included), of the shared expert's `w2` per MoE layer (L_sh), and of the vocabulary-split embedding per call
    (H_out = 1 + MTP blocks: the MTP block embeds the next tokens); plus, per CSA layer, the indexer KL's
    teacher summed over the heads of all tp ranks, [R, S, k_I] (k_I = min(index_topk, S/m) sparse, S/m dense).
  - forward all-gather of the vocabulary-split logits, (1-1/tp)·N·V·4 per output-head call: the largest TP term
    at small D (4 MiB of toy's 6 MiB step), the price of a replicated loss over a split head.
  - backward all-reduces of the input gradients of the ColwiseParallel modules (`wq_b` [N, r_q], the shared
    expert's `w1` and `w3` [N, D] each, the head [N, D] per call) and of the tensors every head shares (tp.py's
    hooks): the K=V head after `kv_norm` [N, c] per attention layer and the compressed entries [R, S/m, c] or
    [R, S/m', c] per CSA / HCA layer. The embedding's input is token ids: no gradient to reduce.
  - the grad norm all-reduces one squared norm per placement group (Shard(0) and Shard(1)); Muon owner-computes
    the TP-split matrices (`wq_b`, `wo_b`, shared `w1`/`w2`/`w3`; `wo_a` holds whole output groups per rank, so
    it stays local) over the tp group, 2·(1-1/tp)·P_own·4/tp.
- **Pipeline parallelism** (dsv4train/parallel/pp.py, torch.distributed.pipelining). Per chunk (M per
  micro-batch) every stage boundary between two ranks carries the mHC streams [R/M, S, N_hc, D] and, with MTP,
  the next-token embedding [R/M, S, D] forward, and their gradients back: one send and one receive per tensor,
  in the "pipeline" phase (the schedule sends outside autograd, so forward and backward sends are not told
  apart). X counts those boundaries: pp-1 for 1F1B, pp·v-1 for interleaved 1F1B (v = 2 stages per rank, which
  alternate ranks), and 2·(pp-1) for DualPipeV, whose turn of the V (stages pp-1 and pp on the last rank) is a
  local hand-over. So the bytes do not depend on M, and interleaving multiplies them by (pp·v-1)/(pp-1): the
  price of its smaller bubble. The loss parts (4 float64) and the [L, E] expert counts are summed over the
  stages (`sum_over_stages`), and the grad norm adds the stages' squared norms. The first step also opens each
  link with a 4-byte message per neighbour and direction (pipelining's handshake).
"""


def _rows_for(d: ParallelDims, rows: int) -> int:
    """Rows per data rank for a layout: a pipeline splits them into its chunks, so round up to a multiple."""
    m = d.microbatches if d.pp > 1 else 1
    return -(-rows // m) * m


def render(settings: list[tuple[str, int, int]], optim: str, argv: list[str]) -> str:
    out = [SECTION, "",
           "Command (" + machine() + "):", "",
           "    PYTHONPATH=. .venv/bin/python " + " ".join(shlex.quote(a) for a in argv), "",
           "Wire bytes sent per rank in one steady-state training step (the second), from every collective seen "
           "at the dispatcher by a `CommDebugMode` subclass (bench/comm_volume.py docstring: why the module "
           "tracker is off, how each op's bytes are derived); the dispatcher count equals CommDebugMode's "
           "`comm_counts` (which leaves out point-to-point sends and receives) and, for plain `dist.all_reduce` / "
           "`dist.all_to_all_single` and the ops of `dist.batch_isend_irecv`, a Python shim's count. "
           f"Optimizer {optim} (Muon + AdamW groups), fp32, one micro-batch per step.", ""]
    totals = {}  # (flavor, layout) -> measured step total, per rank (mean)
    for flavor, seq, rows in settings:
        cfg = model_config(flavor, seq)
        out += [f"### flavor `{flavor}`, seq {seq}, {rows} rows per data rank", ""]
        for layout in LAYOUTS:
            d = ParallelDims(**layout)
            label = d.describe() + (f", {d.pp_schedule}, {d.microbatches} chunks" if d.pp > 1 else "")
            r = _rows_for(d, rows)
            why = check_layout(layout, cfg, seq, r)
            if why is not None:
                out += [f"**{label}** ({d.world_size} ranks): skipped — `{why}`", ""]
                print(f"[{flavor}] {label}: skipped ({why})", file=sys.stderr, flush=True)
                continue
            print(f"[{flavor}] {label}: running on {d.world_size} processes ...", file=sys.stderr, flush=True)
            data = measure(layout, flavor, seq, r, optim)
            totals[flavor, label] = sum(t["mean"] for k, t in summarize(data, d.ep).items()
                                               if not k.endswith("(first step)"))
            table, notes = layout_table(layout, cfg, seq, r, optim, data)
            out += [f"**{label}** ({d.world_size} ranks" + (f", {r} rows" if r != rows else "") + ")", "", table, ""]
            out += [f"- {n}" for n in notes] + [""]
            print("\n".join(out[-(len(notes) + 4):]), file=sys.stderr, flush=True)
    plain, hsdp = ParallelDims(dp=4).describe(), ParallelDims(dp=4, dp_replicate=2).describe()
    pairs = [(f, totals[f, plain], totals[f, hsdp]) for f, _, _ in settings
             if (f, plain) in totals and (f, hsdp) in totals]
    measured = ("Measured above, step total per rank, dp4 vs dp4 as 2 replicas: " + "; ".join(
        f"`{f}` {_fmt_bytes(a)} vs {_fmt_bytes(b)} (HSDP/plain {b / a:.3f})" for f, a, b in pairs) + "."
                if pairs else "")
    out += [EXPLANATIONS.replace("  <HSDP_MEASURED>\n", f"  {measured}\n" if measured else ""),
            *cp_vs_ring("1b", 4096, (4, 8))]
    return "\n".join(out)


def write_docs(section: str, path: str = "docs/benchmarks.md") -> None:
    with open(path) as f:
        text = f.read()
    start = text.find(SECTION + "\n")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n"
    else:
        nxt = text.find("\n## ", start + len(SECTION))
        rest = text[nxt + 1:] if nxt >= 0 else ""
        text = text[:start] + section.rstrip("\n") + "\n" + ("\n" + rest if rest else "")
    with open(path, "w") as f:
        f.write(text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flavor", default="toy", help="flavor, or a comma list (one table set per flavor)")
    ap.add_argument("--seq", default="128", help="tokens per row (one value, or one per flavor)")
    ap.add_argument("--rows", default="2", help="rows per data rank per step (one value, or one per flavor)")
    ap.add_argument("--optim", default="muon", choices=("muon", "adamw"))
    ap.add_argument("--write-docs", action="store_true",
                    help=f"replace the '{SECTION[3:]}' section of docs/benchmarks.md")
    args = ap.parse_args()
    flavors = args.flavor.split(",")
    seqs, rows = ([int(x) for x in s.split(",")] for s in (args.seq, args.rows))
    seqs, rows = (x * len(flavors) if len(x) == 1 else x for x in (seqs, rows))
    if not len(flavors) == len(seqs) == len(rows):
        ap.error("--seq and --rows take one value or one per flavor")
    section = render(list(zip(flavors, seqs, rows)), args.optim, ["bench/comm_volume.py"] + sys.argv[1:])
    print(section)
    if args.write_docs:
        write_docs(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
