"""Pack tokenized documents (each ended by EOS) into fixed-length training samples."""

from __future__ import annotations

import torch


def pack_documents(token_lists: list[list[int]], eos_id: int, seq_len: int) -> torch.Tensor:
    """Concatenate documents with EOS after each and cut into [N, seq_len + 1] rows (inputs + next-token labels).
    The tail that does not fill a row is dropped."""
    stream = [t for doc in token_lists for t in (*doc, eos_id)]
    n = len(stream) // (seq_len + 1)
    if n == 0:
        raise ValueError(f"only {len(stream)} tokens: not enough for one sample of {seq_len + 1}")
    return torch.tensor(stream[: n * (seq_len + 1)], dtype=torch.long).view(n, seq_len + 1)
