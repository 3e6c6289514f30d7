"""GRPO's algorithm pieces (dsv4train/posttrain/grpo/): advantages, the clipped surrogate, loss aggregation, KL
estimators, V3.2's off-policy sequence mask and keep-sampling log-probs.

Expected values are hand-computed (the arithmetic is in the comments), or come from a float64 reference written
token by token in this file from the formulas of posttrain anchors §1.1–1.7 and arch ref §9.3 (verl's
`core_algos.py` conventions: Bessel-corrected std + 1e-6, ρ = exp(clamp(Δ, −20, 20)), L = max(pg1, pg2), dual clip
for A < 0 only, k3 clamps; TRL's loss types "grpo" / "dapo" / "dr_grpo" for the aggregations), or from the
sampler (`dsv4train.inference.sampling.sample`) the keep-sampling log-probs must agree with."""

import math

import pytest
import torch

from dsv4train.inference.sampling import sample
from dsv4train.posttrain.grpo.advantages import constant_groups, group_advantages, overlong_penalty
from dsv4train.posttrain.grpo.kl import KL_KINDS, kl_estimate, unbiased_k3
from dsv4train.posttrain.grpo.masks import keep_sampling_logprobs, off_policy_sequence_mask, sampling_support
from dsv4train.posttrain.grpo.policy_loss import AGGREGATIONS, GrpoLossTerms, aggregate, grpo_loss, ppo_clip_loss

F64 = torch.float64
EXACT = dict(rtol=0, atol=1e-12)  # float64 arithmetic of a few ops: agreement to rounding


def t64(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=F64)


# ----------------------------------------------------------------------------- advantages
def test_group_advantages_standardise_within_contiguous_groups_with_bessel_std():
    # Group 1 [1, 0, 0, 1]: mean 0.5, Bessel var (4 · 0.25) / 3 = 1/3, std sqrt(1/3) = 0.57735
    #   -> A = ±0.5 / (0.57735 + 1e-6) = ±0.8660239 (±0.8660254 without eps).
    # Group 2 [1, 1, 1, 0]: mean 0.75, deviations (.25, .25, .25, -.75), Σ² = 0.75, var 0.75/3 = 0.25, std 0.5
    #   -> A = (0.5, 0.5, 0.5, -1.5) (less 1e-6 relative from eps).
    # Rows are grouped prompt-major (rows 0-3, then 4-7), not interleaved.
    adv = group_advantages(t64([1, 0, 0, 1, 1, 1, 1, 0]), group_size=4)
    a = 0.5 / (math.sqrt(1 / 3) + 1e-6)
    s = 0.25 / (0.5 + 1e-6)  # a deviation of 0.25 over std 0.5 + eps
    torch.testing.assert_close(adv, t64([a, -a, -a, a, s, s, s, -3 * s]), **EXACT)


def test_group_advantages_without_std_are_dr_grpo_and_equal_rewards_give_zero():
    # Dr. GRPO: r - mean only: [1, 0, 0, 1] -> ±0.5; [1, 1, 1, 0] -> (.25, .25, .25, -.75).
    adv = group_advantages(t64([1, 0, 0, 1, 1, 1, 1, 0]), group_size=4, normalize_std=False)
    torch.testing.assert_close(adv, t64([0.5, -0.5, -0.5, 0.5, 0.25, 0.25, 0.25, -0.75]), **EXACT)
    # A constant group: std 0, (r - mean) / (0 + eps) = 0 / eps = 0, never NaN; integer rewards become fp32.
    assert group_advantages(torch.tensor([2, 2, 2]), group_size=3).tolist() == [0.0, 0.0, 0.0]


def test_constant_groups_use_exact_equality():
    # Groups (1, 1), (0, 1), (0, 0), (1, 1 + 1e-9): constant, not, constant, not (exact equality, float64).
    rewards = t64([1, 1, 0, 1, 0, 0, 1, 1 + 1e-9])
    assert constant_groups(rewards, group_size=2).tolist() == [True, False, True, False]


