"""Training checkpoints: `run_dir/checkpoints/step_<N>/`, written with torch.distributed.checkpoint (DCP).

A checkpoint holds the model, the optimizer (as DCP shards: global tensor shapes, so a checkpoint written in one
parallel layout loads in any other), and `trainer_state.pt` (step, data-loader state, RNG states,
counters) plus `meta.json` (the model config, the step, the time). It is written under `.tmp_step_<N>` and renamed
when every file is on disk, so a folder named `step_<N>` is always complete; a killed write leaves only a
`.tmp_*` folder, which the next run removes. Only the newest `keep` complete checkpoints are kept.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

from dsv4train.config.errors import ConfigError
from dsv4train.config.model import ModelConfig
from dsv4train.parallel.runtime import ParallelRuntime

META = "meta.json"
TRAINER_STATE = "trainer_state.pt"
# Fields that may change between a checkpoint and its resume: the indexer mode is switched by the trainer.
_RESUMABLE_MODEL_FIELDS = {"name", "indexer_mode", "max_seq_len"}


@contextlib.contextmanager
def _quiet_dcp():
    """DCP warns on every call that no process group exists; one process is a supported layout here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def step_dirs(ckpt_root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ckpt_root, oldest first."""
    if not ckpt_root.is_dir():
        return []
    found = []
    for p in ckpt_root.iterdir():
        if p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit() and (p / META).exists():
            found.append((int(p.name[5:]), p))
    return sorted(found)


def latest(ckpt_root: Path) -> Path | None:
    found = step_dirs(ckpt_root)
    return found[-1][1] if found else None


def remove_partial(ckpt_root: Path) -> list[str]:
    """Delete `.tmp_*` folders left by a write that was killed; returns their names."""
    removed = []
    if ckpt_root.is_dir():
        for p in ckpt_root.iterdir():
            if p.name.startswith(".tmp_"):
                shutil.rmtree(p)
                removed.append(p.name)
    return removed


def save(ckpt_root: Path, step: int, model, optimizer, trainer_state: dict, keep: int,
         rt: ParallelRuntime | None = None) -> Path:
    """Write `step_<step>` (every rank calls this: DCP writes each rank's shards, rank 0 the rest)."""
    rt = rt or ParallelRuntime()
    final = ckpt_root / f"step_{step}"
    if final.exists():
        return final  # already written (e.g. a signal arrived right after a scheduled save)
    tmp = ckpt_root / f".tmp_step_{step}"
    if rt.is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    rt.barrier()
    state = {"model": model.state_dict(), "optim": get_optimizer_state_dict(model, optimizer)}
    with _quiet_dcp():
        dcp.save(state, checkpoint_id=str(tmp))
    if rt.is_main:
        torch.save(trainer_state, tmp / TRAINER_STATE)
        meta = {"step": step, "time": time.strftime("%Y-%m-%d %H:%M:%S"), "model": asdict(model.cfg),
                "parallel": asdict(rt.dims)}
        (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")
        _fsync_dir(tmp)
        os.replace(tmp, final)
        _fsync_dir(ckpt_root)
        for _, old in step_dirs(ckpt_root)[:-keep]:
            shutil.rmtree(old)
    rt.barrier()
    return final


def _fsync_dir(path: Path) -> None:
    for f in path.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_meta(step_dir: Path) -> dict:
    return json.loads((step_dir / META).read_text())


def check_same_model(step_dir: Path, cfg: ModelConfig) -> None:
    """A resume must build the same network; anything else gets an error naming the differing fields."""
    saved, now = read_meta(step_dir)["model"], asdict(cfg)
    diff = [f"model.{k}: checkpoint {saved.get(k)!r} vs now {now[k]!r}" for k in now
            if k not in _RESUMABLE_MODEL_FIELDS and saved.get(k) != now[k]]
    if diff:
        raise ConfigError(f"cannot resume from {step_dir}: the model config differs ({'; '.join(diff)}). "
                          "Use a new run.dir, or the model config the run was started with.")


def load(step_dir: Path, model, optimizer) -> dict:
    """Restore model and optimizer in place; returns the trainer state saved with them."""
    state = {"model": model.state_dict(), "optim": get_optimizer_state_dict(model, optimizer)}
    with _quiet_dcp():
        dcp.load(state, checkpoint_id=str(step_dir))
    model.load_state_dict(state["model"])
    set_optimizer_state_dict(model, optimizer, state["optim"])
    return torch.load(step_dir / TRAINER_STATE, weights_only=False)


def resolve_step_dir(path) -> Path:
    """`path` is a run dir (newest complete checkpoint) or a `step_<N>` folder."""
    path = Path(path)
    if (path / META).exists():
        return path
    found = latest(path / "checkpoints")
    if found is None:
        raise FileNotFoundError(f"{path} has no complete checkpoint (looked for {path}/checkpoints/step_<N>/{META})")
    return found


def load_model_from_checkpoint(path, device="cpu"):
    """The model weights of a training checkpoint (no optimizer), for `dsv4train.load_pretrained`."""
    from dsv4train.models.pretrained import build_empty

    step_dir = resolve_step_dir(path)
    model = build_empty(ModelConfig(**read_meta(step_dir)["model"]), device)
    state = {"model": model.state_dict()}
    with _quiet_dcp():
        dcp.load(state, checkpoint_id=str(step_dir))
    model.load_state_dict(state["model"])
    return model
