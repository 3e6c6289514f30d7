"""Training losses: next-token CE and the MTP targets (position t predicts token t+2). The trainer weights and sums them."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsv4train.models.sequence import WHOLE_SEQUENCE, WholeSequence

IGNORE = -100


def lm_loss(logits_BSV: torch.Tensor, labels_BS: torch.Tensor, seq: WholeSequence = WHOLE_SEQUENCE) -> torch.Tensor:
    """Mean cross-entropy over the labelled positions (of the whole sequence under context parallelism)."""
    if seq.shards == 1:
        return F.cross_entropy(logits_BSV.float().flatten(0, 1), labels_BS.flatten(), ignore_index=IGNORE)
    total = F.cross_entropy(logits_BSV.float().flatten(0, 1), labels_BS.flatten(), ignore_index=IGNORE,
                            reduction="sum")
    return seq.share(total) / seq.total((labels_BS != IGNORE).sum()).clamp_min(1)


def mtp_targets(labels_BS: torch.Tensor) -> torch.Tensor:
    """labels[:, t] is token t+1; MTP at t predicts token t+2 = labels[:, t+1]. The last position has none."""
    return torch.cat((labels_BS[:, 1:], torch.full_like(labels_BS[:, :1], IGNORE)), dim=1)
