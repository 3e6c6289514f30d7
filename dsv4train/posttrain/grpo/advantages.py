"""Group-relative advantages and the reward shaping of DAPO, per sequence (posttrain anchors §1.1, §1.3, §1.4).

Layout: B = n_prompts · G sequences, the G samples of one prompt in contiguous rows (prompt-major), one scalar
reward per sequence (`rewards_B`). Every token of a sequence gets its sequence's advantage (outcome supervision).

- `group_advantages`: Â_i = (r_i − mean_g r) / (std_g r + eps), std Bessel-corrected (torch.std, as verl's
  `compute_grpo_outcome_advantage`); `normalize_std=False` is Dr. GRPO's Â_i = r_i − mean_g r, which V3.2 uses too:
  dividing by the group's std up-weights prompts that are nearly always right or wrong (question-difficulty bias).
- `constant_groups`: the groups whose rewards are all equal. Their advantages are all 0, so they carry no policy
  gradient and only dilute token-mean losses; DAPO's dynamic sampling drops them (TRL logs their share as
  `frac_reward_zero_std`).
- `overlong_penalty`: DAPO's soft overlong punishment, added to the reward before the advantages.
"""

from __future__ import annotations

import math

import torch


def _check_rewards(rewards_B: torch.Tensor, group_size: int) -> int:
    """The number of prompts; raises on anything `group_advantages` and `constant_groups` cannot group."""
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 2:
        raise ValueError(
            f"group_size must be an integer >= 2 (a group of one has no baseline to compare against), got "
            f"{group_size!r}; sample at least 2 completions per prompt"
        )
    if rewards_B.dim() != 1:
        raise ValueError(f"rewards must be [B] (one reward per sequence), got shape {tuple(rewards_B.shape)}")
    if rewards_B.shape[0] % group_size:
        raise ValueError(
            f"the number of sequences B={rewards_B.shape[0]} is not divisible by group_size={group_size}: "
            f"B must be n_prompts · group_size, the rows of a group contiguous"
        )
    if not torch.isfinite(rewards_B).all():
        raise ValueError(f"rewards must be finite, got {rewards_B.tolist()}: a reward worker returned NaN or inf")
    return rewards_B.shape[0] // group_size


def group_advantages(
    rewards_B: torch.Tensor, group_size: int, normalize_std: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """[B] advantages: reward minus its group's mean, divided by the group's Bessel-corrected std + eps when
    `normalize_std` (GRPO), not divided when not (Dr. GRPO). A group of equal rewards gets 0 either way (0 / eps).
    Integer rewards are promoted to fp32."""
    n_prompts = _check_rewards(rewards_B, group_size)
    if normalize_std and not (isinstance(eps, (int, float)) and 0 < eps < math.inf):
        raise ValueError(f"eps must be a finite number > 0 (it keeps 0 / std finite for equal rewards), got {eps!r}")
    rewards_NG = rewards_B.view(n_prompts, group_size)
    if not rewards_NG.is_floating_point():
        rewards_NG = rewards_NG.float()
    centered_NG = rewards_NG - rewards_NG.mean(dim=1, keepdim=True)
    if normalize_std:
        centered_NG = centered_NG / (rewards_NG.std(dim=1, keepdim=True) + eps)  # torch.std: Bessel-corrected
    return centered_NG.reshape(-1)


def constant_groups(rewards_B: torch.Tensor, group_size: int) -> torch.Tensor:
    """bool [n_prompts]: True where every reward of the group equals the others exactly (no learning signal)."""
    n_prompts = _check_rewards(rewards_B, group_size)
    rewards_NG = rewards_B.view(n_prompts, group_size)
    return (rewards_NG == rewards_NG[:, :1]).all(dim=1)


def overlong_penalty(lengths_B: torch.Tensor, max_len: int, buffer_len: int, factor: float) -> torch.Tensor:
    """fp32 [B], DAPO's soft overlong punishment min(−(len − (max_len − buffer_len)) / buffer_len · factor, 0):
    0 while len <= max_len − buffer_len, then falling linearly to −factor at len = max_len. A response longer than
    max_len is refused: the rollout's token limit and this max_len disagree, so the penalty would be meaningless."""
    if not isinstance(max_len, int) or isinstance(max_len, bool) or max_len < 1:
        raise ValueError(f"max_len must be a positive integer (the response token limit), got {max_len!r}")
    if not isinstance(buffer_len, int) or isinstance(buffer_len, bool) or not (1 <= buffer_len <= max_len):
        raise ValueError(
            f"buffer_len must be an integer in [1, max_len={max_len}] (the tokens before max_len over which the "
            f"penalty ramps up), got {buffer_len!r}"
        )
    if not isinstance(factor, (int, float)) or isinstance(factor, bool) or not (0 <= factor < math.inf):
        raise ValueError(f"factor must be a finite number >= 0 (the penalty at max_len is −factor), got {factor!r}")
    if lengths_B.dim() != 1:
        raise ValueError(f"lengths must be [B] (one response length per sequence), got {tuple(lengths_B.shape)}")
    if ((lengths_B < 0) | (lengths_B > max_len)).any():
        raise ValueError(
            f"lengths must lie in [0, max_len={max_len}], got {lengths_B.tolist()}: set max_len to the rollout's "
            f"max_new_tokens"
        )
    exceed_B = lengths_B.float() - (max_len - buffer_len)
    return (-exceed_B / buffer_len * factor).clamp(max=0.0)
