"""Keep-routing (GRPO, arch ref §9.3): `model(ids, routes={layer: experts [B, S, k]})` replays the experts that
generation recorded for every learned-routing MoE layer instead of the router's top-k.

- After the weights move (as a policy update moves them) the router's own choice differs from the rollout's at
  some tokens; with the routes replayed every token of every learned layer goes to the rollout's experts.
- One MoE layer with replayed experts equals a float64 MoE written out here (the router's sqrt-softplus scores of
  the replayed experts, normalised and scaled, times each expert's clamped SwiGLU, plus the shared expert), and
  its gradient reaches the router through those weights.
- Replaying the router's own choice changes nothing; -1 tokens are routed by the router.
- Bad routes are refused with the layer named."""

import copy

import pytest
import torch
import torch.nn.functional as F

from dsv4train.inference.engine import Engine
from dsv4train.inference.sampling import SamplingParams
from dsv4train.models.moe import MoE
from dsv4train.testing.sensitive_models import SENSITIVE_INIT, sensitive_model
from dsv4train.testing.toy_configs import tiny_config

LAYERS = ("swa", "csa", "hca", "csa")  # layer 0 hash-routed, 1..3 learned


@pytest.fixture(scope="module")
def model():
    return sensitive_model(tiny_config(LAYERS, max_seq_len=64, n_mtp_layers=0, **SENSITIVE_INIT))


@pytest.fixture(scope="module")
def rollout(model):
    """Sampled completions of 4 prompts: the ids fed to the cache (prompt + all generated but the last) and the
    routes the engine recorded."""
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, 300, (n,), generator=g).tolist() for n in (5, 11, 3, 17)]
    params = SamplingParams(max_new_tokens=12, temperature=1.0)
    out = Engine(model, max_batch=4).generate(prompts, params, seeds=[1, 2, 3, 4])
    return [(p + c.token_ids[:-1], c.routes) for p, c in zip(prompts, out)]


def _moved(model):
    """The model after a step: every router weight moved by 30% noise, so its top-k changes at some tokens."""
    moved = copy.deepcopy(model)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for layer in moved.layers:
            w = layer.ffn.gate.weight
            w.add_(0.3 * w.std() * torch.randn(w.shape, generator=g))
    return moved


def _forward_output(model, ids, routes=None):
    ids_1S = torch.tensor([ids])
    batched = None if routes is None else {i: r.unsqueeze(0) for i, r in routes.items()}
    with torch.no_grad():
        out = model(ids_1S, with_aux=True, routes=batched)
    return out


def _learned_routes(model, ids, routes=None):
    """Each learned layer's experts [S, k] in a full forward (read from the blocks' aux)."""
    ids_1S = torch.tensor([ids])
    per_layer = None if routes is None else [routes.get(i) for i in range(len(model.layers))]
    per_layer = None if per_layer is None else [None if r is None else r.unsqueeze(0) for r in per_layer]
    with torch.no_grad():
        _, auxes = model.run_layers(model.embed_streams(ids_1S), ids_1S, model.layers, None, per_layer)
    return {i: auxes[i].moe.routes_BSK[0] for i in range(1, len(LAYERS))}


def test_replayed_routes_are_the_rollouts_for_every_token(model, rollout):
    moved = _moved(model)
    differs = 0
    for ids, routes in rollout:
        assert set(routes) == {1, 2, 3}
        own = _learned_routes(moved, ids)
        replayed = _learned_routes(moved, ids, routes)
        for i in routes:
            assert torch.equal(replayed[i], routes[i]), f"layer {i}"
            differs += int((own[i].sort(-1).values != routes[i].sort(-1).values).any(-1).sum())
    assert differs > 0  # the moved routers choose other experts somewhere: the replay is what made them equal


def test_the_replayed_forward_uses_the_replayed_experts(model, rollout):
    """The logits with replay differ from the moved model's own routing exactly when some route differs, and the
    public forward accepts the batched routes."""
    moved = _moved(model)
    ids, routes = rollout[3]
    own = _forward_output(moved, ids).logits
    replayed = _forward_output(moved, ids, routes).logits
    assert not torch.allclose(own, replayed)
    same = _forward_output(model, ids, routes).logits  # the rollout's weights: replay = the router's own choice
    assert torch.equal(same, _forward_output(model, ids).logits)


