"""`load_pretrained`: a model from any folder of weights dsv4train reads, whichever layer knows its format.

It lives in train/ because train/ is the lowest layer that sees both formats: the weight folders (dsv4 and
transformers, read by `models/pretrained.py`) and the training checkpoints (DCP shards, read by `train/checkpoint.py`).
`models/` cannot reach up into train/ (DESIGN.md's layering; tests/unit/test_house_rules.py checks it), and
inference/ and posttrain/ sit above train/, so they import it from here (or as `dsv4train.load_pretrained`).
"""

from __future__ import annotations

import torch

from dsv4train.models.model import DSV4Model
from dsv4train.models.pretrained import check_vocab_size, detect_format, load_weights
from dsv4train.train.checkpoint import load_model_from_checkpoint


def load_pretrained(path, device="cpu", dtype: torch.dtype | None = None, vocab_size: int | None = None) -> DSV4Model:
    """Model from a dsv4 folder, a transformers `save_pretrained` folder (any layout transformers writes), an
    official hub folder (bf16, or FP8 blocks + FP4 experts, dequantised; MTP kept), single-file or sharded, a
    training run directory (newest complete checkpoint) or one `checkpoints/step_<N>/` folder. Weights load in
    float32, then are cast to `dtype` if given. `vocab_size`, if given, must match. Returned in eval mode."""
    if detect_format(path) != "checkpoint":
        return load_weights(path, device=device, dtype=dtype, vocab_size=vocab_size)
    model = load_model_from_checkpoint(path, device=device)
    check_vocab_size(model.cfg, vocab_size, path)
    return (model.to(dtype) if dtype is not None else model).eval()
