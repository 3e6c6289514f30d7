"""What a module needs to know about the part of the sequence it sees. On one process (and under dp/ep/tp/pp) it
sees every token of its rows: `WholeSequence`, where every method is the identity. Context parallelism
(dsv4train/parallel/cp.py) hands each rank one contiguous shard of the sequence and replaces this object on the
modules that look across tokens: attention (sliding window, compressors, indexer), the MoE balance loss, and the
training losses.

Loss convention: a loss that is a sum over the whole sequence divided by a whole-sequence count is computed on
each shard as `share(local sum) / total(local count)`, so that the mean over the shards (what data-parallel
averaging takes) is the whole-sequence loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class WholeSequence:
    shards = 1

    def offset(self, length: int) -> int:
        """Position of this shard's first token when each shard holds `length` tokens."""
        return 0

    has_previous = False  # whether tokens come before this shard

    def with_previous(self, t_BSX: torch.Tensor, n: int) -> torch.Tensor:
        """[B, n + S, X]: the previous shard's last `n` rows (dim 1) of the same tensor, then `t_BSX`. Zeros where
        nothing comes before (`has_previous` False); the caller masks them."""
        return F.pad(t_BSX, (0, 0, n, 0))

    def gather(self, t_BTX: torch.Tensor) -> torch.Tensor:
        """Every shard's `t_BTX` concatenated along dim 1 in sequence order (with gradient)."""
        return t_BTX

    def total(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of a count over the shards (no gradient)."""
        return t

    def share(self, t: torch.Tensor) -> torch.Tensor:
        """This shard's part of a whole-sequence sum, scaled so that the mean over shards is that sum."""
        return t

    def shard(self, t_BS: torch.Tensor) -> torch.Tensor:
        """This shard's piece (dim 1) of a [B, S, ...] tensor of whole rows, such as token ids or labels. Cut after
        anything that looks across positions (the label and MTP-target shifts)."""
        return t_BS


WHOLE_SEQUENCE = WholeSequence()
