"""Hydra glue: the dsv4train/conf/ folder, the schema registration, and composing a typed PretrainConfig.
Below this module only dataclasses are used (OmegaConf.to_object runs every __post_init__ check)."""

from __future__ import annotations

import re
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from dsv4train.config.grpo import GRPOConfig
from dsv4train.config.pretrain import PretrainConfig
from dsv4train.config.sft import SFTConfig

# The YAML groups ship inside the package (pyproject's package-data), so an installed wheel finds them from any
# working directory; a wheel is unpacked on disk, so a plain path is what Hydra's config_dir needs.
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def register_schemas() -> None:
    ConfigStore.instance().store(name="pretrain_schema", node=writable_schema(PretrainConfig))
    ConfigStore.instance().store(name="sft_schema", node=writable_schema(SFTConfig))
    ConfigStore.instance().store(name="grpo_schema", node=writable_schema(GRPOConfig))


def writable_schema(config_class: type) -> DictConfig:
    """The structured DictConfig of a frozen config dataclass with OmegaConf's read-only flag cleared on every
    node. OmegaConf marks the node of a frozen dataclass read-only, which would refuse Hydra's merge of the YAML
    groups and the command-line overrides; composing writes the DictConfig, and the dataclasses that
    OmegaConf.to_object builds from it stay frozen."""
    schema = OmegaConf.structured(config_class)
    _clear_readonly(schema)
    return schema


def _clear_readonly(node: DictConfig) -> None:
    OmegaConf.set_readonly(node, None)  # None: inherit (from the root: writable)
    for _, child in node.items_ex(resolve=False):
        if isinstance(child, DictConfig):
            _clear_readonly(child)


def to_config(cfg: DictConfig, run_dir: str | None = None) -> PretrainConfig | SFTConfig:
    """Typed config from a composed DictConfig; `run_dir` replaces run.dir (Hydra's per-job output dir)."""
    if run_dir is not None:
        cfg.run.dir = run_dir
    return OmegaConf.to_object(cfg)


def compose_pretrain(overrides: list[str] | None = None) -> tuple[PretrainConfig, str]:
    """Compose dsv4train/conf/pretrain.yaml with overrides outside a Hydra app (tests, `dsv4 demo`); returns the
    typed config and its resolved YAML."""
    return compose_config("pretrain", overrides)


def compose_config(config_name: str, overrides: list[str] | None = None) -> tuple[PretrainConfig | SFTConfig, str]:
    """Compose dsv4train/conf/<config_name>.yaml (pretrain, sft) with overrides outside a Hydra app."""
    from hydra import compose, initialize_config_dir

    register_schemas()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None, job_name=config_name):
        cfg = compose(config_name=config_name, overrides=list(overrides or []))
    run_dir = cfg.run.dir
    resolved = OmegaConf.to_yaml(cfg, resolve=True)
    return to_config(cfg, run_dir), resolved


def explain_composition_error(e: BaseException) -> str:
    """One paragraph from a Hydra/OmegaConf composition error and its cause, without the internals
    (`full_key`/`reference_type` lines, the config search path), e.g. "Could not override 'train.stepz'. Key
    'stepz' not in 'TrainConfig'. To append to your config use +train.stepz=3."."""
    parts: list[str] = []
    for err in (e, e.__cause__):
        if err is None:
            continue
        lines = [ln.strip() for ln in str(err).split("Config search path")[0].splitlines()]
        lines = [ln for ln in lines if ln and not re.match(r"(full_key|reference_type|object_type)\b", ln)]
        for n, line in enumerate(lines):
            if line.endswith(":"):  # a heading over a list ("Available options in 'model':", one per line)
                parts.append(f"{line} {', '.join(lines[n + 1 :])}")
                break
            if line not in parts:
                parts.append(line)
    hint = [p for p in parts if p.startswith("To append")]  # Hydra's hint reads best last
    return (
        " ".join(p if p[-1] in ".!?" else f"{p}." for p in [p for p in parts if p not in hint] + hint)
        or type(e).__name__
    )
