"""Which tokens and sequences GRPO trains on: V3.2's off-policy sequence mask and keep-sampling log-probs (arch ref
§9.3), and the shape checks every GRPO function shares.

Per-token tensors are [B, T] (B sequences, T response tokens, right-padded) with `mask_BT` (bool, or float 0/1)
marking the real response tokens; per-sequence tensors are [B].

**Off-policy sequence mask.** A sequence is dropped from the policy loss (M_i = 0) when its advantage is negative
AND the mean over its real tokens of log(π_old / π_θ) exceeds δ. The mean is a k1 estimate of KL(π_old ‖ π_θ) on
the sequence: a negative-advantage sample the current policy has already moved far from teaches it little and is
the main source of instability when rollouts are stale; positive samples are always kept. The mask is a constant
of the step (no gradient flows through it).

**Keep-sampling mask.** Rollout sampled each token from a truncated distribution: softmax of logits / temperature
restricted to the top-k / top-p support (`dsv4train/inference/sampling.py`, `processed_logits`). The training
log-prob of that token must be of the same distribution, otherwise the importance ratio π_θ / π_old compares two
different distributions and is biased (the truncated mass is missing from one side). So the trainer's logits are
divided by the same temperature and set to −inf outside the same support before log_softmax. The support is a bool
[B, T, V]: either what rollout recorded, or rebuilt from the trainer's own logits by `sampling_support`, which calls
the sampler's `processed_logits` so the rules (order, ties, the token that crosses top-p) cannot drift apart. Pair
these log-probs with the rollout's `sampled_logprob_R` as π_old, never with `raw_logprob_R` (temperature 1, full
vocabulary): that mixes the two distributions the mask exists to keep apart.
"""

from __future__ import annotations

import math

import torch

from dsv4train.inference.sampling import SamplingParams, processed_logits


# ----------------------------------------------------------------------------- shared checks
def check_per_token(**tensors_BT: torch.Tensor) -> tuple[int, int]:
    """(B, T) of the named [B, T] tensors; raises naming the first one whose shape differs."""
    shapes = {name: tuple(t.shape) for name, t in tensors_BT.items()}
    first_name, first_shape = next(iter(shapes.items()))
    if len(first_shape) != 2:
        raise ValueError(f"{first_name} must be [B, T] (sequences × response tokens), got shape {first_shape}")
    for name, shape in shapes.items():
        if shape != first_shape:
            raise ValueError(
                f"{name} has shape {shape} but {first_name} has {first_shape}: every per-token tensor must be "
                f"[B, T] over the same sequences and response positions"
            )
    return first_shape


def check_per_sequence(name: str, t: torch.Tensor, batch: int) -> None:
    if tuple(t.shape) != (batch,):
        raise ValueError(f"{name} must be [B] = [{batch}] (one value per sequence), got shape {tuple(t.shape)}")


def real_tokens(mask_BT: torch.Tensor) -> torch.Tensor:
    """The mask as bool; a float mask must hold only 0 and 1 (weights belong in the loss, not in the mask)."""
    if mask_BT.dtype == torch.bool:
        return mask_BT
    if not ((mask_BT == 0) | (mask_BT == 1)).all():
        raise ValueError("mask_BT must be bool or hold only 0 and 1 (1 = a real response token, 0 = padding)")
    return mask_BT != 0


# ----------------------------------------------------------------------------- off-policy sequence mask
def off_policy_sequence_mask(
    logprob_BT: torch.Tensor,
    old_logprob_BT: torch.Tensor,
    advantages_B: torch.Tensor,
    mask_BT: torch.Tensor,
    delta: float | None,
) -> torch.Tensor:
    """bool [B], True = keep: False exactly when A_i < 0 and mean over real tokens of (logπ_old − logπ_θ) > delta
    (V3.2). `delta=None` keeps every sequence. A sequence without real tokens is kept (it has no loss anyway)."""
    batch, _ = check_per_token(logprob_BT=logprob_BT, old_logprob_BT=old_logprob_BT, mask_BT=mask_BT)
    check_per_sequence("advantages_B", advantages_B, batch)
    real_BT = real_tokens(mask_BT)
    if delta is None:
        return torch.ones(batch, dtype=torch.bool, device=logprob_BT.device)
    if not isinstance(delta, (int, float)) or isinstance(delta, bool) or not (0 <= delta < math.inf):
        raise ValueError(
            f"delta must be a finite number >= 0 (a threshold on the sequence's mean log(π_old/π_θ)), or None to "
            f"keep every sequence; got {delta!r}"
        )
    with torch.no_grad():
        divergence_BT = torch.where(real_BT, old_logprob_BT - logprob_BT, 0.0)
        mean_divergence_B = divergence_BT.sum(dim=1) / real_BT.sum(dim=1).clamp_min(1)
        return ~((advantages_B < 0) & (mean_divergence_B > delta))


# ----------------------------------------------------------------------------- keep-sampling mask
def _per_row(value: float | int | torch.Tensor, name: str, batch: int, seq: int, dtype: torch.dtype, device):
    """A scalar or a [B] tensor as [B·T] (row b·T + t of the flattened logits belongs to sequence b)."""
    if isinstance(value, torch.Tensor):
        check_per_sequence(name, value, batch)
        return value.to(device=device, dtype=dtype).repeat_interleave(seq)
    return torch.full((batch * seq,), value, dtype=dtype, device=device)


