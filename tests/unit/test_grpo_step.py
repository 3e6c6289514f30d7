"""GRPO's training step (dsv4train/posttrain/grpo/): from rollouts to the Learner's micro-batches (batch.py), the
loss in the Learner's sum-over-targets convention (loss.py), the rollout worker (rollout.py), and the Learner seam
that replays a rollout's routes (train/learner.py `_forward`, train/losses.py `batch_routes`).

The references come from outside the code under test: `policy_loss.aggregate` / `grpo_loss` and the masks of
masks.py (tested on their own in tests/unit/test_grpo_algorithms.py), hand-written layouts, float64 log-softmaxes
written here, the model's own forward, and the Engine's documented batch invariance."""

import copy
import os
import subprocess
import sys

import pytest
import torch

from dsv4train.config.pretrain import TrainConfig
from dsv4train.inference.engine import Completion
from dsv4train.inference.sampling import SamplingParams
from dsv4train.models.model import ModelOutput
from dsv4train.posttrain.grpo.batch import ScoredRollout, aggregation_weights, micro_batches
from dsv4train.posttrain.grpo.kl import kl_estimate
from dsv4train.posttrain.grpo.loss import GRPOLoss
from dsv4train.posttrain.grpo.masks import keep_sampling_logprobs, sampling_support
from dsv4train.posttrain.grpo.policy_loss import AGGREGATIONS, aggregate, grpo_loss
from dsv4train.posttrain.grpo.rollout import Rollout, RolloutWorker, rollout_seed
from dsv4train.testing.sensitive_models import SENSITIVE_INIT, sensitive_model
from dsv4train.testing.toy_configs import tiny_config
from dsv4train.train.learner import Learner
from dsv4train.train.losses import IGNORE, NextTokenLoss

F64 = torch.float64
LAYERS = ("swa", "csa", "hca", "csa")  # layer 0 hash-routed, 1..3 learned
LEARNED = (1, 2, 3)
K = 2  # tiny_config's n_activated_experts
E = 4  # tiny_config's n_routed_experts
PAD = 0
CFG = tiny_config(LAYERS, vocab_size=64, max_seq_len=64, n_mtp_layers=0)
# No clipping, no aux losses, no router bias update: the step is the GRPO loss's gradient alone.
NO_EXTRAS = TrainConfig(grad_clip=1e9, balance_loss_weight=0.0, indexer_loss_weight=0.0, bias_update_speed=0.0)
EPS_LOW, EPS_HIGH = 0.2, 0.28


def _completion(tokens, logprobs, routes=None) -> Completion:
    return Completion(list(tokens), list(logprobs), list(logprobs), "stop", routes or {})


def _scored(prompt, completion, advantage=0.0, beta=0.0, group=0) -> ScoredRollout:
    return ScoredRollout(Rollout(group, list(prompt), completion, 0), "math", 0.0, advantage, beta)


# ----------------------------------------------------------------------------- aggregation_weights
@pytest.mark.parametrize("mode", AGGREGATIONS)
def test_aggregation_weights_over_n_equal_aggregate_for_any_cut_into_micro_batches(mode):
    """Σ_i w_i Σ_t ℓ_it / N is `aggregate(ℓ, mask, mode)` (float64), with an empty sequence among them (it counts
    in B for the seq-mean-token-sum modes, not for seq-mean-token-mean). The same weights placed by
    `micro_batches` at the label positions of two arbitrary groups of micro-batches sum to the same value."""
    lengths = [5, 0, 1, 7, 3, 2]
    B, T = len(lengths), max(lengths)
    horizon = 9 if mode == "seq-mean-token-sum-norm" else None
    g = torch.Generator().manual_seed(0)
    loss_BT = torch.randn(B, T, generator=g, dtype=F64)
    mask_BT = torch.arange(T) < torch.tensor(lengths).unsqueeze(1)
    loss_BT = torch.where(mask_BT, loss_BT, torch.nan)  # padding must never enter
    want = aggregate(loss_BT, mask_BT, mode, horizon)

    w = aggregation_weights(lengths, mode, horizon)
    N = sum(lengths)
    assert len(w) == B
    got = sum(w[i] * float(loss_BT[i, : lengths[i]].sum()) for i in range(B) if lengths[i]) / N
    assert got == pytest.approx(float(want), rel=1e-12)  # float64, a few dozen terms: rounding only

    # The same weights in micro-batches: each row's label positions carry its weight and its per-token losses.
    prompt_lengths = [3, 1, 4, 2, 5, 1]
    samples = [
        _scored(range(1, 1 + prompt_lengths[i]), _completion(range(10, 10 + n), [0.0] * n))
        for i, n in enumerate(lengths)
    ]
    real = [i for i in range(B) if lengths[i]]  # an empty completion cannot be trained on (refused below)
    groups = ([real[3], real[0]], [real[2], real[4], real[1]])  # any order, any cut
    total = 0.0
    for group in groups:
        for mb, rows in zip(
            micro_batches([samples[i] for i in group], [w[i] for i in group], 2, (), PAD),
            (group[:2], group[2:]),
        ):
            for b, i in enumerate(rows):
                at_S = mb["labels"][b] != IGNORE
                assert int(at_S.sum()) == lengths[i]
                total += float((mb["loss_weights"][b, at_S].double() * loss_BT[i, : lengths[i]]).sum())
    # fp32 loss_weights (N / (B' |o_i|) etc. rounded to 24 bits): ~6e-8 relative per weight
    assert total / N == pytest.approx(float(want), rel=1e-6)


