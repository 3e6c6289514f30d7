"""megatron-core's indexed dataset (`<prefix>.bin` tokens + `<prefix>.idx` document index), with our checks:
a missing, truncated or corrupt pair fails with the file named instead of a deep numpy/struct error."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np

from dsv4train.config.errors import ConfigError

logging.getLogger("megatron").setLevel(logging.WARNING)  # it logs its import and every index read at INFO
with warnings.catch_warnings():  # megatron warns that transformer-engine/apex are absent; we use neither
    warnings.simplefilter("ignore")
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size < 65500 else np.int32


def write_documents(prefix: Path, docs_ids, vocab_size: int) -> tuple[int, int]:
    """Write one entry per document; returns (documents, tokens)."""
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=token_dtype(vocab_size))
    n_docs = n_tokens = 0
    for ids in docs_ids:
        builder.add_document(np.asarray(ids, dtype=np.int64), [len(ids)])  # ndarray: no torch __array__ warning
        n_docs, n_tokens = n_docs + 1, n_tokens + len(ids)
    builder.finalize(f"{prefix}.idx")
    return n_docs, n_tokens


def open_documents(prefix: Path) -> IndexedDataset:
    for suffix in (".bin", ".idx"):
        if not Path(f"{prefix}{suffix}").is_file():
            raise FileNotFoundError(f"{prefix}{suffix} is missing; run `dsv4 data prepare` for this dataset")
    try:
        ds = IndexedDataset(str(prefix))
    except Exception as e:  # megatron asserts on a bad header and struct/numpy errors on a short file
        raise ConfigError(
            f"{prefix}.idx is not a valid megatron index ({type(e).__name__}: {e}); re-run `dsv4 data prepare`"
        ) from None
    lengths = np.asarray(ds.sequence_lengths, dtype=np.int64)
    itemsize = np.dtype(ds.index.dtype).itemsize
    expected, actual = int(lengths.sum()) * itemsize, Path(f"{prefix}.bin").stat().st_size
    if expected != actual:
        raise ConfigError(
            f"{prefix}.bin has {actual} bytes but its .idx describes {expected}; the pair is "
            "truncated or mismatched, re-run `dsv4 data prepare`"
        )
    return ds
