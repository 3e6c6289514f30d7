"""The rollout write-ahead log (WAL): every token the engine samples is appended to its request's log before the
engine takes its next step, so a generation killed part-way (its process SIGKILLed, its node lost) resumes from the
logged tokens by re-prefilling them, instead of starting its unfinished requests over (DeepSeek-V4, arch ref
§9.2: restarting from scratch biases the samples toward short answers, since long ones are the ones an interruption
catches).

    wal = RolloutWAL(path, version=7)                       # opens path; reads what an earlier life logged there
    completions = engine.generate(prompts, params, seeds=seeds, wal=wal)
    wal.close()

One file per generate call (the rollout worker names it after the call: `step000012-round0.wal`), JSON lines:

    {"req": 3, "seed": 812..., "prompt": "<sha256 of the ids>", "v": 7, "routes": [[[e, e], ...] per layer]}
    {"tok": 3, "n": 0, "id": 17, "lp": -0.31, "raw": -0.52, "v": 7, "fed": null}
    {"tok": 3, "n": 1, "id": 44, "lp": -1.20, "raw": -1.07, "v": 7, "fed": [[e, e] per layer]}

A `req` line is written when the request's prompt is prefilled, with the experts each prompt token went to in every
learned-routing MoE layer. A `tok` line is the n-th generated token: its id, its log-probability under the
distribution it was sampled from and under the model's own (inference/engine.py `Completion`), the policy version
that sampled it, and in `fed` the experts of the token fed in the step that sampled it (token n-1; null for the
token sampled from the prompt's last position). A resumed request so gets back exactly the ids, logprobs and routes
an uninterrupted run would have returned for its logged part.

Durability. The lines of one engine step are written and flushed together: a process killed by any signal leaves
every completed write in the file (the kernel holds it). `fsync=True` also syncs each step to the disk, which a
host crash or power loss would otherwise lose, at the price of a disk round trip per decode step. A kill in the
middle of a write leaves a torn last line; it is cut off when the log is opened again (that token was not logged,
so it is sampled again).

What resumes. A request is resumed when the log holds it with the same seed, the same prompt (by hash) and the
same policy version as the call now running; anything else (an older policy's tokens, another call's request) is
ignored and the request starts over, logging afresh (a newer `req` line for an index supersedes the older one).
With a resumed request, sampling continues at token n with the counter n (inference/sampling.py), so its
continuation is the one an uninterrupted run draws, up to the fp32 rounding of a prefill against decode steps
(inference/engine.py "Batch invariance"). A line that is not the torn last one and cannot be read, or tokens out
of order, are a WALError that names the file and line: that log was not written by this code."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch


class WALError(RuntimeError):
    """A rollout WAL that cannot be read; the message names the file and line."""


@dataclass(frozen=True)
class LoggedRequest:
    """What a WAL holds for one request: its generated tokens so far, with their logprobs and routes."""

    token_ids: list[int]
    logprobs: list[float]
    raw_logprobs: list[float]
    prompt_routes: list[torch.Tensor]  # per learned-routing layer: [prompt tokens, k]
    fed_routes: list[torch.Tensor]  # per learned-routing layer: [generated tokens - 1, k]


@dataclass
class _Logged:
    seed: int
    prompt: str
    version: int
    routes: list[list[list[int]]]
    tokens: list[dict] = field(default_factory=list)


def prompt_hash(prompt: Sequence[int]) -> str:
    return hashlib.sha256(",".join(str(int(t)) for t in prompt).encode()).hexdigest()


class RolloutWAL:
    """The write-ahead log at `path` for one generate call made with the policy weights of `version`."""

    def __init__(self, path: str | os.PathLike, version: int, fsync: bool = False):
        self.path, self.version, self.fsync = Path(path), int(version), fsync
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._logged = self._read()
        self._file = open(self.path, "a", encoding="utf-8")

    # ------------------------------------------------------------------------------------------ reading
    def _read(self) -> dict[int, _Logged]:
        """Every request the file holds; a torn last line is cut off the file."""
        if not self.path.exists():
            return {}
        data = self.path.read_bytes()
        logged: dict[int, _Logged] = {}
        good_end, start, line_no = 0, 0, 0
        while start < len(data):
            end = data.find(b"\n", start)
            line_no += 1
            if end < 0:  # no newline: the write was cut short by the kill; that record never was
                break
            try:
                self._apply(json.loads(data[start:end]), logged)
            except (ValueError, KeyError, TypeError) as e:
                raise WALError(
                    f"{self.path}:{line_no}: not a rollout WAL record ({type(e).__name__}: {e}); it was not written "
                    "by dsv4train's engine, or was edited: delete it and the call starts its requests over"
                ) from None
            good_end = start = end + 1
        if good_end < len(data):
            with open(self.path, "r+b") as f:
                f.truncate(good_end)
        return logged

    @staticmethod
    def _apply(record: dict, logged: dict[int, _Logged]) -> None:
        if "req" in record:
            logged[int(record["req"])] = _Logged(
                int(record["seed"]), str(record["prompt"]), int(record["v"]), record["routes"]
            )
            return
        index, n = int(record["tok"]), int(record["n"])
        request = logged.get(index)
        if request is None:
            raise ValueError(f"token {n} of request {index}, which was never prefilled")
        if n != len(request.tokens):
            raise ValueError(f"token {n} of request {index} after {len(request.tokens)} logged tokens")
        request.tokens.append(record)

    def resume(self, index: int, prompt: Sequence[int], seed: int) -> LoggedRequest | None:
        """The logged part of request `index`, when the log holds it for this prompt, seed and policy version."""
        r = self._logged.get(index)
        if r is None or r.seed != seed or r.prompt != prompt_hash(prompt) or r.version != self.version:
            return None
        fed = [t["fed"] for t in r.tokens[1:]]
        layers = len(r.routes)
        return LoggedRequest(
            token_ids=[int(t["id"]) for t in r.tokens],
            logprobs=[float(t["lp"]) for t in r.tokens],
            raw_logprobs=[float(t["raw"]) for t in r.tokens],
            prompt_routes=[torch.tensor(r.routes[i], dtype=torch.long).reshape(len(prompt), -1) for i in range(layers)],
            fed_routes=[_rows([f[i] for f in fed], r.routes[i]) for i in range(layers)],
        )

    # ------------------------------------------------------------------------------------------ writing
    def log_requests(self, rows: Sequence[tuple[int, Sequence[int], int, Sequence[torch.Tensor]]]) -> None:
        """(index, prompt, seed, [prompt routes [P, k] per learned layer]) for each request just prefilled."""
        self._write(
            {"req": i, "seed": seed, "prompt": prompt_hash(prompt), "v": self.version,
             "routes": [r.tolist() for r in routes]}
            for i, prompt, seed, routes in rows
        )  # fmt: skip

    def log_tokens(self, rows: Sequence[tuple[int, int, int, float, float, Sequence[torch.Tensor] | None]]) -> None:
        """(index, n, token id, sampled logprob, raw logprob, [fed token's routes [k] per layer] or None) for each
        token just sampled."""
        self._write(
            {"tok": i, "n": n, "id": t, "lp": lp, "raw": raw, "v": self.version,
             "fed": None if fed is None else [f.tolist() for f in fed]}
            for i, n, t, lp, raw, fed in rows
        )  # fmt: skip

    def _write(self, records) -> None:
        text = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records)
        if not text:
            return
        self._file.write(text)
        self._file.flush()
        if self.fsync:
            os.fsync(self._file.fileno())

    def close(self, delete: bool = False) -> None:
        """Close the file; `delete=True` removes it (the call's results are in the caller's hands)."""
        self._file.close()
        if delete:
            self.path.unlink(missing_ok=True)


def _rows(values: list, like: list) -> torch.Tensor:
    """[n, k] long from n lists of k experts (k read from the prompt routes when n is 0)."""
    k = len(like[0]) if like else 0
    return torch.tensor(values, dtype=torch.long).reshape(len(values), k) if values else torch.zeros(0, k).long()
