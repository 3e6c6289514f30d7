"""`dsv4 grpo`'s policy update under torchrun layouts (controller.update_policy) equals the one-process update: every
rank gets the same scored samples (the driver broadcasts them in a run), each data rank trains its share of the
micro-batches, padded with micro-batches without targets to as many as the others. A fixed list of scored rollouts
(built here: no generation), one or two SGD steps through the Learner on 2 gloo processes, against the same update
in one process on every rank (the model is tiny). Compared: the weights after it (gathered to rank 0 by
`ParallelRuntime.full_state_dict`, as the weight sync to the rollout workers does: the unsharded model's names and
shapes), the router biases (their update counts the experts of the step's tokens, not the padding's) and the
step's metrics.

Cases: dp2 with 3 micro-batches (rank 1 trains one, and one padding), a reference model (β > 0, the k1 estimate,
whose gradient does not vanish while the policy is still the reference) and seq-mean-token-mean weights, which
depend on every sample of the step; ep2 with two optimizer steps, of 1 micro-batch (rank 1 trains padding only) and
of 2 (one each); tp2 with 3 micro-batches, which both ranks train, and a reference. Every case replays routes
(keep-routing) and has the balance loss and the router-bias update on. Two steps under tp2 were left out: its first
step already rounds differently, so the second gradient is taken at other weights, and the two steps together
measured 5e-6 of the update, too close to UPDATE_TOL (ep2's first step is exact: rank 1 adds only zeros)."""

import pytest
import torch

from dsv4train.config.grpo import GRPOConfig, GRPOOptions
from dsv4train.config.pretrain import TrainConfig
from dsv4train.inference.engine import Completion
from dsv4train.models.model import DSV4Model
from dsv4train.parallel.dims import ParallelDims
from dsv4train.parallel.runtime import ParallelRuntime
from dsv4train.posttrain.grpo.batch import ScoredRollout
from dsv4train.posttrain.grpo.controller import GRPOContext, frozen_copy, prepare_policy, update_policy
from dsv4train.posttrain.grpo.rollout import Rollout
from dsv4train.testing.distributed import run_distributed_test
from dsv4train.testing.masked_batches import relative_l2
from dsv4train.testing.toy_configs import tiny_config
from dsv4train.train.learner import Learner

pytestmark = pytest.mark.dist

CFG = tiny_config(n_hash_layers=1)
LEARNED = [1, 2, 3]  # layer 0 routes by hash, layers 1-3 learn their routing: their routes are replayed
EOS = 1
LR = 0.5  # SGD: a parameter's change is -LR x its gradient, so the weights after the step compare the gradients
# The layout sums the same fp32 terms in another order (FSDP's reduce-scatter and all-gathers, EP's all-to-all, TP's
# all-reduces, the target count all-reduced): the parameter changes differ from one process by rounding, a relative
# L2 of 1e-8 to 1e-6 here (measured 3.8e-8 dp2, 3.7e-7 ep2, 5.3e-7 tp2; printed below). A micro-batch trained twice
# or missed, padding with targets, a rank dividing by its own target count or without reference log-probs moves
# them by 5e-2 or more (measured).
UPDATE_TOL = 1e-5
# The metrics are float64 sums of fp32 terms, all-reduced: rounding only. A near-cancelling one is held to METRIC_ABS:
# the k1 KL, Σ (logπ - logπ_ref) / N = -8.6e-5 from log-probs of about -5.7, is 1.4e-8 off under tp2 (its logits
# round differently), 1.6e-4 of itself.
METRIC_REL, METRIC_ABS = 1e-5, 1e-7


