"""Per-token estimates of KL(π_θ ‖ π_ref) from the log-probs of sampled tokens (posttrain anchors §1.1; arch ref
§9.3). With log r = logπ_ref − logπ_θ of a token:

- k1 = logπ_θ − logπ_ref = −log r: unbiased under samples from π_θ, high variance, can be negative;
- k2 = ½ (logπ_θ − logπ_ref)²: biased, low variance (verl's "mse");
- k3 = r − log r − 1 >= 0: unbiased under π_θ, low variance (Schulman's estimator, GRPO's D_KL; verl's
  "low_var_kl"), with verl's guards: log r clamped to [−20, 20], the result to [−10, 10];
- unbiased k3 (V3.2) = (π_θ / π_old) · k3: GRPO's tokens are sampled from π_old, not π_θ, so k3's expectation is not
  KL(π_θ ‖ π_ref) once the policy has moved; the importance ratio ρ = π_θ / π_old reweights the samples so that
  E_{π_old}[ρ · k3] = Σ_o π_θ(o) k3(o) = KL(π_θ ‖ π_ref) exactly.
"""

from __future__ import annotations

import torch

from dsv4train.posttrain.grpo.masks import check_per_token

KL_ESTIMATORS = ("k1", "k2", "k3")  # kl_estimate's kinds: functions of (logπ_θ, logπ_ref)
KL_KINDS = (*KL_ESTIMATORS, "unbiased_k3")  # what grpo_loss accepts; unbiased_k3 also needs logπ_old
LOG_RATIO_CLAMP = 20.0  # verl: exp() of a larger log-ratio overflows fp32's useful range
K3_CLAMP = 10.0  # verl: bounds one token's k3 (and with it its gradient) when π_θ and π_ref are far apart


def _k3(logprob_BT: torch.Tensor, ref_logprob_BT: torch.Tensor) -> torch.Tensor:
    log_r_BT = (ref_logprob_BT - logprob_BT).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return (log_r_BT.exp() - log_r_BT - 1).clamp(-K3_CLAMP, K3_CLAMP)


def kl_estimate(logprob_BT: torch.Tensor, ref_logprob_BT: torch.Tensor, kind: str) -> torch.Tensor:
    """[B, T] per-token estimate of KL(π_θ ‖ π_ref), `kind` in KL_ESTIMATORS (module docstring); differentiable
    w.r.t. logprob_BT (ref_logprob_BT is a constant of the step)."""
    check_per_token(logprob_BT=logprob_BT, ref_logprob_BT=ref_logprob_BT)
    if kind == "unbiased_k3":
        raise ValueError("kind 'unbiased_k3' needs the rollout policy's log-probs: call unbiased_k3(...) instead")
    if kind == "k1":
        return logprob_BT - ref_logprob_BT
    if kind == "k2":
        return 0.5 * (logprob_BT - ref_logprob_BT).square()
    if kind == "k3":
        return _k3(logprob_BT, ref_logprob_BT)
    raise ValueError(f"unknown KL estimator {kind!r}; use one of {KL_ESTIMATORS} (or unbiased_k3(...))")


def unbiased_k3(logprob_BT: torch.Tensor, old_logprob_BT: torch.Tensor, ref_logprob_BT: torch.Tensor) -> torch.Tensor:
    """[B, T] V3.2's unbiased KL: (π_θ / π_old) · k3, ρ = exp(clamp(logπ_θ − logπ_old, −20, 20)).

    The ratio carries gradient (it is NOT detached). V3.2 writes this as the estimator of KL(π_θ ‖ π_ref) from
    samples of π_old: E_{π_old}[ρ · k3] = Σ_o π_θ(o) k3(o) = KL(π_θ ‖ π_ref) holds for every θ, so its gradient is
    the gradient of the KL itself (unbiased in value and in gradient). With ρ detached the value is the same but the
    gradient loses the ∇π_θ · k3 term, i.e. it becomes the biased gradient of plain k3 reweighted. At θ = θ_old
    ρ = 1 and the value equals k3's, the gradient does not."""
    check_per_token(logprob_BT=logprob_BT, old_logprob_BT=old_logprob_BT, ref_logprob_BT=ref_logprob_BT)
    ratio_BT = (logprob_BT - old_logprob_BT).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).exp()
    return ratio_BT * _k3(logprob_BT, ref_logprob_BT)
