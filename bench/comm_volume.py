"""Communication volume of one training step, per layout: every collective counted at the dispatcher, next to the
formula for it (bench/comm_formulas.py, derived from dsv4train/parallel/* and dsv4train/train/learner.py).

    .venv/bin/python -m bench.comm_volume --flavor toy --seq 128 --rows 2 [--write-docs]
    .venv/bin/python -m bench.comm_volume --flavor toy,tiny --seq 128,256 --rows 2,2 --write-docs

Layouts dp2, ep2, dp2×ep2, cp2, tp2, dp4, dp4 as HSDP with 2 replicas (`parallel.dp_replicate` = 2: FSDP over
2-rank shard groups, gradients all-reduced across replicas), and pp2 with each schedule (1F1B, interleaved 1F1B,
DualPipeV) on gloo CPU processes. Each
runs two optimizer steps of the Learner on one micro-batch of `--rows` rows × `--seq` tokens per data rank (the
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
import os
import re
import shlex
import sys
import tempfile
from collections import defaultdict

import torch
import torch.distributed as dist
from torch.distributed.tensor.debug import CommDebugMode
from torch.utils._python_dispatch import TorchDispatchMode

from bench.comm_formulas import EXPLANATIONS, cp_vs_ring, fmt_bytes, formulas
from bench.docs_section import cpu_name, replace_section
from dsv4train.config.errors import ConfigError
from dsv4train.config.model import ModelConfig
from dsv4train.config.optim import OptimConfig
from dsv4train.config.pretrain import TrainConfig
from dsv4train.models.flavors import get_flavor
from dsv4train.models.model import DSV4Model
from dsv4train.parallel import cp as cp_module
from dsv4train.parallel.dims import ParallelDims
from dsv4train.parallel.runtime import ParallelRuntime

LAYOUTS = (
    {"dp": 2},
    {"ep": 2},
    {"dp": 2, "ep": 2},
    {"cp": 2},
    {"tp": 2},
    {"dp": 4},
    {"dp": 4, "dp_replicate": 2},
    {"pp": 2, "pp_microbatches": 2},
    {"pp": 2, "pp_schedule": "interleaved_1f1b", "pp_microbatches": 2},
    {"pp": 2, "pp_schedule": "dualpipev"},
)  # DualPipeV: at least one chunk per stage (4 rows, see render)
P2P_OPS = ("c10d.send", "c10d.recv_")  # not in CommDebugMode's comm_counts
SECTION = "## Communication volume per step"


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
    for pattern, kind in (
        ("reduce_scatter", "reduce_scatter"),
        ("allgather|all_gather", "all_gather"),
        ("allreduce|all_reduce", "all_reduce"),
        ("alltoall|all_to_all", "all_to_all"),
        ("broadcast", "broadcast"),
        ("send", "send"),
        ("recv", "recv"),
    ):
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
        rec.update(
            rank=me,
            ranks=dist.get_process_group_ranks(pg),
            row_bytes=row_bytes,
            send_rows=[int(s) for s in in_splits],
            recv_rows=[int(s) for s in out_splits],
        )
        if not functional and x.dtype == torch.int64 and x.dim() == 2 and x.shape[0] == n:
            rec["histogram"] = x.sum(1).tolist()  # EP's per-destination row counts (this rank's routing)
    return rec


class _TaggedRuntime(ParallelRuntime):
    """The trainer's runtime with the metric and grad-norm collectives tagged with their phase."""

    mode: CommVolumeMode | None = None

    def _tag(self, phase, term=None):
        return self.mode.tagged(phase, term) if self.mode is not None else contextlib.nullcontext()

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