def test_overlong_penalty_is_dapos_linear_ramp():
    # max_len 20, buffer 4: no penalty up to 16 tokens, then -(len - 16) / 4 · factor: 17 -> -0.25, 18 -> -0.5,
    # 20 -> -1 (· factor 1); factor 0.5 halves it.
    lengths = torch.tensor([10, 16, 17, 18, 20])
    assert overlong_penalty(lengths, max_len=20, buffer_len=4, factor=1.0).tolist() == [0, 0, -0.25, -0.5, -1.0]
    assert overlong_penalty(lengths, max_len=20, buffer_len=4, factor=0.5).tolist() == [0, 0, -0.125, -0.25, -0.5]


# ----------------------------------------------------------------------------- KL estimators
def test_kl_estimators_hand_values():
    # Token 1: π_θ = 0.5, π_ref = 0.25. k1 = log 2 = 0.693147; k2 = ½ (log 2)² = 0.240227;
    #   k3 = r - log r - 1 with r = π_ref/π_θ = 0.5: 0.5 + log 2 - 1 = 0.193147.
    # Token 2: π_θ = 0.25, π_ref = 0.5: k1 = -log 2; k2 = 0.240227; k3 = 2 - log 2 - 1 = 0.306853.
    logp, ref = t64([[math.log(0.5), math.log(0.25)]]), t64([[math.log(0.25), math.log(0.5)]])
    l2 = math.log(2)
    torch.testing.assert_close(kl_estimate(logp, ref, "k1"), t64([[l2, -l2]]), **EXACT)
    torch.testing.assert_close(kl_estimate(logp, ref, "k2"), t64([[0.5 * l2**2, 0.5 * l2**2]]), **EXACT)
    torch.testing.assert_close(kl_estimate(logp, ref, "k3"), t64([[0.5 + l2 - 1, 2 - l2 - 1]]), **EXACT)


def test_k3_is_clamped_like_verl():
    # log r = ref - logp. 2.5 -> e^2.5 - 3.5 = 8.682494 (under the clamp); 3 -> e^3 - 4 = 16.0855 -> 10;
    # 30 -> clamped to 20 first, then 10; -30 -> -20: e^-20 + 20 - 1 = 19 -> 10.
    logp = t64([[0.0, 0.0, 0.0, 0.0]])
    ref = t64([[2.5, 3.0, 30.0, -30.0]])
    torch.testing.assert_close(kl_estimate(logp, ref, "k3"), t64([[math.exp(2.5) - 3.5, 10, 10, 10]]), **EXACT)


def test_unbiased_k3_hand_value_and_ratio_clamp():
    # π_θ = 0.5, π_old = 0.25, π_ref = 0.25: ρ = 2, k3 = 0.5 + log 2 - 1 = 0.193147 -> 0.386294.
    # A log-ratio to π_old of 30 is clamped to 20: ρ = e^20 (k3 = 0 there: π_ref = π_θ).
    logp = t64([[math.log(0.5), 0.0]])
    old = t64([[math.log(0.25), -30.0]])
    ref = t64([[math.log(0.25), 0.0]])
    out = unbiased_k3(logp, old, ref)
    torch.testing.assert_close(out[0, 0], t64(2 * (0.5 + math.log(2) - 1)), **EXACT)
    assert out[0, 1].item() == 0.0
    out = unbiased_k3(t64([[0.0]]), t64([[-30.0]]), t64([[-1.0]]))  # k3 = e^-1 + 1 - 1 = e^-1
    torch.testing.assert_close(out, t64([[math.exp(20) * math.exp(-1)]]), rtol=1e-12, atol=0)


def _categorical():
    """Three distributions over 5 outcomes (float64), π_θ = softmax(θ) with θ a leaf."""
    theta = t64([0.3, -1.2, 0.8, 0.0, -0.5]).requires_grad_(True)
    old = t64([0.1, -0.7, 0.2, 0.4, -0.1]).log_softmax(0)
    ref = t64([-0.2, 0.5, 0.3, -0.9, 0.1]).log_softmax(0)
    return theta, old, ref


