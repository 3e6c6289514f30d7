"""What happens around each training step besides the step itself: evaluation, tracking, the progress bar,
preemption and checkpoints. Each is a callback with three hooks; the trainer calls them in list order, so a
callback sees what earlier ones added (the tracker logs the `val_loss` the evaluator put in `metrics`, the
checkpointer sees the stop the preemption callback asked for)."""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from dsv4train.config.pretrain import PretrainConfig
from dsv4train.observability.trackers import Trackers
from dsv4train.parallel.runtime import ParallelRuntime
from dsv4train.train.learner import Learner
from dsv4train.train.losses import NextTokenLoss
from dsv4train.utils.device import rng_state
from dsv4train.utils.signals import PreemptionFlag


@dataclass
class Loop:
    """The state of a run that callbacks read (and, for `stop_reason` and the val losses, write)."""

    cfg: PretrainConfig
    run_dir: Path  # the resolved run dir (the same on every rank)
    learner: Learner  # model, optimizer, runtime, precision, the step
    train_data: object  # PackedLoader: its state goes into checkpoints
    step: int = 0
    start_step: int = 0
    stop_reason: str | None = None  # set to end the run after this step (e.g. "SIGTERM")
    val_first: float | None = None  # the validation loss at step 0 (kept in checkpoints, so a resume knows it)
    val_last: float | None = None
    preemption: PreemptionFlag = field(default_factory=PreemptionFlag)  # set by a signal (utils/signals.py)

    @property
    def model(self) -> torch.nn.Module:
        return self.learner.model

    @property
    def optimizer(self):
        return self.learner.optimizer

    @property
    def rt(self) -> ParallelRuntime:
        return self.learner.rt

    @property
    def ckpt_root(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def is_last_step(self) -> bool:
        return self.step == self.cfg.train.steps

    def trainer_state(self) -> dict:
        """What a checkpoint needs besides model, optimizer and the Learner's counters to continue bit for bit (and
        to report the run)."""
        return {
            "step": self.step,
            "loader": self.train_data.state_dict(),
            "rng": rng_state(),
            "val_first": self.val_first,
            "val_last": self.val_last,
        }

    def check_preemption(self) -> None:
        """Set `stop_reason` when a preemption signal reached any rank (collective: every rank calls it at the same
        point, so all stop after the same step). A signal on another rank is named as such."""
        if not self.rt.any_rank(self.preemption.signum is not None):
            return
        seen = [s for s in PreemptionFlag.SIGNALS if self.rt.any_rank(self.preemption.signum == s)]  # same calls
        self.stop_reason = self.preemption.name or f"{signal.Signals(seen[0]).name} on another rank"


class Callback:
    def on_train_start(self, loop: Loop) -> None:
        pass

    def on_step_end(self, loop: Loop, metrics: dict) -> None:
        pass

    def on_train_end(self, loop: Loop, summary: dict) -> None:
        pass

    def close(self) -> None:
        """Release resources; called once, also when the run stops with an error."""


class EvalCallback(Callback):
    """Validation loss at the start of a fresh run, every `every` steps and at the last step."""

    def __init__(self, val_batches: list[dict], every: int):
        """val_batches: micro-batches with the keys of train/losses.py (labels, ...), the same at every evaluation."""
        self.val_batches, self.every = val_batches, every

    def _evaluate(self, loop: Loop) -> float:
        return loop.learner.evaluate(self.val_batches, NextTokenLoss())["lm_loss"]

    def on_train_start(self, loop: Loop) -> None:
        if loop.step == 0 and loop.stop_reason is None:
            loop.val_first = loop.val_last = self._evaluate(loop)

    def on_step_end(self, loop: Loop, metrics: dict) -> None:
        if loop.step % self.every == 0 or loop.is_last_step:
            loop.val_last = metrics["val_loss"] = self._evaluate(loop)


class TrackerCallback(Callback):
    """Every `every` steps (and every step with an evaluation: `val_loss`, or `eval/...` keys) to metrics.jsonl and
    the chosen tracker."""

    def __init__(self, trackers: Trackers, every: int):
        self.trackers, self.every = trackers, every

    def on_step_end(self, loop: Loop, metrics: dict) -> None:
        if loop.step % self.every == 0 or any(k == "val_loss" or k.startswith("eval/") for k in metrics):
            self.trackers.log(metrics, loop.step)

    def on_train_end(self, loop: Loop, summary: dict) -> None:
        self.trackers.summary(summary)

    def close(self) -> None:
        self.trackers.finish()


class ProgressCallback(Callback):
    def __init__(self, enabled: bool, desc: str = "pretrain"):
        self.enabled, self.desc, self.bar = enabled, desc, None

    def on_train_start(self, loop: Loop) -> None:
        self.bar = tqdm(
            total=loop.cfg.train.steps, initial=loop.step, desc=self.desc, unit="step", disable=not self.enabled
        )

    def on_step_end(self, loop: Loop, metrics: dict) -> None:
        self.bar.update(1)
        self.bar.set_postfix(
            lm_loss=f"{metrics['lm_loss']:.3f}", lr=f"{metrics['lr']:.1e}", tok_s=f"{metrics['tokens_per_sec']:,.0f}"
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class PreemptionCallback(Callback):
    """SIGTERM / SIGUSR1 (Slurm's warning) end the run after the current step, with a checkpoint. The handlers are
    installed before set-up (`Loop.preemption`, see trainer.py), and a signal that arrives before the first step
    ends the run before it."""

    def on_step_end(self, loop: Loop, metrics: dict) -> None:
        loop.check_preemption()


class CheckpointCallback(Callback):
    """`checkpoints/step_<N>/` every `every` steps (0: never on a schedule), at the last step and on a stop."""

    def __init__(self, every: int, keep: int):
        self.every, self.keep = every, keep

    def on_step_end(self, loop: Loop, metrics: dict) -> None:
        due = self.every and loop.step % self.every == 0
        if due or loop.is_last_step or loop.stop_reason:
            loop.learner.save(loop.ckpt_root, loop.step, loop.trainer_state(), self.keep, optim_cfg=loop.cfg.optim)


def default_callbacks(
    cfg: PretrainConfig, val_batches: list[dict], trackers: Trackers | None, desc: str = "pretrain"
) -> list[Callback]:
    """Evaluation, then (on the main rank, the one with `trackers`) tracking and the progress bar, then
    preemption and checkpoints. Every rank runs eval, preemption and checkpoints: they are collective. `cfg` is a
    PretrainConfig or an SFTConfig (both have `train` and `optim`)."""
    t = cfg.train
    main_only = (
        [] if trackers is None else [TrackerCallback(trackers, t.log_every), ProgressCallback(t.progress_bar, desc)]
    )
    return [
        EvalCallback(val_batches, t.eval_every),
        *main_only,
        PreemptionCallback(),
        CheckpointCallback(t.checkpoint_every, t.keep_checkpoints),
    ]
