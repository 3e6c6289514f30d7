"""Experiment trackers behind one small interface (levanter-style): `log(metrics, step)`, `summary(values)`,
`finish()`. `metrics.jsonl` is always written; `tracker=wandb` or `tracker=tensorboard` adds one more sink."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

from dsv4train.config.errors import ConfigError
from dsv4train.config.pretrain import TrackerConfig


def _scalars(metrics: dict) -> dict[str, float]:
    """Flatten lists (e.g. per-layer expert load) to `name/i`; keep numbers only."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, (list, tuple)):
            out.update({f"{k}/{i}": float(x) for i, x in enumerate(v)})
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = float(v)
    return out


class JsonlTracker:
    """One JSON object per logged step, appended (a resumed run keeps the earlier lines; readers take the last
    line of each step)."""

    def __init__(self, path: Path):
        self.file = open(path, "a")

    def log(self, metrics: dict, step: int) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        self.file.write(json.dumps({"step": step, **clean}) + "\n")
        self.file.flush()

    def summary(self, values: dict) -> None:
        pass

    def finish(self) -> None:
        self.file.close()


class TensorboardTracker:
    def __init__(self, run_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ConfigError(
                "tracker.name: tensorboard needs the tensorboard package "
                "(pip install tensorboard), or use tracker=jsonl"
            ) from e
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log(self, metrics: dict, step: int) -> None:
        for k, v in _scalars(metrics).items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def summary(self, values: dict) -> None:
        self.writer.add_text("summary", json.dumps(values, indent=2))

    def finish(self) -> None:
        self.writer.close()


class WandbTracker:
    def __init__(self, cfg: TrackerConfig, run_dir: Path, config: dict):
        try:
            import wandb
        except ImportError as e:
            raise ConfigError(
                "tracker.name: wandb needs the wandb package (pip install wandb), or use tracker=jsonl"
            ) from e
        run_id = hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:12]  # same run.dir -> same wandb run
        self.run = wandb.init(
            project=cfg.project,
            dir=str(run_dir),
            mode=cfg.mode,
            config=config,
            name=run_dir.name,
            id=run_id,
            resume="allow",
        )

    def log(self, metrics: dict, step: int) -> None:
        self.run.log(_scalars(metrics), step=step)

    def summary(self, values: dict) -> None:
        self.run.summary.update(values)

    def finish(self) -> None:
        self.run.finish()


class Trackers:
    """All active sinks; the trainer talks to this one object."""

    def __init__(self, sinks: list):
        self.sinks = sinks

    def log(self, metrics: dict, step: int) -> None:
        for s in self.sinks:
            s.log(metrics, step)

    def summary(self, values: dict) -> None:
        for s in self.sinks:
            s.summary(values)

    def finish(self) -> None:
        for s in self.sinks:
            s.finish()


def build_trackers(cfg: TrackerConfig, run_dir: Path, config: dict) -> Trackers:
    sinks = [JsonlTracker(run_dir / "metrics.jsonl")]
    if cfg.name == "tensorboard":
        sinks.append(TensorboardTracker(run_dir))
    elif cfg.name == "wandb":
        sinks.append(WandbTracker(cfg, run_dir, config))
    return Trackers(sinks)


def read_metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl with one record per step (the last one written wins, so a resumed run reads cleanly)."""
    by_step: dict[int, dict] = {}
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; is {run_dir} a dsv4 run directory?")
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
            by_step[rec["step"]] = rec
    return [by_step[s] for s in sorted(by_step)]
