"""GRPO's loss in the Learner's convention (train/learner.py): sums over one micro-batch's target tokens, which the
Learner divides by the step's target count N. The micro-batch is batch.py's (labels = the completion tokens).

Per target token of sequence i, with ρ = π_θ / π_old and M_i the off-policy sequence mask (policy_loss.py):

    loss_sum = Σ w_i,t · (max(−A_i ρ, −A_i clip(ρ, 1 − ε_low, 1 + ε_high)) · M_i + β_i · KL_i,t)

with the aggregation's weights w (batch.py), so loss_sum / N equals `policy_loss.grpo_loss` with the same mode on
the whole step (tests/unit/test_grpo_step.py checks it against `grpo_loss`). logπ_θ is taken under the distribution
rollout sampled from: logits / temperature, restricted to the top-k / top-p support when the rollout truncated
(masks.py keep-sampling); π_old is the rollout's log-prob of the token under that same distribution.

What the Learner runs for it: no MTP block (`uses_mtp` False; it is frozen in GRPO), and the logits only from the
micro-batch's first completion position on (`logits_from`): the prompt's positions skip the output head and its
[B, S, V] log-softmax. A micro-batch holds whole groups, whose rows share one prompt, so that is most of the
prompt.

Metrics (each a sum the Learner divides by N): `policy_loss` (the weighted surrogate: the aggregated policy loss),
`kl` (the estimate per token: its token mean; 0 without a reference), `clip_fraction` (tokens whose ratio was
clipped, of all target tokens), `masked_fraction` (tokens of sequences the off-policy mask dropped), `entropy` (of
the sampling distribution, per token), `ratio_gap` (|logπ_θ − logπ_old| per token: how far training and rollout
disagree; ~0 on the first update of a step with keep-routing)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dsv4train.models.model import ModelOutput
from dsv4train.posttrain.grpo.kl import KL_KINDS, kl_estimate, unbiased_k3
from dsv4train.posttrain.grpo.masks import keep_sampling_logprobs, off_policy_sequence_mask, sampling_support
from dsv4train.posttrain.grpo.policy_loss import ppo_clip_loss
from dsv4train.train.losses import IGNORE, ROUTES_PREFIX, LossOutput, count_targets


def sampling_logprobs(
    logits_BSV: torch.Tensor, labels_BS: torch.Tensor, temperature: float, top_k: int, top_p: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-prob of each label under the rollout's sampling distribution [B, S] fp32, 0 at IGNORE; that
    distribution's entropy [B, S], detached)."""
    real_BS = labels_BS != IGNORE
    targets_BS = torch.where(real_BS, labels_BS, 0)
    if top_k > 0 or top_p < 1.0:
        support_BSV = sampling_support(logits_BSV, temperature, top_k, top_p)
        logprob_BS = keep_sampling_logprobs(logits_BSV, targets_BS, support_BSV, temperature, real_BS)
        scaled_BSV = (logits_BSV.detach().float() / temperature).masked_fill(~support_BSV, -math.inf)
        with torch.no_grad():
            logp_BSV = scaled_BSV.log_softmax(-1)
    else:  # one log_softmax serves the log-prob (with its gradient) and, detached, the entropy
        logp_BSV = (logits_BSV.float() / temperature).log_softmax(-1)
        logprob_BS = torch.where(real_BS, logp_BSV.gather(-1, targets_BS.unsqueeze(-1)).squeeze(-1), 0.0)
        logp_BSV = logp_BSV.detach()
    with torch.no_grad():
        entropy_BS = -(logp_BSV.exp() * torch.where(torch.isfinite(logp_BSV), logp_BSV, 0.0)).sum(-1)
    return logprob_BS, torch.where(real_BS, entropy_BS, 0.0)


@dataclass(frozen=True)
class GRPOLoss:
    temperature: float
    top_k: int
    top_p: float
    eps_low: float
    eps_high: float
    dual_clip: float | None = None
    kl_kind: str = "k3"
    delta: float | None = None
    uses_mtp: bool = False  # the Learner skips the MTP block (frozen in GRPO)
    metric_names: tuple[str, ...] = (
        "policy_loss",
        "kl",
        "clip_fraction",
        "masked_fraction",
        "entropy",
        "ratio_gap",
    )

    def __post_init__(self) -> None:
        if self.kl_kind not in KL_KINDS:
            raise ValueError(f"unknown kl_kind {self.kl_kind!r}; use one of {KL_KINDS}")

    def logits_from(self, batch: dict[str, torch.Tensor]) -> int:
        """The first position with a label (a completion token): the prompt's positions need no logits."""
        real_S = (batch["labels"] != IGNORE).any(0)
        return int(real_S.nonzero()[0]) if bool(real_S.any()) else 0

    def __call__(self, out: ModelOutput, batch: dict[str, torch.Tensor]) -> LossOutput:
        start = batch["labels"].shape[1] - out.logits.shape[1]  # the logits begin at logits_from(batch)
        batch = {k: v[:, start:] for k, v in batch.items() if not k.startswith(ROUTES_PREFIX)}
        labels_BS = batch["labels"]
        real_BS = labels_BS != IGNORE
        logprob_BS, entropy_BS = sampling_logprobs(out.logits, labels_BS, self.temperature, self.top_k, self.top_p)
        old_BS = batch["old_logprobs"].to(logprob_BS)
        advantages_B = batch["advantages"][:, 0].to(logprob_BS)
        keep_B = off_policy_sequence_mask(logprob_BS, old_BS, advantages_B, real_BS, self.delta)
        pg_BS, clipped_BS = ppo_clip_loss(logprob_BS, old_BS, advantages_B, self.eps_low, self.eps_high, self.dual_clip)
        policy_BS = torch.where(keep_B.unsqueeze(-1), pg_BS, 0.0)
        weights_BS = batch["loss_weights"].to(logprob_BS)
        beta_BS = batch["beta"].to(logprob_BS)
        kl_BS = torch.zeros_like(logprob_BS)
        if "ref_logprobs" in batch:
            ref_BS = batch["ref_logprobs"].to(logprob_BS)
            if self.kl_kind == "unbiased_k3":
                kl_BS = unbiased_k3(logprob_BS, old_BS, ref_BS)
            else:
                kl_BS = kl_estimate(logprob_BS, ref_BS, self.kl_kind)
        per_token_BS = weights_BS * (policy_BS + beta_BS * kl_BS)
        in_policy_BS = real_BS & keep_B.unsqueeze(-1)

        def total(values_BS: torch.Tensor, where_BS: torch.Tensor = real_BS) -> torch.Tensor:
            return torch.where(where_BS, values_BS, 0.0).sum()  # selected, not multiplied: padding may hold NaN

        metrics = {
            "policy_loss": total(weights_BS * policy_BS).detach(),
            "kl": total(kl_BS).detach(),
            "clip_fraction": (clipped_BS & in_policy_BS).sum().to(logprob_BS),
            "masked_fraction": (real_BS & ~keep_B.unsqueeze(-1)).sum().to(logprob_BS),
            "entropy": total(entropy_BS),
            "ratio_gap": total((logprob_BS - old_BS).abs()).detach(),
        }
        return LossOutput(total(per_token_BS), count_targets(batch), metrics)
