"""Rows packed with several documents (SFT, and pre-training with `data.document_mask=true`): attention never
crosses a document boundary, on any path, and positions restart at every document.

A packed row is described by `positions_BS`, each token's position inside its document: a 0 starts a document
(`[A A A B B C]` has positions `[0 1 2 0 1 0]`), what transformers' packed-sequence collators pass as
`position_ids`. From it:

- sliding window: a query sees keys of its own document only (`first_visible_BS`, the row index of its
  document's first token), inside the usual window of W keys; the blocked [S, 2W] path stays, with a per-query
  lower bound instead of an S x S mask.
- compressors (CSA, HCA and the indexer's): compression blocks are laid out per document, starting at the
  document's first token, exactly as if the document were a row of its own. An entry therefore never pools two
  documents: no block straddles a boundary, because blocks do not run across one. A document's trailing partial
  block (fewer than `ratio` tokens) is not compressed, as at the end of a row; its tokens are still seen through
  the sliding window. CSA's first block of a document has no previous block (its overlap slots get no weight, as
  at the start of a row). Entries are rotated at their position inside the document.
- compressed attention and the lightning indexer: the entries of a row are stored document after document, so
  the entries a query may use are one contiguous range `[first, end)` of the row's entries: those of its own
  document that are complete at its position (the causal rule floor((t+1)/ratio) with t counted from the
  document's start). The indexer's top-k picks inside that range only.
- MTP: at a document's last token the MTP input (token t+1) is the token itself, the same dummy a row's last
  position gets, so nothing of the next document enters.

Context parallelism does not support packed documents yet (attention refuses the combination)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class DocumentBlocks:
    """The compression blocks of a packed row for one ratio m; T = most complete blocks in any row of the batch
    (rows with fewer are padded with entries that no query can see)."""

    token_index_BTM: torch.Tensor  # row index of each block's m tokens
    first_in_document_BT: torch.Tensor  # bool: the block opens its document (CSA: no previous block)
    position_BT: torch.Tensor  # the block's first token's position in its document (= m * block number)
    first_visible_BS: torch.Tensor  # first entry a query may use: its document's first block
    end_visible_BS: torch.Tensor  # one past the last entry a query may use


@dataclass
class Documents:
    positions_BS: torch.Tensor
    first_token_BS: torch.Tensor  # row index of the first token of each token's document
    last_in_document_BS: torch.Tensor  # bool: the token ends its document
    _blocks: dict[int, DocumentBlocks] = field(default_factory=dict, repr=False)

    @staticmethod
    def from_positions(positions_BS: torch.Tensor, input_ids_BS: torch.Tensor) -> Documents:
        check_positions(positions_BS, input_ids_BS)
        B, S = positions_BS.shape
        t_S = torch.arange(S, device=positions_BS.device)
        starts_next = torch.cat((positions_BS[:, 1:] == 0, positions_BS.new_ones(B, 1, dtype=torch.bool)), 1)
        return Documents(positions_BS, t_S - positions_BS, starts_next)

    def blocks(self, ratio: int) -> DocumentBlocks:
        """Computed once per forward and ratio, shared by every layer (and the indexer) of that ratio."""
        if ratio not in self._blocks:
            self._blocks[ratio] = _document_blocks(self, ratio)
        return self._blocks[ratio]


def check_positions(positions_BS: torch.Tensor, input_ids_BS: torch.Tensor) -> None:
    """Positions must describe whole documents: same shape as the ids, integers, 0 in the first column, and each
    next position either one more (same document) or 0 (a new one)."""
    if positions_BS.shape != input_ids_BS.shape:
        raise ValueError(
            f"positions must have the shape of input_ids {tuple(input_ids_BS.shape)}, got {tuple(positions_BS.shape)}"
        )
    if positions_BS.dtype.is_floating_point or positions_BS.dtype == torch.bool:
        raise ValueError(f"positions must be an integer tensor, got {positions_BS.dtype}")
    if bool((positions_BS[:, 0] != 0).any()):
        raise ValueError("positions must be 0 at the first token of every row (a row starts a document)")
    step = positions_BS[:, 1:] - positions_BS[:, :-1]
    bad = (step != 1) & (positions_BS[:, 1:] != 0)
    if bool(bad.any()):
        b, t = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"positions must count 0, 1, 2, ... inside each document and restart at 0 for the next one; row {b} "
            f"goes {int(positions_BS[b, t])} -> {int(positions_BS[b, t + 1])} at column {t + 1}"
        )


def _document_blocks(docs: Documents, m: int) -> DocumentBlocks:
    pos_BS = docs.positions_BS
    B, S = pos_BS.shape
    device = pos_BS.device
    t_S = torch.arange(S, device=device)
    last_token_BS = _document_last_token(docs.last_in_document_BS)
    remaining_BS = last_token_BS - t_S + 1  # tokens from here to the end of the document
    opens_block_BS = (pos_BS % m == 0) & (remaining_BS >= m)
    blocks_through_BS = opens_block_BS.long().cumsum(1)  # blocks opened up to and including t
    T = int(blocks_through_BS[:, -1].max()) if S else 0
    # the block opened at t is entry blocks_through[t] - 1; every other t writes to a scratch column T
    column_BS = torch.where(opens_block_BS, blocks_through_BS - 1, torch.full_like(blocks_through_BS, T))
    start_BT = torch.zeros(B, T + 1, dtype=torch.long, device=device).scatter_(1, column_BS, t_S.expand(B, S))[:, :T]
    blocks_before_BS = blocks_through_BS - opens_block_BS.long()
    first_visible_BS = blocks_before_BS.gather(1, docs.first_token_BS)
    return DocumentBlocks(
        token_index_BTM=start_BT.unsqueeze(-1) + torch.arange(m, device=device),
        first_in_document_BT=pos_BS.gather(1, start_BT) == 0,
        position_BT=pos_BS.gather(1, start_BT),
        first_visible_BS=first_visible_BS,
        end_visible_BS=first_visible_BS + torch.div(pos_BS + 1, m, rounding_mode="floor"),
    )


def _document_last_token(last_in_document_BS: torch.Tensor) -> torch.Tensor:
    """Row index of the last token of each token's document: the first document end at or after t."""
    B, S = last_in_document_BS.shape
    t_S = torch.arange(S, device=last_in_document_BS.device)
    ends_BS = torch.where(last_in_document_BS, t_S.expand(B, S), torch.full((B, S), S, device=t_S.device))
    return ends_BS.flip(1).cummin(1).values.flip(1)


def gather_tokens(x_BSD: torch.Tensor, token_index_BTM: torch.Tensor) -> torch.Tensor:
    """The tokens of every block, block after block: [B, T * m, D]."""
    B, T, m = token_index_BTM.shape
    return x_BSD.gather(1, token_index_BTM.reshape(B, T * m, 1).expand(-1, -1, x_BSD.shape[-1]))
