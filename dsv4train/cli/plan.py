"""`dsv4 plan [overrides] [--gpu-memory-gb 80] [--json] [--all] [--check-ranks 0,5,63] [--config-dir DIR]`:
a dry run of a parallel layout at scale, without GPUs. Composes the same config as `dsv4 pretrain` (e.g.
`model=flash parallel.pp=4 parallel.dp=4 parallel.ep=4 train.seq_len=4096 train.micro_batch_size=1`), validates
the layout for a world of exactly pp·dp·cp·ep·tp ranks with the same checks as a real run, builds the real device
mesh on a fake process group as the first and last rank, and prints where every layer, expert and FSDP shard lives and
an
estimate of the memory per rank (formulas: dsv4train/parallel/plan.py). Nothing is trained or allocated."""

from __future__ import annotations

import argparse
import json
import sys

from dsv4train.config.errors import ConfigError

GB = 1e9


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dsv4 plan", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("overrides", nargs="*", help="Hydra overrides, as for dsv4 pretrain")
    p.add_argument("--gpu-memory-gb", type=float, default=80.0, help="memory of one GPU to compare with (80)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON instead of tables")
    p.add_argument("--all", action="store_true", help="print every placement row (default: elide the middle)")
    p.add_argument(
        "--check-ranks",
        default=None,
        metavar="R,R,...",
        help="ranks to build the device mesh as (default: the first and the last)",
    )
    p.add_argument(
        "--config-dir",
        default=None,
        metavar="DIR",
        help="a recipe folder whose config (--config-name) extends dsv4train/conf/pretrain.yaml, as for "
        "`dsv4 pretrain --config-dir DIR --config-name NAME`",
    )
    p.add_argument("--config-name", default="config", metavar="NAME", help="config in --config-dir (config)")
    return p


def compose(overrides: list[str], config_dir: str | None = None, config_name: str = "config"):
    """The typed PretrainConfig `dsv4 pretrain` would run: dsv4train/conf/pretrain.yaml, or a recipe's
    `config_name`.yaml in `config_dir` that extends it (its defaults list names `pretrain`; the package's conf/ is
    on the search path, as `dsv4 pretrain --config-dir` puts it there)."""
    from dsv4train.config.hydra_entry import CONF_DIR, compose_pretrain, register_schemas, to_config

    if config_dir is None:
        return compose_pretrain(overrides)[0]
    from pathlib import Path

    from hydra import compose as hydra_compose, initialize_config_dir

    register_schemas()
    with initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base=None, job_name="pretrain"):
        cfg = hydra_compose(config_name=config_name, overrides=[f"hydra.searchpath=[file://{CONF_DIR}]", *overrides])
    return to_config(cfg)


def span(xs: list[int]) -> str:
    """Compact text for a sorted list of ints: '0-15', '0,4,8,12', '0..60 step 4', '-' for none."""
    if not xs:
        return "-"
    if len(xs) == 1:
        return str(xs[0])
    steps = {b - a for a, b in zip(xs, xs[1:])}
    if steps == {1}:
        return f"{xs[0]}-{xs[-1]}"
    if len(xs) <= 4:
        return ",".join(map(str, xs))
    if len(steps) == 1:
        return f"{xs[0]}..{xs[-1]} step {steps.pop()}"
    return ",".join(map(str, xs[:3])) + f",…({len(xs)})"


def _gb(x: float) -> str:
    return f"{x / GB:8.2f}"


