"""The GRPO tests' starting policy: a small random model saved as a dsv4 folder with a tokenizer trained on the
offline math and code records (every chat special token at its fixed id), so `grpo.init=<folder>` loads it."""

from __future__ import annotations

import json
from pathlib import Path

from dsv4train.data.tasks.records import domain_records
from dsv4train.data.tokenizer import train_tokenizer
from dsv4train.models.model import DSV4Model
from dsv4train.models.pretrained import save_dsv4
from dsv4train.testing.toy_configs import tiny_config


def save_grpo_base(folder: Path, vocab_size: int = 512, max_seq_len: int = 256) -> Path:
    """Write the model and its tokenizer.json to `folder`; return it."""
    records = [*domain_records("math", "train", 40, seed=0), *domain_records("code", "train", 10, seed=0)]
    tokenizer = train_tokenizer([json.dumps(r) for r in records], vocab_size)
    model = DSV4Model(tiny_config(vocab_size=tokenizer.get_vocab_size(), max_seq_len=max_seq_len))
    model.init_weights(0)
    save_dsv4(model, folder)
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder
