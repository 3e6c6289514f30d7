"""The Hydra command shape `dsv4 pretrain` and `dsv4 sft` share: overrides on the command line, `--cfg job`, `-m`
sweeps (one run dir per job), a run.dir checked before Hydra creates it, exit status 2 for a bad override, config
value, data or checkpoint, 1 for a loss that stayed non-finite, 0 when the run finished or stopped on a signal."""

from __future__ import annotations

import sys
from collections.abc import Callable

from dsv4train.utils.signals import catch_preemption


def run_hydra_command(prog: str, config_name: str, argv: list[str], run: Callable, help_text: str) -> int:
    """Compose dsv4train/conf/<config_name>.yaml with `argv` and call `run(typed_config, resolved_yaml)`."""
    # The preemption handlers first (before torch is imported): a SIGTERM during start-up ends the run before
    # its first step with a summary, instead of killing it.
    with catch_preemption():
        return _run(prog, config_name, argv, run, help_text)


def _run(prog: str, config_name: str, argv: list[str], run: Callable, help_text: str) -> int:
    import hydra

    from dsv4train.config.errors import ConfigError
    from dsv4train.config.hydra_entry import CONF_DIR, register_schemas
    from dsv4train.observability.run_dir import open_run_dir

    if argv and argv[0] in ("-h", "--help") and len(argv) == 1:
        print(help_text)
    for arg in argv:  # Hydra creates run.dir before our code runs; check it first so the error names the key
        if arg.startswith("run.dir=") and "," not in arg:
            try:
                open_run_dir(arg.split("=", 1)[1])
            except ConfigError as e:
                print(f"{prog}: {e}", file=sys.stderr)
                return 2
    register_schemas()
    started: list[bool] = []  # set once Hydra has composed a config and called the task

    def task(cfg) -> None:
        from hydra.core.hydra_config import HydraConfig
        from omegaconf import OmegaConf
        from omegaconf.errors import MissingMandatoryValue

        from dsv4train.config.hydra_entry import to_config

        started.append(True)
        try:
            run_dir = HydraConfig.get().runtime.output_dir
            resolved = OmegaConf.to_yaml(cfg, resolve=True)
            try:
                config = to_config(cfg, run_dir)
            except MissingMandatoryValue as e:  # a required key (`init` of dsv4 sft) not given
                raise ConfigError(f"{e.full_key}: required, give it on the command line ({e.full_key}=...)") from None
            run(config, resolved)
        except (ConfigError, FileNotFoundError) as e:  # ConfigError includes a damaged checkpoint (CheckpointError)
            print(f"{prog}: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        except FloatingPointError as e:
            print(f"{prog}: stopped: {e}", file=sys.stderr)
            raise SystemExit(1) from None

    sys.argv = [prog, *argv]
    app = hydra.main(config_path=str(CONF_DIR), config_name=config_name, version_base=None)(task)
    try:
        app()
    except SystemExit as e:
        code = int(e.code or 0)
        # Hydra printed its one-paragraph message for a bad override or config group and exits 1; that is a user
        # error like any other bad config value (a failure inside the task has already chosen its own status).
        return 2 if code == 1 and not started else code
    return 0
