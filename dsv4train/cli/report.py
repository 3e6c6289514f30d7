"""`dsv4 report RUN_DIR`: PNG plots of a run from its metrics.jsonl, written to RUN_DIR/plots/:
loss.png (train parts and validation), lr.png, throughput.png (tokens/s and MFU), expert_load.png (a heatmap
of max/mean expert load per MoE layer over steps; 1.0 is perfectly balanced); for a GRPO run (`dsv4 grpo`) instead
of the loss and throughput: reward.png (rollout reward and accuracy per task, held-out greedy accuracy and
sampled pass@1), grpo_policy.png (clip fraction, KL, entropy, masked fraction, response length) and
time_split.png (seconds per step in rollout, reward, train and weight sync)."""

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

    if any("reward_mean" in r for r in records):
        _grpo_plots(records, series, save, plt)
    else:
        _lm_plots(series, save, plt)

    fig, ax = plt.subplots(figsize=(7, 3))
    ax.plot(*series("lr"))
    ax.set(xlabel="step", ylabel="learning rate", title="learning rate")
    ax.grid(alpha=0.3)
    save(fig, "lr.png")

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


def _lm_plots(series, save, plt) -> None:
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
    ax.plot(*series("tokens_per_sec"), label="tokens/s")
    ax.set(xlabel="step", ylabel="tokens/s", title="throughput")
    x, y = series("mfu")
    if x:
        twin = ax.twinx()
        twin.plot(x, [100 * v for v in y], color="tab:orange", alpha=0.6, label="MFU %")
        twin.set_ylabel("MFU (% of measured matmul peak)")
    ax.grid(alpha=0.3)
    save(fig, "throughput.png")


def _grpo_plots(records: list[dict], series, save, plt) -> None:
    keys = sorted({k for r in records for k in r})
    tasks = sorted({k.split("/")[0] for k in keys if k.endswith("/reward_mean")})
    fig, ax = plt.subplots(figsize=(7, 4))
    for task in tasks:
        line = ax.plot(*series(f"{task}/reward_mean"), label=f"{task} reward (rollouts)")[0]
        ax.plot(*series(f"{task}/accuracy"), ":", color=line.get_color(), label=f"{task} accuracy (rollouts)")
        x, y = series(f"eval/{task}_accuracy")
        if x:
            ax.plot(x, y, "o-", color=line.get_color(), markersize=4, label=f"{task} held-out greedy accuracy")
        x, y = series(f"eval/{task}_sampled_accuracy")
        if x:
            ax.plot(x, y, "s--", color=line.get_color(), markersize=4, label=f"{task} held-out sampled pass@1")
    ax.set(xlabel="step", ylabel="reward / accuracy", title="GRPO reward and accuracy")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save(fig, "reward.png")

    names = ("clip_fraction", "kl", "entropy", "masked_fraction", "response_length")
    fig, axes = plt.subplots(len(names), 1, figsize=(7, 1.6 * len(names)), sharex=True)
    for ax, name in zip(axes, names):
        ax.plot(*series(name))
        ax.set_ylabel(name.replace("_", " "), fontsize=8)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("step")
    axes[0].set_title("GRPO policy update")
    save(fig, "grpo_policy.png")

    parts = ("rollout_s", "reward_s", "train_s", "sync_s")
    fig, ax = plt.subplots(figsize=(7, 3))
    steps = [r["step"] for r in records if "rollout_s" in r]
    bottom = [0.0] * len(steps)
    for part in parts:
        values = [r.get(part, 0.0) for r in records if "rollout_s" in r]
        ax.bar(steps, values, bottom=bottom, label=part[:-2])
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set(xlabel="step", ylabel="seconds", title="time per step")
    ax.legend(fontsize=8)
    save(fig, "time_split.png")


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
    if "reward_mean" in last:
        evals = {k: v for k, v in last.items() if k.startswith("eval/")}
        print(f"{len(records)} steps logged; last step {last['step']}: reward {last['reward_mean']:.4f} {evals}")
        return 0
    vals = [r["val_loss"] for r in records if r.get("val_loss") is not None]
    print(
        f"{len(records)} steps logged; last step {last['step']}: loss {last.get('loss')}"
        + (f", val loss {vals[0]:.4f} -> {vals[-1]:.4f}" if vals else "")
    )
    return 0