def test_unbiased_k3_is_the_exact_kl_under_old_samples_in_value_and_gradient():
    """V3.2: E_{o~π_old}[ρ(o) k3(o)] = KL(π_θ ‖ π_ref) for every θ, so the gradients agree too. The expectation is
    the exact sum over the 5 outcomes (no sampling); plain k3 under π_old is off, and so is the gradient of the
    estimator with the ratio detached."""
    theta, old, ref = _categorical()
    logp = theta.log_softmax(0)
    exact_kl = (logp.exp() * (logp - ref)).sum()  # Σ π_θ log(π_θ / π_ref), written from the definition
    p_old = old.exp()
    expected_unbiased = (p_old * unbiased_k3(logp[None], old[None], ref[None])[0]).sum()
    torch.testing.assert_close(expected_unbiased, exact_kl, **EXACT)
    (grad_unbiased,) = torch.autograd.grad(expected_unbiased, theta, retain_graph=True)
    (grad_kl,) = torch.autograd.grad(exact_kl, theta, retain_graph=True)
    torch.testing.assert_close(grad_unbiased, grad_kl, **EXACT)

    plain = (p_old * kl_estimate(logp[None], ref[None], "k3")[0]).sum()
    assert abs(plain.item() - exact_kl.item()) > 0.05, (plain.item(), exact_kl.item())  # biased under π_old
    detached = (p_old * (logp - old).exp().detach() * kl_estimate(logp[None], ref[None], "k3")[0]).sum()
    (grad_detached,) = torch.autograd.grad(detached, theta)
    assert (grad_detached - grad_kl).abs().max() > 0.05  # the ratio must carry gradient


# ----------------------------------------------------------------------------- clipped surrogate
# Rows: A = +1, -1, +2; ratios ρ per token. eps_low 0.2, eps_high 0.28 (DAPO): clip(ρ) to [0.8, 1.28].
RATIOS = [[1.5, 0.5, 1.1, 5.0], [1.5, 0.5, 1.1, 5.0], [1.0, 0.9, 1.2, 0.7]]
ADV = [1.0, -1.0, 2.0]


def _ratio_inputs():
    old = torch.full((3, 4), math.log(0.3), dtype=F64)
    logp = (old + torch.log(t64(RATIOS))).requires_grad_(True)
    return logp, old, t64(ADV)


def test_ppo_clip_loss_hand_values_clip_mask_and_gradients():
    # L = max(-A ρ, -A clip(ρ, 0.8, 1.28)), for A < 0 then min(L, -A · 3):
    # A=+1: ρ 1.5 -> max(-1.5, -1.28) = -1.28 clipped; 0.5 -> max(-0.5, -0.8) = -0.5; 1.1 -> -1.1;
    #       5 -> max(-5, -1.28) = -1.28 clipped (dual clip does not apply to A > 0).
    # A=-1: ρ 1.5 -> max(1.5, 1.28) = 1.5; 0.5 -> max(0.5, 0.8) = 0.8 clipped; 1.1 -> 1.1;
    #       5 -> max(5, 1.28) = 5 -> dual clip min(5, 3) = 3.
    # A=+2: ρ 1, 0.9, 1.2 inside the range -> -2, -1.8, -2.4; 0.7 -> max(-1.4, -1.6) = -1.4.
    # dL/dlogπ on the unclipped branch is -A ρ; 0 where the clip or the dual clip took over.
    logp, old, adv = _ratio_inputs()
    loss, clipped = ppo_clip_loss(logp, old, adv, eps_low=0.2, eps_high=0.28, dual_clip=3.0)
    expected = t64([[-1.28, -0.5, -1.1, -1.28], [1.5, 0.8, 1.1, 3.0], [-2.0, -1.8, -2.4, -1.4]])
    torch.testing.assert_close(loss, expected, **EXACT)
    assert clipped.tolist() == [[True, False, False, True], [False, True, False, False], [False] * 4]
    (grad,) = torch.autograd.grad(loss.sum(), logp)
    expected_grad = t64([[0.0, -0.5, -1.1, 0.0], [1.5, 0.0, 1.1, 0.0], [-2.0, -1.8, -2.4, -1.4]])
    torch.testing.assert_close(grad, expected_grad, **EXACT)


