"""Masked micro-batches and a hand-written reference for the Learner's token-weighted loss convention
(train/learner.py): tests/unit/test_learner.py (one process, gradient accumulation) and
tests/distributed/test_token_weighted_loss.py (dp2, cp2, with accumulation) compare the Learner against it.

The reference does not use the Learner or its loss functions: one forward of the whole global batch and
    loss = (Σ CE over labelled positions + mtp_weight · Σ MTP CE over positions with an MTP target) / N,
N = the number of labelled positions, written with plain `F.cross_entropy`. The aux losses are left out (their
weights are 0 in these tests): they are per-micro-batch means, which the convention weights by target count and
which no single whole-batch forward reproduces when micro-batches differ.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100  # the HF / PyTorch convention for "no target here"
MTP_WEIGHT = 0.3


def masked_rows(vocab: int, rows: int, seq: int, seed: int = 3, packed: bool = False) -> dict[str, torch.Tensor]:
    """A global batch of whole rows with very different target counts: row 0 all of them, row 1 a 'prompt' of
    3/4 of the row masked, row 2 every other position masked, row 3 only its last 3 positions kept, and so on
    cyclically. Keys as train/losses.py documents them (input_ids, labels, next_ids, mtp_labels).

    packed: each row also holds several documents (`positions`, models/documents.py), of lengths that cut windows
    and compression blocks (row r: documents of 5 + r, 11 and the rest of the row). The targets stay as above:
    the model's masking, not the labels, is what keeps the documents apart here."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (rows, seq + 1), generator=g)
    keep = torch.ones(rows, seq, dtype=torch.bool)
    for r in range(rows):
        kind = r % 4
        if kind == 1:
            keep[r, : 3 * seq // 4] = False
        elif kind == 2:
            keep[r, ::2] = False
        elif kind == 3:
            keep[r, :-3] = False
    labels = torch.where(keep, tokens[:, 1:], torch.full_like(tokens[:, 1:], IGNORE))
    mtp_labels = torch.cat((labels[:, 1:], torch.full_like(labels[:, :1], IGNORE)), dim=1)
    batch = {"input_ids": tokens[:, :-1], "labels": labels, "next_ids": tokens[:, 1:], "mtp_labels": mtp_labels}
    if packed:
        lengths = [(5 + r % 4, 11, seq - 16 - r % 4) for r in range(rows)]
        batch["positions"] = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths])
    return batch


def reference_loss_and_grads(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """({lm_loss, mtp_loss, loss}, {name: grad}) of the convention on the whole batch, by hand."""
    model.zero_grad(set_to_none=True)
    out = model(batch["input_ids"], mtp_input_ids=batch["next_ids"], with_aux=True, positions=batch.get("positions"))
    n = (batch["labels"] != IGNORE).sum()
    ce = F.cross_entropy(out.logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE, reduction="sum")
    mtp = F.cross_entropy(
        out.mtp_logits.flatten(0, 1), batch["mtp_labels"].flatten(), ignore_index=IGNORE, reduction="sum"
    )
    loss = (ce + MTP_WEIGHT * mtp) / n
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return {"lm_loss": float(ce.detach() / n), "mtp_loss": float(mtp.detach() / n), "loss": float(loss.detach())}, grads


def relative_l2(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    """‖got - want‖ / ‖want‖ over all tensors of `want` together."""
    num = sum(float((got[k].double() - w.double()).square().sum()) for k, w in want.items())
    den = sum(float(w.double().square().sum()) for w in want.values())
    return (num / den) ** 0.5
