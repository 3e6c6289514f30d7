"""Activation memory of one training step, measured against `dsv4 plan`'s formula (dsv4train/parallel/plan.py,
`activation_bytes`), per point: flavor, sequence length, rows, precision, CSA indexer mode, layout.

    .venv/bin/python -m bench.activation_memory  # the table in docs/benchmarks.md
    .venv/bin/python -m bench.activation_memory --points small:2048:1:fp32:sparse
    .venv/bin/python -m bench.activation_memory --points toy:256:2:bf16:dense:tp2 --json out.json

A point is flavor:seq:rows:precision:indexer[:layout], precision fp32 | bf16 (autocast) | fp8 (emulated FP8
GEMMs, block 32, with bf16 autocast), layout one | tp2 | cp2 | ep2 (gloo, 2 CPU processes; rank 0 reported; cp
ranks split the seq). Measured: every distinct storage saved for backward, plus the logits the step holds, at
the start of the backward of one real Learner step (dsv4train/testing/activation_memory.py says what counts).
"Weight copies" (bf16/FP8 copies of weights that the forward saves) are apart from the activations; the ratio
is of the sum. MB = 1e6 B.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

from dsv4train.models.flavors import get_flavor
from dsv4train.parallel.dims import ParallelDims
from dsv4train.parallel.plan import ActivationCase, activation_bytes
from dsv4train.testing.activation_memory import measure_step

DOC_POINTS = [
    "toy:128:1:fp32:sparse",
    "toy:256:1:fp32:sparse",
    "toy:512:1:fp32:sparse",
    "toy:256:2:fp32:dense",
    "toy:256:4:fp32:sparse",
    "toy:256:1:bf16:sparse",
    "toy:256:2:bf16:dense",
    "toy:256:1:fp8:sparse",
    "tiny:256:1:fp32:sparse",
    "tiny:512:1:fp32:dense",
    "tiny:512:2:bf16:sparse",
    "tiny:512:1:bf16:dense",
    "small:512:1:fp32:sparse",
    "small:512:1:bf16:dense",
    "small:2048:1:fp32:sparse",
    "small:2048:1:bf16:sparse",
    "toy:256:1:fp32:sparse:tp2",
    "toy:256:2:bf16:dense:tp2",
    "toy:256:1:fp32:sparse:cp2",
    "toy:256:2:bf16:dense:cp2",
    "toy:256:2:fp32:sparse:ep2",
    "tiny:512:1:fp32:sparse:tp2",
    "tiny:512:1:bf16:dense:cp2",
]
LAYOUTS = {"one": {}, "tp2": {"tp": 2}, "cp2": {"cp": 2}, "ep2": {"ep": 2}}
MB = 1e6


def parse(point: str) -> dict:
    parts = point.split(":")
    if (
        len(parts) not in (5, 6)
        or parts[3] not in ("fp32", "bf16", "fp8")
        or parts[4] not in ("dense", "sparse")
        or (len(parts) == 6 and parts[5] not in LAYOUTS)
    ):
        raise SystemExit(f"bad point {point!r}: flavor:seq:rows:fp32|bf16|fp8:dense|sparse[:one|tp2|cp2|ep2]")
    return {
        "flavor": parts[0],
        "seq": int(parts[1]),
        "rows": int(parts[2]),
        "precision": parts[3],
        "indexer": parts[4],
        "layout": parts[5] if len(parts) == 6 else "one",
    }


def formula(p: dict) -> dict[str, float]:
    cfg = get_flavor(p["flavor"], max_seq_len=max(p["seq"], 256))
    dims = ParallelDims(**LAYOUTS[p["layout"]])
    return activation_bytes(
        cfg,
        ActivationCase(
            rows=p["rows"],
            seq=p["seq"] // dims.cp,
            compute_bytes=4 if p["precision"] == "fp32" else 2,
            indexer=p["indexer"],
            fp8=p["precision"] == "fp8",
            cp=dims.cp,
            tp=dims.tp,
            ep=dims.ep,
        ),
    )


def measure(p: dict, dims: ParallelDims | None = None) -> dict[str, int]:
    cfg = get_flavor(p["flavor"], max_seq_len=max(p["seq"], 256))
    return measure_step(cfg, p["seq"], p["rows"], p["precision"], p["indexer"], dims).groups()


def _rank_main(rank: int, world_size: int, p: dict, out_path: str) -> None:
    groups = measure(p, ParallelDims(**LAYOUTS[p["layout"]]))
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(groups, f)


def run_point(p: dict) -> dict:
    start = time.time()
    if p["layout"] == "one":
        got = measure(p)
    else:
        from dsv4train.testing.distributed import run_distributed_test

        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "groups.json")
            run_distributed_test(_rank_main, world_size=2, args=(p, path), timeout_s=900)
            with open(path) as f:
                got = json.load(f)
    want = formula(p)
    copies = (got.pop("weight copies", 0), want.pop("weight copies"))
    return {
        **p,
        "measured": sum(got.values()),
        "formula": sum(want.values()),
        "measured_copies": copies[0],
        "formula_copies": copies[1],
        "groups_measured": got,
        "groups_formula": want,
        "seconds": round(time.time() - start, 1),
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| flavor | seq | rows | precision | indexer | layout | measured MB | formula MB | weight copies "
        "measured / formula MB | formula / measured |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        total_m, total_f = r["measured"] + r["measured_copies"], r["formula"] + r["formula_copies"]
        lines.append(
            f"| {r['flavor']} | {r['seq']} | {r['rows']} | {r['precision']} | {r['indexer']} | "
            f"{r['layout']} | {r['measured'] / MB:,.2f} | {r['formula'] / MB:,.2f} | "
            f"{r['measured_copies'] / MB:,.2f} / {r['formula_copies'] / MB:,.2f} | "
            f"{total_f / total_m:.4f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", default=",".join(DOC_POINTS), help="comma-separated flavor:seq:rows:prec:mode[:layout]")
    ap.add_argument("--json", default=None, help="also write every point's groups here")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rows = []
    for point in args.points.split(","):
        r = run_point(parse(point))
        rows.append(r)
        print(
            f"{point}: measured {r['measured'] / MB:.2f} MB (+{r['measured_copies'] / MB:.2f} copies), formula "
            f"{r['formula'] / MB:.2f} (+{r['formula_copies'] / MB:.2f}), {r['seconds']} s",
            file=sys.stderr,
            flush=True,
        )
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    worst = max(abs((r["formula"] + r["formula_copies"]) / (r["measured"] + r["measured_copies"]) - 1) for r in rows)
    print(f"\nlargest |formula/measured - 1|: {worst:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
