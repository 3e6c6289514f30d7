"""A training step's time and page faults with the host allocator keeping freed memory (`keep`, what every `dsv4`
command sets, dsv4train/utils/host_memory.py) and with glibc's defaults (`system`), each in a fresh subprocess on the
same machine in the same run. Prints one JSON line per cell, then a markdown section; `--write-docs` puts it into
docs/benchmarks.md.

    .venv/bin/python -m bench.host_allocator [--flavor toy --shapes 64x150,8x256 --steps 6 --threads 2] [--write-docs]

A step: the model's forward (no MTP) on random ids of rows × seq tokens, the cross-entropy of every position over
the whole vocabulary (the logits, their log-softmax and its gradient are the step's largest tensors, as in
pre-training, SFT and GRPO), backward, and an AdamW step. 64x150 is the shape of bench/grpo_vs_trl.py's update
(64 completions of a prompt plus up to 96 tokens), 8x256 the demo's pre-training batch. Two warm-up steps, then
`--steps` timed ones: the median seconds and the mean minor page faults per step (`getrusage` ru_minflt)."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys

SECTION = "## Host allocator"
DOCS_PATH = "docs/benchmarks.md"
CHOICES = ("system", "keep")


def measure(flavor: str, rows: int, seq: int, steps: int, threads: int) -> dict:
    import resource
    import statistics
    import time

    import torch
    import torch.nn.functional as F

    from dsv4train.models.flavors import get_flavor
    from dsv4train.models.model import DSV4Model
    from dsv4train.utils.host_memory import keep_freed_memory

    changed = keep_freed_memory()
    torch.set_num_threads(threads)
    cfg = get_flavor(flavor, n_mtp_layers=0)
    model = DSV4Model(cfg)
    model.init_weights(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)

    def step() -> None:
        ids = torch.randint(0, cfg.vocab_size, (rows, seq + 1), generator=gen)
        logits = model(ids[:, :-1], with_aux=True, with_mtp=False).logits
        F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    times, faults = [], []
    for _ in range(steps):
        f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    return {"changed": changed, "step_s": statistics.median(times), "faults": sum(faults) / len(faults)}


def render(rows: list[dict], args, argv: list[str]) -> str:
    import torch

    from bench.docs_section import cpu_name

    lines = [
        SECTION,
        "",
        f"Command ({datetime.date.today()}, {cpu_name()}, torch {torch.__version__}):",
        "",
        "    .venv/bin/python " + shlex.join(argv),
        "",
        f"One training step of flavor `{args.flavor}` (forward without MTP, cross-entropy over the whole vocabulary "
        f"at every position, backward, AdamW), fp32, {args.threads} thread(s); median of {args.steps} steps after "
        "two warm-up steps, each allocator in a fresh subprocess. `system` = glibc's defaults (requests above its "
        "mmap threshold, at most 32 MiB, get fresh pages each time), `keep` = freed memory stays mapped "
        "(dsv4train/utils/host_memory.py, the default of every `dsv4` command). bench/host_allocator.py's docstring "
        "says what a step is.",
        "",
        "| rows × seq | system step s | keep step s | keep speed-up | system page faults / step | "
        "keep page faults / step |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        s, k = r["system"], r["keep"]
        lines.append(
            f"| {r['rows']} × {r['seq']} | {s['step_s']:.3f} | {k['step_s']:.3f} | {s['step_s'] / k['step_s']:.2f}× "
            f"| {s['faults']:,.0f} | {k['faults']:,.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flavor", default="toy")
    ap.add_argument("--shapes", default="64x150,8x256", help="rows x seq, comma-separated")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--write-docs", action="store_true", help=f"replace the section of {DOCS_PATH}")
    ap.add_argument("--child", help=argparse.SUPPRESS)  # rows x seq, measured in this process
    a = ap.parse_args()
    if a.child:
        rows, seq = (int(v) for v in a.child.split("x"))
        print(json.dumps(measure(a.flavor, rows, seq, a.steps, a.threads)))
        return 0
    results = []
    for shape in a.shapes.split(","):
        rows, seq = (int(v) for v in shape.split("x"))
        cell = {"rows": rows, "seq": seq}
        for choice in CHOICES:
            env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "DSV4_HOST_MALLOC": choice}
            cmd = [sys.executable, "-m", "bench.host_allocator", *sys.argv[1:], "--child", shape]
            done = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if done.returncode != 0:
                print(done.stderr[-4000:], file=sys.stderr)
                return 1
            cell[choice] = json.loads(done.stdout.strip().splitlines()[-1])
            if cell[choice]["changed"] != (choice == "keep"):
                print(f"{choice}: the allocator setting did not take effect (not glibc?)", file=sys.stderr)
                return 1
        print(json.dumps(cell))
        results.append(cell)
    section = render(results, a, ["-m", "bench.host_allocator", *sys.argv[1:]])
    print(section)
    if a.write_docs:
        from bench.docs_section import replace_section

        replace_section(SECTION, section, DOCS_PATH)
    return 0


if __name__ == "__main__":
    sys.exit(main())
