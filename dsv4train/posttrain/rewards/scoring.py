"""Score many completions at once: each through `safe_reward` (a reward function that raises, hangs or returns
garbage gives 0 and a logged reason), `workers` at a time in threads. The code domain's judge runs every candidate
in a sandbox subprocess, so threads overlap those runs; the math verifier is pure Python and quick."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from dsv4train.posttrain.rewards.reward_fn import safe_reward

RewardFn = Callable[[str], object]  # completion text -> reward, or (reward, reason)


def score_completions(
    jobs: Sequence[tuple[RewardFn, str]], timeout_s: float, workers: int = 1
) -> list[tuple[float, str]]:
    """(reward, reason) of each (reward function, completion text), in order."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if workers == 1 or len(jobs) <= 1:
        return [safe_reward(fn, text, timeout_s=timeout_s) for fn, text in jobs]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="reward") as pool:
        return list(pool.map(lambda job: safe_reward(job[0], job[1], timeout_s=timeout_s), jobs))