def test_aggregation_weights_refuse_bad_mode_horizon_and_lengths():
    with pytest.raises(ValueError, match="unknown loss aggregation mode"):
        aggregation_weights([1, 2], "mean")
    for horizon in (None, 0, -3, 2.5, True):
        with pytest.raises(ValueError, match="needs horizon"):
            aggregation_weights([1, 2], "seq-mean-token-sum-norm", horizon)
    with pytest.raises(ValueError, match="horizon is only used by"):
        aggregation_weights([1, 2], "token-mean", 8)
    with pytest.raises(ValueError, match=">= 0"):
        aggregation_weights([1, -1], "token-mean")
    for mode in AGGREGATIONS:
        with pytest.raises(ValueError, match="no sequences"):
            aggregation_weights([], mode, 8 if mode == "seq-mean-token-sum-norm" else None)


# ----------------------------------------------------------------------------- micro_batches
def _routes(L: int, first: int) -> dict[int, torch.Tensor]:
    """Distinct, known experts [L, K] per learned layer: layer i token t -> (first + i + t) % E and the next."""
    out = {}
    for i in LEARNED:
        e = (first + i + torch.arange(L)) % E
        out[i] = torch.stack([e, (e + 1) % E], -1)
    return out


@pytest.fixture
def hand_rollouts():
    """Prompt 3 + completion 2 (4 inputs), prompt 5 + completion 4 (8 inputs)."""
    r0 = _completion([21, 22], [-0.1, -0.2], _routes(4, 0))
    r1 = _completion([41, 42, 43, 44], [-1.1, -1.2, -1.3, -1.4], _routes(8, 2))
    return [
        _scored([11, 12, 13], r0, advantage=0.5, beta=0.01, group=0),
        _scored([31, 32, 33, 34, 35], r1, advantage=-1.5, beta=0.02, group=1),
    ]


def test_micro_batch_layout_by_hand(hand_rollouts):
    (mb,) = micro_batches(hand_rollouts, [0.25, 0.75], rows_per_batch=2, learned_layers=LEARNED, pad_id=PAD)
    X = IGNORE
    # input_ids = (prompt + completion)[:-1], right-padded with pad_id to the longest row (8 inputs)
    assert mb["input_ids"].tolist() == [[11, 12, 13, 21, PAD, PAD, PAD, PAD], [31, 32, 33, 34, 35, 41, 42, 43]]
    assert mb["input_ids"].dtype == torch.long
    # labels: the completion at positions P-1 .. P+C-2, IGNORE over the prompt and the padding
    assert mb["labels"].tolist() == [[X, X, 21, 22, X, X, X, X], [X, X, X, X, 41, 42, 43, 44]]
    at = mb["labels"] != IGNORE
    assert mb["old_logprobs"][0, at[0]].tolist() == pytest.approx([-0.1, -0.2], abs=1e-7)  # fp32 storage
    assert mb["old_logprobs"][1, at[1]].tolist() == pytest.approx([-1.1, -1.2, -1.3, -1.4], abs=1e-7)
    # advantages and beta: the sequence's value in every position of its row (padding included)
    assert mb["advantages"].tolist() == [[0.5] * 8, [-1.5] * 8]
    assert torch.equal(mb["beta"], torch.tensor([[0.01] * 8, [0.02] * 8]))  # both stored as fp32
    # loss_weights: the sequence's weight at its label positions only
    assert mb["loss_weights"].tolist() == [[0, 0, 0.25, 0.25, 0, 0, 0, 0], [0, 0, 0, 0, 0.75, 0.75, 0.75, 0.75]]
    # routes: the recorded experts of the real inputs, -1 (the router chooses) at padding
    for i in LEARNED:
        r = mb[f"routes.{i}"]
        assert r.dtype == torch.long and tuple(r.shape) == (2, 8, K)
        assert torch.equal(r[0, :4], hand_rollouts[0].rollout.completion.routes[i])
        assert (r[0, 4:] == -1).all()
        assert torch.equal(r[1], hand_rollouts[1].rollout.completion.routes[i])
    assert set(mb) == {"input_ids", "labels", "old_logprobs", "advantages", "loss_weights", "beta"} | {
        f"routes.{i}" for i in LEARNED
    }


