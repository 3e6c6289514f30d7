"""Shared pieces of the "a parallel layout trains like one process" tests (tests/distributed/): fixed batches, whole
gradients of a possibly sharded model, and the comparisons with their tolerances.

Why the gradient tolerances look the way they do (all measured on the tiny configs):
- first step: each tensor within 1e-4 of its own largest entry, or 1e-7 of the model's largest gradient entry.
  The mHC gradients (hc_*, above all the MTP head's) are sums of near-cancelling stream terms, so a different
  fp32 summation order (TP's all-reduce after wo_b) moves them by up to 1e-2 of their own size yet ~1e-9 of
  the model's scale. A wrong shard, scale or missing reduction is off by O(1).
- last step: relative to the model's scale only. After the first update the weights carry fp32 noise that
  AdamW's normalisation and Muon's Newton-Schulz lift to full size where a gradient is ~1e-12; on ONE process,
  2 micro-batches vs 1 batch of the same rows already differ by 4e-3 of the MTP head's own max at step 3.
"""

from __future__ import annotations

import torch

from dsv4train.data.loader import rank_rows
from dsv4train.models.moe import update_router_bias
from dsv4train.train.step import train_step


def fixed_batches(vocab: int, rows: int, seq: int, steps: int, seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"tokens": torch.randint(0, vocab, (rows, seq + 1), generator=g)} for _ in range(steps)]


def full_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """name -> the whole gradient (gathered if it is a DTensor shard), for the parameters that have one."""
    return {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
            for n, p in model.named_parameters() if p.grad is not None}


def run_steps(model, optimizer, batches: list[dict], rt, train_cfg, grad_accum: int = 1
              ) -> tuple[list[float], list[dict], list[torch.Tensor]]:
    """Train one step per batch (dense indexer on the first step, sparse after) on this rank's rows, split into
    `grad_accum` micro-batches, with the router-bias update. Returns the losses and global expert counts of every
    step and the (clipped) gradients of the first and the last step."""
    losses, grads, counts = [], [], []
    for i, batch in enumerate(batches):
        model.set_indexer_mode("dense" if i == 0 else "sparse")
        rows = rank_rows(batch, rt.data_rank, rt.data_ranks)
        micro = [{"tokens": t} for t in rows["tokens"].chunk(grad_accum)]
        res = train_step(model, optimizer, micro, 0.3, train_cfg, torch.device("cpu"), torch.float32, rt)
        update_router_bias(model, rt.local_expert_counts(res.expert_counts, model), train_cfg.bias_update_speed)
        losses.append(res.loss)
        counts.append(res.expert_counts)
        if i in (0, len(batches) - 1):
            grads.append(full_grads(model))
    return losses, grads, counts


def assert_losses_close(got: list[float], want: list[float], rtol: float, what: str = "loss") -> None:
    for step, (a, b) in enumerate(zip(got, want)):
        assert abs(a - b) <= rtol * abs(b), f"step {step + 1}: {what} {a} vs one process {b}"


def assert_grads_match(got: list[dict], want: list[dict], last_tol: float = 1e-4) -> None:
    """got/want: [first-step grads, last-step grads]; only the names in `got` are compared (a pipeline rank
    holds only its stages)."""
    scale = max(float(g.abs().max()) for g in want[1].values())
    for when, g_step, w_step in (("first", got[0], want[0]), ("last", got[1], want[1])):
        for name, g in g_step.items():
            r = w_step[name]
            diff = float((g - r).abs().max())
            own, overall = diff / max(float(r.abs().max()), 1e-12), diff / scale
            ok = (own < 1e-4 or overall < 1e-7) if when == "first" else overall < last_tol
            assert ok, (f"{name}: {when}-step gradient differs from one process by {own:.2e} of its max "
                        f"({overall:.2e} of the model's)")
