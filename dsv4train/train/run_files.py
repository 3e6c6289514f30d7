"""Finding what a training run directory holds: the run a path belongs to, and the tokenizer it trained with."""

from __future__ import annotations

from pathlib import Path

import yaml


def run_dir_of(src: Path) -> Path | None:
    """The training run directory SRC belongs to (SRC itself, or the run above a `checkpoints/step_<N>/`), or None
    when SRC is a weights folder."""
    if (src / "checkpoints").is_dir():
        return src
    if src.parent.name == "checkpoints" and (src.parent.parent / "config.resolved.yaml").is_file():
        return src.parent.parent
    return None


def run_tokenizer(src: Path) -> tuple[Path | None, str]:
    """(the tokenizer.json the run trained with, "") when SRC is a run that has one: its own (SFT runs keep theirs) or
    that of its data.dir (pre-training); else (None, why not)."""
    run = run_dir_of(src)
    if run is None:
        return None, f"{src} is not a training run"
    if (run / "tokenizer.json").is_file():
        return run / "tokenizer.json", ""
    resolved = run / "config.resolved.yaml"
    if not resolved.is_file():
        return None, f"{run} has no config.resolved.yaml"
    try:
        data_dir = (yaml.safe_load(resolved.read_text()) or {}).get("data", {}).get("dir")
    except (yaml.YAMLError, AttributeError) as e:
        return None, f"{resolved} cannot be read ({e})"
    if not data_dir:
        return None, f"{resolved} names no data.dir"
    tokenizer = Path(data_dir) / "tokenizer.json"
    if not tokenizer.is_file():
        return None, f"the run's data.dir {data_dir} has no tokenizer.json (from {Path.cwd()})"
    return tokenizer, ""
