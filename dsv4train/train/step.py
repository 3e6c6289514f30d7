"""One optimizer step over a list of micro-batches, and the validation loss. The loss is
CE + mtp_weight·MTP + balance_weight·balance + indexer_weight·indexer-KL (arch ref §5.3, §6, §8.4)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import partial

import torch

from dsv4train.config.pretrain import TrainConfig
from dsv4train.models.model import DSV4Model
from dsv4train.models.sequence import WholeSequence
from dsv4train.parallel.runtime import ParallelRuntime
from dsv4train.train.losses import lm_loss, mtp_targets


@dataclass
class StepResult:
    loss: float  # the weighted total
    lm_loss: float
    mtp_loss: float
    balance_loss: float
    indexer_loss: float
    grad_norm: float
    expert_counts: torch.Tensor  # [n_moe_layers, E], summed over the micro-batches
    skipped: bool = False
    reason: str = ""

    def metrics(self) -> dict:
        counts = self.expert_counts.float()
        load = (counts.max(-1).values / counts.mean(-1).clamp_min(1e-9)).tolist()
        return {"loss": self.loss, "lm_loss": self.lm_loss, "mtp_loss": self.mtp_loss,
                "balance_loss": self.balance_loss, "indexer_loss": self.indexer_loss, "grad_norm": self.grad_norm,
                "expert_load_max_over_mean": load, "skipped": self.skipped}


def _autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def train_step(model: DSV4Model, optimizer, batches: list[dict], mtp_weight: float, t: TrainConfig,
               device: torch.device, dtype: torch.dtype, rt: ParallelRuntime | None = None) -> StepResult:
    """Forward/backward over this rank's micro-batches, clip, step. Losses and expert counts are reduced over
    the data-parallel ranks (and the pipeline stages), so every rank gets the same numbers and makes the same skip
    decision."""
    rt = rt or ParallelRuntime()
    model.train()
    optimizer.zero_grad(set_to_none=True)
    if rt.pipeline is None:
        parts, counts = _forward_backward(model, batches, mtp_weight, t, device, dtype, rt)
    else:
        parts, counts = _pipelined_forward_backward(rt, batches, mtp_weight, t, device, dtype)
    parts = rt.mean_over_data(parts)
    counts = rt.sum_over_data(counts.detach())
    loss, ce, mtp, bal, idx = parts.tolist()
    grad_norm = rt.clip_grad_norm(model.parameters(), t.grad_clip)
    result = StepResult(loss, ce, mtp, bal, idx, float(grad_norm), counts)
    if not torch.isfinite(parts).all() or not torch.isfinite(grad_norm):
        result.skipped, result.reason = True, f"loss {loss}, grad norm {float(grad_norm)}"
        optimizer.zero_grad(set_to_none=True)
        return result
    optimizer.step()
    return result


def _forward_backward(model: DSV4Model, batches: list[dict], mtp_weight: float, t: TrainConfig,
                      device: torch.device, dtype: torch.dtype,
                      rt: ParallelRuntime) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole model on this rank: (loss, CE, MTP, balance, indexer) averaged over the micro-batches, and the
    expert counts [n_moe_layers, E] summed over them. Under context parallelism the rank runs its piece of every
    row and its losses are its share of the whole rows' (models/sequence.py)."""
    parts = torch.zeros(5, dtype=torch.float64)
    counts = None
    for batch in batches:
        rows = batch["tokens"].to(device, non_blocking=True)
        inputs, labels, mtp_labels = _inputs_and_targets(rows, rt)
        with _autocast(device, dtype):
            out = model(inputs, mtp_input_ids=labels, with_aux=True)
        ce = lm_loss(out.logits, labels, rt.seq)
        mtp = lm_loss(out.mtp_logits, mtp_labels, rt.seq) if out.mtp_logits is not None else ce.new_zeros(())
        loss = ce + mtp_weight * mtp + t.balance_loss_weight * out.balance_loss + t.indexer_loss_weight * out.indexer_loss
        (loss / len(batches)).backward()
        parts += torch.stack([loss, ce, mtp, out.balance_loss, out.indexer_loss]).detach().double().cpu()
        counts = out.expert_counts if counts is None else counts + out.expert_counts
    return parts / len(batches), counts


def _inputs_and_targets(rows: torch.Tensor, rt: ParallelRuntime) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of seq+1 tokens -> this rank's (inputs, next-token labels, MTP targets), each [B, seq] (or its
    context-parallel piece, cut after the shifts). The MTP input at position t is labels[t] (token t+1)."""
    labels = rows[:, 1:]
    return tuple(rt.seq.shard(t) for t in (rows[:, :-1], labels, mtp_targets(labels)))


def _pipeline_inputs(rows: torch.Tensor, rt: ParallelRuntime) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's token ids [B, S] and targets [B, S, 2] (labels, MTP targets) for the pipeline."""
    inputs, labels, mtp_labels = _inputs_and_targets(rows, rt)
    return inputs, torch.stack((labels, mtp_labels), dim=-1)


def _pipeline_loss_parts(outputs: tuple, targets_BS2: torch.Tensor,
                         seq: WholeSequence) -> tuple[torch.Tensor, torch.Tensor]:
    """The last pipeline stage's (CE, MTP) of one chunk from its outputs (logits[, MTP logits])."""
    ce = lm_loss(outputs[0], targets_BS2[..., 0], seq)
    return ce, (lm_loss(outputs[1], targets_BS2[..., 1], seq) if len(outputs) > 1 else ce.new_zeros(()))


def _pipelined_forward_backward(rt: ParallelRuntime, batches: list[dict], mtp_weight: float, t: TrainConfig,
                                device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The same through this rank's pipeline stages (parallel/pp.py): each micro-batch is split into chunks that
    the schedule runs forward and backward; the stages' parts and counts are summed over the pp ranks."""
    parts = torch.zeros(4, dtype=torch.float64)
    counts = None
    for batch in batches:
        rows = batch["tokens"].to(device, non_blocking=True)
        with _autocast(device, dtype):
            p, c = rt.pipeline.train(*_pipeline_inputs(rows, rt), partial(_pipeline_loss_parts, seq=rt.seq),
                                     mtp_weight, t.balance_loss_weight,
                                     t.indexer_loss_weight, scale=1.0 / len(batches))
        parts += p
        counts = c if counts is None else counts + c
    ce, mtp, bal, idx = rt.sum_over_stages(parts / len(batches))
    loss = ce + mtp_weight * mtp + t.balance_loss_weight * bal + t.indexer_loss_weight * idx
    return torch.stack([loss, ce, mtp, bal, idx]), rt.sum_over_stages(counts)


@torch.no_grad()
def evaluate(model: DSV4Model, batches: list[dict], device: torch.device, dtype: torch.dtype,
             rt: ParallelRuntime | None = None) -> float:
    """Mean LM loss over `batches` (this rank's rows of them), averaged over the data-parallel ranks."""
    rt = rt or ParallelRuntime()
    model.eval()
    total = torch.zeros((), dtype=torch.float64)
    for batch in batches:
        rows = batch["tokens"].to(device)
        with _autocast(device, dtype):
            if rt.pipeline is None:
                inputs, labels, _ = _inputs_and_targets(rows, rt)
                total += lm_loss(model(inputs), labels, rt.seq).double().cpu()
            else:
                total += rt.pipeline.evaluate(*_pipeline_inputs(rows, rt),
                                              partial(_pipeline_loss_parts, seq=rt.seq))
    model.train()
    return float(rt.mean_over_data(rt.sum_over_stages(total) / len(batches)))
