"""A stateful, deterministic loader over a prepared folder: blend datasets, shuffle documents, pack rows.

- Split: a fixed random `val_fraction` of each dataset's documents (seeded by data.seed) is validation, the rest
  training; so validation is not one corner of the corpus (e.g. the alphabetically last files).
- Order: each dataset walks its training documents in a permutation seeded by (data.seed, dataset, epoch) and
  concatenates them into one token stream; rows of `seq_len + 1` tokens are cut from it (consecutive rows share
  one token, as in megatron's GPT dataset, so every token is a target once).
- Blend: row r goes to the dataset whose count lags its weight the most (deterministic, exact proportions
  in the limit, like megatron's blended dataset).
- State: `state_dict()` is a few integers per dataset; `load_state_dict()` continues exactly where it was.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dsv4train.config.data import DataConfig
from dsv4train.config.errors import ConfigError
from dsv4train.data.indexed import open_documents
from dsv4train.data.prepare import MANIFEST


def read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"data.dir={folder}: no {MANIFEST}; create it with `dsv4 data prepare --out {folder} ...`")
    return json.loads(path.read_text())


def check_vocab(data_vocab: int, model_vocab: int) -> None:
    if data_vocab > model_vocab:
        raise ConfigError(f"model.vocab_size: the tokenizer has {data_vocab} tokens but the model only "
                          f"{model_vocab}; use a model with model.vocab_size >= {data_vocab} or re-tokenize")


@dataclass
class _Cursor:
    epoch: int = 0
    doc: int = 0  # position in this epoch's permutation
    offset: int = 0  # token offset inside that document
    rows: int = 0


class _Source:
    """One dataset's document stream for one split."""

    def __init__(self, name: str, prefix: Path, val_fraction: float, split: str, seed: int, index: int):
        self.name, self.seed, self.index = name, seed, index
        self.docs = open_documents(prefix)
        n = len(self.docs)
        n_val = max(1, round(n * val_fraction))
        if n - n_val < 1:
            raise ConfigError(f"data.val_fraction: dataset {name!r} has {n} documents, too few to hold "
                              f"{n_val} out for validation and keep some for training")
        held_out = np.random.default_rng([seed, index, 2**31 - 1]).permutation(n)  # a random, fixed val set
        self.doc_ids = np.sort(held_out[:n_val] if split == "val" else held_out[n_val:])
        self.shuffle = split == "train"
        self.cursor = _Cursor()
        self._perms: dict[int, np.ndarray] = {}

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return self.doc_ids
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.clear()
            rng = np.random.default_rng([self.seed, self.index, epoch])
            self._perms[epoch] = rng.permutation(self.doc_ids)
        return self._perms[epoch]

    def _walk(self, c: _Cursor, n: int, collect: bool):
        """Cursor after n tokens from c (and those tokens with document-start marks if collect)."""
        c = _Cursor(**vars(c))
        tokens, starts = [], []
        while n > 0:
            order = self._order(c.epoch)
            doc = self.docs[int(order[c.doc])]
            k = min(n, len(doc) - c.offset)
            if collect:
                tokens.append(doc[c.offset: c.offset + k])
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
    def __init__(self, cfg: DataConfig, seq_len: int, batch_size: int, split: str):
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        folder = Path(cfg.dir)
        manifest = read_manifest(folder)
        names = list(cfg.sources) or list(manifest["datasets"])
        unknown = [n for n in names if n not in manifest["datasets"]]
        if unknown:
            raise ConfigError(f"data.sources: {unknown} not in {folder} (it has {list(manifest['datasets'])})")
        weights = list(cfg.weights) or [manifest["datasets"][n]["tokens"] for n in names]
        self.weights = np.asarray(weights, dtype=np.float64) / sum(weights)
        self.sources = [_Source(n, folder / n, cfg.val_fraction, split, cfg.seed, i) for i, n in enumerate(names)]
        self.vocab_size = int(manifest["vocab_size"])
        self.seq_len, self.batch_size, self.rows = seq_len, batch_size, 0

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
        return {"rows": self.rows, "sources": [dict(vars(s.cursor)) for s in self.sources]}

    def load_state_dict(self, state: dict) -> None:
        if len(state["sources"]) != len(self.sources):
            raise ConfigError(f"data.sources: the checkpoint's loader blends {len(state['sources'])} datasets, "
                              f"this config {len(self.sources)}; resume with the same data config")
        self.rows = int(state["rows"])
        for s, c in zip(self.sources, state["sources"]):
            s.cursor = _Cursor(**c)
