"""`dsv4 grpo grpo.init=SFT_EXPERT [Hydra overrides]`: GRPO of a domain expert on the offline domains' train split
(grpo.tasks=[math] or [code]), rewards from each domain's verifier (the code judge runs candidates in a sandbox).
SFT_EXPERT: an SFT run directory (its newest checkpoint), a dsv4 folder or an HF export; its tokenizer comes with it.
E.g.
    dsv4 grpo grpo.init=runs/sft grpo.tasks=[math] run.dir=runs/grpo-math
`--cfg job` prints the resolved config; `-m` sweeps. Re-running the same command resumes from the newest checkpoint.
Presets: dsv4train/conf/grpo/ (grpo=toy is the default). Schema: dsv4train/config/grpo.py. Exit status as
`dsv4 pretrain`."""

from __future__ import annotations

from dsv4train.cli.hydra_app import run_hydra_command


def _run(cfg, resolved: str) -> None:
    from dsv4train.posttrain.grpo.controller import grpo

    grpo(cfg, resolved)


def grpo_main(argv: list[str]) -> int:
    return run_hydra_command("dsv4 grpo", "grpo", argv, _run, __doc__)
