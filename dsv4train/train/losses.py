"""Losses for the Learner (train/learner.py), in its token-weighted convention: a loss function returns SUMS over
the target tokens of one micro-batch and their count, and the Learner divides by the number of target tokens of the
whole global batch (every micro-batch, every data and context rank).

A micro-batch is a dict of [B, S] tensors of whole rows (the Learner cuts them into context-parallel shards, so any
shift across positions is done here, on whole rows, before the cut):
- `input_ids`: the tokens the model reads;
- `labels`: the target of each position (the next token), IGNORE where there is none (prompt, padding, a masked
  turn); every non-IGNORE label is one target token of the convention;
- `next_ids`: the token after each position, the MTP block's input (arch ref §6: Embed(token_{t+1})), never masked;
- `mtp_labels`: the MTP target of each position (token t+2, IGNORE where the label after it is IGNORE or absent);
- `routes.<layer>` [B, S, k] (GRPO, optional): keep-routing, the experts each token goes to in that learned-routing
  MoE layer (−1: the router chooses), passed to the model as `routes=` (`batch_routes`).
A loss function may read further keys of its own (GRPO's old log-probs, advantages, weights).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dsv4train.models.model import ModelOutput

IGNORE = -100
ROUTES_PREFIX = "routes."  # batch key of one layer's replayed routes: routes.<layer index>


@dataclass(frozen=True)
class LossOutput:
    """One micro-batch's loss as the Learner takes it. `loss_sum` (differentiated) and every `metrics` value are sums
    over the micro-batch's target tokens; `n_targets` is their count (the non-IGNORE labels). `metrics` has exactly
    the keys of the loss function's `metric_names`, so every rank reduces the same vector (a pipeline rank without
    the last stage never calls the loss)."""

    loss_sum: torch.Tensor
    n_targets: torch.Tensor
    metrics: dict[str, torch.Tensor]

    def sums(self, metric_names: tuple[str, ...]) -> torch.Tensor:
        """[loss_sum, metrics in `metric_names` order] as float64 on the CPU (detached): what is reduced over ranks."""
        return torch.stack(
            [v.detach().double().cpu() for v in (self.loss_sum, *(self.metrics[k] for k in metric_names))]
        )

    def counted_sums(self, metric_names: tuple[str, ...]) -> torch.Tensor:
        """[n_targets, loss_sum, metrics...] as float64 on the CPU: an evaluation's per-batch contribution."""
        return torch.cat([torch.tensor([float(self.n_targets)], dtype=torch.float64), self.sums(metric_names)])


def batch_routes(batch: dict[str, torch.Tensor]) -> dict[int, torch.Tensor] | None:
    """The replayed routes of a micro-batch ({layer: [B, S, k]}), None when it carries none."""
    routes = {int(k[len(ROUTES_PREFIX) :]): v for k, v in batch.items() if k.startswith(ROUTES_PREFIX)}
    return routes or None


def token_ce_sum(logits_BSV: torch.Tensor, labels_BS: torch.Tensor) -> torch.Tensor:
    """Sum of the cross-entropy over the labelled positions (fp32)."""
    return F.cross_entropy(logits_BSV.float().flatten(0, 1), labels_BS.flatten(), ignore_index=IGNORE, reduction="sum")


def row_targets(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Target tokens of each row [B]: its non-IGNORE labels."""
    return (batch["labels"] != IGNORE).sum(1)


def count_targets(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Target tokens of a micro-batch: its non-IGNORE labels."""
    return row_targets(batch).sum()


def mtp_targets(labels_BS: torch.Tensor) -> torch.Tensor:
    """labels[:, t] is token t+1; MTP at t predicts token t+2 = labels[:, t+1]. The last position has none."""
    return torch.cat((labels_BS[:, 1:], torch.full_like(labels_BS[:, :1], IGNORE)), dim=1)


def lm_batch(rows_BS1: torch.Tensor, doc_start_BS1: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """A pre-training micro-batch from packed rows of seq+1 tokens: every position has a target.

    With `doc_start_BS1` (the loader's mask of document starts; `data.document_mask=true`) the documents of a row
    are kept apart: `positions` restart at each document (and at the row's first token, which may continue a
    document of the previous row), and no target crosses into the next document, so a document's last token
    (its EOS) has no next-token target and the two last positions no MTP target."""
    labels = rows_BS1[:, 1:]
    batch = {"input_ids": rows_BS1[:, :-1], "labels": labels, "next_ids": labels, "mtp_labels": mtp_targets(labels)}
    if doc_start_BS1 is None:
        return batch
    starts_next_BS = doc_start_BS1[:, 1:]  # token t+1 opens a document
    ignore = torch.full_like(labels, IGNORE)
    batch["labels"] = torch.where(starts_next_BS, ignore, labels)
    batch["mtp_labels"] = torch.where(starts_next_BS, ignore, mtp_targets(batch["labels"]))
    batch["positions"] = positions_from_starts(doc_start_BS1[:, :-1])
    return batch


def training_batch(rows: dict[str, torch.Tensor], document_mask: bool) -> dict[str, torch.Tensor]:
    """The micro-batch of one loader batch ({"tokens", "doc_start"}), documents kept apart or not."""
    return lm_batch(rows["tokens"], rows["doc_start"] if document_mask else None)


def positions_from_starts(starts_BS: torch.Tensor) -> torch.Tensor:
    """Each token's position inside its document, from a mask of document starts (column 0 always starts one)."""
    t_S = torch.arange(starts_BS.shape[1], device=starts_BS.device)
    first_BS = torch.where(starts_BS, t_S, torch.zeros_like(t_S)).cummax(1).values
    return t_S - first_BS


@dataclass(frozen=True)
class NextTokenLoss:
    """CE of the next token plus `mtp_weight` · CE of the MTP target (token t+2), both summed over the positions that
    have one and divided by the number of next-token targets: DeepSeek-V3's L_MTP = -1/T Σ_{i=2+k}^{T+1} log P_i
    (the MTP sum has one term fewer per row, its normaliser is the same T). Logged: `lm_loss`, `mtp_loss` (0 without
    an MTP block)."""

    mtp_weight: float = 0.0
    metric_names: tuple[str, ...] = ("lm_loss", "mtp_loss")

    def __call__(self, out: ModelOutput, batch: dict[str, torch.Tensor]) -> LossOutput:
        ce = token_ce_sum(out.logits, batch["labels"])
        loss, mtp = ce, ce.new_zeros(())
        if out.mtp_logits is not None:
            mtp = token_ce_sum(out.mtp_logits, batch["mtp_labels"])
            loss = loss + self.mtp_weight * mtp
        return LossOutput(loss, count_targets(batch), {"lm_loss": ce.detach(), "mtp_loss": mtp.detach()})
