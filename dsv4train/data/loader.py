"""A stateful, deterministic loader over a prepared folder: blend datasets, shuffle documents, pack rows.

- Split: a fixed pseudo-random `val_fraction` of each dataset's documents is validation, the rest training. The
  pick depends only on the dataset's name and size (not on data.seed, nor on which datasets are blended), so
  validation losses compare across data orders and mixes, and it is not one corner of the corpus (e.g. the
  alphabetically last files).
- Order: each dataset walks its training documents in a permutation seeded by (data.seed, dataset name, epoch)
  and concatenates them into one token stream; rows of `seq_len + 1` tokens are cut from it (consecutive rows
  share one token, as in megatron's GPT dataset, so every token is a target once). Validation is not shuffled.
- Blend: row r goes to the dataset whose row count lags its weight the most (deterministic, exact proportions
  in the limit; the same greedy rule as megatron's blended-dataset index).
- State: `state_dict()` is a few integers per dataset; `load_state_dict()` continues exactly where it was.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dsv4train.config.data import DataConfig
from dsv4train.config.errors import ConfigError
from dsv4train.data.indexed import open_documents
from dsv4train.data.prepare import MANIFEST

_VAL_SALT = 0x5EED  # fixes the validation pick independently of data.seed


def read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"data.dir={folder}: no {MANIFEST}; create it with `dsv4 data prepare --out {folder} ...`"
        )
    try:
        manifest = json.loads(path.read_text())
        _ = manifest["vocab_size"], manifest["datasets"]
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"data.dir: {path} is not a manifest written by `dsv4 data prepare` ({e!r})") from None
    return manifest


def check_vocab(data_vocab: int, model_vocab: int) -> None:
    """The model must have an embedding row for every token id the data can hold."""
    if data_vocab > model_vocab:
        raise ConfigError(
            f"model.vocab_size: the tokenizer has {data_vocab} tokens but the model only "
            f"{model_vocab}; use a model with model.vocab_size >= {data_vocab} or re-tokenize"
        )


@dataclass
class _Cursor:
    epoch: int = 0
    doc: int = 0  # position in this epoch's document order
    offset: int = 0  # token offset inside that document
    rows: int = 0  # rows taken from this dataset


class _Source:
    """One dataset's document stream for one split."""

    def __init__(self, name: str, prefix: Path, val_fraction: float, split: str, seed: int):
        self.name, self.seed, self.key = name, seed, zlib.crc32(name.encode())
        self.docs = open_documents(prefix)
        n = len(self.docs)
        n_val = max(1, round(n * val_fraction))
        if n - n_val < 1:
            raise ConfigError(
                f"data.val_fraction: dataset {name!r} has {n} documents, too few to hold "
                f"{n_val} out for validation and keep some for training"
            )
        pick = np.random.default_rng([_VAL_SALT, self.key]).permutation(n)
        self.doc_ids = np.sort(pick[:n_val] if split == "val" else pick[n_val:])
        self.shuffle = split == "train"
        self.cursor = _Cursor()
        self._orders: dict[int, np.ndarray] = {}

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return self.doc_ids
        if epoch not in self._orders:
            if len(self._orders) > 2:
                self._orders.clear()
            self._orders[epoch] = np.random.default_rng([self.seed, self.key, epoch]).permutation(self.doc_ids)
        return self._orders[epoch]

    def _walk(self, c: _Cursor, n: int, collect: bool):
        """Cursor after n tokens from c (and those tokens with document-start marks if collect)."""
        c = _Cursor(**vars(c))
        tokens, starts = [], []
        while n > 0:
            order = self._order(c.epoch)
            doc = self.docs[int(order[c.doc])]
            k = min(n, len(doc) - c.offset)
            if collect:
                tokens.append(doc[c.offset : c.offset + k])
                start = np.zeros(k, dtype=bool)
                start[0] = c.offset == 0
                starts.append(start)
            n, c.offset = n - k, c.offset + k
            if c.offset == len(doc):
                c.doc, c.offset = c.doc + 1, 0
                if c.doc == len(order):
                    c.epoch, c.doc = c.epoch + 1, 0
        return c, tokens, starts

    def take(self, n_tokens: int) -> tuple[np.ndarray, np.ndarray]:
        """The next n_tokens of the stream and a mask of document starts; advances by n_tokens - 1."""
        _, tokens, starts = self._walk(self.cursor, n_tokens, collect=True)
        self.cursor, _, _ = self._walk(self.cursor, n_tokens - 1, collect=False)
        self.cursor.rows += 1
        return np.concatenate(tokens).astype(np.int64), np.concatenate(starts)


