"""GRPO's loss: the PPO-clip surrogate per token, V3.2's off-policy sequence mask and KL penalty, and the choice of
aggregation over tokens (posttrain anchors §1.1–1.4, §1.7; arch ref §9.3).

Per token (i a sequence, t a token, A_i its advantage, ρ = π_θ / π_old, M_i the off-policy sequence mask):

    ℓ_{i,t} = max(−A_i ρ, −A_i clip(ρ, 1 − ε_low, 1 + ε_high)) · M_i + β · KL_{i,t}

minimised (the negated objective of arch ref §9.3), then aggregated over the real tokens by `aggregate`. The
surrogate is verl's `compute_policy_loss_vanilla` convention: ρ = exp(clamp(logπ_θ − logπ_old, −20, 20)), and the
optional dual clip (Ye et al. 2020) bounds a negative-advantage token's loss by −A_i · c, since an unbounded ρ would
otherwise let one stale token dominate. ε_low < ε_high is DAPO's clip-higher. The KL term is not masked by M_i:
the mask drops a sequence's policy-gradient signal, not its tie to the reference.

Aggregation, the knob that silently changes the algorithm (`AGGREGATIONS`):
- "token-mean": Σ_{i,t} ℓ / Σ_{i,t} 1 over real tokens (DAPO, verl's default, TRL's "dapo"; the Learner's
  convention, train/learner.py: for data parallelism the count must be the global batch's, so the Learner
  divides sums itself and this local mean is for one process);
- "seq-mean-token-mean": mean over sequences of each sequence's token mean (the original GRPO, TRL's "grpo";
  sequences without real tokens are left out of the mean);
- "seq-mean-token-sum": mean over the B sequences of each one's token sum;
- "seq-mean-token-sum-norm": Σ_{i,t} ℓ / (B · horizon) (Dr. GRPO, TRL's "dr_grpo" with horizon =
  max_completion_length): a constant normaliser, so a sequence's weight does not depend on its length.
Padding positions never enter: whatever they hold (even NaN) is selected away, not multiplied by 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dsv4train.posttrain.grpo.kl import KL_KINDS, LOG_RATIO_CLAMP, kl_estimate, unbiased_k3
from dsv4train.posttrain.grpo.masks import check_per_sequence, check_per_token, off_policy_sequence_mask, real_tokens

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_clip(eps_low: float, eps_high: float, dual_clip: float | None) -> None:
    if not _is_number(eps_low) or not (0 < eps_low < 1):
        raise ValueError(
            f"eps_low must be a number in (0, 1) (the ratio is clipped below at 1 − eps_low), got {eps_low!r}"
        )
    if not _is_number(eps_high) or not (0 < eps_high < math.inf):
        raise ValueError(
            f"eps_high must be a finite number > 0 (the ratio is clipped above at 1 + eps_high), got {eps_high!r}"
        )
    if dual_clip is not None and (not _is_number(dual_clip) or not (1 < dual_clip < math.inf)):
        raise ValueError(
            f"dual_clip must be a finite number > 1 (a negative-advantage token's loss is capped at −A · dual_clip; "
            f"verl uses 3.0), or None to turn it off; got {dual_clip!r}"
        )


def ppo_clip_loss(
    logprob_BT: torch.Tensor,
    old_logprob_BT: torch.Tensor,
    advantages_B: torch.Tensor,
    eps_low: float,
    eps_high: float,
    dual_clip: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss_BT, clipped_BT): the per-token clipped surrogate max(pg1, pg2) with pg1 = −A ρ and
    pg2 = −A clip(ρ, 1 − eps_low, 1 + eps_high), then for A < 0 min(·, −A · dual_clip) when dual_clip is set;
    `clipped_BT` (bool) marks the tokens where the clip was active (pg2 > pg1), which get no gradient. Padding is
    not masked here (see `aggregate`)."""
    batch, _ = check_per_token(logprob_BT=logprob_BT, old_logprob_BT=old_logprob_BT)
    check_per_sequence("advantages_B", advantages_B, batch)
    _check_clip(eps_low, eps_high, dual_clip)
    ratio_BT = (logprob_BT - old_logprob_BT).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).exp()
    adv_B1 = advantages_B.unsqueeze(-1)
    pg1_BT = -adv_B1 * ratio_BT
    pg2_BT = -adv_B1 * ratio_BT.clamp(1 - eps_low, 1 + eps_high)
    loss_BT = torch.maximum(pg1_BT, pg2_BT)
    if dual_clip is not None:
        loss_BT = torch.where(adv_B1 < 0, torch.minimum(loss_BT, -adv_B1 * dual_clip), loss_BT)
    return loss_BT, pg2_BT > pg1_BT