def _float64_moe(moe: MoE, x_ND: torch.Tensor, experts_NK: torch.Tensor) -> torch.Tensor:
    """The MoE of arch ref §5 with the experts given, in float64, written out without models/moe.py's code."""
    x = x_ND.double()
    scores = torch.sqrt(F.softplus(x @ moe.gate.weight.double().T))
    w = scores.gather(1, experts_NK)
    w = w / w.sum(-1, keepdim=True) * moe.gate.route_scale
    limit = moe.experts.limit
    y = torch.zeros_like(x)
    for n in range(x.shape[0]):
        for j, e in enumerate(experts_NK[n].tolist()):
            g = x[n] @ moe.experts.w1[e].double().T
            u = x[n] @ moe.experts.w3[e].double().T
            h = F.silu(g.clamp(max=limit)) * u.clamp(-limit, limit)
            y[n] += w[n, j] * (h @ moe.experts.w2[e].double().T)
    s = moe.shared_experts
    gs, us = x @ s.w1.weight.double().T, x @ s.w3.weight.double().T
    return y + (F.silu(gs.clamp(max=limit)) * us.clamp(-limit, limit)) @ s.w2.weight.double().T


def test_one_moe_layer_with_replayed_experts_equals_a_float64_reference(model):
    moe = copy.deepcopy(model.layers[1].ffn)
    g = torch.Generator().manual_seed(11)
    x_BSD = torch.randn(2, 5, model.cfg.dim, generator=g)
    routes_BSK = torch.randint(0, model.cfg.n_routed_experts, (2, 5, 1), generator=g)
    routes_BSK = torch.cat([routes_BSK, (routes_BSK + 1) % model.cfg.n_routed_experts], -1)  # k = 2 distinct
    y_BSD, aux = moe(x_BSD, None, routes_BSK=routes_BSK)
    assert torch.equal(aux.routes_BSK, routes_BSK)
    want = _float64_moe(moe, x_BSD.reshape(10, -1), routes_BSK.reshape(10, -1)).view(2, 5, -1)
    # fp32 against float64: each output is a sum of ~100 products of size ~1, so its rounding error is up to
    # eps32 · Σ|terms| ≈ 6e-8 · 100 = 6e-6 absolute, whatever the output's own size (a small output near 0 carries
    # the error of its large terms; with one OpenMP thread the summation order gave 1.1e-6 on a 5e-3 output)
    torch.testing.assert_close(y_BSD.double(), want, rtol=1e-5, atol=1e-5)
    y_BSD.square().sum().backward()
    assert moe.gate.weight.grad is not None and moe.gate.weight.grad.abs().sum() > 0  # through the weights


def test_minus_one_tokens_are_routed_by_the_router(model, rollout):
    moved = _moved(model)
    ids, routes = rollout[1]
    half = {i: r.clone() for i, r in routes.items()}
    for r in half.values():
        r[::2] = -1
    own, replayed = _learned_routes(moved, ids), _learned_routes(moved, ids, half)
    for i in routes:
        assert torch.equal(replayed[i][::2], own[i][::2])
        assert torch.equal(replayed[i][1::2], routes[i][1::2])


@pytest.mark.parametrize(
    "routes, message",
    [
        ({0: torch.zeros(1, 4, 2, dtype=torch.long)}, "layer 0, a hash-routed layer"),
        ({9: torch.zeros(1, 4, 2, dtype=torch.long)}, "routes has layer 9"),
        ({1: torch.zeros(1, 3, 2, dtype=torch.long)}, r"routes\[1\] must be int64 \[1, 4, 2\]"),
        ({1: torch.zeros(1, 4, 2)}, r"routes\[1\] must be int64"),
        ({1: torch.full((1, 4, 2), 4, dtype=torch.long)}, r"routes\[1\] holds experts outside \[0, 4\)"),
        ({1: torch.tensor([[[0, -1], [0, 1], [1, 2], [2, 3]]])}, "replayed whole or not at all"),
    ],
)
def test_bad_routes_are_refused(model, routes, message):
    with pytest.raises(ValueError, match=message):
        model(torch.tensor([[5, 6, 7, 8]]), routes=routes)