class PackedLoader:
    """`next_batch()` -> tokens LongTensor[B, seq_len + 1] and doc_start BoolTensor[B, seq_len + 1]."""

    def __init__(self, cfg: DataConfig, seq_len: int, batch_size: int, split: str):
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len} and {batch_size}")
        folder = Path(cfg.dir)
        manifest = read_manifest(folder)
        names = list(cfg.sources) or list(manifest["datasets"])
        unknown = [n for n in names if n not in manifest["datasets"]]
        if unknown:
            raise ConfigError(f"data.sources: {unknown} not in {folder} (it has {list(manifest['datasets'])})")
        weights = list(cfg.weights) or [manifest["datasets"][n]["tokens"] for n in names]
        self.weights = np.asarray(weights, dtype=np.float64) / sum(weights)
        self.sources = [_Source(n, folder / n, cfg.val_fraction, split, cfg.seed) for n in names]
        self._vocab_size = int(manifest["vocab_size"])
        self.seq_len, self.batch_size, self.rows = seq_len, batch_size, 0

    @property
    def vocab_size(self) -> int:
        """The tokenizer's vocabulary (from the manifest): every token id is below it."""
        return self._vocab_size

    def _pick_source(self) -> _Source:
        counts = np.array([s.cursor.rows for s in self.sources], dtype=np.float64)
        deficit = self.weights * (self.rows + 1) - counts
        return self.sources[int(np.argmax(deficit))]

    def next_batch(self) -> dict:
        rows, starts = [], []
        for _ in range(self.batch_size):
            tokens, start = self._pick_source().take(self.seq_len + 1)
            rows.append(tokens)
            starts.append(start)
            self.rows += 1
        return {"tokens": torch.from_numpy(np.stack(rows)), "doc_start": torch.from_numpy(np.stack(starts))}

    def val_batches(self, n: int) -> list[dict]:
        """A fixed list of n batches from the start of the stream (the same on every call)."""
        saved = self.state_dict()
        self.load_state_dict({"rows": 0, "sources": [vars(_Cursor()) for _ in self.sources]})
        batches = [self.next_batch() for _ in range(n)]
        self.load_state_dict(saved)
        return batches

    def state_dict(self) -> dict:
        return {
            "rows": self.rows,
            "names": [s.name for s in self.sources],
            "sources": [dict(vars(s.cursor)) for s in self.sources],
        }

    def load_state_dict(self, state: dict) -> None:
        names = state.get("names", [s.name for s in self.sources])
        if list(names) != [s.name for s in self.sources] or len(state["sources"]) != len(self.sources):
            raise ConfigError(
                f"data.sources: the saved loader blends {list(names)}, this config "
                f"{[s.name for s in self.sources]}; resume with the same data config"
            )
        self.rows = int(state["rows"])
        for s, c in zip(self.sources, state["sources"]):
            s.cursor = _Cursor(**{k: int(v) for k, v in c.items()})


def rank_rows(batch: dict, rank: int, n_ranks: int) -> dict:
    """Rows [rank·b, (rank+1)·b) of a batch of n_ranks·b rows (every value a tensor of rows)."""
    b = next(iter(batch.values())).shape[0] // n_ranks
    return {k: v[rank * b : (rank + 1) * b] for k, v in batch.items()}


class RankSlice:
    """This data-parallel rank's share of a loader's global batches: every rank walks the same stream (so the
    loader state in a checkpoint is one and the same for all ranks, and resumes in any layout) and keeps its
    own rows. `loader` must produce n_ranks·micro_batch_size rows per batch."""

    def __init__(self, loader: PackedLoader, rank: int, n_ranks: int):
        if loader.batch_size % n_ranks:
            raise ValueError(f"global batch {loader.batch_size} does not split into {n_ranks} equal shares")
        self.loader, self.rank, self.n_ranks = loader, rank, n_ranks

    @property
    def vocab_size(self) -> int:
        return self.loader.vocab_size

    def next_batch(self) -> dict:
        return rank_rows(self.loader.next_batch(), self.rank, self.n_ranks)

    def val_batches(self, n: int) -> list[dict]:
        return [rank_rows(b, self.rank, self.n_ranks) for b in self.loader.val_batches(n)]

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)