def test_ppo_clip_loss_without_dual_clip_and_ratio_clamp():
    # Without dual clip the A=-1, ρ=5 token keeps L = 5 and gradient -A ρ = 5.
    logp, old, adv = _ratio_inputs()
    loss, _ = ppo_clip_loss(logp, old, adv, eps_low=0.2, eps_high=0.28)
    assert loss[1, 3].item() == pytest.approx(5.0, rel=1e-12)
    (grad,) = torch.autograd.grad(loss[1, 3], logp)
    assert grad[1, 3].item() == pytest.approx(5.0, rel=1e-12)
    # verl's clamp of the log-ratio to 20: A = -1 and logπ - logπ_old = 30 gives L = e^20, not e^30.
    loss, _ = ppo_clip_loss(t64([[30.0]]), t64([[0.0]]), t64([-1.0]), eps_low=0.2, eps_high=0.2)
    assert loss.item() == pytest.approx(math.exp(20), rel=1e-12)


# ----------------------------------------------------------------------------- aggregation
# Row 0: three real tokens 1, 2, 3; row 1: real 4, 5 and padding NaN; row 2: no real token (padding inf, NaN, 9).
AGG_LOSS = [[1.0, 2.0, 3.0], [4.0, 5.0, math.nan], [math.inf, math.nan, 9.0]]
AGG_MASK = [[1, 1, 1], [1, 1, 0], [0, 0, 0]]


@pytest.mark.parametrize(
    "mode, horizon, expected",
    [
        ("token-mean", None, 3.0),  # (1+2+3+4+5) / 5 tokens
        ("seq-mean-token-mean", None, 3.25),  # sequence means 2 and 4.5; the empty row left out: 6.5 / 2
        ("seq-mean-token-sum", None, 5.0),  # sums 6, 9, 0 over B = 3 sequences: 15 / 3
        ("seq-mean-token-sum-norm", 4, 1.25),  # Dr. GRPO: 15 / (B · horizon) = 15 / 12
    ],
)
@pytest.mark.parametrize("mask_dtype", [torch.bool, F64])
def test_aggregate_modes_hand_values_and_padding_never_leaks(mode, horizon, expected, mask_dtype):
    loss = t64(AGG_LOSS).requires_grad_(True)
    out = aggregate(loss, torch.tensor(AGG_MASK).to(mask_dtype), mode, horizon)
    assert out.item() == pytest.approx(expected, rel=1e-12)
    (grad,) = torch.autograd.grad(out, loss)
    assert torch.isfinite(grad).all() and (grad[torch.tensor(AGG_MASK) == 0] == 0).all()


def test_aggregate_of_no_real_token_is_zero():
    for mode in ("token-mean", "seq-mean-token-mean"):
        assert aggregate(torch.ones(2, 3), torch.zeros(2, 3, dtype=torch.bool), mode).item() == 0.0
    assert AGGREGATIONS[0] == "token-mean"  # the default, and the Learner's convention


