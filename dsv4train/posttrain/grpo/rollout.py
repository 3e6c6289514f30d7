"""The rollout worker: its own copy of the policy and a generation engine over it (inference/engine.py), fed new
weights by a versioned sync and asked for G completions per prompt.

It is the unit a Ray rollout actor wraps: nothing in it touches the trainer's model, so the controller could run it
in another process. Weights arrive as a full state dict with the policy version (the number of optimizer steps the
weights have seen); every rollout records the version that generated it, so a stale sample is detectable. A sync
copies the tensors into the worker's parameters in place, so the engine's cache and (with `compile=True`) its
compiled decode step stay valid.

Each completion's sampling seed is a pure function of (run seed, step, refill round, prompt slot, sample): a resumed
run draws exactly the samples an uninterrupted one would.

The rollout WAL (inference/wal.py). With `wal_dir`, a `generate` call given a `wal_key` logs every token to
`wal_dir/<wal_key>.wal` before the engine's next step. If the call dies part-way (a SIGKILLed Ray actor, a killed
run) and is made again with the same key, prompts, seeds and weight version, its requests continue from their
logged tokens by re-prefilling them; the file is deleted once the call returns. The key must name the call
(the controller uses step, refill round and actor); on a cluster, `wal_dir` must be on storage every node sees for
a restarted actor on another node to find it (elsewhere its requests start over: still the same samples, because
the seeds are fixed, at the cost of generating them again)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from dsv4train.config.model import ModelConfig
from dsv4train.inference.engine import Completion, Engine
from dsv4train.inference.sampling import SamplingParams
from dsv4train.inference.wal import RolloutWAL
from dsv4train.models.model import DSV4Model


@dataclass(frozen=True)
class Rollout:
    """One sampled completion of one prompt, with what training needs from the generation."""

    group: int  # the prompt's slot in this step's batch (the G rollouts of a prompt share it)
    prompt_ids: list[int]
    completion: Completion
    version: int  # the policy version that generated it


def rollout_seed(seed: int, step: int, round_: int, group: int, sample: int) -> int:
    """The sampling seed of one completion: fixed by these alone (not by batch, order or what else runs)."""
    key = f"grpo:{seed}:{step}:{round_}:{group}:{sample}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") >> 1


class RolloutWorker:
    """A policy copy on `device` with an Engine of `max_batch` slots of `max_len` tokens; `wal_dir` turns the
    rollout WAL on (module docstring), `wal_fsync` syncs it to disk every step."""

    def __init__(
        self,
        model_cfg: ModelConfig,
        max_batch: int,
        max_len: int,
        device: torch.device | str = "cpu",
        tokenizer=None,
        compile: bool = False,
        wal_dir: str | Path | None = None,
        wal_fsync: bool = False,
    ):
        self.model = DSV4Model(model_cfg).to(device).eval()
        self.model.set_indexer_mode("sparse")
        self.engine = Engine(self.model, max_batch=max_batch, max_len=max_len, tokenizer=tokenizer, compile=compile)
        self.version = -1  # no weights yet
        self.wal_dir, self.wal_fsync = (Path(wal_dir) if wal_dir is not None else None), wal_fsync

    @torch.no_grad()
    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        """Copy the policy's weights in (every parameter and buffer, by name; a missing or extra one is an error)."""
        if version < self.version:
            raise ValueError(f"weight sync of version {version} after version {self.version}: versions only grow")
        self.model.load_state_dict(state_dict, strict=True)
        self.version = version

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        group_size: int,
        params: SamplingParams,
        seeds: Sequence[int],
        wal_key: str | None = None,
    ) -> list[Rollout]:
        """`group_size` completions of each prompt, prompt-major (the G rollouts of prompt i are rows i·G..i·G+G−1);
        `seeds` one per completion in that order; `wal_key` names this call's WAL (when the worker has a wal_dir)."""
        if self.version < 0:
            raise RuntimeError("the rollout worker has no weights yet: call load_weights first")
        expanded = [list(p) for p in prompts for _ in range(group_size)]
        if len(seeds) != len(expanded):
            raise ValueError(f"{len(seeds)} seeds for {len(expanded)} completions ({len(prompts)} × {group_size})")
        wal = None
        if self.wal_dir is not None and wal_key is not None:
            wal = RolloutWAL(self.wal_dir / f"{wal_key}.wal", self.version, fsync=self.wal_fsync)
        try:
            completions = self.engine.generate(expanded, params, seeds=list(seeds), wal=wal)
        finally:
            if wal is not None:
                wal.close()
        if wal is not None:
            wal.path.unlink(missing_ok=True)  # the results are returned: a retry would not need them
        return [
            Rollout(row // group_size, expanded[row], completion, self.version)
            for row, completion in enumerate(completions)
        ]
