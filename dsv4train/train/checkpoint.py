"""Training checkpoints: `run_dir/checkpoints/step_<N>/`, written with torch.distributed.checkpoint (DCP).

A checkpoint holds the model, the optimizer (as DCP shards: global tensor shapes, so a checkpoint written in one
parallel layout loads in any other), and `trainer_state.pt` (step, data-loader state, RNG states,
counters, the validation losses) plus `meta.json` (the model and optimizer configs, the step, the time). It is written
under `.tmp_step_<N>` and renamed when every file is on disk, so a folder named `step_<N>` is always complete; a
killed write leaves only a `.tmp_*` folder, which the next run removes and which is never resumed from. Only the
newest `keep` complete checkpoints are kept.

Before a resume reads a checkpoint, `verify` checks that every file its DCP index names is there and as long as the
index says: a file cut short later (a copy that stopped, a full disk) is reported with the folder, the file and what
to do, instead of an EOFError from deep inside DCP. A damaged checkpoint is not skipped silently: the run stops and
says which earlier checkpoint it can resume from once the damaged folder is moved away.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
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
from dsv4train.config.optim import OptimConfig
from dsv4train.models.pretrained import build_empty
from dsv4train.parallel.runtime import ParallelRuntime

META = "meta.json"
TRAINER_STATE = "trainer_state.pt"
DCP_INDEX = ".metadata"  # DCP's index: which bytes of which .distcp file hold each tensor
# Fields that may change between a checkpoint and its resume: the indexer mode is switched by the trainer.
_RESUMABLE_MODEL_FIELDS = {"name", "indexer_mode", "max_seq_len"}
_MISSING_KEY = "Missing key in checkpoint state_dict"  # DCP's planner, when a key this run needs is not saved


class CheckpointError(ConfigError):
    """A checkpoint cannot be used as it is (damaged, or written for another optimizer); the message names the
    folder and the file, and says what to do. The CLI prints it and exits 2, like a bad config value."""


@contextlib.contextmanager
def _quiet_dcp():
    """DCP warns on every call that no process group exists; one process is a supported layout here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _step_of(step_dir: Path) -> int:
    """N of a folder named `step_<N>`, else -1."""
    name = step_dir.name
    return int(name[5:]) if name.startswith("step_") and name[5:].isdigit() else -1


