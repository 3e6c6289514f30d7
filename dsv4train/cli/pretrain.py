"""`dsv4 pretrain [Hydra overrides]`: e.g. `dsv4 pretrain model=tiny train.steps=1000 run.dir=runs/t1`.
`--cfg job` prints the resolved config; `-m` sweeps (`-m optim.lr=1e-3,3e-3`), one run dir per job.
Re-running the same command with the same run.dir resumes from its newest complete checkpoint.

Exit status: 0 when the run finished or stopped on SIGTERM/SIGUSR1 (summary.json says which); 1 when the loss
stayed non-finite (or a bug: with its traceback); 2 for a bad override, config value, data folder or checkpoint,
with a message naming it."""

from __future__ import annotations

import sys

from dsv4train.utils.signals import catch_preemption

_task_started: list[bool] = []  # set once Hydra has composed a config and called _task


def _task(cfg) -> None:
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from dsv4train.config.errors import ConfigError
    from dsv4train.config.hydra_entry import to_config
    from dsv4train.train.trainer import pretrain

    _task_started.append(True)
    try:
        run_dir = HydraConfig.get().runtime.output_dir
        resolved = OmegaConf.to_yaml(cfg, resolve=True)
        config = to_config(cfg, run_dir)
        pretrain(config, resolved)
    except (ConfigError, FileNotFoundError) as e:  # ConfigError includes a damaged checkpoint (CheckpointError)
        print(f"dsv4 pretrain: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except FloatingPointError as e:
        print(f"dsv4 pretrain: stopped: {e}", file=sys.stderr)
        raise SystemExit(1) from None


def pretrain_main(argv: list[str]) -> int:
    # The preemption handlers first (before torch is imported): a SIGTERM during start-up ends the run before
    # its first step with a summary, instead of killing it.
    with catch_preemption():
        return _pretrain_main(argv)


def _pretrain_main(argv: list[str]) -> int:
    import hydra

    from dsv4train.config.errors import ConfigError
    from dsv4train.config.hydra_entry import CONF_DIR, register_schemas
    from dsv4train.observability.run_dir import open_run_dir

    if argv and argv[0] in ("-h", "--help") and len(argv) == 1:
        print(__doc__)
    for arg in argv:  # Hydra creates run.dir before our code runs; check it first so the error names the key
        if arg.startswith("run.dir=") and "," not in arg:
            try:
                open_run_dir(arg.split("=", 1)[1])
            except ConfigError as e:
                print(f"dsv4 pretrain: {e}", file=sys.stderr)
                return 2
    register_schemas()
    sys.argv = ["dsv4 pretrain", *argv]
    app = hydra.main(config_path=str(CONF_DIR), config_name="pretrain", version_base=None)(_task)
    _task_started.clear()
    try:
        app()
    except SystemExit as e:
        code = int(e.code or 0)
        # Hydra printed its one-paragraph message for a bad override or config group and exits 1; that is a user
        # error like any other bad config value (a failure inside the task has already chosen its own status).
        return 2 if code == 1 and not _task_started else code
    return 0