def _worker(
    rank: int, world: int, layout: dict, flavor, seq: int, rows: int, optim: str, out_path: str, steps: int = 2
):
    from dsv4train.data.loader import rank_rows
    from dsv4train.optim.groups import build_optimizers
    from dsv4train.train.learner import Learner
    from dsv4train.train.losses import NextTokenLoss, lm_batch

    cfg = flavor if isinstance(flavor, ModelConfig) else model_config(flavor, seq)
    rt = _TaggedRuntime(ParallelDims(**layout))
    model = DSV4Model(cfg)
    model.init_weights(0)
    rt.parallelize(model)
    opt = rt.distribute_optimizer(build_optimizers(model, OptimConfig(name=optim, muon_ns_dtype="float32")))
    mesh = rt.mesh
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
    batches = [{"tokens": torch.randint(0, cfg.vocab_size, (global_rows, seq + 1), generator=g)} for _ in range(steps)]
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

    learner = Learner(model, opt, TrainConfig(), rt)
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
                learner.step(
                    [lm_batch(rank_rows(batch, rt.data_rank, rt.data_ranks)["tokens"])], NextTokenLoss(mtp_weight=0.3)
                )
        finally:
            rt.mode = None
            for f, fn in originals.items():
                setattr(dist, f, fn)
                if f in p2p:
                    setattr(c10d, f, fn)
        counted = defaultdict(int)
        for r in mode.records:
            counted[r["op"]] += 1
        debug_counts = {str(k).replace("c10d_functional.", "_c10d_functional."): v for k, v in mode.comm_counts.items()}
        collectives = {k: v for k, v in counted.items() if k not in P2P_OPS}
        assert debug_counts == collectives, f"CommDebugMode counts {debug_counts} != records {collectives}"
        assert shim["all_reduce"] == counted["c10d.allreduce_"], (dict(shim), dict(counted))
        assert shim["all_to_all_single"] == counted["c10d.alltoall_base_"], (dict(shim), dict(counted))
        assert shim["p2p"] == sum(counted[k] for k in P2P_OPS), (dict(shim), dict(counted))
        for r in mode.records:
            r["group"] = groups.get(r["group"], f"size {r['n']}")
        muon = getattr(opt, "optimizers", {}).get("muon") if hasattr(opt, "optimizers") else None
        result.append(
            {
                "records": mode.records,
                "debug_counts": debug_counts,
                "muon_last_comm": dict(getattr(muon, "last_comm", {}) or {}),
            }
        )
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
        run_distributed_test(
            _worker,
            world_size=ParallelDims(**layout).world_size,
            args=(layout, flavor, seq, rows, optim, path, steps),
            timeout_s=300.0,
        )
        with open(path) as f:
            return json.load(f)


def check_layout(layout: dict, cfg: ModelConfig, seq: int, rows: int) -> str | None:
    """None when the layout can run, else why not (the ParallelDims check that refuses it, e.g. tp not dividing
    the heads)."""
    dims = ParallelDims(**layout)
    try:
        dims.validate(dims.world_size, cfg, seq, rows)
    except ConfigError as e:
        return str(e)
    return None


# ------------------------------------------------------------------------------------------------ attribution
def term_of(rec: dict, ep: int) -> str:
    """The formula term a recorded collective belongs to (by phase, kind and group)."""
    kind, phase, group = rec["kind"], rec["phase"], rec["group"]
    if rec.get("term"):
        return rec["term"]
    if rec["cp"]:
        what = {
            "send": "point-to-point",
            "recv": "point-to-point",
            "all_reduce": "count all-reduce",
            "all_gather": "all-gather, compressed entries",
            "reduce_scatter": "reduce-scatter, compressed entries",
        }
        return f"CP {what[kind]} ({phase})" if kind in what else f"other: {rec['op']} ({phase}, cp.py)"
    if group == "tp" and phase in ("forward", "backward"):
        return f"TP {kind.replace('_', '-')} ({phase})"
    if phase in ("forward", "backward"):
        unit = "experts" if group in ("efsdp", "efsdp_shard", "efsdp_replicate") and ep > 1 else "dense"
        if kind in ("all_gather", "reduce_scatter"):
            return f"FSDP all-gather, {unit} ({phase})" if kind == "all_gather" else f"FSDP reduce-scatter, {unit}"
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
        terms[name] = {
            "calls": max(calls),
            "calls_differ": len(calls) > 1,
            "mean": sum(vals) / len(vals),
            "max": max(vals),
            "min": min(vals),
            "phase": phase,
        }
    return terms


def ep_routing_exact(per_rank_steps: list[list[dict]], step: int = -1) -> list[tuple[float, float]]:
    """Per rank (measured, predicted) EP row all-to-all wire bytes of the step, the prediction from every layer's
    routing histogram (the input of the counts all-to-all, hist[r][j] = rows rank r routes to EP rank j's
    experts): forward dispatch sends Σ_{j≠r} hist[r][j] rows, combine returns the Σ_{j≠r} hist[j][r] rows rank r
    received, and backward runs both again reversed (same rows), so 2·(sent + received) rows of D elements."""
    counts = [
        [r for r in steps[step]["records"] if "histogram" in r and r["phase"] == "forward"] for steps in per_rank_steps
    ]
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
PHASES = ("forward", "backward", "pipeline", "metrics", "grad_norm", "optimizer")


