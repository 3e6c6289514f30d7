"""The pre-training loop on one process. `pretrain(cfg)` reads top to bottom:

set up (run dir, model, data, optimizer, trackers) -> resume from the newest checkpoint if any ->
for each step: schedules -> forward/backward over micro-batches -> NaN policy -> clip -> optimizer step ->
router bias update -> log / eval / checkpoint -> preemption check -> summary.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from dsv4train.config.pretrain import PretrainConfig
from dsv4train.data.loader import PackedLoader, check_vocab
from dsv4train.models.flops import train_flops_per_token
from dsv4train.models.model import DSV4Model
from dsv4train.models.moe import update_router_bias
from dsv4train.observability.run_dir import open_run_dir, write_snapshot
from dsv4train.observability.throughput import measured_matmul_peak, mfu
from dsv4train.observability.trackers import build_trackers
from dsv4train.optim.groups import build_optimizers
from dsv4train.optim.schedule import lr_at, mtp_weight_at
from dsv4train.train import checkpoint
from dsv4train.train.step import StepResult, evaluate, train_step
from dsv4train.utils.device import pick_device, rng_state, seed_everything, set_rng_state
from dsv4train.utils.signals import PreemptionFlag


def pretrain(cfg: PretrainConfig, resolved_yaml: str | None = None) -> dict:
    t = cfg.train
    run_dir = open_run_dir(cfg.run.dir)
    ckpt_root = run_dir / "checkpoints"
    device = pick_device(t.device)
    seed_everything(cfg.seed)

    train_data = PackedLoader(cfg.data, t.seq_len, t.micro_batch_size, "train")
    val_data = PackedLoader(cfg.data, t.seq_len, t.micro_batch_size, "val")
    check_vocab(train_data.vocab_size, cfg.model.vocab_size)
    val_batches = val_data.val_batches(t.eval_batches)

    model = DSV4Model(cfg.model).to(device)
    model.init_weights(cfg.seed)
    optimizer = build_optimizers(model, cfg.optim)

    start_step, nan_skips, removed = 0, 0, checkpoint.remove_partial(ckpt_root)
    resume_from = checkpoint.latest(ckpt_root)
    if resume_from is not None:
        checkpoint.check_same_model(resume_from, cfg.model)
        state = checkpoint.load(resume_from, model, optimizer)
        train_data.load_state_dict(state["loader"])
        set_rng_state(state["rng"])
        start_step, nan_skips = state["step"], state["nan_skips"]
    config_dict = asdict(cfg)
    write_snapshot(run_dir, resolved_yaml or OmegaConf.to_yaml(config_dict), start_step)
    trackers = build_trackers(cfg.tracker, run_dir, config_dict)
    _print_start(cfg, model, run_dir, resume_from, removed, device)

    dtype = torch.bfloat16 if cfg.precision.compute_dtype == "bfloat16" else torch.float32
    peak = measured_matmul_peak(device, dtype)
    flops_per_token = train_flops_per_token(cfg.model, t.seq_len)
    tokens_per_step = t.micro_batch_size * t.grad_accum * t.seq_len

    def trainer_state(step: int) -> dict:
        return {"step": step, "nan_skips": nan_skips, "loader": train_data.state_dict(), "rng": rng_state()}

    first_val = last_val = evaluate(model, val_batches, device, dtype) if start_step == 0 else None
    last: StepResult | None = None
    step, t_start, preempted = start_step, time.perf_counter(), None
    with PreemptionFlag() as flag, tqdm(total=t.steps, initial=start_step, desc="pretrain", unit="step",
                                        disable=not t.progress_bar) as bar:
        while step < t.steps:
            model.set_indexer_mode("dense" if step < t.dense_indexer_steps else "sparse")
            lr = lr_at(step, cfg.optim, t.steps)
            optimizer.set_lr(lr)
            batches = [train_data.next_batch() for _ in range(t.grad_accum)]
            t0 = time.perf_counter()
            mtp_weight = mtp_weight_at(step, cfg.optim, t.steps, t.mtp_weight, t.mtp_weight_decay)
            last = train_step(model, optimizer, batches, mtp_weight, t, device, dtype)
            if last.skipped:
                nan_skips += 1
                if t.nan_policy == "stop" or nan_skips > t.max_nan_skips:
                    trackers.finish()
                    raise FloatingPointError(
                        f"non-finite loss or gradient at step {step + 1} ({last.reason}); {nan_skips} such step(s) "
                        f"in a row. Lower optim.lr, check the data, or resume from {checkpoint.latest(ckpt_root)}")
            else:
                nan_skips = 0
                update_router_bias(model, last.expert_counts, t.bias_update_speed)
            step += 1
            tps = tokens_per_step / (time.perf_counter() - t0)
            metrics = {**last.metrics(), "lr": lr, "tokens_per_sec": tps, "mfu": mfu(flops_per_token, tps, peak),
                       "router_bias_norm": _router_bias_norm(model), "muon_update_rms": optimizer.muon_update_rms()}
            if step % t.eval_every == 0 or step == t.steps:
                last_val = metrics["val_loss"] = evaluate(model, val_batches, device, dtype)
            if step % t.log_every == 0 or "val_loss" in metrics:
                trackers.log(metrics, step)
            bar.update(1)
            bar.set_postfix(lm_loss=f"{metrics['lm_loss']:.3f}", lr=f"{lr:.1e}", tok_s=f"{tps:,.0f}")
            if (t.checkpoint_every and step % t.checkpoint_every == 0) or step == t.steps:
                checkpoint.save(ckpt_root, step, model, optimizer, trainer_state(step), t.keep_checkpoints)
            if flag.signum is not None:
                preempted = flag.name
                checkpoint.save(ckpt_root, step, model, optimizer, trainer_state(step), t.keep_checkpoints)
                break

    elapsed = time.perf_counter() - t_start
    summary = {"run_dir": str(run_dir), "steps_done": step, "steps_total": t.steps, "resumed_from": start_step,
               "seconds": round(elapsed, 1), "tokens": (step - start_step) * tokens_per_step,
               "tokens_per_sec": round((step - start_step) * tokens_per_step / max(elapsed, 1e-9)),
               "final_train_lm_loss": None if last is None else round(last.lm_loss, 4),
               "val_loss_at_start": _round(first_val), "val_loss_last": _round(last_val), "preempted_by": preempted,
               "checkpoint": str(checkpoint.latest(ckpt_root))}
    trackers.summary(summary)
    trackers.finish()
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    _print_summary(summary)
    return summary


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def _router_bias_norm(model: DSV4Model) -> float:
    biases = [b for name, b in model.named_buffers() if name.endswith("gate.bias")]
    return float(torch.linalg.vector_norm(torch.cat(biases))) if biases else 0.0


def _print_start(cfg, model, run_dir: Path, resume_from, removed, device) -> None:
    n = sum(p.numel() for p in model.parameters())
    print(f"dsv4 pretrain: model '{cfg.model.name}' ({n / 1e6:.2f}M params, {cfg.model.n_layers} layers) on {device}, "
          f"{cfg.train.steps} steps of {cfg.train.micro_batch_size}x{cfg.train.grad_accum}x{cfg.train.seq_len} tokens, "
          f"optim {cfg.optim.name}, run dir {run_dir}")
    if removed:
        print(f"  removed incomplete checkpoint writes: {', '.join(removed)}")
    if resume_from is not None:
        print(f"  resuming from {resume_from}")


def _print_summary(s: dict) -> None:
    print("\n== pretrain summary ==")
    for k, v in s.items():
        if v is not None:
            print(f"  {k:<16} {v}")