def test_micro_batches_split_rows_in_order(hand_rollouts):
    one, two = micro_batches(hand_rollouts, [0.25, 0.75], rows_per_batch=1, learned_layers=LEARNED, pad_id=PAD)
    assert one["input_ids"].tolist() == [[11, 12, 13, 21]]  # each micro-batch padded to its own longest row
    assert two["labels"].tolist() == [[IGNORE] * 4 + [41, 42, 43, 44]]
    three = [*hand_rollouts, hand_rollouts[0]]
    batches = micro_batches(three, [1.0, 2.0, 3.0], rows_per_batch=2, learned_layers=LEARNED, pad_id=PAD)
    assert [tuple(b["input_ids"].shape) for b in batches] == [(2, 8), (1, 4)]
    assert batches[1]["loss_weights"].tolist() == [[0, 0, 3.0, 3.0]]


def test_micro_batches_refuse_mismatched_routes_weights_and_empty_completions(hand_rollouts):
    bad = _completion([21, 22], [-0.1, -0.2], {i: torch.zeros(5, K, dtype=torch.long) for i in LEARNED})
    with pytest.raises(ValueError, match="routes for 5 tokens, the row has 4 inputs"):
        micro_batches([_scored([11, 12, 13], bad)], [1.0], 1, LEARNED, PAD)
    with pytest.raises(ValueError, match="1 weights for 2 samples"):
        micro_batches(hand_rollouts, [1.0], 1, LEARNED, PAD)
    with pytest.raises(ValueError, match="without generated tokens"):
        micro_batches([_scored([1, 2], _completion([], []))], [1.0], 1, (), PAD)
    partial = _completion([21, 22], [-0.1, -0.2], {LEARNED[0]: torch.zeros(4, K, dtype=torch.long)})
    with pytest.raises(ValueError, match=f"no routes for learned-routing layer {LEARNED[1]}"):
        micro_batches([_scored([11, 12, 13], partial)], [1.0], 1, LEARNED, PAD)


def test_grpo_loss_refuses_an_unknown_kl_kind_when_built():
    with pytest.raises(ValueError, match="unknown kl_kind 'bogus'"):
        GRPOLoss(1.0, 0, 1.0, 0.2, 0.28, kl_kind="bogus")


# ----------------------------------------------------------------------------- GRPOLoss
@pytest.fixture(scope="module")
def loss_model():
    return sensitive_model(tiny_config(LAYERS, vocab_size=64, max_seq_len=64, n_mtp_layers=0, **SENSITIVE_INIT))


@pytest.fixture(scope="module")
def greedy_rows(loss_model):
    """4 (prompt, completion) pairs, each completion the model's greedy continuation (so every label lies in any
    top-k / top-p support of its own logits)."""
    g = torch.Generator().manual_seed(3)
    rows = []
    for P, C in ((3, 2), (5, 4), (4, 3), (6, 5)):
        seq = torch.randint(1, CFG.vocab_size, (P,), generator=g).tolist()
        with torch.no_grad():
            for _ in range(C):
                seq.append(int(loss_model(torch.tensor([seq]))[0, -1].argmax()))
        rows.append((seq[:P], seq[P:]))
    return rows