def _samples(n: int, beta: float, seed: int) -> list[ScoredRollout]:
    """n scored rollouts in groups of 2 (a group shares its prompt), prompts of 3-6 and completions of 2-7 tokens,
    π_old near the random model's log-probs (ratios near 1, some clipped), random advantages and experts."""
    g = torch.Generator().manual_seed(seed)
    k, e = CFG.n_activated_experts, CFG.n_routed_experts
    out = []
    for i in range(n):
        if i % 2 == 0:
            prompt = torch.randint(2, CFG.vocab_size, (int(torch.randint(3, 7, (), generator=g)),), generator=g)
        c = int(torch.randint(2, 8, (), generator=g))
        tokens = torch.randint(2, CFG.vocab_size, (c,), generator=g).tolist()
        old = (-torch.log(torch.tensor(float(CFG.vocab_size))) + 0.3 * torch.randn(c, generator=g)).tolist()
        length = len(prompt) + c - 1
        routes = {layer: torch.rand(length, e, generator=g).argsort(-1)[:, :k] for layer in LEARNED}
        completion = Completion(tokens, old, old, "stop", routes)
        advantage = float(torch.randn((), generator=g))
        out.append(ScoredRollout(Rollout(i // 2, prompt.tolist(), completion, 0), "math", 0.0, advantage, beta))
    return out


def _policy() -> DSV4Model:
    model = DSV4Model(CFG)
    model.init_weights(0)
    return model


def _update(layout: dict, options: GRPOOptions, train: TrainConfig, samples: list[ScoredRollout]):
    """update_policy on a fresh policy in `layout` ({} = one process): (metrics, whole state dict after it on the
    main rank (None elsewhere), the trainable parameters' names)."""
    rt = ParallelRuntime(ParallelDims(**layout))
    model = _policy()
    reference = frozen_copy(model, torch.device("cpu")) if options.uses_reference else None
    prepare_policy(model, train)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert model.learned_routing_layers == LEARNED
    model = rt.parallelize(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    learner = Learner(model, optimizer, train, rt)
    ctx = GRPOContext(
        GRPOConfig(grpo=options, train=train), None, None, None, reference, EOS, model.learned_routing_layers
    )
    metrics = update_policy(learner, ctx, samples, step=0)
    return metrics, rt.full_state_dict(model), trainable


def _check(rank, world_size, layout: dict, options: dict, n_samples: int, micro_batch_size: int):
    opts = GRPOOptions(init="unused", **options)
    train = TrainConfig(
        micro_batch_size=micro_batch_size,
        grad_clip=1e9,  # no clipping: the update stays linear in the gradient
        balance_loss_weight=1e-2,
        indexer_loss_weight=0.0,  # the toy preset's: the indexer frozen (prepare_policy)
        bias_update_speed=1e-2,
    )
    samples = _samples(n_samples, opts.beta_of("math"), seed=1)
    before = _policy().state_dict()
    want_metrics, want, trainable = _update({}, opts, train, samples)
    got_metrics, got, _ = _update(layout, opts, train, samples)

    assert got_metrics["skipped"] is False
    for key in ("loss", "policy_loss", "kl", "clip_fraction", "entropy", "ratio_gap", "balance_loss", "grad_norm"):
        assert got_metrics[key] == pytest.approx(want_metrics[key], rel=METRIC_REL, abs=METRIC_ABS), key
    assert got_metrics["expert_load_max_over_mean"] == want_metrics["expert_load_max_over_mean"]
    if rank != 0:
        assert got is None  # the whole weights go to the driver only
        return
    assert got.keys() == want.keys()  # the unsharded model's names: what a rollout worker loads (strict)
    assert all(got[k].shape == want[k].shape for k in want)
    # the router biases move by ±speed per expert by the step's expert counts: exactly the one-process counts
    biases = [k for k in want if k.endswith("gate.bias")]
    assert biases and all(torch.equal(got[k], want[k]) for k in biases)
    assert any(not torch.equal(want[k], before[k]) for k in biases)  # they did move
    got_delta = {k: got[k] - before[k] for k in trainable}
    want_delta = {k: want[k] - before[k] for k in trainable}
    assert all(float(want_delta[k].abs().max()) > 0 for k in trainable[:3])  # the update moved the weights
    err = relative_l2(got_delta, want_delta)
    print(f"{layout}: relative L2 of the parameter update vs one process: {err:.2e}")
    assert err < UPDATE_TOL
    frozen = [k for k in want if k not in trainable and not k.endswith("gate.bias")]
    assert all(torch.equal(got[k], before[k]) for k in frozen)  # MTP, indexer, buffers: untouched


@pytest.mark.parametrize(
    "layout,options,n_samples,micro_batch_size",
    [
        ({"dp": 2}, {"beta": 0.1, "kl_kind": "k1", "aggregation": "seq-mean-token-mean"}, 6, 2),
        ({"ep": 2}, {"updates_per_step": 2}, 5, 2),
        ({"tp": 2}, {"beta": 0.1, "kl_kind": "k1", "aggregation": "seq-mean-token-sum-norm"}, 6, 2),
    ],
    ids=["dp2-3-micro-batches-reference", "ep2-2-updates-of-1-and-2-micro-batches", "tp2-reference"],
)
def test_grpo_update_matches_one_process(layout, options, n_samples, micro_batch_size):
    world_size = ParallelDims(**layout).world_size
    run_distributed_test(_check, world_size=world_size, args=(layout, options, n_samples, micro_batch_size))
