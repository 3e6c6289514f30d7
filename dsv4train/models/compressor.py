"""KV compressors (arch ref §3.4). One entry per `ratio` tokens, softmax-gated per channel.

HCA (overlap=False): entry i pools tokens [ratio*i, ratio*(i+1)).
CSA (overlap=True): projections are 2*c wide; entry i pools 2*ratio slots: the FIRST half `[..., :c]` of the
previous block's tokens and the SECOND half `[..., c:]` of its own block's tokens (the reference layout).
Entry 0's previous-block slots are empty (value 0, gate -inf) at the start of a sequence; on a later shard of a
context-parallel sequence they hold the previous shard's last block. A tail shorter than `ratio` is dropped.
Each shard pools its own blocks; the entries of all shards are then gathered (models/sequence.py).
In a row packed with several documents the blocks are laid out per document (models/documents.py)."""

from __future__ import annotations

import torch
from torch import nn

from dsv4train.models.documents import Documents, gather_tokens
from dsv4train.models.norms import RMSNorm
from dsv4train.models.rope import apply_rope, rope_cos_sin
from dsv4train.models.sequence import WHOLE_SEQUENCE, WholeSequence


class Compressor(nn.Module):
    def __init__(self, dim: int, head_dim: int, ratio: int, overlap: bool, eps: float):
        super().__init__()
        self.head_dim, self.ratio, self.overlap = head_dim, ratio, overlap
        width = (2 if overlap else 1) * head_dim
        self.wkv = nn.Linear(dim, width, bias=False)
        self.wgate = nn.Linear(dim, width, bias=False)
        self.ape = nn.Parameter(torch.zeros(ratio, width))
        self.norm = RMSNorm(head_dim, eps)

    def forward(
        self,
        x_BSD: torch.Tensor,
        freqs: tuple[float, ...],
        seq: WholeSequence = WHOLE_SEQUENCE,
        docs: Documents | None = None,
    ) -> torch.Tensor:
        """[B, S, d] -> compressed entries [B, S // ratio, head_dim], normalised and rotated at position ratio*i
        (of the whole sequence: under context parallelism S is this shard's length and the entries of every
        shard are returned). With packed documents: each document's complete blocks, document after document,
        rotated at their position inside the document."""
        B, S, _ = x_BSD.shape
        m, c = self.ratio, self.head_dim
        T = S // m if docs is None else docs.blocks(m).token_index_BTM.shape[1]
        if T == 0:
            return x_BSD.new_zeros(B, 0, c)
        if docs is None:
            x = x_BSD[:, : T * m]
            block_T = torch.arange(T, device=x_BSD.device)
            opens_document_BT = (block_T == 0) & (not seq.has_previous)  # [T]: the same for every row
            positions_BT = (block_T + seq.offset(T)) * m
        else:
            blocks = docs.blocks(m)
            x = gather_tokens(x_BSD, blocks.token_index_BTM)
            opens_document_BT, positions_BT = blocks.first_in_document_BT, blocks.position_BT
        kv = self.wkv(x).view(B, T, m, -1)
        gate = self.wgate(x).view(B, T, m, -1) + self.ape.to(x.dtype)
        if self.overlap:
            kv, gate = self._with_previous_block(kv, gate, seq, opens_document_BT)
        return seq.gather(self.pool(kv, gate, positions_BT, freqs))

    def pool(
        self, kv_BTMW: torch.Tensor, gate_BTMW: torch.Tensor, positions_BT: torch.Tensor, freqs: tuple[float, ...]
    ) -> torch.Tensor:
        """Entries [B, T, c] from each block's slots (m, or CSA's 2m with `overlap_slots`): the per-channel softmax
        of the gates over the slots, the weighted sum, the norm and the rotation at the block's position."""
        weights = gate_BTMW.softmax(dim=2, dtype=torch.float32).to(kv_BTMW.dtype)
        pooled = self.norm((kv_BTMW * weights).sum(dim=2))
        cos, sin = rope_cos_sin(freqs, positions_BT)
        return apply_rope(pooled, cos, sin)

    def project(self, x_RD: torch.Tensor, position_R: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One token per row at `position_R` (decoding): its slot projections (kv [R, W], gate with the position
        bias of its place in the block [R, W]), what `forward` computes for every token of a block."""
        ape = self.ape.to(x_RD.dtype)[position_R % self.ratio]
        return self.wkv(x_RD), self.wgate(x_RD) + ape

    def _with_previous_block(
        self, kv_BTMW: torch.Tensor, gate_BTMW: torch.Tensor, seq: WholeSequence, opens_document_BT: torch.Tensor
    ):
        """CSA: block i's 2m slots are the first half of block i-1's projections, then the second half of its own.
        A block that opens a document (or the sequence) has no previous block: those slots get no weight."""
        B, T, m, _ = kv_BTMW.shape
        c = self.head_dim
        first_half = torch.cat((kv_BTMW[..., :c], gate_BTMW[..., :c].to(kv_BTMW.dtype)), -1).view(B, T * m, 2 * c)
        prev_BTMX = seq.with_previous(first_half, m)[:, : T * m].view(B, T, m, 2 * c)
        return overlap_slots(
            prev_BTMX[..., :c], prev_BTMX[..., c:].to(gate_BTMW.dtype), kv_BTMW, gate_BTMW, opens_document_BT
        )


def overlap_slots(
    prev_kv: torch.Tensor, prev_gate: torch.Tensor, kv: torch.Tensor, gate: torch.Tensor, opens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """CSA's 2m slots of each block [..., 2m, c]: the previous block's first-half projections (`prev_*`, [..., m, c]),
    then the block's own second half (`kv`, `gate`: [..., m, 2c]). Where `opens` (the block starts the sequence or
    its document; shape of the leading dims) the previous slots get gate -inf, no weight."""
    c = prev_kv.shape[-1]
    opens_11 = opens[..., None, None]
    empty_11 = torch.zeros(opens_11.shape, device=kv.device).masked_fill(opens_11, float("-inf"))
    return (
        torch.cat((prev_kv, kv[..., c:]), dim=-2),
        torch.cat((prev_gate + empty_11.to(prev_gate.dtype), gate[..., c:]), dim=-2),
    )


def visible_entries(positions: torch.Tensor, ratio: int) -> torch.Tensor:
    """Number of compressed entries a query at 0-based position t may use: floor((t+1)/ratio) (arch ref §3.5)."""
    return torch.div(positions + 1, ratio, rounding_mode="floor")