ADVANTAGES = (1.0, -0.7, 0.6, -1.2)
# logπ_old − logπ_θ per token: ±0.3 leaves the clip range [0.8, 1.28] for some tokens; row 1 (A < 0) is 0.45
# above on average (> delta: masked when the off-policy mask is on), row 3 (A < 0) averages 0.02 (kept).
OLD_OFFSETS = ((0.3, -0.1), (0.6, 0.3, 0.6, 0.3), (-0.3, 0.1, 0.05), (0.3, -0.3, 0.1, -0.3, 0.3))
DELTA = 0.25
BETA = 0.05


@pytest.fixture(scope="module")
def step_inputs(loss_model, greedy_rows):
    """Laid out here, independently of batch.py: the padded rows' logits [B, S, V] (fp32, from the model), and for
    each target (token j of completion b, read at position P_b − 1 + j) its position [B, T] and mask [B, T]."""
    rows = [p + c[:-1] for p, c in greedy_rows]
    S = max(map(len, rows))
    ids_BS = torch.tensor([r + [PAD] * (S - len(r)) for r in rows])
    with torch.no_grad():
        logits = loss_model(ids_BS)
    T = max(len(c) for _, c in greedy_rows)
    pos_BT = torch.zeros(len(rows), T, dtype=torch.long)
    tok_BT = torch.zeros(len(rows), T, dtype=torch.long)
    mask_BT = torch.zeros(len(rows), T, dtype=torch.bool)
    for b, (p, c) in enumerate(greedy_rows):
        pos_BT[b, : len(c)] = torch.arange(len(p) - 1, len(p) - 1 + len(c))
        tok_BT[b, : len(c)], mask_BT[b, : len(c)] = torch.tensor(c), True
    return logits, pos_BT, tok_BT, mask_BT


def _at_targets(values_BSX: torch.Tensor, pos_BT: torch.Tensor) -> torch.Tensor:
    """values [B, S, ...] at each target's position: [B, T, ...]."""
    return torch.stack([values_BSX[b, pos_BT[b]] for b in range(pos_BT.shape[0])])


def _logprobs64(logits_BTV: torch.Tensor, tok_BT: torch.Tensor, temperature: float, support_BTV=None):
    """float64 log softmax(logits / T) (restricted to the support when given) of each token."""
    scaled = logits_BTV.double() / temperature
    if support_BTV is not None:
        scaled = scaled.masked_fill(~support_BTV, -torch.inf)
    return scaled.log_softmax(-1).gather(-1, tok_BT.unsqueeze(-1)).squeeze(-1)


def _entropy64(logits_BTV: torch.Tensor, temperature: float, support_BTV=None) -> torch.Tensor:
    scaled = logits_BTV.double() / temperature
    if support_BTV is not None:
        scaled = scaled.masked_fill(~support_BTV, -torch.inf)
    p = scaled.softmax(-1)
    return -(p * torch.where(p > 0, p.log(), 0.0)).sum(-1)


