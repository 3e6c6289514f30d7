"""`dsv4 pretrain [Hydra overrides]`: e.g. `dsv4 pretrain model=tiny train.steps=1000 run.dir=runs/t1`.
`--cfg job` prints the resolved config; `-m` sweeps (`-m optim.lr=1e-3,3e-3`), one run dir per job.
Re-running the same command with the same run.dir resumes from its newest complete checkpoint."""

from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from dsv4train.config.errors import ConfigError
from dsv4train.config.hydra_entry import CONF_DIR, register_schemas, to_config
from dsv4train.observability.run_dir import open_run_dir


def _task(cfg: DictConfig) -> None:
    from dsv4train.train.trainer import pretrain

    try:
        run_dir = HydraConfig.get().runtime.output_dir
        resolved = OmegaConf.to_yaml(cfg, resolve=True)
        config = to_config(cfg, run_dir)
        pretrain(config, resolved)
    except (ConfigError, FileNotFoundError) as e:
        print(f"dsv4 pretrain: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except FloatingPointError as e:
        print(f"dsv4 pretrain: stopped: {e}", file=sys.stderr)
        raise SystemExit(1) from None


def pretrain_main(argv: list[str]) -> int:
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
    try:
        app()
    except SystemExit as e:
        return int(e.code or 0)
    return 0
