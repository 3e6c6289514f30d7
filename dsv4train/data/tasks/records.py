"""SFT record files of the offline domains (`dsv4 data tasks`): every sample of a split once per reasoning mode
(a thinking-mode target with its short `<think>` trace and a chat-mode target), as jsonl."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from dsv4train.data.tasks import code, math

DOMAINS = ("math", "code")
MODES = ("think", "chat")


def domain_records(
    domain: str, split: str, n: int, seed: int, math_difficulty: int = 2, code_difficulty: int = 2
) -> Iterator[dict[str, Any]]:
    """The records of `n` samples of `domain`'s `split`, each in both modes (2n records)."""
    if domain == "math":
        for s in math.make_split(split, n, seed, difficulty=math_difficulty):
            yield from (math.to_record(s, mode) for mode in MODES)
    elif domain == "code":
        for s in code.make_split(split, n, seed, difficulty=code_difficulty):
            yield from (code.to_chat_record(s, mode) for mode in MODES)
    else:
        raise ValueError(f"unknown domain {domain!r}: expected one of {', '.join(DOMAINS)}")


def write_task_records(
    out: Path,
    domains: Sequence[str],
    n_train: int,
    n_test: int,
    seed: int,
    math_difficulty: int = 2,
    code_difficulty: int = 2,
) -> dict[str, int]:
    """`out/train.jsonl` and `out/test.jsonl` (test records are for inspection and validation: `dsv4 eval` draws
    the same test problems from the seed). Returns the number of records written per file."""
    unknown = [d for d in domains if d not in DOMAINS]
    if unknown:
        raise ValueError(f"unknown domains {unknown}: expected some of {', '.join(DOMAINS)}")
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for split, n in (("train", n_train), ("test", n_test)):
        path = out / f"{split}.jsonl"
        count = 0
        with path.open("w") as f:
            for domain in domains:
                for record in domain_records(domain, split, n, seed, math_difficulty, code_difficulty):
                    f.write(json.dumps(record, ensure_ascii=False) + "\n")
                    count += 1
        written[path.name] = count
    return written
