"""Shared pieces of the "a parallel layout trains like one process" tests (tests/distributed/): the tiny model,
fixed batches, whole gradients of a possibly sharded model, the one-process reference with its noise floor, and
the comparison.

A layout computes the one-process sums in another order (all-reduces, shards, micro-batches, pipeline chunks), so
it differs from one process by fp32 rounding, amplified where a value is a near-cancelling sum (the mHC gradients
hc_*, above all the MTP head's: up to 2e-2 of their own size at the first step, yet ~1e-9 of the model's largest
gradient) and by training (AdamW's first update is ±lr whatever a gradient's size; the sparse indexer's top-k
turns a last-bit change into another entry). How far rounding moves each value is measured, not assumed:
`one_process_reference` trains the reference and three reruns that are exact in real arithmetic (the same rows
as twice the micro-batches: the gradient sums over rows in another order; twice with every parameter moved one
ulp up or down: every forward value rounded differently, as a layout's reordered activations are). A value's
floor is the largest difference of the reruns from the reference.

FP8/FP4 adds a noise the reruns cannot sample: the quantisers absorb their last-bit changes (their floors are
often exactly 0), but a layout's reordered partial sums (TP's all-reduced input gradients) can put an FP8
operand on the other side of a rounding midpoint, and that 1/16 step cascades through the backward into every
earlier layer (up to 5e-2 of a tensor's max at the first step, tp2 FP8+FP4, 16-token rows). So a quantised run
also trains the same model unquantised; its distance from the reference, what all the roundings do together,
bounds re-rounding some of them. It is not added to the first step's losses: that forward rounds the same values.

`assert_matches_one_process` requires every loss part at every step, the validation loss, and every gradient
tensor at the first and at the last step (max over its entries) to be within

    NOISE_MULTIPLE · rerun floor + REL_TOL · |reference|  (+ QUANT_MULTIPLE · |reference - unquantised|).

There is no escape by the model's scale: a tensor whose gradient is 1e-9 of the largest one is held to its own
floor. A wrong shard, scale or missing reduction moves a tensor by >= 1e-2 of its size; in the fp32 tests the
tolerance exceeds 1e-2 of a value's size for at most 11 of the ~320 values a test compares, all of them mHC hc_*
gradients (the old check, 1e-7 / 1e-4 of the model's largest gradient, could not see a 1% error in 15 of the 153
tensors of the tp2 reference at the first step and in 122 at the last). Measured with

    DSV4_EQUIV_REPORT=/tmp/equiv.jsonl pytest tests/distributed/test_layouts.py tests/distributed/test_pipeline.py

which also shows the margins: the worst value reached 0.18 of its tolerance in fp32 (an mHC gradient, cp4) and
0.22 with FP8 (a shared-expert gradient, tp2 FP8+FP4). FP8/FP4 gradients are held only to about their
quantisation error (|reference - unquantised| is a median 9e-2 of a tensor's max at the first step, 0.17 at the
second), so the FP8 tests catch a wrong scale or a lost quantiser by the first step's losses, which stay within
REL_TOL.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist

from dsv4train.config.pretrain import PrecisionConfig
from dsv4train.data.loader import rank_rows
from dsv4train.models.model import DSV4Model
from dsv4train.parallel.runtime import ParallelRuntime
from dsv4train.quant import apply_precision
from dsv4train.testing.toy_configs import tiny_config
from dsv4train.train.learner import Learner
from dsv4train.train.losses import NextTokenLoss, lm_batch

# A layout's rounding is one more draw of the noise the reruns sample. Over the layouts, optimizers and
# precisions measured (tiny config: dp2, ep2, tp2, pp2, cp2, dp2×tp2, cp2×tp2, tp2×ep2; fp32, FP8, FP8+FP4; Muon
# and AdamW) the largest layout / floor ratio was 8.6 for a gradient (an MTP mHC tensor, FP8 tp2) and 17 for a loss
# part (the sparse indexer loss, FP8+FP4 tp2, second step); 32 keeps about 2x over the worst.
NOISE_MULTIPLE = 32.0
# For a value whose reruns happen to round alike (floor 0): the largest first-step difference seen there was 2e-6
# of a tensor's max (FP8 dp2) and 6e-7 of a loss part. 1e-5 keeps 5x over that and is 1e-3 below a 1% bug.
REL_TOL = 1e-5
# Re-rounding some of a quantised run's roundings moves a value by a part of what all of them do: measured at most
# 0.52 of |reference - unquantised| (a shared-expert gradient, tp2 FP8+FP4, first step); 1 keeps 2x. Not applied to
# the first step's losses: its forward rounds the same values (a layout's last-bit activation differences rarely
# flip a forward rounding, and then move a loss far less than REL_TOL: every part within 2e-7 over the FP8 runs).
QUANT_MULTIPLE = 1.0

LOSS_PARTS = ("loss", "lm_loss", "mtp_loss", "balance_loss", "indexer_loss")


@dataclass
class Trained:
    """What a run of `run_steps` is compared by."""

    losses: list[dict[str, float]]  # per step: the weighted total and its parts (LOSS_PARTS)
    grads: list[dict[str, torch.Tensor]]  # the (clipped) gradients of the first and of the last step
    counts: list[torch.Tensor]  # per step: the global expert counts [n_moe_layers, E]
    val_loss: float | None = None  # validation loss on the first batch after training, if asked for


@dataclass
class Spread:
    """Per value, the largest |other run - reference|: loss parts per step, gradients per tensor at the first and
    the last step (max over the entries), the validation loss."""

    losses: list[dict[str, float]]
    grads: list[dict[str, float]]
    val_loss: float | None

    @staticmethod
    def of(ref: Trained, others: list[Trained]) -> Spread:
        losses = [
            {k: max(abs(o.losses[s][k] - w[k]) for o in others) for k in LOSS_PARTS} for s, w in enumerate(ref.losses)
        ]
        grads = [
            {n: max(_max_diff(o.grads[s][n], g) for o in others) for n, g in step.items()}
            for s, step in enumerate(ref.grads)
        ]
        val = None if ref.val_loss is None else max(abs(o.val_loss - ref.val_loss) for o in others)
        return Spread(losses, grads, val)


@dataclass
class NoiseFloor:
    reruns: Spread  # the three exact-in-real-arithmetic reruns
    quantisation: Spread | None  # FP8/FP4 references: the same training unquantised
    counts_stable: list[bool]  # per step: every other run routed exactly like the reference

    def tolerance(self, ref_size: float, pick: Callable[[Spread], float], forward_only: bool = False) -> float:
        """`forward_only`: a value of the first step's forward (its losses), where no FP8 flip cascade reaches."""
        tol = NOISE_MULTIPLE * pick(self.reruns) + REL_TOL * ref_size
        if self.quantisation is None or forward_only:
            return tol
        return tol + QUANT_MULTIPLE * pick(self.quantisation)


