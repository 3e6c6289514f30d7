"""The state generation keeps per attention layer, as the architecture needs it (arch ref §3, §10.2), for a fixed
number of sequence slots, and the cached forward's instructions (`CacheStep`).

Per layer and slot:

- `window`: a ring of the last W raw K=V entries (after kv_norm and RoPE), position p at index p % W. Every
  layer type has the sliding window.
- `compressed.entries` (CSA, HCA): the compressed entries, entry i at index i, complete when block i closes (the token
  at position m(i+1) - 1 arrives), so a query at t sees entries [0, (t+1) // m) — the causal rule of training.
  Decode re-pools each row's open block at every step (no data-dependent branch on which rows close a block, so
  a decode step has static shapes and compiles to one graph); the entry of an open block is never visible, and the
  pooling of its closing step, over the whole block, is the one that stays. Room for ceil(max_len / m) entries.
- `block_kv_NPX` / `block_gate_NPX` (CSA, HCA): the compressor's projections (kv, and gate with its position bias)
  of the last P tokens, a ring: P = m for HCA (the open block), P = 2m for CSA (its entry i also pools the first
  half of block i-1's projections). This carry-over state is what closes the next entry.
- CSA only, the lightning indexer's own compressor: `index.entries` (its keys) and its ring.
- Entries and keys live in a store (models/kv_store.py): as computed, or FP8/FP4 (`cache_dtype="fp8"`).
- mHC streams and the MoE need nothing: every token's are its own.

`prefill_*` functions copy what a full forward over right-padded prompts computed into the slots (each row's real
tokens only: entries of complete blocks, the last W window entries, the projections of the last P tokens);
`append_*` functions add one decoded token per row."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dsv4train.config.model import ModelConfig
from dsv4train.models.compressor import Compressor, overlap_slots
from dsv4train.models.kv_store import CACHE_DTYPES, Fp4KeyStore, Fp8EntryStore, PlainStore

Store = PlainStore | Fp8EntryStore | Fp4KeyStore


@dataclass
class CompressorState:
    """One compressor's entries (a store, models/kv_store.py) and carry-over ring (compute dtype) for every slot."""

    entries: Store
    block_kv_NPX: torch.Tensor
    block_gate_NPX: torch.Tensor


@dataclass
class LayerCache:
    window: Store
    compressed: CompressorState | None = None  # CSA, HCA
    index: CompressorState | None = None  # CSA: the indexer's keys

    def tensors(self) -> list[torch.Tensor]:
        """Everything the layer's cache holds, carry-over rings included."""
        out = self.window.tensors()
        for state in (self.compressed, self.index):
            if state is not None:
                out += [*state.entries.tensors(), state.block_kv_NPX, state.block_gate_NPX]
        return out

    def entry_tensors(self) -> list[torch.Tensor]:
        """The window and the compressed entries and keys: what `models/flops.py`'s KV formula counts."""
        out = self.window.tensors()
        for state in (self.compressed, self.index):
            if state is not None:
                out += state.entries.tensors()
        return out


def _compressor_state(n_slots: int, comp: Compressor, entries: Store, dtype, device) -> CompressorState:
    ring = 2 * comp.ratio if comp.overlap else comp.ratio
    width = comp.wkv.out_features
    return CompressorState(
        entries=entries,
        block_kv_NPX=torch.zeros(n_slots, ring, width, dtype=dtype, device=device),
        block_gate_NPX=torch.zeros(n_slots, ring, width, dtype=dtype, device=device),
    )