def aggregate(
    loss_BT: torch.Tensor, mask_BT: torch.Tensor, mode: str = "token-mean", horizon: int | None = None
) -> torch.Tensor:
    """Scalar: the per-token loss reduced over the real tokens of `mask_BT` by `mode` (module docstring).
    `horizon` (a positive integer, the maximum response length) is required by "seq-mean-token-sum-norm" and
    refused by the others. A mode whose denominator counts no real token gives 0."""
    batch, _ = check_per_token(loss_BT=loss_BT, mask_BT=mask_BT)
    if mode not in AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation mode {mode!r}; use one of {AGGREGATIONS}")
    if mode == "seq-mean-token-sum-norm":
        if not isinstance(horizon, int) or isinstance(horizon, bool) or horizon < 1:
            raise ValueError(
                f"mode 'seq-mean-token-sum-norm' needs horizon, a positive integer (the maximum response length, "
                f"Dr. GRPO's constant normaliser), got {horizon!r}"
            )
    elif horizon is not None:
        raise ValueError(
            f"horizon is only used by mode 'seq-mean-token-sum-norm'; pass horizon=None with mode {mode!r}"
        )
    real_BT = real_tokens(mask_BT)
    masked_BT = torch.where(real_BT, loss_BT, 0.0)
    if mode == "token-mean":
        return masked_BT.sum() / real_BT.sum().clamp_min(1)
    seq_sums_B = masked_BT.sum(dim=1)
    if mode == "seq-mean-token-sum":
        return seq_sums_B.mean()
    if mode == "seq-mean-token-sum-norm":
        return seq_sums_B.sum() / (batch * horizon)
    seq_tokens_B = real_BT.sum(dim=1)
    has_tokens_B = seq_tokens_B > 0
    seq_means_B = torch.where(has_tokens_B, seq_sums_B / seq_tokens_B.clamp_min(1), 0.0)
    return seq_means_B.sum() / has_tokens_B.sum().clamp_min(1)


@dataclass(frozen=True)
class GrpoLossTerms:
    """One GRPO loss evaluation: `loss` (scalar, differentiable) and detached scalar metrics. `policy_loss` is the
    masked clipped surrogate aggregated like the loss (loss = policy_loss + β · the KL term aggregated the same
    way); `kl` the KL estimate's mean over real tokens (0 when β = 0: not computed); `clip_fraction` the share of
    the tokens in the policy loss (real, not off-policy masked) whose ratio was clipped; `masked_fraction` the
    share of real tokens whose sequence the off-policy mask removed."""

    loss: torch.Tensor
    policy_loss: torch.Tensor
    kl: torch.Tensor
    clip_fraction: torch.Tensor
    masked_fraction: torch.Tensor


def grpo_loss(
    logprob_BT: torch.Tensor,
    old_logprob_BT: torch.Tensor,
    advantages_B: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    eps_low: float,
    eps_high: float,
    dual_clip: float | None = None,
    beta: float = 0.0,
    kl_kind: str = "k3",
    ref_logprob_BT: torch.Tensor | None = None,
    delta: float | None = None,
    mode: str = "token-mean",
    horizon: int | None = None,
) -> GrpoLossTerms:
    """The GRPO loss of one batch of rollouts (module docstring): `ppo_clip_loss` times V3.2's off-policy
    sequence mask (`delta`, None = off), plus `beta` times the `kl_kind` estimate (KL_KINDS; "unbiased_k3" uses
    old_logprob_BT as π_old), aggregated by `mode`. With beta = 0 no KL is computed and ref_logprob_BT may be None."""
    check_per_token(logprob_BT=logprob_BT, old_logprob_BT=old_logprob_BT, mask_BT=mask_BT)
    if kl_kind not in KL_KINDS:
        raise ValueError(f"unknown kl_kind {kl_kind!r}; use one of {KL_KINDS}")
    if not _is_number(beta) or not (0 <= beta < math.inf):
        raise ValueError(f"beta must be a finite number >= 0 (the KL penalty's weight, 0 = no KL), got {beta!r}")
    if beta > 0 and ref_logprob_BT is None:
        raise ValueError(
            f"beta={beta} > 0 needs ref_logprob_BT (the reference model's log-probs); pass them or set beta=0"
        )
    real_BT = real_tokens(mask_BT)
    keep_B = off_policy_sequence_mask(logprob_BT, old_logprob_BT, advantages_B, real_BT, delta)
    pg_BT, clipped_BT = ppo_clip_loss(logprob_BT, old_logprob_BT, advantages_B, eps_low, eps_high, dual_clip)
    policy_BT = torch.where(keep_B.unsqueeze(-1), pg_BT, 0.0)
    policy_loss = aggregate(policy_BT, real_BT, mode, horizon)
    loss = policy_loss
    kl_mean = torch.zeros((), dtype=pg_BT.dtype, device=pg_BT.device)
    if beta > 0:
        if kl_kind == "unbiased_k3":
            kl_BT = unbiased_k3(logprob_BT, old_logprob_BT, ref_logprob_BT)
        else:
            kl_BT = kl_estimate(logprob_BT, ref_logprob_BT, kl_kind)
        loss = aggregate(policy_BT + beta * kl_BT, real_BT, mode, horizon)
        kl_mean = aggregate(kl_BT, real_BT, "token-mean").detach()
    in_policy_BT = real_BT & keep_B.unsqueeze(-1)
    return GrpoLossTerms(
        loss=loss,
        policy_loss=policy_loss.detach(),
        kl=kl_mean,
        clip_fraction=_share(clipped_BT & in_policy_BT, in_policy_BT, pg_BT.dtype),
        masked_fraction=_share(real_BT & ~keep_B.unsqueeze(-1), real_BT, pg_BT.dtype),
    )


def _share(part_BT: torch.Tensor, whole_BT: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """count(part) / count(whole) in the loss's dtype, 0 when whole is empty."""
    return part_BT.sum().to(dtype) / whole_BT.sum().clamp_min(1).to(dtype)