def build_tiny(precision: PrecisionConfig | None = None) -> DSV4Model:
    """The model the equivalence tests train: `tiny_config(n_hash_layers=1)`, seed 0, optionally FP8 / FP8+FP4."""
    model = DSV4Model(tiny_config(n_hash_layers=1))
    model.init_weights(0)
    return model if precision is None else apply_precision(model, precision)


def fixed_batches(vocab: int, rows: int, seq: int, steps: int, seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"tokens": torch.randint(0, vocab, (rows, seq + 1), generator=g)} for _ in range(steps)]


def full_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """name -> the whole gradient (gathered if it is a DTensor shard), for the parameters that have one."""
    return {
        n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
        for n, p in model.named_parameters()
        if p.grad is not None
    }


def run_steps(
    model, optimizer, batches: list[dict], rt, train_cfg, grad_accum: int = 1, validate: bool = False
) -> Trained:
    """Train one step per batch (dense indexer on the first step, sparse after) on this rank's rows, split into
    `grad_accum` micro-batches, with the router-bias update; with `validate`, then the validation loss of the
    first batch."""
    losses, grads, counts = [], [], []
    learner = Learner(model, optimizer, train_cfg, rt)
    for i, batch in enumerate(batches):
        model.set_indexer_mode("dense" if i == 0 else "sparse")
        rows = rank_rows(batch, rt.data_rank, rt.data_ranks)
        micro = [lm_batch(t) for t in rows["tokens"].chunk(grad_accum)]
        res = learner.step(micro, NextTokenLoss(mtp_weight=0.3))
        losses.append({"loss": res.loss, **{k: res.metrics[k] for k in LOSS_PARTS[1:]}})
        counts.append(res.expert_counts.cpu())
        if i in (0, len(batches) - 1):
            grads.append(full_grads(model))
    val = None
    if validate:
        val = learner.evaluate(
            [lm_batch(rank_rows(batches[0], rt.data_rank, rt.data_ranks)["tokens"])], NextTokenLoss()
        )["lm_loss"]
    return Trained(losses, grads, counts, val)


