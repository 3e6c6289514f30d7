"""The pre-training loop, on one process or under torchrun. `pretrain(cfg)` reads top to bottom:

preemption handlers (first: a SIGTERM/SIGUSR1 during set-up ends the run before its first step, with a summary) ->
set up (layout check, run dir, process group, data, model, parallelize, optimizer, trackers) ->
resume from the newest checkpoint if any ->
for each step: schedules (lr, MTP weight, indexer mode) -> the Learner's step (forward/backward over the
micro-batches with the next-token loss, NaN policy, clipping, optimizer step, router bias update) -> metrics ->
callbacks (eval, tracking, progress bar, preemption, checkpoint) -> summary.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from omegaconf import OmegaConf

from dsv4train.config.pretrain import PretrainConfig
from dsv4train.data.loader import PackedLoader, RankSlice, check_vocab
from dsv4train.models.flops import train_flops_per_token
from dsv4train.models.model import DSV4Model
from dsv4train.observability.run_dir import open_run_dir, write_snapshot
from dsv4train.observability.throughput import measured_matmul_peak, mfu
from dsv4train.observability.trackers import build_trackers
from dsv4train.optim.groups import build_optimizers
from dsv4train.optim.schedule import lr_at, mtp_weight_at
from dsv4train.parallel.dims import ParallelDims
from dsv4train.parallel.runtime import ParallelRuntime
from dsv4train.quant import apply_precision
from dsv4train.train import checkpoint
from dsv4train.train.callbacks import Callback, Loop, default_callbacks
from dsv4train.train.learner import Learner
from dsv4train.train.losses import NextTokenLoss, training_batch
from dsv4train.utils.device import pick_device, seed_everything, set_rng_state
from dsv4train.utils.dist import env_world_size, init_distributed
from dsv4train.utils.signals import PreemptionFlag, catch_preemption


def pretrain(cfg: PretrainConfig, resolved_yaml: str | None = None) -> dict:
    with catch_preemption() as preemption:  # before anything else, so set-up is covered too
        return _pretrain(cfg, resolved_yaml, preemption)


def _pretrain(cfg: PretrainConfig, resolved_yaml: str | None, preemption: PreemptionFlag) -> dict:
    t = cfg.train
    dims = ParallelDims.from_config(cfg.parallel)
    dims.validate(env_world_size(), cfg.model, t.seq_len, t.micro_batch_size)  # before any process-group work
    device = init_distributed(pick_device(t.device), cfg.parallel.timeout_s)
    rt = ParallelRuntime(dims, device)
    run_dir = open_run_dir(same_run_dir(cfg, rt))  # the resolved run dir lives here, the config keeps the asked one
    dtype = torch.bfloat16 if cfg.precision.compute_dtype == "bfloat16" else torch.float32
    seed_everything(cfg.seed)

    global_rows = t.micro_batch_size * rt.data_ranks  # each data rank reads its own rows of every batch
    train_data = RankSlice(PackedLoader(cfg.data, t.seq_len, global_rows, "train"), rt.data_rank, rt.data_ranks)
    val_data = RankSlice(PackedLoader(cfg.data, t.seq_len, global_rows, "val"), rt.data_rank, rt.data_ranks)
    check_vocab(train_data.vocab_size, cfg.model.vocab_size)

    model = DSV4Model(cfg.model).to(device)
    model.init_weights(cfg.seed)  # the same full weights on every rank, then sharded
    n_params = sum(p.numel() for p in model.parameters())  # the whole model, before pp keeps this rank's stages
    loop, resume_from, removed, fresh_optimizer = resumed_loop(cfg, model, rt, dtype, run_dir, train_data, preemption)
    config_dict = asdict(cfg)
    if rt.is_main:
        write_snapshot(run_dir, resolved_yaml or OmegaConf.to_yaml(config_dict), loop.start_step)
        _print_start(cfg, n_params, loop, resume_from, removed, fresh_optimizer)

    trackers = build_trackers(cfg.tracker, run_dir, config_dict) if rt.is_main else None
    val_batches = [training_batch(b, cfg.data.document_mask) for b in val_data.val_batches(t.eval_batches)]
    callbacks = default_callbacks(cfg, val_batches, trackers)
    summary = run_and_summarise(
        loop, callbacks, lambda: training_batch(train_data.next_batch(), cfg.data.document_mask)
    )
    if rt.is_main:
        print_summary(summary)
    return summary


def run_and_summarise(loop: Loop, callbacks: list[Callback], next_micro_batch, extra_summary: dict | None = None):
    """The steps, the callbacks closed whatever happens, and summary.json (with `extra_summary`) in the run dir."""
    return summarise_run(loop, callbacks, lambda: run_steps(loop, callbacks, next_micro_batch), extra_summary)


def summarise_run(loop: Loop, callbacks: list[Callback], run, extra_summary: dict | None = None) -> dict:
    """`run()` (a command's steps, returning its summary), the callbacks closed whatever happens, then the summary
    with `extra_summary` written to summary.json in the run dir."""
    try:
        summary = run()
    finally:
        for cb in callbacks:
            cb.close()
    summary.update(extra_summary or {})
    if loop.rt.is_main:
        (loop.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def resumed_loop(cfg, model: DSV4Model, rt: ParallelRuntime, dtype, run_dir: Path, train_data, preemption):
    """The model parallelized with its precision, its optimizer, Learner and Loop, and the run's newest complete
    checkpoint loaded into them if there is one (incomplete writes of a killed run removed first). `cfg` is a
    PretrainConfig or an SFTConfig. Returns (loop, the checkpoint resumed from or None, removed writes, whether the
    optimizer state starts fresh)."""
    model = rt.parallelize(apply_precision(model, cfg.precision))
    optimizer = rt.distribute_optimizer(build_optimizers(model, cfg.optim))
    learner = Learner(model, optimizer, cfg.train, rt, rt.device, dtype, checkpoint_root=run_dir / "checkpoints")
    loop = Loop(cfg, run_dir, learner, train_data, preemption=preemption)
    removed = checkpoint.remove_partial(loop.ckpt_root) if rt.is_main else []  # .tmp_* of a killed write
    rt.barrier()
    resume_from = checkpoint.latest(loop.ckpt_root)  # complete step_<N> folders only
    fresh_optimizer = resume_from is not None and resume(loop, resume_from)
    return loop, resume_from, removed, fresh_optimizer


def resume(loop: Loop, step_dir: Path) -> bool:
    """Load `step_dir` into the loop (weights, optimizer state, data position, RNG, counters) after checking it was
    written for this model and optimizer. Returns True when the optimizer state starts fresh instead (another
    optimizer and train.allow_optimizer_change=true)."""
    cfg = loop.cfg
    allow = cfg.train.allow_optimizer_change
    checkpoint.check_same_model(step_dir, loop.model.cfg)
    fits = checkpoint.check_same_optimizer(step_dir, cfg.optim, allow)
    loaded, state = loop.learner.load(step_dir, optimizer_state=fits if fits is not None else (None if allow else True))
    loop.train_data.load_state_dict(state["loader"])
    set_rng_state(state["rng"])
    loop.step = loop.start_step = state["step"]
    loop.val_first, loop.val_last = state.get("val_first"), state.get("val_last")  # absent before they were saved
    return not loaded


def same_run_dir(cfg, rt: ParallelRuntime) -> str:
    """Rank 0's run.dir for every rank. A default run.dir holds the launch time, which processes started a second
    apart resolve differently; the empty folder Hydra made for such a rank is removed."""
    chosen = rt.from_main(cfg.run.dir)
    own = Path(cfg.run.dir)
    if chosen != cfg.run.dir and own.is_dir() and not any(own.iterdir()):
        own.rmdir()
    return chosen


def run_steps(loop: Loop, callbacks: list[Callback], next_micro_batch) -> dict:
    """The training steps from `loop.step` to train.steps (or a stop): `next_micro_batch()` gives each micro-batch
    (this rank's rows, the keys of train/losses.py). Pre-training and SFT run the same steps."""
    cfg, model, optimizer = loop.cfg, loop.model, loop.optimizer
    t = cfg.train
    peak = measured_matmul_peak(loop.learner.device, loop.learner.dtype)
    flops_per_token = train_flops_per_token(model.cfg, t.seq_len)
    tokens_per_step = t.micro_batch_size * t.grad_accum * t.seq_len * loop.rt.data_ranks
    loop.check_preemption()  # a signal during set-up: no step, no evaluation, just the summary
    for cb in callbacks:
        cb.on_train_start(loop)

    last, t_start = None, time.perf_counter()
    while loop.step < t.steps and loop.stop_reason is None:
        model.set_indexer_mode("dense" if loop.step < t.dense_indexer_steps else "sparse")
        lr = lr_at(loop.step, cfg.optim, t.steps)
        optimizer.set_lr(lr)
        batches = [next_micro_batch() for _ in range(t.grad_accum)]
        t0 = time.perf_counter()
        loss_fn = NextTokenLoss(mtp_weight_at(loop.step, cfg.optim, t.steps, t.mtp_weight, t.mtp_weight_decay))
        last = loop.learner.step(batches, loss_fn, number=loop.step + 1)
        loop.step += 1
        tps = tokens_per_step / (time.perf_counter() - t0)
        mfu_now = mfu(flops_per_token, tps / loop.rt.dims.world_size, peak)  # per device
        metrics = {
            **last.log(),
            "lr": lr,
            "tokens_per_sec": tps,
            "mfu": mfu_now,
            "router_bias_norm": _router_bias_norm(model, loop.rt),
            "muon_update_rms": optimizer.muon_update_rms(),
        }
        for cb in callbacks:
            cb.on_step_end(loop, metrics)

    elapsed = time.perf_counter() - t_start
    done = loop.step - loop.start_step
    summary = {
        **steps_summary(loop, elapsed),
        "tokens": done * tokens_per_step,
        "tokens_per_sec": round(done * tokens_per_step / max(elapsed, 1e-9)),
        "final_train_lm_loss": None if last is None else round(last.metrics["lm_loss"], 4),
        "val_loss_at_start": _round(loop.val_first),
        "val_loss_last": _round(loop.val_last),
        "preempted_by": loop.stop_reason,
        "checkpoint": str(checkpoint.latest(loop.ckpt_root)),
    }
    for cb in callbacks:
        cb.on_train_end(loop, summary)
    return summary


def steps_summary(loop: Loop, elapsed: float) -> dict:
    """The summary entries every training command starts with: where, how far, from where, how long."""
    return {
        "run_dir": str(loop.run_dir),
        "steps_done": loop.step,
        "steps_total": loop.cfg.train.steps,
        "resumed_from": loop.start_step,
        "seconds": round(elapsed, 1),
    }


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def _router_bias_norm(model: DSV4Model, rt: ParallelRuntime) -> float:
    """L2 norm of all learned routers' biases (every pipeline stage's: squares are summed over the pp ranks)."""
    squares = sum(
        (b.double().square().sum().cpu() for name, b in model.named_buffers() if name.endswith("gate.bias")),
        torch.zeros((), dtype=torch.float64),
    )
    return float(rt.sum_over_stages(squares).sqrt())


def _print_start(
    cfg: PretrainConfig, n: int, loop: Loop, resume_from, removed: list[str], fresh_optimizer: bool
) -> None:
    t = cfg.train
    dims = loop.rt.dims
    print(
        f"dsv4 pretrain: model '{cfg.model.name}' ({n / 1e6:.2f}M params, {cfg.model.n_layers} layers) on "
        f"{placement(loop)}, {t.steps} steps of {t.micro_batch_size * dims.data_ranks}x{t.grad_accum}x{t.seq_len} "
        "tokens, "
        f"optim {cfg.optim.name}, run dir {loop.run_dir}"
    )
    if removed:
        print(f"  removed incomplete checkpoint writes: {', '.join(removed)}")
    if resume_from is not None:
        print(f"  resuming from {resume_from}")
    if fresh_optimizer:
        before = checkpoint.read_meta(resume_from).get("optim", {}).get("name", "an unrecorded optimizer")
        print(
            f"WARNING: optimizer changed on resume ({before} in {resume_from.name}, optim.name={cfg.optim.name} "
            "now) and train.allow_optimizer_change=true: the weights, data position and RNG come from the "
            "checkpoint, the optimizer state (momentum, Adam moments, step counts) starts fresh",
            file=sys.stderr,
        )
    if resume_from is not None and loop.step >= t.steps:
        print(
            f"  nothing to train: the run is already at step {loop.step} of train.steps={t.steps}; raise "
            "train.steps to train longer"
        )


def placement(loop: Loop) -> str:
    """Where the run runs: the device, or how many processes in which layout."""
    dims = loop.rt.dims
    return f"{loop.learner.device}" if dims.world_size == 1 else f"{dims.world_size} processes ({dims.describe()})"


def print_summary(s: dict, command: str = "pretrain", leave_out: tuple[str, ...] = ()) -> None:
    print(f"\n== {command} summary ==")
    for k, v in s.items():
        if v is not None and k not in leave_out:
            print(f"  {k:<16} {v}")