# ----------------------------------------------------------------------------- off-policy sequence mask
def test_off_policy_sequence_mask_hand_values():
    # δ = 0.2; d_i = mean over real tokens of logπ_old - logπ_θ (padding holds 10, which must be ignored):
    # row 0: A -1, d (0.3 + 0.3) / 2 = 0.3 > δ -> drop;   row 1: A +1, d 0.3 -> keep (only A < 0 is masked);
    # row 2: A -1, d (0.1 + 0.2 + 0) / 3 = 0.1 <= δ -> keep;  row 3: A -1, d 0.1 (mean over all 3 positions would
    # be 3.4) -> keep;  row 4: A 0, d 0.5 -> keep (A < 0 is strict).
    divergence = t64([[0.3, 0.3, 10], [0.3, 0.3, 10], [0.1, 0.2, 0.0], [0.1, 0.1, 10], [0.5, 0.5, 0.5]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0], [1, 1, 1], [1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    logp = torch.full((5, 3), -1.0, dtype=F64)
    old = logp + divergence
    adv = t64([-1.0, 1.0, -1.0, -1.0, 0.0])
    assert off_policy_sequence_mask(logp, old, adv, mask, delta=0.2).tolist() == [False, True, True, True, True]
    assert off_policy_sequence_mask(logp, old, adv, mask, delta=0.35).tolist() == [True] * 5
    assert off_policy_sequence_mask(logp, old, adv, mask, delta=None).tolist() == [True] * 5


# ----------------------------------------------------------------------------- the composed loss
def _value(x) -> float:
    return x.item() if torch.is_tensor(x) else x


def reference_grpo_loss(logp, old, adv, mask, ref, *, eps_low, eps_high, dual_clip, beta, kind, delta, mode, horizon):
    """Float64, token by token with Python control flow, from the formulas (arch ref §9.3, posttrain anchors
    §1.2, §1.7): returns (loss, policy_loss, kl_mean, clip_fraction, masked_fraction, n_dual_clipped)."""
    batch, seq = logp.shape
    zero = logp.new_zeros(())
    seq_policy, seq_total, seq_count = [], [], []
    kl_sum, n_real, n_clipped, n_in_policy, n_masked, n_dual = zero, 0, 0, 0, 0, 0
    for i in range(batch):
        real = [t for t in range(seq) if mask[i, t]]
        a = adv[i].item()
        divergence = sum((old[i, t] - logp[i, t]).item() for t in real) / max(len(real), 1)
        keep = delta is None or not (a < 0 and divergence > delta)
        policy_i, total_i = zero, zero
        for t in real:
            ratio = torch.exp(logp[i, t] - old[i, t])
            low, high = 1 - eps_low, 1 + eps_high
            clipped_ratio = low if ratio.item() < low else high if ratio.item() > high else ratio
            unclipped_term, clipped_term = -a * ratio, -a * clipped_ratio
            is_clipped = _value(clipped_term) > _value(unclipped_term)
            term = clipped_term if is_clipped else unclipped_term
            if dual_clip is not None and a < 0 and _value(term) > -a * dual_clip:
                term, n_dual = -a * dual_clip, n_dual + 1
            term = term if keep else zero
            kl = zero
            if beta > 0:
                log_r = ref[i, t] - logp[i, t]
                k3 = torch.exp(log_r) - log_r - 1
                kl = {"k1": -log_r, "k2": 0.5 * log_r**2, "k3": k3, "unbiased_k3": ratio * k3}[kind]
                kl_sum = kl_sum + kl
            policy_i, total_i = policy_i + term, total_i + term + beta * kl
            n_real += 1
            n_in_policy += keep
            n_clipped += keep and is_clipped
            n_masked += not keep
        seq_policy.append(policy_i)
        seq_total.append(total_i)
        seq_count.append(len(real))

    def reduce(sums):
        if mode == "token-mean":
            return sum(sums, zero) / n_real
        if mode == "seq-mean-token-mean":
            means = [s / c for s, c in zip(sums, seq_count) if c > 0]
            return sum(means, zero) / len(means)
        if mode == "seq-mean-token-sum":
            return sum(sums, zero) / batch
        return sum(sums, zero) / (batch * horizon)

    kl_mean = kl_sum / n_real
    return reduce(seq_total), reduce(seq_policy), kl_mean, n_clipped / n_in_policy, n_masked / n_real, n_dual


def _rollout_batch():
    """B = 6 (2 prompts × G = 3), T = 5, right-padded. Log-ratios spread by 0.5, so some tokens clip and some
    A < 0 tokens pass a dual clip of 1.5; row 2 (A < 0) drifted by -0.5, so the off-policy mask (δ = 0.25) drops
    it. The test asserts each of these paths is taken."""
    gen = torch.Generator().manual_seed(0)
    batch, seq = 6, 5
    lengths = torch.tensor([5, 3, 4, 1, 5, 2])
    mask = torch.arange(seq)[None, :] < lengths[:, None]
    old = torch.rand(batch, seq, generator=gen, dtype=F64).mul(0.9).add(0.05).log()
    noise = torch.randn(batch, seq, generator=gen, dtype=F64) * 0.5
    shift = t64([0.0, 0.0, -0.5, 0.0, 0.0, 0.0])[:, None]
    logp = torch.where(mask, old + noise + shift, -30.0)  # padding holds garbage the loss must ignore
    ref = old + torch.randn(batch, seq, generator=gen, dtype=F64) * 0.2
    adv = t64([1.2, -0.4, -0.8, 0.9, -1.1, 0.2])
    return logp.requires_grad_(True), old, adv, mask, ref


@pytest.mark.parametrize(
    "kind, mode, dual_clip, delta, beta",
    [
        ("unbiased_k3", "token-mean", 1.5, 0.25, 0.1),
        ("k3", "seq-mean-token-mean", None, 0.25, 0.05),
        ("k1", "seq-mean-token-sum", 1.5, None, 0.1),
        ("k2", "seq-mean-token-sum-norm", None, 0.25, 0.2),
        ("k3", "token-mean", 1.5, 0.25, 0.0),
    ],
)
def test_grpo_loss_equals_the_float64_reference_in_value_metrics_and_gradient(kind, mode, dual_clip, delta, beta):
    logp, old, adv, mask, ref = _rollout_batch()
    horizon = 5 if mode == "seq-mean-token-sum-norm" else None
    settings = dict(eps_low=0.2, eps_high=0.28, dual_clip=dual_clip, beta=beta, delta=delta, mode=mode, horizon=horizon)
    terms = grpo_loss(logp, old, adv, mask, kl_kind=kind, ref_logprob_BT=ref if beta else None, **settings)
    assert isinstance(terms, GrpoLossTerms)
    loss, policy, kl, clip_fraction, masked_fraction, n_dual = reference_grpo_loss(
        logp, old, adv, mask, ref, kind=kind, **settings
    )
    assert 0 < clip_fraction < 1  # the inputs exercise the clip ...
    assert (masked_fraction > 0) == (delta is not None)  # ... the off-policy mask ...
    assert (n_dual > 0) == (dual_clip is not None)  # ... and the dual clip
    torch.testing.assert_close(terms.loss, loss, **EXACT)
    torch.testing.assert_close(terms.policy_loss, policy, **EXACT)
    torch.testing.assert_close(terms.kl, kl if beta else torch.zeros((), dtype=F64), **EXACT)
    assert terms.clip_fraction.item() == pytest.approx(clip_fraction, rel=1e-12)
    assert terms.masked_fraction.item() == pytest.approx(masked_fraction, rel=1e-12)
    assert not terms.policy_loss.requires_grad and not terms.kl.requires_grad
    (grad,) = torch.autograd.grad(terms.loss, logp)
    (grad_ref,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(grad, grad_ref, **EXACT)


# ----------------------------------------------------------------------------- keep-sampling log-probs
def test_keep_sampling_logprobs_hand_values():
    # logits (2, 1, 0, -1); probabilities 0.6439, 0.2369, 0.0871, 0.0321 (cumulative 0.6439, 0.8808, 0.9679, 1).
    # top_k 2 -> support {0, 1}: logπ(0) = 2 - log(e² + e) = -log(1 + e^-1) = -0.313262; logπ(1) = -log(1 + e).
    # temperature 2, top_k 2 -> logits (1, 0.5): logπ(0) = -log(1 + e^-0.5) = -0.474077.
    # top_p 0.9 -> mass ranked above token 2 is 0.8808 < 0.9 (kept), above token 3 0.9679 (dropped): support
    #   {0, 1, 2}, logπ(2) = 0 - log(e² + e + 1) = -2.407606.
    logits = torch.tensor([[[2.0, 1.0, 0.0, -1.0]] * 2])  # [B=1, T=2, V=4]
    top2 = sampling_support(logits, temperature=1.0, top_k=2, top_p=1.0)
    assert top2[0, 0].tolist() == [True, True, False, False]
    out = keep_sampling_logprobs(logits, torch.tensor([[0, 1]]), top2)
    torch.testing.assert_close(out, torch.tensor([[-math.log(1 + math.exp(-1)), -math.log(1 + math.e)]]))
    hot = keep_sampling_logprobs(logits, torch.tensor([[0, 0]]), sampling_support(logits, 2.0, 2, 1.0), 2.0)
    torch.testing.assert_close(hot[0, 0], torch.tensor(-math.log(1 + math.exp(-0.5))))
    nucleus = sampling_support(logits, temperature=1.0, top_k=0, top_p=0.9)
    assert nucleus[0, 0].tolist() == [True, True, True, False]
    out = keep_sampling_logprobs(logits, torch.tensor([[2, 2]]), nucleus)
    torch.testing.assert_close(out[0, 0], torch.tensor(-math.log(math.exp(2) + math.e + 1)))


def test_keep_sampling_logprobs_equal_the_samplers_and_give_no_gradient_outside_the_support():
    """The rollout's `sample` returns the log-prob under the distribution it sampled from; the trainer's
    keep-sampling log-prob of the same logits must be that number (fp32 ops in the same order: 1e-6)."""
    gen = torch.Generator().manual_seed(1)
    batch, seq, vocab = 2, 3, 11
    logits = torch.randn(batch, seq, vocab, generator=gen) * 2
    temperature, top_k, top_p = torch.tensor([0.7, 1.3]), torch.tensor([4, 0]), 0.8
    rows = batch * seq
    drawn = sample(
        logits.reshape(rows, vocab),
        temperature.repeat_interleave(seq),
        top_k.repeat_interleave(seq),
        torch.full((rows,), top_p),
        seeds_R=torch.arange(rows),
        counters_R=torch.zeros(rows, dtype=torch.long),
    )
    support = sampling_support(logits, temperature, top_k, top_p)
    assert (support[0].sum(-1) <= 4).all() and (support.sum(-1) < vocab).all()  # the truncation is real
    leaf = logits.clone().requires_grad_(True)
    out = keep_sampling_logprobs(leaf, drawn.tokens_R.view(batch, seq), support, temperature)
    torch.testing.assert_close(out, drawn.sampled_logprob_R.view(batch, seq), rtol=0, atol=1e-6)
    (grad,) = torch.autograd.grad(out.sum(), leaf)
    assert (grad[~support] == 0).all() and (grad[support] != 0).any()


def test_keep_sampling_logprobs_padding_gets_zero_without_nan():
    logits = torch.randn(1, 2, 5).requires_grad_(True)
    support = torch.zeros(1, 2, 5, dtype=torch.bool)
    support[0, 0, 3] = True  # position 0 real (only token 3 possible); position 1 padding with an empty support
    tokens = torch.tensor([[3, -100]])  # padding holds an id outside the vocabulary
    out = keep_sampling_logprobs(logits, tokens, support, mask_BT=torch.tensor([[1.0, 0.0]]))
    assert out.tolist() == [[0.0, 0.0]]  # a one-token support: log 1 = 0; padding: 0
    (grad,) = torch.autograd.grad(out.sum(), logits)
    assert torch.isfinite(grad).all()


# ----------------------------------------------------------------------------- bad input
def _bt(*rows):
    return torch.zeros(*rows, dtype=F64)


BAD_INPUTS = [
    (lambda: group_advantages(torch.zeros(6), group_size=4), "not divisible by group_size=4"),
    (lambda: group_advantages(torch.zeros(6), group_size=1), "group_size must be an integer >= 2"),
    (lambda: group_advantages(torch.zeros(2, 2), group_size=2), r"rewards must be \[B\]"),
    (lambda: group_advantages(t64([0, math.nan]), group_size=2), "rewards must be finite"),
    (lambda: group_advantages(torch.zeros(4), group_size=2, eps=0.0), "eps must be a finite number > 0"),
    (lambda: constant_groups(torch.zeros(5), group_size=2), "not divisible"),
    (lambda: overlong_penalty(torch.tensor([21]), 20, 4, 1.0), r"lengths must lie in \[0, max_len=20\]"),
    (lambda: overlong_penalty(torch.tensor([1]), 20, 0, 1.0), "buffer_len must be an integer in"),
    (lambda: overlong_penalty(torch.tensor([1]), 20, 4, -1.0), "factor must be a finite number >= 0"),
    (lambda: kl_estimate(_bt(2, 3), _bt(2, 4), "k3"), r"ref_logprob_BT has shape \(2, 4\)"),
    (lambda: kl_estimate(_bt(2, 3), _bt(2, 3), "k4"), "unknown KL estimator 'k4'"),
    (lambda: kl_estimate(_bt(2, 3), _bt(2, 3), "unbiased_k3"), r"call unbiased_k3\(...\) instead"),
    (lambda: unbiased_k3(_bt(6), _bt(6), _bt(6)), r"must be \[B, T\]"),
    (lambda: ppo_clip_loss(_bt(2, 3), _bt(2, 3), _bt(3), 0.2, 0.2), r"advantages_B must be \[B\] = \[2\]"),
    (lambda: ppo_clip_loss(_bt(2, 3), _bt(2, 3), _bt(2), 0.0, 0.2), r"eps_low must be a number in \(0, 1\)"),
    (lambda: ppo_clip_loss(_bt(2, 3), _bt(2, 3), _bt(2), 0.2, -0.1), "eps_high must be a finite number > 0"),
    (lambda: ppo_clip_loss(_bt(2, 3), _bt(2, 3), _bt(2), 0.2, 0.2, 1.0), "dual_clip must be a finite number > 1"),
    (lambda: aggregate(_bt(2, 3), _bt(2, 3), "token-sum"), "unknown loss aggregation mode 'token-sum'"),
    (lambda: aggregate(_bt(2, 3), _bt(2, 3), "seq-mean-token-sum-norm"), "needs horizon"),
    (lambda: aggregate(_bt(2, 3), _bt(2, 3), "token-mean", horizon=8), "horizon is only used by"),
    (lambda: aggregate(_bt(2, 3), _bt(2, 3) + 0.5, "token-mean"), "mask_BT must be bool or hold only 0 and 1"),
    (lambda: grpo_loss(_bt(2, 3), _bt(2, 3), _bt(2), _bt(2, 3), eps_low=0.2, eps_high=0.2, beta=0.1), "needs ref"),
    (lambda: grpo_loss(_bt(2, 3), _bt(2, 3), _bt(2), _bt(2, 3), eps_low=0.2, eps_high=0.2, kl_kind="kl"), "kl_kind"),
    (lambda: grpo_loss(_bt(2, 3), _bt(2, 3), _bt(2), _bt(2, 3), eps_low=0.2, eps_high=0.2, beta=-1), "beta must"),
    (lambda: off_policy_sequence_mask(_bt(2, 3), _bt(2, 3), _bt(2), _bt(2, 3), -0.1), "delta must be a finite"),
    (lambda: sampling_support(_bt(1, 2, 4), 1.0, -1, 1.0), "top_k must be an integer >= 0"),
    (lambda: sampling_support(_bt(1, 2, 4), 1.0, 0, torch.tensor([1.5])), r"top_p must lie in \(0, 1\]"),
    (lambda: sampling_support(_bt(2, 4), 1.0, 0, 1.0), r"logits must be \[B, T, V\]"),
    (
        lambda: keep_sampling_logprobs(_bt(1, 1, 3), torch.tensor([[1]]), torch.tensor([[[True, False, True]]])),
        "outside its sampling support",
    ),
    (
        lambda: keep_sampling_logprobs(_bt(1, 1, 3), torch.tensor([[1]]), torch.ones(1, 1, 3, dtype=torch.bool), 0.0),
        "temperature must be finite and > 0",
    ),
    (
        lambda: keep_sampling_logprobs(_bt(1, 1, 3), torch.tensor([[3]]), torch.ones(1, 1, 3, dtype=torch.bool)),
        r"token ids in \[0, V=3\)",
    ),
]


@pytest.mark.parametrize("call, match", BAD_INPUTS, ids=[m for _, m in BAD_INPUTS])
def test_bad_input_is_refused_with_a_message_that_names_it(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_every_kl_kind_is_accepted_by_grpo_loss():
    logp, old, adv, mask, ref = _rollout_batch()
    for kind in KL_KINDS:
        terms = grpo_loss(logp, old, adv, mask, eps_low=0.2, eps_high=0.2, beta=0.1, kl_kind=kind, ref_logprob_BT=ref)
        assert torch.isfinite(terms.loss) and terms.kl.item() != 0