def _check_against_grpo_loss(greedy_rows, step_inputs, lp_BT, loss_fn, mode, delta, support_BTV=None):
    """loss_fn on the micro-batch of `micro_batches` (old log-probs = lp_BT + OLD_OFFSETS) against `grpo_loss` on
    the [B, T] tensors laid out here; returns the kept sequences."""
    logits, pos_BT, tok_BT, mask_BT = step_inputs
    old_BT = torch.zeros_like(lp_BT)
    for b, offsets in enumerate(OLD_OFFSETS):
        old_BT[b, : len(offsets)] = lp_BT[b, : len(offsets)] + torch.tensor(offsets, dtype=F64)
    ref_BT = lp_BT - 0.2 * torch.sin(lp_BT * 7)  # a reference model ≠ π_θ
    lengths = [len(c) for _, c in greedy_rows]
    scored = [
        _scored(p, _completion(c, old_BT[b, : len(c)].tolist()), ADVANTAGES[b], BETA)
        for b, (p, c) in enumerate(greedy_rows)
    ]
    (mb,) = micro_batches(scored, aggregation_weights(lengths, mode), len(scored), (), PAD)
    assert tuple(mb["input_ids"].shape) == tuple(logits.shape[:2])
    mb["ref_logprobs"] = torch.zeros(mb["labels"].shape)  # what the controller adds: at the label positions
    for b, n in enumerate(lengths):
        mb["ref_logprobs"][b, pos_BT[b, :n]] = ref_BT[b, :n].float()
    lo = loss_fn(ModelOutput(logits, None, torch.zeros(()), torch.zeros(()), torch.zeros(1, E)), mb)
    N = sum(lengths)
    assert int(lo.n_targets) == N

    adv_B = torch.tensor(ADVANTAGES, dtype=F64)
    ref_BT = mb["ref_logprobs"].double().gather(1, pos_BT)  # the fp32-stored reference the loss sees
    old_BT = torch.where(mask_BT, old_BT.float().double(), 0.0)  # likewise the fp32-stored old log-probs
    want = grpo_loss(
        lp_BT, old_BT, adv_B, mask_BT, eps_low=EPS_LOW, eps_high=EPS_HIGH, beta=BETA, kl_kind="k3",
        ref_logprob_BT=ref_BT, delta=delta, mode=mode,
    )  # fmt: skip
    # fp32 log-softmax of O(1) logits against float64: ~1e-7 relative on each term; the terms have both signs, so
    # 1e-5 of the total leaves room for cancellation and is far below any wrong term (O(1e-2) of the total)
    assert float(lo.loss_sum) / N == pytest.approx(float(want.loss), rel=1e-5)
    assert float(lo.metrics["policy_loss"]) / N == pytest.approx(float(want.policy_loss), rel=1e-5)

    # the metrics' sums, counted here in float64
    ratio_BT = (lp_BT - old_BT).exp()
    clipped_BT = ((adv_B[:, None] > 0) & (ratio_BT > 1 + EPS_HIGH)) | ((adv_B[:, None] < 0) & (ratio_BT < 1 - EPS_LOW))
    divergence_B = torch.where(mask_BT, old_BT - lp_BT, 0.0).sum(1) / mask_BT.sum(1)
    keep_B = ~((adv_B < 0) & (divergence_B > delta)) if delta is not None else torch.ones(4, dtype=torch.bool)
    n_clipped = int((clipped_BT & mask_BT & keep_B[:, None]).sum())
    assert 0 < n_clipped < int((mask_BT & keep_B[:, None]).sum())  # the clip is active for some tokens, not all
    assert float(lo.metrics["clip_fraction"]) == n_clipped
    assert float(lo.metrics["masked_fraction"]) == int((mask_BT & ~keep_B[:, None]).sum())
    # each below: fp32 against float64 on a sum of 14 terms of O(1)
    kl = torch.where(mask_BT, kl_estimate(lp_BT, ref_BT, "k3"), 0.0).sum()
    assert float(lo.metrics["kl"]) == pytest.approx(float(kl), rel=1e-4, abs=1e-6)
    gap = torch.where(mask_BT, (lp_BT - old_BT).abs(), 0.0).sum()
    assert float(lo.metrics["ratio_gap"]) == pytest.approx(float(gap), rel=1e-5)
    entropy_BT = _entropy64(_at_targets(logits, pos_BT), loss_fn.temperature, support_BTV)
    assert float(lo.metrics["entropy"]) == pytest.approx(float(entropy_BT[mask_BT].sum()), rel=1e-5)
    return keep_B


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("delta", [None, DELTA])
def test_grpo_loss_sum_over_n_equals_grpo_loss(greedy_rows, step_inputs, mode, delta):
    """Without truncation: logπ_θ is log softmax(logits / T) (float64, written here); loss_sum / N equals
    `grpo_loss` on the [B, T] target tensors, with β > 0 (k3 against a reference) and the off-policy mask on or
    off; the metrics' sums are the counts and sums computed here."""
    T = 0.7
    logits, pos_BT, tok_BT, mask_BT = step_inputs
    lp_BT = torch.where(mask_BT, _logprobs64(_at_targets(logits, pos_BT), tok_BT, T), 0.0)
    loss_fn = GRPOLoss(temperature=T, top_k=0, top_p=1.0, eps_low=EPS_LOW, eps_high=EPS_HIGH, delta=delta)
    keep_B = _check_against_grpo_loss(greedy_rows, step_inputs, lp_BT, loss_fn, mode, delta)
    assert keep_B.tolist() == ([True, False, True, True] if delta is not None else [True] * 4)


