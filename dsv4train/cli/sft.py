"""`dsv4 sft sft.init=MODEL data.train=[FILE,...] [Hydra overrides]`: supervised fine-tuning of a pre-trained model on
chat records (jsonl or parquet of {"messages": [...], "domain": ..., "mode": "chat"|"think"|"think_max"}), the loss on
the assistant's tokens only. MODEL: a dsv4 folder, a run directory (its newest checkpoint) or an HF export; its
tokenizer comes with it (or data.tokenizer=PATH). E.g.
    dsv4 sft sft.init=runs/demo data.train=[data/sft/train.jsonl] run.dir=runs/sft
`--cfg job` prints the resolved config; `-m` sweeps. Re-running the same command resumes from the newest checkpoint.
Presets: dsv4train/conf/sft/ (sft=toy is the default). Exit status as `dsv4 pretrain`."""

from __future__ import annotations

from dsv4train.cli.hydra_app import run_hydra_command


def _run(cfg, resolved: str) -> None:
    from dsv4train.posttrain.sft import sft

    sft(cfg, resolved)


def sft_main(argv: list[str]) -> int:
    return run_hydra_command("dsv4 sft", "sft", argv, _run, __doc__)
