"""`dsv4 report RUN_DIR`: PNG plots of a run from its metrics.jsonl, written to RUN_DIR/plots/:
loss.png (train parts and validation), lr.png, throughput.png (tokens/s and MFU), expert_load.png (a heatmap
of max/mean expert load per MoE layer over steps; 1.0 is perfectly balanced)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _plots(records: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]

    def series(key):
        pts = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        return [p[0] for p in pts], [p[1] for p in pts]

    written = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(out / name)

    fig, ax = plt.subplots(figsize=(7, 4))
    for key in ("lm_loss", "mtp_loss", "val_loss"):
        x, y = series(key)
        if x:
            ax.plot(x, y, "o-" if key == "val_loss" else "-", label=key, markersize=3)
    ax.set(xlabel="step", ylabel="loss", title="loss")
    ax.legend()
    ax.grid(alpha=0.3)
    save(fig, "loss.png")

    fig, ax = plt.subplots(figsize=(7, 3))
    ax.plot(*series("lr"))
    ax.set(xlabel="step", ylabel="learning rate", title="learning rate")
    ax.grid(alpha=0.3)
    save(fig, "lr.png")

    fig, ax = plt.subplots(figsize=(7, 3))
    ax.plot(*series("tokens_per_sec"), label="tokens/s")
    ax.set(xlabel="step", ylabel="tokens/s", title="throughput")
    x, y = series("mfu")
    if x:
        twin = ax.twinx()
        twin.plot(x, [100 * v for v in y], color="tab:orange", alpha=0.6, label="MFU %")
        twin.set_ylabel("MFU (% of measured matmul peak)")
    ax.grid(alpha=0.3)
    save(fig, "throughput.png")

    loads = [r.get("expert_load_max_over_mean") for r in records]
    if any(loads):
        import numpy as np

        width = max(len(v) for v in loads if v)
        grid = np.array([v if v and len(v) == width else [np.nan] * width for v in loads]).T
        fig, ax = plt.subplots(figsize=(7, 1 + 0.4 * width))
        im = ax.imshow(
            grid,
            aspect="auto",
            cmap="magma",
            interpolation="nearest",
            extent=(steps[0] - 0.5, steps[-1] + 0.5, width - 0.5, -0.5),
        )
        ax.set(xlabel="step", ylabel="MoE layer (last = MTP)", title="expert load: max / mean per layer")
        fig.colorbar(im, ax=ax)
        save(fig, "expert_load.png")
    return written


def report_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="dsv4 report", description=__doc__)
    p.add_argument("run_dir", type=Path)
    args = p.parse_args(argv)
    from dsv4train.observability.trackers import read_metrics

    try:
        records = read_metrics(args.run_dir)
    except FileNotFoundError as e:
        print(f"dsv4 report: {e}", file=sys.stderr)
        return 2
    if not records:
        print(f"dsv4 report: {args.run_dir}/metrics.jsonl has no records yet", file=sys.stderr)
        return 2
    out = args.run_dir / "plots"
    out.mkdir(exist_ok=True)
    for path in _plots(records, out):
        print(f"wrote {path}")
    last = records[-1]
    vals = [r["val_loss"] for r in records if r.get("val_loss") is not None]
    print(
        f"{len(records)} steps logged; last step {last['step']}: loss {last.get('loss')}"
        + (f", val loss {vals[0]:.4f} -> {vals[-1]:.4f}" if vals else "")
    )
    return 0