def layout_table(layout: dict, cfg: ModelConfig, seq: int, rows: int, optim: str, data) -> tuple[str, list[str]]:
    """Markdown table for one layout and the list of findings (formula vs measured)."""
    d = ParallelDims(**layout)
    model_terms = d.world_size in (d.tp * d.pp, d.dp * d.cp * d.ep) and min(d.tp, d.pp) == 1  # TP, PP: alone
    form = formulas(cfg, layout, seq, rows, optim) if model_terms else {"_vars": {}}
    v = form.pop("_vars")
    meas = summarize(data, d.ep)
    first = summarize(data, d.ep, step=0)
    lines = [
        "| term | phase | calls | formula (per rank) | formula | measured (mean [max]) | measured/formula |",
        "|---|---|---|---|---|---|---|",
    ]
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
        mtxt = fmt_bytes(mb) + (f" [{fmt_bytes(m['max'])}]" if m and m["max"] != m["min"] else "")
        fb = f["bytes"] if f else None
        ratio = "—" if not fb else f"{mb / fb:.4f}"
        phase = f["phase"] if f else m["phase"]
        totals[phase][0] += fb or 0.0
        totals[phase][1] += mb
        lines.append(
            f"| {name} | {phase} | {calls} | {f['formula'] if f else '—'} | "
            f"{fmt_bytes(fb) if f else '—'} | {mtxt} | {ratio} |"
        )
        if f and f["exact"] is not None and m and abs(m["mean"] - f["exact"]) > 0.5:
            notes.append(f"{name}: measured {m['mean']:.0f} B ≠ exact formula {f['exact']:.0f} B")
    for phase in PHASES:
        if phase in totals:
            fb, mb = totals[phase]
            lines.append(
                f"| **{phase} total** | | | | {fmt_bytes(fb)} | {fmt_bytes(mb)} | {mb / fb:.4f} |"
                if fb
                else f"| **{phase} total** | | | | — | {fmt_bytes(mb)} | — |"
            )
    fb, mb = sum(t[0] for t in totals.values()), sum(t[1] for t in totals.values())
    lines.append(
        f"| **step total** | | | | {fmt_bytes(fb) if form else '—'} | {fmt_bytes(mb)} | "
        + (f"{mb / fb:.4f} |" if fb else "— |")
    )
    extra = [
        f"{k}: {x['calls']} calls, {fmt_bytes(x['mean'])}"
        + (f" [{fmt_bytes(x['max'])}]" if x["max"] != x["min"] else "")
        for k, x in first.items()
        if k not in meas
    ]
    changed = [
        f"{k}: {x['calls']} calls, {fmt_bytes(x['mean'])} vs {meas[k]['calls']} calls, {fmt_bytes(meas[k]['mean'])}"
        for k, x in first.items()
        if k in meas and (abs(x["mean"] - meas[k]["mean"]) > 0.5 or x["calls"] != meas[k]["calls"])
    ]
    notes.append(
        "first step adds: "
        + ("; ".join(extra) or "nothing")
        + ("; differs from the steady step: " + "; ".join(changed) if changed else "")
    )
    if v and "tp" in v:
        notes.append(
            "TP: "
            + ", ".join(f"{k}={x}" for k, x in v["tp"].items())
            + "; P_own={P_own:,} in "
            "{muon_owner_matrices} matrices (H_out: the embedding / output head calls, one more per MTP "
            "block; L_sh: MoE layers with a shared expert, MTP included)".format(**v)
        )
        _muon_note(data, meas, notes)
    elif v and "pp" in v:
        notes.append(
            "PP: " + ", ".join(f"{k}={x}" for k, x in v["pp"].items()) + " (X: stage boundaries between "
            "ranks, M: chunks per micro-batch; the MTP block's next-token embedding travels with the streams)"
        )
    elif v:
        notes.append(
            "n_f={n_f}, n_e={n_e}, ep={ep}, W={W}; P_dense={P_dense:,} (FSDP2-padded {P_dense_padded:,}), "
            "P_exp={P_exp:,}, P_own={P_own:,} in {muon_owner_matrices} matrices, L={L}, E={E}, K={K}, "
            "D={D}, N={N}, P_root={P_root:,}".format(**v)
            + (
                "; HSDP: r={r} replicas, FSDP shard group n_s={n_s}, n_es={n_es} (P_dense_padded and "
                "P_own are for n_s)".format(**v)
                if v["r"] > 1
                else ""
            )
        )
        if v["cp"]:
            notes.append(
                "CP: " + ", ".join(f"{k}={x}" for k, x in v["cp"].items()) + " (L_att counts the MTP "
                "block, a sliding-window layer; L_bal: the MoE layers with a balance loss)"
            )
        if v["padding"]:
            notes.append(
                "FSDP2 padding (elements, all units): "
                + ", ".join(f"`{k}` +{x}" for k, x in v["padding"].items())
                + "; measured FSDP bytes equal the padded formula exactly"
                + ("" if not any(n.endswith("exact formula") or "≠ exact" in n for n in notes) else " EXCEPT above")
            )
        if d.ep > 1:
            pairs = ep_routing_exact(data)
            same = all(abs(m - p) < 0.5 for m, p in pairs)
            notes.append(
                "EP row all-to-all per rank, measured vs routing-exact prediction from the counts "
                "exchange: "
                + ", ".join(f"{m:.0f} / {p:.0f} B" for m, p in pairs)
                + (" — equal on every rank" if same else " — DIFFER")
            )
        if d.cp > 1:
            sent, received = p2p_totals(data)
            notes.append(
                f"CP point-to-point over all ranks: {sent} B sent, {received} B received"
                + (" — every send matched" if sent == received else " — DIFFER")
            )
        _muon_note(data, meas, notes)
    else:
        notes.append("no formulas for this layout (TP and PP are modelled alone): measured only")
    return "\n".join(lines), notes