def _check_tensor_settings(temperature, top_k, top_p) -> None:
    """The ranges of `SamplingParams` for settings given as [B] tensors (scalars are checked by SamplingParams)."""
    if isinstance(temperature, torch.Tensor) and not (torch.isfinite(temperature) & (temperature >= 0)).all():
        raise ValueError(f"temperature must be finite and >= 0 (0 = greedy), got {temperature.tolist()}")
    if isinstance(top_k, torch.Tensor) and (top_k.is_floating_point() or (top_k < 0).any()):
        raise ValueError(f"top_k must be an integer tensor >= 0 (0 = off), got {top_k.tolist()}")
    if isinstance(top_p, torch.Tensor) and not ((top_p > 0) & (top_p <= 1)).all():
        raise ValueError(f"top_p must lie in (0, 1] (1 = off), got {top_p.tolist()}")


def sampling_support(
    logits_BTV: torch.Tensor,
    temperature: float | torch.Tensor,
    top_k: int | torch.Tensor,
    top_p: float | torch.Tensor,
) -> torch.Tensor:
    """bool [B, T, V]: the tokens rollout could have sampled at each position, rebuilt from these logits with the
    sampler's own `processed_logits` (temperature, then top-k, then top-p; temperature 0 = the argmax alone). Each
    setting is one value for all sequences or a [B] tensor. Row-wise, so callers may chunk over B to bound the
    [B·T, V] sort's memory. Only equals rollout's support where the trainer's logits equal rollout's; where they
    may differ in the last bits, a recorded support is the exact one."""
    if logits_BTV.dim() != 3:
        raise ValueError(f"logits must be [B, T, V], got shape {tuple(logits_BTV.shape)}")
    scalars = {
        k: v for k, v in dict(temperature=temperature, top_k=top_k, top_p=top_p).items() if not torch.is_tensor(v)
    }
    SamplingParams(**scalars)  # the sampler's own range checks, with its messages
    _check_tensor_settings(temperature, top_k, top_p)
    batch, seq, vocab = logits_BTV.shape
    device = logits_BTV.device
    with torch.no_grad():
        processed_RV = processed_logits(
            logits_BTV.detach().reshape(batch * seq, vocab),
            _per_row(temperature, "temperature", batch, seq, torch.float32, device),
            _per_row(top_k, "top_k", batch, seq, torch.long, device),
            _per_row(top_p, "top_p", batch, seq, torch.float32, device),
        )
    return (processed_RV != -math.inf).view(batch, seq, vocab)


def keep_sampling_logprobs(
    logits_BTV: torch.Tensor,
    tokens_BT: torch.Tensor,
    support_BTV: torch.Tensor,
    temperature: float | torch.Tensor = 1.0,
    mask_BT: torch.Tensor | None = None,
) -> torch.Tensor:
    """fp32 [B, T], differentiable: log of the probability of each token under softmax(logits / temperature)
    restricted to `support_BTV` (the distribution rollout sampled it from). `temperature` is one value or a [B]
    tensor, > 0 (a greedy rollout has no distribution to train on). Padding positions (mask_BT 0) get 0 and no
    gradient whatever their token and support; a real token outside its support is refused: the support does not
    belong to this rollout."""
    if logits_BTV.dim() != 3:
        raise ValueError(f"logits must be [B, T, V], got shape {tuple(logits_BTV.shape)}")
    batch, seq, vocab = logits_BTV.shape
    check_per_token(tokens_BT=tokens_BT, **({} if mask_BT is None else {"mask_BT": mask_BT}))
    if tuple(tokens_BT.shape) != (batch, seq):
        raise ValueError(f"tokens_BT must be [B, T] = [{batch}, {seq}] like the logits, got {tuple(tokens_BT.shape)}")
    if support_BTV.dtype != torch.bool or support_BTV.shape != logits_BTV.shape:
        raise ValueError(
            f"support_BTV must be a bool tensor shaped like the logits {tuple(logits_BTV.shape)}, got "
            f"{support_BTV.dtype} {tuple(support_BTV.shape)}"
        )
    real_BT = torch.ones_like(tokens_BT, dtype=torch.bool) if mask_BT is None else real_tokens(mask_BT)
    if tokens_BT.is_floating_point() or ((tokens_BT < 0) | (tokens_BT >= vocab))[real_BT].any():
        raise ValueError(f"tokens_BT must be integer token ids in [0, V={vocab}) at the real (mask_BT 1) positions")
    temperatures = temperature if torch.is_tensor(temperature) else torch.tensor([float(temperature)])
    if not (torch.isfinite(temperatures) & (temperatures > 0)).all():
        raise ValueError(
            f"temperature must be finite and > 0 (the temperature rollout sampled at), got {temperature!r}; a greedy "
            f"rollout (temperature 0) has no sampling distribution to compute log-probs of"
        )
    if torch.is_tensor(temperature):
        check_per_sequence("temperature", temperature, batch)
        divisor = temperature.to(device=logits_BTV.device, dtype=torch.float32).view(batch, 1, 1)
    else:
        divisor = float(temperature)
    tokens_BT1 = torch.where(real_BT, tokens_BT.long(), 0).unsqueeze(-1)  # padding may hold any id (e.g. -100)
    if not support_BTV.gather(-1, tokens_BT1).squeeze(-1)[real_BT].all():
        raise ValueError(
            "a real token lies outside its sampling support: the support does not match the rollout that sampled "
            "these tokens (record it at rollout, or rebuild it with the rollout's temperature / top_k / top_p)"
        )
    # A padding position with an empty support gives NaN here; the final where drops it, and masked_fill's backward
    # gives its logits zero gradient.
    scaled_BTV = (logits_BTV.float() / divisor).masked_fill(~support_BTV, -math.inf)
    logprob_BT = scaled_BTV.log_softmax(dim=-1).gather(-1, tokens_BT1).squeeze(-1)
    return torch.where(real_BT, logprob_BT, 0.0)
