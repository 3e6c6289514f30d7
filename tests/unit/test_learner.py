"""The Learner's token-weighted loss convention on one process (train/learner.py): masked micro-batches with very
different target counts, split into several micro-batches, give the loss and the gradient of the whole batch's
Σ over targets / N, against a hand-written reference (dsv4train/testing/masked_batches.py). The layouts (dp2, cp2,
with accumulation) are in tests/distributed/test_token_weighted_loss.py."""

import pytest
import torch

from dsv4train.config.pretrain import TrainConfig
from dsv4train.testing.equivalence import build_tiny
from dsv4train.testing.masked_batches import MTP_WEIGHT, masked_rows, reference_loss_and_grads, relative_l2
from dsv4train.train.learner import Learner
from dsv4train.train.losses import LossOutput, NextTokenLoss

ROWS, SEQ = 4, 32
# No clipping (the reference has none), no aux losses (see masked_batches.py), no router bias update.
NO_EXTRAS = TrainConfig(grad_clip=1e9, balance_loss_weight=0.0, indexer_loss_weight=0.0, bias_update_speed=0.0)


def _grads(model) -> dict[str, torch.Tensor]:
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def _split(batch: dict, parts: int) -> list[dict]:
    return [dict(zip(batch, vs)) for vs in zip(*(v.chunk(parts) for v in batch.values()))]


@pytest.mark.parametrize("accum", [1, 2, 4])
def test_masked_micro_batches_give_the_whole_batch_token_mean(accum):
    """Rows hold 32, 8, 16 and 3 targets; split into 1, 2 or 4 micro-batches the step must still be the whole
    batch's Σ / N (a per-micro-batch mean would weigh the 3-target row like the 32-target one). fp32, summation
    order only: relative L2 of the gradients < 1e-5 (measured ~1e-7), losses to 1e-6 relative."""
    batch = masked_rows(build_tiny().cfg.vocab_size, ROWS, SEQ)
    want_losses, want_grads = reference_loss_and_grads(build_tiny(), batch)

    model = build_tiny()
    learner = Learner(model, torch.optim.SGD(model.parameters(), lr=0.0), NO_EXTRAS)
    res = learner.step(_split(batch, accum), NextTokenLoss(mtp_weight=MTP_WEIGHT))
    assert res.n_targets == int((batch["labels"] != -100).sum()) == 32 + 8 + 16 + 3
    for k in ("lm_loss", "mtp_loss"):
        assert res.metrics[k] == pytest.approx(want_losses[k], rel=1e-6)
    assert res.loss == pytest.approx(want_losses["loss"], rel=1e-6)
    assert relative_l2(_grads(model), want_grads) < 1e-5


def test_full_rows_equal_the_mean_of_micro_batch_means():
    """What changes for pre-training: nothing when every row is full. With 2 micro-batches of full rows the step's
    lm_loss is the plain mean of the two micro-batches' mean CE (computed here with torch's default mean)."""
    from dsv4train.train.losses import lm_batch

    model = build_tiny()
    rows = torch.randint(0, model.cfg.vocab_size, (ROWS, SEQ + 1), generator=torch.Generator().manual_seed(4))
    halves = [lm_batch(r) for r in rows.chunk(2)]
    with torch.no_grad():
        means = [
            float(torch.nn.functional.cross_entropy(model(b["input_ids"]).flatten(0, 1), b["labels"].flatten()))
            for b in halves
        ]
    learner = Learner(model, torch.optim.SGD(model.parameters(), lr=0.0), NO_EXTRAS)
    res = learner.step(halves, NextTokenLoss())
    assert res.metrics["lm_loss"] == pytest.approx(sum(means) / 2, rel=1e-6)


def test_a_loss_that_counts_other_targets_is_refused():
    """The Learner divides by the labels' count; a loss function summing over other positions must fail loudly."""
    model = build_tiny()
    batch = masked_rows(model.cfg.vocab_size, ROWS, SEQ)

    class Wrong(NextTokenLoss):
        def __call__(self, out, b):
            lo = super().__call__(out, b)
            return LossOutput(lo.loss_sum, lo.n_targets + 1, lo.metrics)

    learner = Learner(model, torch.optim.SGD(model.parameters(), lr=0.0), NO_EXTRAS)
    with pytest.raises(ValueError, match="reports 60 target tokens for a micro-batch whose labels hold 59"):
        learner.step([batch], Wrong())


def test_a_step_without_targets_is_refused():
    model = build_tiny()
    batch = masked_rows(model.cfg.vocab_size, ROWS, SEQ)
    batch["labels"] = torch.full_like(batch["labels"], -100)
    learner = Learner(model, torch.optim.SGD(model.parameters(), lr=0.0), NO_EXTRAS)
    with pytest.raises(ValueError, match="no target tokens"):
        learner.step([batch], NextTokenLoss())


def test_work_a_step_does_not_need_is_not_done():
    """A loss function with uses_mtp False gets no MTP logits and the MTP block does not run; the default loss runs
    it."""
    model = build_tiny()
    batch = masked_rows(model.cfg.vocab_size, ROWS, SEQ)
    mtp_calls = []
    model.mtp[0].register_forward_hook(lambda *args: mtp_calls.append(1))
    learner = Learner(model, torch.optim.SGD(model.parameters(), lr=0.0), NO_EXTRAS)
    res = learner.step([batch], NextTokenLoss(mtp_weight=MTP_WEIGHT))
    assert mtp_calls and res.metrics["mtp_loss"] > 0

    class WithoutMTP(NextTokenLoss):
        uses_mtp = False

    mtp_calls.clear()
    res = learner.step([batch], WithoutMTP())
    assert mtp_calls == [] and res.metrics["mtp_loss"] == 0.0
