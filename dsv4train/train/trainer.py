"""A short single-process pre-training loop (AdamW, warm-up + cosine). Reads top to bottom:
batch -> forward with aux -> CE + MTP + balance + indexer KL -> backward -> clip -> step -> router bias update."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from dsv4train.config.errors import ConfigError
from dsv4train.models.model import DSV4Model
from dsv4train.models.moe import update_router_bias
from dsv4train.train.losses import lm_loss, mtp_targets


@dataclass
class TrainConfig:
    steps: int = 200
    micro_batch_size: int = 8
    lr: float = 3e-3
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    mtp_weight: float = 0.3
    balance_loss_weight: float = 1e-4
    indexer_loss_weight: float = 1.0
    bias_update_speed: float = 1e-3
    eval_every: int = 50
    eval_batches: int = 4
    log_every: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        for key in ("steps", "micro_batch_size", "eval_every", "log_every", "eval_batches"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"train.{key}: must be > 0, got {getattr(self, key)}")
        if not 0 <= self.warmup_steps < self.steps:
            raise ConfigError(f"train.warmup_steps: must be in [0, steps={self.steps}), got {self.warmup_steps}")


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def _adamw(model: DSV4Model, cfg: TrainConfig) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)


@torch.no_grad()
def evaluate(model: DSV4Model, samples: torch.Tensor, batch_size: int, max_batches: int) -> float:
    model.eval()
    losses = [lm_loss(model(rows[:, :-1]), rows[:, 1:]).item()
              for rows in samples[: batch_size * max_batches].split(batch_size)]
    model.train()
    return sum(losses) / len(losses)


def train(model: DSV4Model, train_samples: torch.Tensor, val_samples: torch.Tensor, cfg: TrainConfig,
          run_dir: Path) -> dict:
    """Train on rows of [seq_len + 1] tokens; log to run_dir/metrics.jsonl; return a summary dict."""
    run_dir.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = _adamw(model, cfg)
    model.train()
    val_before = evaluate(model, val_samples, cfg.micro_batch_size, cfg.eval_batches)
    tokens_per_step = cfg.micro_batch_size * (train_samples.shape[1] - 1)
    start, last = time.perf_counter(), {}
    with open(run_dir / "metrics.jsonl", "w") as log, tqdm(range(cfg.steps), desc="pretrain", unit="step") as bar:
        for step in bar:
            t0 = time.perf_counter()
            rows = train_samples[torch.randint(len(train_samples), (cfg.micro_batch_size,), generator=gen)]
            inputs, labels = rows[:, :-1], rows[:, 1:]
            out = model(inputs, mtp_input_ids=labels, with_aux=True)
            ce = lm_loss(out.logits, labels)
            mtp = lm_loss(out.mtp_logits, mtp_targets(labels)) if out.mtp_logits is not None else ce.new_zeros(())
            loss = (ce + cfg.mtp_weight * mtp + cfg.balance_loss_weight * out.balance_loss
                    + cfg.indexer_loss_weight * out.indexer_loss)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()} at step {step}; lower train.lr or check the data")
            lr = lr_at(step, cfg)
            for g in opt.param_groups:
                g["lr"] = lr
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            update_router_bias(model, out.expert_counts, cfg.bias_update_speed)
            counts = out.expert_counts.float()
            last = {"step": step + 1, "loss": ce.item(), "mtp_loss": mtp.item(), "lr": lr,
                    "balance_loss": out.balance_loss.item(), "indexer_loss": out.indexer_loss.item(),
                    "grad_norm": grad_norm.item(), "tokens_per_sec": tokens_per_step / (time.perf_counter() - t0),
                    "expert_load_max_over_mean": (counts.max(-1).values / counts.mean(-1)).tolist()}
            if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
                last["val_loss"] = evaluate(model, val_samples, cfg.micro_batch_size, cfg.eval_batches)
            if (step + 1) % cfg.log_every == 0 or "val_loss" in last:
                log.write(json.dumps(last) + "\n")
                log.flush()
            bar.set_postfix(loss=f"{ce.item():.3f}", lr=f"{last['lr']:.1e}")
    elapsed = time.perf_counter() - start
    summary = {"steps": cfg.steps, "tokens": cfg.steps * tokens_per_step, "seconds": round(elapsed, 1),
               "tokens_per_sec": round(cfg.steps * tokens_per_step / elapsed), "val_loss_before": round(val_before, 4),
               "val_loss_after": round(last["val_loss"], 4), "final_train_loss": round(last["loss"], 4),
               "run_dir": str(run_dir)}
    (run_dir / "summary.json").write_text(json.dumps({"train": asdict(cfg), **summary}, indent=2))
    return summary