@pytest.mark.parametrize("top_k, top_p", [(0, 0.6), (5, 1.0)])
def test_grpo_loss_with_truncated_sampling_uses_the_keep_sampling_logprobs(greedy_rows, step_inputs, top_k, top_p):
    """With top-p / top-k, logπ_θ is of the truncated distribution (masks.sampling_support for the support, and
    keep_sampling_logprobs, checked against a float64 masked log-softmax here); it differs from the untruncated
    one, so using the wrong one shows."""
    T = 0.8
    logits, pos_BT, tok_BT, mask_BT = step_inputs
    logits_BTV = _at_targets(logits, pos_BT)
    support_BTV = sampling_support(logits_BTV, T, top_k, top_p)
    assert (support_BTV.sum(-1)[mask_BT] < CFG.vocab_size).all()  # every target's distribution is truncated
    lp_BT = torch.where(mask_BT, _logprobs64(logits_BTV, tok_BT, T, support_BTV), 0.0)
    kept_BT = keep_sampling_logprobs(logits_BTV, tok_BT, support_BTV, T, mask_BT)
    torch.testing.assert_close(kept_BT.double(), lp_BT, rtol=0, atol=1e-5)  # fp32 against float64, O(1) values
    # renormalised over a smaller support, every target's log-prob is higher than the untruncated one (by > 1e-2,
    # far above the fp32 rounding of either)
    full_BT = _logprobs64(logits_BTV, tok_BT, T)
    assert (lp_BT[mask_BT] > full_BT[mask_BT] + 1e-2).all()
    loss_fn = GRPOLoss(temperature=T, top_k=top_k, top_p=top_p, eps_low=EPS_LOW, eps_high=EPS_HIGH, delta=DELTA)
    _check_against_grpo_loss(greedy_rows, step_inputs, lp_BT, loss_fn, "token-mean", DELTA, support_BTV)


# ----------------------------------------------------------------------------- the Learner replays the routes
def _router_routes(model, ids_BS) -> dict[int, torch.Tensor]:
    """The experts [B, S, k] the routers choose in each learned layer of a plain forward (the blocks' aux)."""
    with torch.no_grad():
        _, auxes = model.run_layers(model.embed_streams(ids_BS), ids_BS, model.layers)
    return {i: auxes[i].moe.routes_BSK for i in LEARNED}


def test_learner_forward_replays_the_batchs_routes(loss_model):
    """A micro-batch whose `routes.<i>` hold valid experts other than the routers' choice: the Learner's forward
    is the model's forward with those routes, not its plain forward."""
    model = copy.deepcopy(loss_model)
    learner = Learner(model, torch.optim.SGD(model.parameters(), lr=0.0), NO_EXTRAS)
    ids_BS = torch.randint(1, CFG.vocab_size, (2, 9), generator=torch.Generator().manual_seed(5))
    own = _router_routes(model, ids_BS)
    # each token's two experts shifted by one (mod 4): a valid pair, never the router's pair as a set
    other = {i: (r + 1) % E for i, r in own.items()}
    other[2][1, 6:] = -1  # the tail of one row left to the router (padding in a real micro-batch)
    batch = {"input_ids": ids_BS, "labels": ids_BS, **{f"routes.{i}": r for i, r in other.items()}}
    with torch.no_grad():
        got = learner._forward(batch, NextTokenLoss()).logits
        want = model(ids_BS, routes=other)
        plain = model(ids_BS)
    assert torch.equal(got, want)  # the same computation on the same CPU: bitwise
    # the replay moves the logits: by far more than rounding (sensitive init, ~O(1) logits)
    assert (got - plain).abs().max() > 1e-2


# ----------------------------------------------------------------------------- the rollout worker
PARAMS = SamplingParams(max_new_tokens=6, temperature=1.0)
PROMPT_A, PROMPT_B = [5, 17, 9, 33], [40, 2, 61, 7, 12, 28, 3]


@pytest.fixture(scope="module")
def policy(loss_model):
    return loss_model  # the trainer's policy the worker syncs from (tests copy it before changing it)


@pytest.fixture(scope="module")
def worker(policy):
    w = RolloutWorker(policy.cfg, max_batch=8, max_len=32)
    w.load_weights(policy.state_dict(), version=3)
    return w


def _seeds(prompts: int, group_size: int, step: int = 5) -> list[int]:
    return [rollout_seed(0, step, 0, i, k) for i in range(prompts) for k in range(group_size)]


