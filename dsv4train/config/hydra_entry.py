"""Hydra glue: the conf/ folder, the schema registration, and composing a typed PretrainConfig.
Below this module only dataclasses are used (OmegaConf.to_object runs every __post_init__ check)."""

from __future__ import annotations

from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from dsv4train.config.pretrain import PretrainConfig

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def register_schemas() -> None:
    ConfigStore.instance().store(name="pretrain_schema", node=PretrainConfig)


def to_config(cfg: DictConfig, run_dir: str | None = None) -> PretrainConfig:
    """Typed config from a composed DictConfig; `run_dir` replaces run.dir (Hydra's per-job output dir)."""
    if run_dir is not None:
        cfg.run.dir = run_dir
    return OmegaConf.to_object(cfg)


def compose_pretrain(overrides: list[str] | None = None) -> tuple[PretrainConfig, str]:
    """Compose conf/pretrain.yaml with overrides outside a Hydra app (tests, `dsv4 demo`); returns the typed
    config and its resolved YAML."""
    from hydra import compose, initialize_config_dir

    register_schemas()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None, job_name="pretrain"):
        cfg = compose(config_name="pretrain", overrides=list(overrides or []))
    run_dir = cfg.run.dir
    resolved = OmegaConf.to_yaml(cfg, resolve=True)
    return to_config(cfg, run_dir), resolved
