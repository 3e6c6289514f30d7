"""The prompts GRPO samples from: the train split of each domain (never a test problem), rendered exactly as the SFT
records and `dsv4 eval` render them, with each problem's verifier.

`PromptPool` walks a seeded permutation of all its problems, epoch after epoch (a new permutation each epoch), and
its position is checkpointed (`state_dict`), so a resumed run draws the prompts an uninterrupted one would."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tokenizers import Tokenizer

from dsv4train.config.errors import ConfigError
from dsv4train.posttrain.evaluation import prompt_text, task_problems


@dataclass(frozen=True)
class Prompt:
    task: str
    index: int  # the problem's index in its task's train split
    ids: list[int]
    score: Callable[[str], tuple[float, str]] = field(repr=False)  # completion text -> (reward, reason)


def task_prompts(
    tokenizer: Tokenizer,
    tasks: list[str],
    n_per_task: int,
    mode: str,
    seed: int,
    max_prompt_len: int,
    math_difficulty: int,
    code_difficulty: int,
) -> tuple[list[Prompt], int]:
    """(every train problem of `tasks` that fits in `max_prompt_len` tokens, how many did not)."""
    prompts, too_long = [], 0
    for task in tasks:
        for i, p in enumerate(task_problems(task, "train", n_per_task, seed, mode, math_difficulty, code_difficulty)):
            ids = tokenizer.encode(prompt_text(p.user_text, mode), add_special_tokens=False).ids
            if len(ids) > max_prompt_len:
                too_long += 1
                continue
            prompts.append(Prompt(task, i, ids, p.score))
    if not prompts:
        raise ConfigError(
            f"no training prompts: every one of the {too_long} problems of {tasks} is longer than {max_prompt_len} "
            "tokens (the model's max_seq_len minus grpo.max_new_tokens); lower grpo.max_new_tokens"
        )
    return prompts, too_long


class PromptPool:
    """Prompts drawn in a seeded order without replacement within an epoch."""

    def __init__(self, prompts: list[Prompt], seed: int):
        if not prompts:
            raise ValueError("an empty prompt set: GRPO needs at least one prompt to sample")
        self.prompts, self.seed = prompts, seed
        self.epoch, self.position = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.prompts), generator=generator).tolist()

    def take(self, n: int) -> list[Prompt]:
        out = []
        while len(out) < n:
            if self.position == len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            out.append(self.prompts[self._order[self.position]])
            self.position += 1
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "size": len(self.prompts)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("size") != len(self.prompts):
            raise ConfigError(
                f"the checkpoint's prompt pool held {state.get('size')} prompts, this run's holds {len(self.prompts)}: "
                "grpo.tasks, grpo.train_problems, grpo.max_new_tokens or the difficulties changed; resume with the "
                "same settings or start a new run.dir"
            )
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._permutation(self.epoch)