def test_rollout_worker_generates_prompt_major_groups_with_the_loaded_weights(policy, worker):
    out = worker.generate([PROMPT_A, PROMPT_B], 3, PARAMS, _seeds(2, 3))
    assert [r.group for r in out] == [0, 0, 0, 1, 1, 1]
    assert [r.prompt_ids for r in out] == [PROMPT_A] * 3 + [PROMPT_B] * 3
    assert [r.version for r in out] == [3] * 6
    assert len({tuple(r.completion.token_ids) for r in out[:3]}) > 1  # each sample its own seed
    # the worker samples from the loaded weights: each raw log-prob is the policy's full forward's (temperature 1)
    for r in out:
        ids = r.prompt_ids + r.completion.token_ids
        with torch.no_grad():
            lp = policy(torch.tensor([ids[:-1]]))[0].double().log_softmax(-1)
        P = len(r.prompt_ids)
        want = [float(lp[P - 1 + j, t]) for j, t in enumerate(r.completion.token_ids)]
        # decode through the cache against a full forward: fp32, ~1e-6 (inference/engine.py)
        assert r.completion.raw_logprobs == pytest.approx(want, abs=1e-4)
        assert all(tuple(routes.shape) == (len(ids) - 1, K) for routes in r.completion.routes.values())
        assert sorted(r.completion.routes) == list(LEARNED)


def test_rollout_worker_samples_depend_on_the_seeds_not_the_batch(worker):
    both = worker.generate([PROMPT_B, PROMPT_A], 2, PARAMS, [11, 12, 13, 14])
    alone = worker.generate([PROMPT_A], 1, PARAMS, [14])
    assert (alone[0].group, both[3].group) == (0, 1)
    assert alone[0].completion.token_ids == both[3].completion.token_ids
    # the same logits up to fp32 rounding in another batch (engine.py: batch invariance)
    assert alone[0].completion.logprobs == pytest.approx(both[3].completion.logprobs, abs=1e-5)
    for i in LEARNED:
        assert torch.equal(alone[0].completion.routes[i], both[3].completion.routes[i])
    with pytest.raises(ValueError, match="3 seeds for 4 completions"):
        worker.generate([PROMPT_A, PROMPT_B], 2, PARAMS, [1, 2, 3])


def test_rollout_worker_needs_weights_and_versions_only_grow(policy):
    w = RolloutWorker(policy.cfg, max_batch=2, max_len=16)
    with pytest.raises(RuntimeError, match="call load_weights first"):
        w.generate([PROMPT_A], 1, PARAMS, [0])
    w.load_weights(policy.state_dict(), version=4)
    w.load_weights(policy.state_dict(), version=4)  # the same version again is fine
    with pytest.raises(ValueError, match="versions only grow"):
        w.load_weights(policy.state_dict(), version=2)
    assert w.version == 4
    assert w.generate([PROMPT_A], 1, PARAMS, [0])[0].version == 4


def test_rollout_seed_is_a_pure_function_of_all_its_arguments():
    base = (7, 3, 1, 2, 0)
    s = rollout_seed(*base)
    assert 0 <= s < 2**63  # an Engine seed: fits in int64
    variants = [base[:i] + (base[i] + 1,) + base[i + 1 :] for i in range(5)] + [(3, 7, 1, 2, 0), (7, 3, 1, 0, 2)]
    assert len({s, *(rollout_seed(*v) for v in variants)}) == 1 + len(variants)
    # stable across processes (a salted hash() would not be): another interpreter with another hash seed
    code = f"from dsv4train.posttrain.grpo.rollout import rollout_seed; print(rollout_seed{base})"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert int(other.stdout) == s == rollout_seed(*base)