def nudge_one_ulp(model: torch.nn.Module, seed: int) -> None:
    """Move every parameter entry to its float neighbour above or below (a fair coin per entry, fixed seed)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            up = torch.rand(p.shape, generator=g) < 0.5
            p.copy_(torch.nextafter(p, torch.where(up, torch.inf, -torch.inf).to(p.dtype)))


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max()) if a.numel() else 0.0


def _one_process_run(
    build_model, make_optimizer, batches, train_cfg, validate: bool, grad_accum: int, nudge_seed: int | None
) -> Trained:
    model = build_model()
    if nudge_seed is not None:
        nudge_one_ulp(model, nudge_seed)
    return run_steps(model, make_optimizer(model), batches, ParallelRuntime(), train_cfg, grad_accum, validate)


def one_process_reference(
    build_model: Callable[[], torch.nn.Module],
    make_optimizer,
    batches: list[dict],
    train_cfg,
    grad_accum: int = 1,
    validate: bool = False,
    unquantised: Callable[[], torch.nn.Module] | None = None,
) -> tuple[Trained, NoiseFloor]:
    """The one-process run of `batches` and its noise floor: three reruns (2x the micro-batches; every parameter
    nudged one ulp, two seeds) and, given `unquantised` (the same model without FP8/FP4), that model's run.
    `build_model()` gives a fresh model, the same every call. Under a process group the runs are spread over the
    ranks and gathered, so a rank trains at most ceil(runs / world) of them."""
    run = partial(_one_process_run, build_model, make_optimizer, batches, train_cfg, validate)
    jobs = [
        partial(run, grad_accum, None),
        partial(run, 2 * grad_accum, None),
        partial(run, grad_accum, 1),
        partial(run, grad_accum, 2),
    ]
    if unquantised is not None:
        jobs.append(
            partial(_one_process_run, unquantised, make_optimizer, batches, train_cfg, validate, grad_accum, None)
        )
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    done = {i: job() for i, job in enumerate(jobs) if i % world == rank}
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, done)
        done = {i: t for part in gathered for i, t in part.items()}
    ref, *others = (done[i] for i in range(len(jobs)))
    reruns, twin = others[:3], others[3:]
    stable = [all(torch.equal(o.counts[s], c) for o in others) for s, c in enumerate(ref.counts)]
    return ref, NoiseFloor(Spread.of(ref, reruns), Spread.of(ref, twin) if twin else None, stable)


@dataclass
class Checked:
    """One compared value: a loss part, the validation loss, or a gradient tensor (max over its entries)."""

    what: str  # e.g. "step 2: indexer_loss", "last-step gradient of layers.0.attn.wq_a.weight"
    diff: float  # |layout - one process|
    tol: float
    size: float  # |one process| (a tensor: its largest entry)


def compared_values(got: Trained, want: Trained, floor: NoiseFloor) -> list[Checked]:
    """Every loss part at every step, the validation loss, and the first- and last-step gradients of the
    parameters in `got` (a pipeline rank holds only its stages')."""
    out = []
    for step, (g, w) in enumerate(zip(got.losses, want.losses)):
        for k in LOSS_PARTS:
            tol = floor.tolerance(abs(w[k]), lambda s, step=step, k=k: s.losses[step][k], forward_only=step == 0)
            out.append(Checked(f"step {step + 1}: {k}", abs(g[k] - w[k]), tol, abs(w[k])))
    if want.val_loss is not None:
        tol = floor.tolerance(abs(want.val_loss), lambda s: s.val_loss)
        out.append(Checked("val loss", abs(got.val_loss - want.val_loss), tol, abs(want.val_loss)))
    for step, (when, g_step, w_step) in enumerate(zip(("first", "last"), got.grads, want.grads)):
        for name, g in g_step.items():
            own = float(w_step[name].abs().max())
            tol = floor.tolerance(own, lambda s, step=step, name=name: s.grads[step][name])
            out.append(Checked(f"{when}-step gradient of {name}", _max_diff(g, w_step[name]), tol, own))
    return out


def _report(checked: list[Checked], what: str, path: str) -> None:
    """One JSON line: the worst diff / tolerance and the values whose tolerance exceeds 1% of their size (those
    a 1% bug could hide in). The module docstring's suite numbers come from these lines."""
    worst = max(checked, key=lambda c: c.diff / max(c.tol, 1e-300))
    line = {
        "test": os.environ.get("PYTEST_CURRENT_TEST", ""),
        "precision": what,
        "rank": dist.get_rank() if dist.is_initialized() else 0,
        "values": len(checked),
        "worst": [worst.what, worst.diff / max(worst.tol, 1e-300)],
        "tolerance_over_1pct": [c.what for c in checked if c.tol > 1e-2 * c.size],
    }
    with open(path, "a") as f:
        f.write(json.dumps(line) + "\n")


def assert_matches_one_process(got: Trained, want: Trained, floor: NoiseFloor, what: str = "") -> None:
    """`compared_values` within their tolerances, and the expert counts exactly at the steps where every other
    one-process run routed exactly like the reference; the message lists the first values that are not. With
    DSV4_EQUIV_REPORT=<file>, each call also appends its margins to that file (`_report`)."""
    checked = compared_values(got, want, floor)
    if os.environ.get("DSV4_EQUIV_REPORT"):
        _report(checked, what, os.environ["DSV4_EQUIV_REPORT"])
    bad = [
        f"{c.what} differs from one process by {c.diff:.2e} = {c.diff / max(c.size, 1e-30):.2e} of its size "
        f"{c.size:.2e} (tolerance {c.tol:.2e})"
        for c in checked
        if not c.diff <= c.tol
    ]
    bad += [
        f"step {step + 1}: expert counts differ from one process"
        for step, (g, w, stable) in enumerate(zip(got.counts, want.counts, floor.counts_stable))
        if stable and not torch.equal(g, w)
    ]
    assert not bad, f"{what or 'layout'}: {len(bad)} values differ from one process:\n  " + "\n  ".join(bad[:8])