def allocate_layer_caches(
    model: torch.nn.Module,
    n_slots: int,
    max_len: int,
    dtype: torch.dtype,
    device: torch.device,
    cache_dtype: str = "model",
) -> list[LayerCache]:
    """Zeroed caches for every main layer of `model` (a DSV4Model), `n_slots` sequences of up to `max_len` tokens.
    cache_dtype "model": entries in `dtype`; "fp8": main entries FP8 E4M3 + BF16 RoPE dims, indexer keys FP4."""
    if cache_dtype not in CACHE_DTYPES:
        raise ValueError(f"cache_dtype must be one of {CACHE_DTYPES}, got {cache_dtype!r}")
    cfg: ModelConfig = model.cfg

    def entries(n: int) -> Store:
        if cache_dtype == "fp8":
            return Fp8EntryStore(n_slots, n, cfg.head_dim, cfg.rope_head_dim, dtype, device)
        return PlainStore(n_slots, n, cfg.head_dim, dtype, device)

    def index_keys(n: int) -> Store:
        if cache_dtype == "fp8":
            return Fp4KeyStore(n_slots, n, cfg.index_head_dim, dtype, device)
        return PlainStore(n_slots, n, cfg.index_head_dim, dtype, device)

    caches = []
    for layer in model.layers:
        attn = layer.attn
        cache = LayerCache(entries(cfg.window_size))
        if attn.layer_type != "swa":
            n = -(-max_len // attn.compressor.ratio)  # a decode step writes its open block's entry
            cache.compressed = _compressor_state(n_slots, attn.compressor, entries(n), dtype, device)
        if attn.layer_type == "csa":
            n = -(-max_len // attn.indexer.compressor.ratio)
            cache.index = _compressor_state(n_slots, attn.indexer.compressor, index_keys(n), dtype, device)
        caches.append(cache)
    return caches


@dataclass
class CacheStep:
    """One cached forward of the model: rows are sequences in cache slots `slots_R`.

    Prefill (`lengths_R` set): input [R, L] right-padded prompts, row r's real tokens are its first lengths_R[r];
    the forward is the ordinary full one (causal, so no real token sees padding) and copies its state into the
    slots. Decode (`positions_R` set): input [R, 1], one token per row at its position; the layers read and extend
    the slots. `routes` collects each MoE layer's expert choices [R, S, k], in layer order. A prefill returns the
    logits at each row's last real position only ([R, 1, V]), or at every position with `all_logits`."""

    layers: list[LayerCache]
    slots_R: torch.Tensor
    lengths_R: torch.Tensor | None = None
    positions_R: torch.Tensor | None = None
    all_logits: bool = False
    routes: list[torch.Tensor] = field(default_factory=list)

    def __post_init__(self):
        if (self.lengths_R is None) == (self.positions_R is None):
            raise ValueError("a CacheStep is either a prefill (lengths_R) or a decode step (positions_R)")

    @property
    def prefill(self) -> bool:
        return self.lengths_R is not None

    def layer(self, i: int) -> LayerStep:
        return LayerStep(self, self.layers[i])


@dataclass
class LayerStep:
    step: CacheStep
    cache: LayerCache

    @property
    def layer_window(self) -> int:
        return self.cache.window.tensors()[0].shape[1]


# ------------------------------------------------------------------------------------------------ prefill
def _real_positions(lengths_R: torch.Tensor, last: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions [R, last] = the last `last` positions of each row, valid [R, last]: the position exists)."""
    p_RL = lengths_R.unsqueeze(1) - last + torch.arange(last, device=lengths_R.device)
    return p_RL, p_RL >= 0


def prefill_window(lc: LayerStep, kv_BSC: torch.Tensor) -> None:
    step = lc.step
    W = lc.layer_window
    p_RW, ok_RW = _real_positions(step.lengths_R, W)
    r, j = ok_RW.nonzero(as_tuple=True)
    p = p_RW[r, j]
    lc.cache.window.write(step.slots_R[r], p % W, kv_BSC[r, p])


def prefill_compressor(
    lc: LayerStep, state: CompressorState, comp: Compressor, x_BSD: torch.Tensor, entries_BTC: torch.Tensor
) -> None:
    """The entries of each row's complete blocks and the projections of its last P tokens."""
    step = lc.step
    slots_R, lengths_R = step.slots_R, step.lengths_R
    T = entries_BTC.shape[1]
    r, t = (torch.arange(T, device=lengths_R.device) < (lengths_R // comp.ratio).unsqueeze(1)).nonzero(as_tuple=True)
    state.entries.write(slots_R[r], t, entries_BTC[r, t])
    P = state.block_kv_NPX.shape[1]
    p_RP, ok_RP = _real_positions(lengths_R, P)
    r, j = ok_RP.nonzero(as_tuple=True)
    p = p_RP[r, j]
    kv_MX, gate_MX = comp.project(x_BSD[r, p], p)
    state.block_kv_NPX[slots_R[r], p % P] = kv_MX
    state.block_gate_NPX[slots_R[r], p % P] = gate_MX


# ------------------------------------------------------------------------------------------------ decode
def append_window(lc: LayerStep, kv_RC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Write each row's new K=V entry; returns (the row's window keys [R, W, C], hidden [R, W]: ring places whose
    position would be before 0). Ring place j holds position t - ((t - j) mod W), always > t - W."""
    step = lc.step
    W = lc.layer_window
    t_R = step.positions_R
    lc.cache.window.write(step.slots_R, t_R % W, kv_RC)
    j_W = torch.arange(W, device=t_R.device)
    held_RW = t_R.unsqueeze(1) - torch.remainder(t_R.unsqueeze(1) - j_W, W)
    return lc.cache.window.read(step.slots_R), held_RW < 0


def append_compressor(
    lc: LayerStep, state: CompressorState, comp: Compressor, x_RD: torch.Tensor, freqs: tuple[float, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Add each row's token to the compressor ring and pool the row's open block into its entry (complete, and
    visible, once the block's last token has arrived; before that the not-yet-written ring places hold older
    tokens and the entry stays hidden). Returns (every entry of the row's slot [R, T, c], hidden [R, T]: entries
    not complete at the row's position). Static shapes: no host sync, no branch on the data."""
    step = lc.step
    slots_R, t_R = step.slots_R, step.positions_R
    m, P = comp.ratio, state.block_kv_NPX.shape[1]
    kv_RX, gate_RX = comp.project(x_RD, t_R)
    state.block_kv_NPX[slots_R, t_R % P] = kv_RX
    state.block_gate_NPX[slots_R, t_R % P] = gate_RX
    block_R = t_R // m
    own_RM = (block_R * m % P).unsqueeze(1) + torch.arange(m, device=t_R.device)
    kv = state.block_kv_NPX[slots_R.unsqueeze(1), own_RM]
    gate = state.block_gate_NPX[slots_R.unsqueeze(1), own_RM]
    if comp.overlap:
        c = comp.head_dim
        prev_RM = torch.remainder((block_R - 1) * m, P).unsqueeze(1) + torch.arange(m, device=t_R.device)
        prev_kv = state.block_kv_NPX[slots_R.unsqueeze(1), prev_RM][..., :c]
        prev_gate = state.block_gate_NPX[slots_R.unsqueeze(1), prev_RM][..., :c]
        kv, gate = overlap_slots(prev_kv, prev_gate, kv, gate, block_R == 0)
    entry_R1C = comp.pool(kv.unsqueeze(1), gate.unsqueeze(1), (block_R * m).unsqueeze(1), freqs)
    state.entries.write(slots_R, block_R, entry_R1C[:, 0])
    entries_RTC = state.entries.read(slots_R)
    hidden_RT = torch.arange(entries_RTC.shape[1], device=t_R.device) >= ((t_R + 1) // m).unsqueeze(1)
    return entries_RTC, hidden_RT