# ----------------------------------------------------------------------------- one GRPO step
def test_one_learner_step_moves_the_logprobs_by_the_advantages_sign(policy, worker):
    """Two rollouts of the worker (keep-routing: their recorded routes replayed), advantage +1 and -1, one SGD
    step of the Learner with GRPOLoss: the positive sequence's tokens became more likely, the negative's less."""
    rollouts = worker.generate([PROMPT_A, PROMPT_B], 1, PARAMS, _seeds(2, 1, step=9))
    samples = [
        ScoredRollout(rollouts[0], "math", 1.0, advantage=1.0, beta=0.0),
        ScoredRollout(rollouts[1], "math", 0.0, advantage=-1.0, beta=0.0),
    ]
    weights = aggregation_weights([len(r.completion.token_ids) for r in rollouts], "token-mean")
    batches = micro_batches(samples, weights, 1, LEARNED, PAD)
    model = copy.deepcopy(policy)
    model.set_indexer_mode("sparse")  # as the worker generated

    def seq_logprobs() -> list[float]:
        """Each rollout's Σ_j log π(c_j) (temperature 1, float64) with its recorded routes, laid out here."""
        out = []
        for r in rollouts:
            P, c = len(r.prompt_ids), r.completion.token_ids
            ids = torch.tensor([r.prompt_ids + c[:-1]])
            routes = {i: e.unsqueeze(0) for i, e in r.completion.routes.items()}
            with torch.no_grad():
                logits_TV = model(ids, routes=routes)[0, P - 1 :]
            out.append(float(_logprobs64(logits_TV, torch.tensor(c), 1.0).sum()))
        return out

    before = seq_logprobs()
    # on-policy: the rollouts' log-probs are the training forward's (decode vs full forward, fp32)
    for r, lp in zip(rollouts, before):
        assert sum(r.completion.logprobs) == pytest.approx(lp, abs=1e-4)
    loss_fn = GRPOLoss(temperature=1.0, top_k=0, top_p=1.0, eps_low=EPS_LOW, eps_high=EPS_HIGH)
    learner = Learner(model, torch.optim.SGD(model.parameters(), lr=1e-4), NO_EXTRAS)
    res = learner.step(batches, loss_fn)
    assert not res.skipped and res.n_targets == sum(len(r.completion.token_ids) for r in rollouts)
    after = seq_logprobs()
    # lr 1e-4 is in the linear regime (1e-5 moves both by a tenth as much): ~0.3 here; rounding moves them ~1e-5
    assert after[0] > before[0] + 1e-2
    assert after[1] < before[1] - 1e-2


def test_the_learner_takes_logits_only_from_the_first_completion_position(policy, worker):
    """GRPOLoss's `logits_from`: the output head runs on the micro-batch's positions from its first label on (the
    shorter prompt's last token), and the step's loss and gradient equal those over the full logits (fp32; the
    same computation on fewer rows: relative L2 < 1e-6, measured ~1e-8)."""
    rollouts = worker.generate([PROMPT_A, PROMPT_B], 1, PARAMS, _seeds(2, 1, step=4))
    samples = [
        ScoredRollout(rollouts[0], "math", 1.0, advantage=1.0, beta=0.0),
        ScoredRollout(rollouts[1], "math", 0.0, advantage=-1.0, beta=0.0),
    ]
    weights = aggregation_weights([len(r.completion.token_ids) for r in rollouts], "token-mean")
    (batch,) = micro_batches(samples, weights, 2, LEARNED, PAD)
    loss_fn = GRPOLoss(temperature=1.0, top_k=0, top_p=1.0, eps_low=EPS_LOW, eps_high=EPS_HIGH)
    assert loss_fn.logits_from(batch) == len(PROMPT_A) - 1

    class FullLogits(GRPOLoss):
        def logits_from(self, batch):
            return 0

    full_fn = FullLogits(temperature=1.0, top_k=0, top_p=1.0, eps_low=EPS_LOW, eps_high=EPS_HIGH)
    results = []
    for fn in (loss_fn, full_fn):
        model = copy.deepcopy(policy)
        model.set_indexer_mode("sparse")
        head_rows = []
        model.head.register_forward_hook(lambda m, args, out, rows=head_rows: rows.append(args[0].shape[1]))
        res = Learner(model, torch.optim.SGD(model.parameters(), lr=0.0), NO_EXTRAS).step([batch], fn)
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        results.append((res, grads, head_rows))
    (cut, cut_grads, cut_rows), (full, full_grads, full_rows) = results
    S = batch["input_ids"].shape[1]
    assert cut_rows == [S - (len(PROMPT_A) - 1)] and full_rows == [S]
    assert cut.loss == pytest.approx(full.loss, rel=1e-6)
    assert cut.metrics == pytest.approx(full.metrics, rel=1e-6, abs=1e-9)
    num = sum(float((cut_grads[k] - full_grads[k]).pow(2).sum()) for k in full_grads)
    den = sum(float(g.pow(2).sum()) for g in full_grads.values())
    assert cut_grads.keys() == full_grads.keys() and (num / den) ** 0.5 < 1e-6