def step_dirs(ckpt_root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ckpt_root, oldest first."""
    if not ckpt_root.is_dir():
        return []
    return sorted(
        (_step_of(p), p) for p in ckpt_root.iterdir() if p.is_dir() and _step_of(p) >= 0 and (p / META).exists()
    )


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


def save(
    ckpt_root: Path,
    step: int,
    model,
    optimizer,
    trainer_state: dict,
    keep: int,
    rt: ParallelRuntime | None = None,
    optim: OptimConfig | None = None,
) -> Path:
    """Write `step_<step>` (every rank calls this: DCP writes each rank's shards, rank 0 the rest). `optim`, the
    optimizer config, goes into meta.json so a resume with another optimizer can be told apart."""
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
        meta = {
            "step": step,
            "time": time.strftime("%Y-%m-%d %H:%M:%S"),
            "model": asdict(model.cfg),
            "parallel": asdict(rt.dims),
            **({"optim": asdict(optim)} if optim is not None else {}),
        }
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
    path = step_dir / META
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(_damaged(step_dir, META, f"cannot be read ({e})")) from None
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict):
        raise CheckpointError(_damaged(step_dir, META, "has no 'model' entry"))
    return meta


def check_same_model(step_dir: Path, cfg: ModelConfig) -> None:
    """A resume must build the same network; anything else gets an error naming the differing fields."""
    saved, now = read_meta(step_dir)["model"], asdict(cfg)
    diff = [
        f"model.{k}: checkpoint {saved.get(k)!r} vs now {now[k]!r}"
        for k in now
        if k not in _RESUMABLE_MODEL_FIELDS and saved.get(k) != now[k]
    ]
    if diff:
        raise ConfigError(
            f"cannot resume from {step_dir}: the model config differs ({'; '.join(diff)}). "
            "Use a new run.dir, or the model config the run was started with."
        )


def _optimizer_layout(optim: dict) -> dict:
    """The optimizer fields that decide the shape of its saved state: which optimizer holds the matrices, and
    whether Muon keeps wo_a's row blocks as a group of their own."""
    layout = {"name": optim.get("name")}
    if optim.get("name") == "muon":
        layout["muon_split_wo_a"] = optim.get("muon_split_wo_a")
    return layout


def check_same_optimizer(step_dir: Path, cfg: OptimConfig, allow_change: bool) -> bool | None:
    """Whether this run's optimizer state can be loaded from `step_dir`: True (same optimizer), False (another
    one, and `allow_change`: load the weights only), None (a checkpoint from before meta.json held the optimizer;
    `load` finds out). Another optimizer without `allow_change` is refused with the fields and the way out."""
    saved = read_meta(step_dir).get("optim")
    if saved is None:
        return None
    before, now = _optimizer_layout(saved), _optimizer_layout(asdict(cfg))
    if before == now:
        return True
    if allow_change:
        return False
    key = "name" if before["name"] != now["name"] else "muon_split_wo_a"
    diff = f"optim.{key}: checkpoint {before[key]!r} vs now {now[key]!r}"
    raise ConfigError(
        f"cannot resume from {step_dir}: it holds the state of another optimizer ({diff}). "
        "Resume with the optimizer the run was started with, use a new run.dir, or set "
        "train.allow_optimizer_change=true to load the weights, data position and RNG from it and "
        "start the new optimizer's state fresh."
    )


def _damaged(step_dir: Path, file: str, what: str) -> str:
    """The message for a checkpoint that cannot be read: the folder, the file, and what to do."""
    root = step_dir.parent
    earlier = [p for n, p in step_dirs(root) if n < _step_of(step_dir)]
    aside = root / f"damaged_{step_dir.name}"  # not named step_<N>, so never resumed from nor pruned
    then = (
        f"resume from the previous complete checkpoint, {earlier[-1]}"
        if earlier
        else f"start again from step 0 (there is no earlier checkpoint in {root})"
    )
    return (
        f"checkpoint {step_dir} is damaged: {file} {what}. Nothing was changed. Move the folder aside "
        f"(`mv {step_dir} {aside}`) and re-run to {then}; or restore the folder from a copy."
    )


def verify(step_dir: Path) -> None:
    """Check that the files of `step_dir` are all there and as long as DCP's index says (cheap: sizes only)."""
    from torch.distributed.checkpoint import FileSystemReader

    read_meta(step_dir)
    for name in (DCP_INDEX, TRAINER_STATE):
        if not (step_dir / name).is_file():
            raise CheckpointError(_damaged(step_dir, name, "is missing"))
    try:
        index = FileSystemReader(str(step_dir)).read_metadata()
    except Exception as e:  # a cut-short pickle: EOFError, UnpicklingError, ...
        raise CheckpointError(_damaged(step_dir, DCP_INDEX, f"cannot be read ({type(e).__name__}: {e})")) from None
    needed: dict[str, int] = {}
    for info in (index.storage_data or {}).values():
        path, end = getattr(info, "relative_path", None), getattr(info, "offset", 0) + getattr(info, "length", 0)
        if path is not None:
            needed[path] = max(needed.get(path, 0), end)
    for name, size in sorted(needed.items()):
        file = step_dir / name
        if not file.is_file():
            raise CheckpointError(_damaged(step_dir, name, f"is missing (the index {DCP_INDEX} names it)"))
        if file.stat().st_size < size:
            raise CheckpointError(
                _damaged(
                    step_dir,
                    name,
                    f"is cut short: {file.stat().st_size:,} bytes, but the "
                    f"index {DCP_INDEX} has data up to byte {size:,}",
                )
            )


def _failures(e: BaseException) -> list[BaseException]:
    """The exceptions behind a DCP error: one per failing rank under torch.distributed, else `e` itself."""
    failures = getattr(e, "failures", None)
    return [exc for exc, _ in failures.values()] if isinstance(failures, dict) else [e]


def _missing_key(e: BaseException) -> str | None:
    """DCP's 'Missing key ...' message behind `e`, if that is what it is."""
    return next((str(c) for c in _failures(e) if _MISSING_KEY in str(c)), None)


def _dcp_load(step_dir: Path, state: dict) -> None:
    """dcp.load, with a read error (a file damaged in a way its size does not show) named as a damaged checkpoint.
    A missing key is re-raised for the caller to explain; anything else is a bug and keeps its traceback."""
    try:
        with _quiet_dcp():
            dcp.load(state, checkpoint_id=str(step_dir))
    except BaseException as e:
        if _missing_key(e) is not None:
            raise
        bad = [
            c
            for c in _failures(e)
            if isinstance(c, (EOFError, pickle.UnpicklingError)) or "PytorchStreamReader" in str(c)
        ]
        if bad:
            raise CheckpointError(
                _damaged(step_dir, "a .distcp shard", f"cannot be read ({type(bad[0]).__name__}: {bad[0]})")
            ) from None
        raise


def load(step_dir: Path, model, optimizer, optimizer_state: bool | None = True) -> bool:
    """Restore model and (unless `optimizer_state` is False) optimizer in place, after `verify`. With
    `optimizer_state=None` (unknown whether it fits) an optimizer state of another optimizer is skipped. Returns
    whether the optimizer state was loaded; `trainer_state` reads the rest."""
    verify(step_dir)
    with_optimizer = optimizer_state is not False
    state = {"model": model.state_dict()}
    if with_optimizer:
        state["optim"] = get_optimizer_state_dict(model, optimizer)
    try:
        _dcp_load(step_dir, state)
    except BaseException as e:
        missing = _missing_key(e)
        if missing is None:
            raise
        if "optim." not in missing:
            raise CheckpointError(
                f"cannot resume from {step_dir}: {missing} The checkpoint was written by another "
                "version of dsv4train or for another model; use a new run.dir."
            ) from None
        if optimizer_state is None:  # an old checkpoint, and train.allow_optimizer_change=true: weights only
            del state["optim"]
            _dcp_load(step_dir, state)
            with_optimizer = False
        else:
            raise CheckpointError(
                f"cannot resume from {step_dir}: its optimizer state does not fit this run's "
                f"optimizer ({missing}); it was written with another optim.name or "
                "optim.muon_split_wo_a (or by another version of dsv4train). Resume with that "
                "optimizer, use a new run.dir, or set train.allow_optimizer_change=true to start "
                "the optimizer state fresh."
            ) from None
    model.load_state_dict(state["model"])
    if with_optimizer:
        set_optimizer_state_dict(model, optimizer, state["optim"])
    return with_optimizer


def trainer_state(step_dir: Path) -> dict:
    """Step, data-loader state, RNG states and counters saved with the weights."""
    try:
        return torch.load(step_dir / TRAINER_STATE, weights_only=False)
    except (EOFError, pickle.UnpicklingError, RuntimeError, OSError) as e:
        raise CheckpointError(_damaged(step_dir, TRAINER_STATE, f"cannot be read ({type(e).__name__}: {e})")) from None


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
    step_dir = resolve_step_dir(path)
    model = build_empty(ModelConfig(**read_meta(step_dir)["model"]), device)
    state = {"model": model.state_dict()}
    with _quiet_dcp():
        dcp.load(state, checkpoint_id=str(step_dir))
    model.load_state_dict(state["model"])
    return model
