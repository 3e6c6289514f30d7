"""`dsv4 demo`: the toy-scale pipeline on CPU, through the same code paths as a real run.

1. data: the Python standard library's source -> BPE tokenizer -> megatron indexed dataset
   (`dsv4 data prepare`, cached in data/prepared/stdlib and reused by later runs);
2. pre-train the toy flavor with the Hydra-configured engine (`dsv4 pretrain`), Muon + AdamW, checkpoints;
3. plots (`dsv4 report`) and the end-of-run summary.
Post-training stages join as they land."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

DATA_DIR = "data/prepared/stdlib"  # the default of dsv4train/conf/data/stdlib.yaml, so `dsv4 pretrain` finds it too


def _count(text: str) -> int:
    """A whole number >= 1 (argparse prints the message with the option's name and exits 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def demo_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="dsv4 demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--run-dir",
        default=None,
        help="default: runs/demo-<time> (a fresh run each time); an "
        "existing run dir is resumed from its newest checkpoint",
    )
    ap.add_argument("--steps", type=_count, default=300)
    ap.add_argument("--data-dir", type=Path, default=Path(DATA_DIR), help="prepared data (made if missing)")
    ap.add_argument("--max-docs", type=_count, default=1200, help="stdlib files used for the corpus")
    ap.add_argument("overrides", nargs="*", help="extra `dsv4 pretrain` overrides, e.g. train.seq_len=128")
    args = ap.parse_args(argv)
    run_dir = args.run_dir or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}"

    # The config first: a bad override fails in a second, before the data step (`dsv4` prints it, status 2).
    from dsv4train.config.hydra_entry import compose_pretrain

    cfg, resolved = compose_pretrain(
        [f"run.dir={run_dir}", f"data.dir={args.data_dir}", f"train.steps={args.steps}", *args.overrides]
    )

    print("[1/3] data: Python stdlib source -> BPE tokenizer -> indexed dataset")
    data_dir = args.data_dir
    if (data_dir / "manifest.json").exists():
        print(f"      reusing {data_dir} (delete it to rebuild)")
    else:
        from dsv4train.cli.data import data_main

        rc = data_main(
            [
                "prepare",
                "--stdlib",
                "--max-docs",
                str(args.max_docs),
                "--vocab-size",
                "4096",
                "--name",
                "stdlib",
                "--out",
                str(data_dir),
            ]
        )
        if rc != 0:
            return rc

    print(f"[2/3] pre-train model=toy for {args.steps} steps -> {run_dir}")
    from dsv4train.train.trainer import pretrain

    summary = pretrain(cfg, resolved)

    print("[3/3] plots")
    from dsv4train.cli.report import report_main

    report_main([run_dir])
    first, last = summary["val_loss_at_start"], summary["val_loss_last"]
    extend = f"dsv4 pretrain run.dir={run_dir} data.dir={data_dir} train.steps=<more>"
    if summary["preempted_by"]:
        print(
            f"\nstopped by {summary['preempted_by']} at step {summary['steps_done']}; continue with the same "
            f"`dsv4 demo --run-dir {run_dir}` command or {extend}"
        )
        return 0
    if first is None or last is None:  # a checkpoint from before the validation losses were saved in it
        print(
            f"\nthe run is at step {summary['steps_done']}; its step-0 validation loss is not in its checkpoint. "
            f"Extend it with: {extend}"
        )
        return 0
    print(
        f"\nvalidation loss {first:.3f} (step 0) -> {last:.3f} (step {summary['steps_done']}); "
        f"extend this run with: {extend}"
    )
    if last >= first:
        print("validation loss did not fall: something is wrong")
        return 1
    return 0