def render(plan, show_all: bool = False) -> str:
    d = plan.dims
    lines = []
    add = lines.append
    add(
        f"dsv4 plan: model '{plan.model}' ({plan.params_total / 1e9:.3g}B params with MTP) on {d.world_size} ranks "
        f"({d.describe()}), micro-batch {plan.micro_batch_size}×{plan.seq_len} tokens, grad_accum "
        f"{plan.grad_accum}, {plan.compute_dtype}, optim {plan.optimizer}"
    )
    strides, s = {}, 1
    for a in reversed(("pp", "dp", "cp", "ep", "tp")):
        strides[a], s = s, s * getattr(d, a)
    add(
        "mesh (outermost first): "
        + "  ".join(
            f"{a}={getattr(d, a)}" + (f" (rank stride {strides[a]})" if getattr(d, a) > 1 else "")
            for a in ("pp", "dp", "cp", "ep", "tp")
        )
    )
    add(
        f"  fsdp = dp·cp·ep = {d.dp * d.cp * d.ep} ranks shard the dense weights; efsdp = dp·cp = {d.dp * d.cp} "
        f"shard the routed experts; {d.data_ranks} data ranks (dp·ep) read different batches"
    )
    if d.dp_replicate > 1:
        add(
            f"  HSDP: both groups form {d.dp_replicate} replicas; a weight is sharded over {d.fsdp_shards} (dense) "
            f"/ {d.expert_fsdp_shards} (experts) ranks and all-reduced across the replicas"
        )
    add(
        f"  device mesh built on a fake process group as rank(s) {', '.join(map(str, sorted(plan.mesh_checked)))}: "
        "coordinates and groups match the plan"
    )

    add("\npipeline stages")
    add(f"  {'stage':<6}{'ranks':<14}{'layers':<16}holds")
    per_stage = d.world_size // d.pp
    for st in plan.stages:
        ranks = span(list(range(st.stage * per_stage, (st.stage + 1) * per_stage)))
        add(f"  {st.stage:<6}{ranks:<14}{span(st.layers) + f' ({len(st.layers)})':<16}{', '.join(st.holds) or '-'}")

    add(
        f"\nplacement: one row per group of ranks holding the same weights (the dp·cp = {d.dp * d.cp} ranks of an "
        "efsdp group)"
    )
    head = f"  {'ranks':<20}{'pp':>3}{'ep':>4}{'tp':>4}  {'layers':<10}{'experts':<12}fsdp group"
    add(head)
    rows = plan.rows
    shown = rows if show_all or len(rows) <= 24 else rows[:10] + [None] + rows[-10:]
    for r in shown:
        if r is None:
            add(f"  … {len(rows) - 20} more rows (--all prints them)")
            continue
        add(
            f"  {span(r['ranks']):<20}{r['pp']:>3}{r['ep']:>4}{r['tp']:>4}  {span(r['layers']):<10}"
            f"{span(r['experts']):<12}{span(r['fsdp_group'])}"
        )

    add("\nmemory per rank, GB (1e9 B), an estimate (formulas: dsv4train/parallel/plan.py)")
    terms = list(plan.stages[0].terms)
    add(f"  {'term':<24}" + "".join(f"{'stage ' + str(s.stage):>10}" for s in plan.stages))
    for term in terms:
        add(f"  {term:<24}" + "".join(f"{_gb(s.terms[term]):>10}" for s in plan.stages))
    add(f"  {'total':<24}" + "".join(f"{_gb(s.total):>10}" for s in plan.stages))
    if any(s.in_flight > 1 for s in plan.stages):
        add(f"  {'(pp chunks alive)':<24}" + "".join(f"{s.in_flight:>10}" for s in plan.stages))
    peak = plan.peak
    add(
        f"  peak: stage {peak.stage}, {peak.total / GB:.2f} GB; biggest term: {peak.biggest} "
        f"({peak.terms[peak.biggest] / GB:.2f} GB)"
    )
    act = peak.activations
    if act is not None:
        parts = ", ".join(f"{k.removeprefix('layers.')} {v / GB:.2f}" for k, v in act.groups.items() if v)
        add(
            f"  activations of stage {peak.stage}: CSA {act.indexer} (the larger of the modes the run uses), "
            f"{act.rows:g} row(s) per forward; GB by part: {parts}"
        )
    if plan.gpu_memory_gb is not None:
        room = plan.gpu_memory_gb - peak.total / GB
        verdict = (
            f"fits with {room:.1f} GB to spare (keep ~10% for the CUDA context and fragmentation)"
            if room >= 0
            else f"does NOT fit: {-room:.1f} GB over"
        )
        add(f"  vs a {plan.gpu_memory_gb:g} GB GPU: {verdict}")
    return "\n".join(lines)


def plan_main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        from hydra.errors import HydraException

        from dsv4train.parallel.plan import make_plan

        ranks = None if args.check_ranks is None else [int(x) for x in args.check_ranks.split(",") if x.strip()]
        cfg = compose(args.overrides, args.config_dir, args.config_name)
        plan = make_plan(cfg, ranks, args.gpu_memory_gb)
    except (ConfigError, HydraException, ValueError) as e:
        print(f"dsv4 plan: {e}", file=sys.stderr)
        return 2
    print(json.dumps(plan.to_json(), indent=2) if args.json else render(plan, args.all))
    return 0
