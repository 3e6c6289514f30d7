"""`dsv4 pretrain [Hydra overrides]`: e.g. `dsv4 pretrain model=tiny train.steps=1000 run.dir=runs/t1`.
`--cfg job` prints the resolved config; `-m` sweeps (`-m optim.lr=1e-3,3e-3`), one run dir per job.
Re-running the same command with the same run.dir resumes from its newest complete checkpoint.

Exit status: 0 when the run finished or stopped on SIGTERM/SIGUSR1 (summary.json says which); 1 when the loss
stayed non-finite (or a bug: with its traceback); 2 for a bad override, config value, data folder or checkpoint,
with a message naming it."""

from __future__ import annotations

from dsv4train.cli.hydra_app import run_hydra_command


def _run(cfg, resolved: str) -> None:
    from dsv4train.train.trainer import pretrain

    pretrain(cfg, resolved)


def pretrain_main(argv: list[str]) -> int:
    return run_hydra_command("dsv4 pretrain", "pretrain", argv, _run, __doc__)
