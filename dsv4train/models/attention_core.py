"""One softmax over sliding-window keys, compressed keys and a per-head sink (arch ref §3.7). The window part
never builds an S x S tensor; the dense compressed part does build S x S/ratio scores (a quarter of S^2 on CSA):

- window: queries in blocks of W = window; block b attends to the keys of blocks b-1 and b (2W keys) with a
  fixed relative mask, so scores are [B, S, H, 2W].
- compressed, dense: all T = S // ratio entries with the causal rule entry i visible iff i < (t+1) // ratio
  (scores [B, S, H, T]; T is S/4 or S/128: O(S^2/ratio), which is why CSA switches to the sparse mode).
- compressed, sparse: the k entries picked by the indexer, gathered per query (scores [B, S, H, k]).
The three score blocks and the sink column share one fp32 softmax; the sink column is then dropped.
Rows packed with several documents (models/documents.py) add a per-query lower bound on both parts: the window's
keys from the query's document start on, the compressed entries from its document's first entry on."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class CompressedKeys:
    """Compressed entries for one layer: either all of them with a causal limit, or gathered top-k."""

    kv_BTC: torch.Tensor
    n_visible_S: torch.Tensor  # one past the last entry each query may see: floor((t+1)/ratio); [S] or [B, S]
    topk_BSK: torch.Tensor | None = None  # indexer picks (-1 = none); None = dense
    first_visible_BS: torch.Tensor | None = None  # packed documents: the first entry each query may see

    def hidden(self) -> torch.Tensor:
        """Which entries each query may not use: [S, T], or [B, S, T] with packed documents."""
        entry_T = torch.arange(self.kv_BTC.shape[1], device=self.kv_BTC.device)
        hidden = entry_T >= self.n_visible_S.unsqueeze(-1)
        if self.first_visible_BS is not None:
            hidden = hidden | (entry_T < self.first_visible_BS.unsqueeze(-1))
        return hidden


def _window_blocks(kv_ext_BXC: torch.Tensor, window: int) -> tuple[torch.Tensor, int]:
    """Keys for each query block: [B, nb, 2W, C] (blocks b-1 and b). `kv_ext_BXC` is [B, W + S, C]: the W keys
    before the queries (zeros at the start of a sequence), then the S keys of the queries' own positions."""
    B, X, C = kv_ext_BXC.shape
    S = X - window
    nb = -(-S // window)
    padded = F.pad(kv_ext_BXC, (0, 0, 0, nb * window - S))
    return torch.cat((padded[:, :-window].view(B, nb, window, C), padded[:, window:].view(B, nb, window, C)), 2), nb


def _window_mask(nb: int, window: int, device: torch.device, sees_previous: bool) -> torch.Tensor:
    """Additive mask [nb, W, 2W]: query i of a block sees key j iff i < j <= i + W; block 0's previous block is
    hidden at the start of a sequence (seen when the keys before a sequence shard were given)."""
    i = torch.arange(window, device=device).view(-1, 1)
    j = torch.arange(2 * window, device=device).view(1, -1)
    ok = ((j > i) & (j <= i + window)).expand(nb, -1, -1).clone()
    if not sees_previous:
        ok[0, :, :window] = False
    return torch.zeros(ok.shape, device=device).masked_fill(~ok, float("-inf"))


def _other_document_keys(first_key_BS: torch.Tensor, nb: int, window: int) -> torch.Tensor:
    """[B, nb, W, 2W] bool: key j of query block b (row position (b-1)W + j) lies before the query's document."""
    B, S = first_key_BS.shape
    first_BNW = F.pad(first_key_BS, (0, nb * window - S)).view(B, nb, window, 1)
    key_pos_N1K = (torch.arange(nb, device=first_key_BS.device).view(nb, 1, 1) - 1) * window + torch.arange(
        2 * window, device=first_key_BS.device
    )
    return key_pos_N1K < first_BNW


def hybrid_attention(
    q_BSHC: torch.Tensor,
    kv_ext_BXC: torch.Tensor,
    sink_H: torch.Tensor,
    window: int,
    comp: CompressedKeys | None,
    sees_previous: bool = False,
    first_key_BS: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Returns (output [B, S, H, C], probabilities on the compressed keys [B, S, H, T or k] or None).

    kv_ext_BXC: [B, W + S, C], the W keys before the queries then their own S keys. At the start of a sequence
    the first W are padding and hidden; under context parallelism they are the previous shard's last W keys and
    `sees_previous` is True. first_key_BS (packed documents): the first row position each query may see."""
    B, S, H, C = q_BSHC.shape
    scale = C**-0.5
    keys_BNKC, nb = _window_blocks(kv_ext_BXC, window)
    q_blk = F.pad(q_BSHC, (0, 0, 0, 0, 0, nb * window - S)).view(B, nb, window * H, C)
    win = torch.matmul(q_blk, keys_BNKC.transpose(-1, -2)) * scale  # [B, nb, W*H, 2W]
    mask = _window_mask(nb, window, q_BSHC.device, sees_previous)
    win = win.view(B, nb, window, H, 2 * window) + mask.view(nb, window, 1, 2 * window).to(win.dtype)
    if first_key_BS is not None:
        win = win.masked_fill(_other_document_keys(first_key_BS, nb, window).unsqueeze(3), float("-inf"))
    parts = [win.view(B, nb * window, H, 2 * window)[:, :S]]

    gathered = None
    if comp is not None and comp.kv_BTC.shape[1] > 0:
        T = comp.kv_BTC.shape[1]
        if comp.topk_BSK is None:
            cs = torch.matmul(q_BSHC.reshape(B, S * H, C), comp.kv_BTC.transpose(-1, -2)).view(B, S, H, T) * scale
            cs = cs.masked_fill(comp.hidden().unsqueeze(-2), float("-inf"))
        else:
            idx = comp.topk_BSK
            k = idx.shape[-1]
            flat = idx.clamp_min(0) + (torch.arange(B, device=idx.device) * T).view(B, 1, 1)
            gathered = comp.kv_BTC.reshape(B * T, C).index_select(0, flat.view(-1)).view(B, S, k, C)  # grad: index_add
            cs = torch.matmul(q_BSHC, gathered.transpose(-1, -2)) * scale  # [B, S, H, k]
            cs = cs.masked_fill((idx < 0).unsqueeze(2), float("-inf"))
        parts.append(cs)
    parts.append(sink_H.to(win.dtype).view(1, 1, H, 1).expand(B, S, H, 1))

    probs = torch.cat(parts, dim=-1).softmax(dim=-1, dtype=torch.float32).to(kv_ext_BXC.dtype)
    p_win = probs[..., : 2 * window]
    p_win = F.pad(p_win, (0, 0, 0, 0, 0, nb * window - S)).view(B, nb, window * H, 2 * window)
    out = torch.matmul(p_win, keys_BNKC).view(B, nb * window, H, C)[:, :S]
    p_comp = None
    if len(parts) == 3:
        p_comp = probs[..., 2 * window : -1]
        if gathered is None:
            out = out + torch.matmul(p_comp.reshape(B, S * H, -1), comp.kv_BTC).view(B, S, H, C)
        else:
            out = out + torch.matmul(p_comp, gathered)
    return out, p_comp


def decode_attention(
    q_RHC: torch.Tensor,
    window_RWC: torch.Tensor,
    window_hidden_RW: torch.Tensor,
    comp_RKC: torch.Tensor | None,
    comp_hidden_RK: torch.Tensor | None,
    sink_H: torch.Tensor,
) -> torch.Tensor:
    """One query per row (generation, models/kv_cache.py): the same single softmax over its window keys, its
    compressed keys (all entries of the row, or the indexer's picks) and the sink as `hybrid_attention`, with the
    keys given per row and `*_hidden` marking the places a query may not use. Returns [R, H, C]."""
    R, H, C = q_RHC.shape
    scale = C**-0.5
    win = torch.einsum("rhc,rwc->rhw", q_RHC, window_RWC) * scale
    parts = [win.masked_fill(window_hidden_RW.unsqueeze(1), float("-inf"))]
    if comp_RKC is not None:
        cs = torch.einsum("rhc,rkc->rhk", q_RHC, comp_RKC) * scale
        parts.append(cs.masked_fill(comp_hidden_RK.unsqueeze(1), float("-inf")))
    parts.append(sink_H.to(win.dtype).view(1, H, 1).expand(R, H, 1))
    probs = torch.cat(parts, dim=-1).softmax(dim=-1, dtype=torch.float32).to(window_RWC.dtype)
    W = window_RWC.shape[1]
    out = torch.einsum("rhw,rwc->rhc", probs[..., :W], window_RWC)
    if comp_RKC is not None:
        out = out + torch.einsum("rhk,rkc->rhc", probs[..., W:-1], comp_RKC)
    return out