def _muon_note(data, meas: dict, notes: list[str]) -> None:
    muon = [s[-1]["muon_last_comm"] for s in data]
    if muon and muon[0]:
        sent = sum(m.get("sent", 0) for m in muon) / len(muon) * 4
        mm = meas.get("Muon owner-compute all-to-all", {}).get("mean", 0.0)
        notes.append(
            f"DistributedMuon.last_comm sent·4 = {sent:.0f} B per rank (mean) vs measured {mm:.0f} B"
            + (" — equal" if abs(sent - mm) < 0.5 else " — DIFFER")
        )


def machine() -> str:
    cores = f"{os.cpu_count()} cores visible"
    return f"{cpu_name()}, {cores}, torch {torch.__version__}, gloo, one process per rank with 1 thread"


def _rows_for(d: ParallelDims, rows: int) -> int:
    """Rows per data rank for a layout: a pipeline splits them into its chunks, so round up to a multiple."""
    m = d.microbatches if d.pp > 1 else 1
    return -(-rows // m) * m


def render(settings: list[tuple[str, int, int]], optim: str, argv: list[str]) -> str:
    out = [
        SECTION,
        "",
        "Command (" + machine() + "):",
        "",
        "    .venv/bin/python " + " ".join(shlex.quote(a) for a in argv),
        "",
        "Wire bytes sent per rank in one steady-state training step (the second), from every collective seen "
        "at the dispatcher by a `CommDebugMode` subclass (bench/comm_volume.py docstring: why the module "
        "tracker is off, how each op's bytes are derived); the dispatcher count equals CommDebugMode's "
        "`comm_counts` (which leaves out point-to-point sends and receives) and, for plain `dist.all_reduce` / "
        "`dist.all_to_all_single` and every point-to-point `dist.isend` / `dist.irecv`, a Python shim's count; "
        "the formulas are in bench/comm_formulas.py. "
        f"Optimizer {optim} (Muon + AdamW groups), fp32, one micro-batch per step.",
        "",
    ]
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
            totals[flavor, label] = sum(
                t["mean"] for k, t in summarize(data, d.ep).items() if not k.endswith("(first step)")
            )
            table, notes = layout_table(layout, cfg, seq, r, optim, data)
            out += [f"**{label}** ({d.world_size} ranks" + (f", {r} rows" if r != rows else "") + ")", "", table, ""]
            out += [f"- {n}" for n in notes] + [""]
            print("\n".join(out[-(len(notes) + 4) :]), file=sys.stderr, flush=True)
    plain, hsdp = ParallelDims(dp=4).describe(), ParallelDims(dp=4, dp_replicate=2).describe()
    pairs = [
        (f, totals[f, plain], totals[f, hsdp]) for f, _, _ in settings if (f, plain) in totals and (f, hsdp) in totals
    ]
    measured = (
        "Measured above, step total per rank, dp4 vs dp4 as 2 replicas: "
        + "; ".join(f"`{f}` {fmt_bytes(a)} vs {fmt_bytes(b)} (HSDP/plain {b / a:.3f})" for f, a, b in pairs)
        + "."
        if pairs
        else ""
    )
    out += [
        EXPLANATIONS.replace("  <HSDP_MEASURED>\n", f"  {measured}\n" if measured else ""),
        *cp_vs_ring("1b", 4096, (4, 8)),
    ]
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flavor", default="toy", help="flavor, or a comma list (one table set per flavor)")
    ap.add_argument("--seq", default="128", help="tokens per row (one value, or one per flavor)")
    ap.add_argument("--rows", default="2", help="rows per data rank per step (one value, or one per flavor)")
    ap.add_argument("--optim", default="muon", choices=("muon", "adamw"))
    ap.add_argument(
        "--write-docs", action="store_true", help=f"replace the '{SECTION[3:]}' section of docs/benchmarks.md"
    )
    args = ap.parse_args()
    flavors = args.flavor.split(",")
    seqs, rows = ([int(x) for x in s.split(",")] for s in (args.seq, args.rows))
    seqs, rows = (x * len(flavors) if len(x) == 1 else x for x in (seqs, rows))
    if not len(flavors) == len(seqs) == len(rows):
        ap.error("--seq and --rows take one value or one per flavor")
    section = render(list(zip(flavors, seqs, rows)), args.optim, ["-m", "bench.comm_volume", *sys.argv[1:]])
    print(section)
    if args.write_docs:
        replace_section(SECTION, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
