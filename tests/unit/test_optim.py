"""Muon + AdamW set-up (arch ref §8.1) and the LR / MTP schedules (§8.2)."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F

from dsv4train.config.errors import ConfigError
from dsv4train.config.optim import OptimConfig
from dsv4train.models.model import DSV4Model
from dsv4train.optim.groups import build_optimizers, describe_groups
from dsv4train.optim.muon import NS_COEFFICIENTS, Muon, newton_schulz, orthogonal_update
from dsv4train.optim.schedule import decay_start, lr_at, mtp_weight_at
from dsv4train.testing.toy_configs import tiny_config


def _step_with(opt, params, grads):
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()


def _tiny_model(seed: int = 0) -> DSV4Model:
    model = DSV4Model(tiny_config(["swa", "csa", "hca"]))
    model.init_weights(seed=seed)
    return model


# (a) torch.optim.Muon. Conventions matched: torch's buffer is an EMA, buf = (1-mu)*M, and its Nesterov input is
# (1-mu)*U, so feeding torch G/(1-mu) gives it our M and U exactly (NS is scale-invariant up to eps anyway);
# adjust_lr_fn="match_rms_adamw" scales by 0.2*sqrt(max(A, B)), i.e. our rms=0.2; weight decay W*(1-lr*wd) with
# the unscaled lr on both sides; NS in bfloat16, 5 quintic steps, eps 1e-7 (torch clamps the norm, we add eps).
@pytest.mark.parametrize("shape", [(48, 80), (80, 48)])
def test_matches_torch_muon_without_momentum(shape):
    torch.manual_seed(0)
    w0 = torch.randn(shape) * 0.02
    ours, ref = w0.clone().requires_grad_(), w0.clone().requires_grad_()
    opt = Muon([ours], lr=0.02, momentum=0.0, weight_decay=0.1, ns="quintic", ns_dtype="bfloat16", rms=0.2)
    opt_ref = torch.optim.Muon(
        [ref], lr=0.02, momentum=0.0, nesterov=True, weight_decay=0.1, adjust_lr_fn="match_rms_adamw"
    )
    for _ in range(5):
        g = torch.randn(shape)
        _step_with(opt, [ours], [g])
        _step_with(opt_ref, [ref], [g])
    # identical NS input -> bit-identical bf16 NS; only the fp32 lr multiply rounds differently
    torch.testing.assert_close(ours, ref, atol=1e-7, rtol=0)


def test_matches_torch_muon_with_nesterov_momentum():
    torch.manual_seed(0)
    mu, w0 = 0.95, torch.randn(48, 80) * 0.02
    ours, ref = w0.clone().requires_grad_(), w0.clone().requires_grad_()
    opt = Muon([ours], lr=0.02, momentum=mu, weight_decay=0.1, ns="quintic", ns_dtype="bfloat16", rms=0.2)
    opt_ref = torch.optim.Muon(
        [ref], lr=0.02, momentum=mu, nesterov=True, weight_decay=0.1, adjust_lr_fn="match_rms_adamw"
    )
    for _ in range(6):
        g = torch.randn(48, 80)
        _step_with(opt, [ours], [g])
        _step_with(opt_ref, [ref], [g / (1 - mu)])
    buf, buf_ref = opt.state[ours]["momentum_buffer"], opt_ref.state[ref]["momentum_buffer"]
    torch.testing.assert_close(buf, buf_ref, rtol=1e-5, atol=1e-5)
    # fp32 rounding of the EMA flips a few bf16 roundings of the NS input; NS amplifies them to ~0.3%
    rel = (ours - ref).norm() / (ours - w0).norm()
    assert rel < 1e-2, float(rel)


# (b) hybrid Newton–Schulz
@pytest.mark.parametrize("shape", [(64, 160), (128, 128), (160, 64)])
def test_hybrid_ns_singular_values(shape):
    torch.manual_seed(1)
    u = torch.randn(1, *shape)
    fast8 = torch.linalg.svdvals(newton_schulz(u, NS_COEFFICIENTS["hybrid"][:8])[0])
    full = torch.linalg.svdvals(newton_schulz(u, NS_COEFFICIENTS["hybrid"])[0])
    assert 0.7 <= full.min() and full.max() <= 1.3
    assert (full - 1).abs().max() < 0.01 < (fast8 - 1).abs().max()  # the 2-step tail settles them at 1


# (c) a stacked expert parameter [E, n, m] is E independent matrices
def test_expert_stack_equals_per_expert_updates():
    torch.manual_seed(2)
    w0 = torch.randn(3, 24, 40) * 0.02
    stacked = w0.clone().requires_grad_()
    singles = [w0[e].clone().requires_grad_() for e in range(3)]
    opt_s, opt_1 = Muon([stacked], lr=0.01), Muon(singles, lr=0.01)
    for _ in range(3):
        g = torch.randn(3, 24, 40) * torch.tensor([1.0, 10.0, 0.1]).view(3, 1, 1)  # unequal scales per expert
        _step_with(opt_s, [stacked], [g])
        _step_with(opt_1, singles, list(g))
    torch.testing.assert_close(stacked, torch.stack(singles), atol=1e-6, rtol=1e-5)


# (d) wo_a with row_blocks=g: each output group's [r, m] block is its own matrix
def test_wo_a_row_blocks_orthogonalise_each_block():
    torch.manual_seed(3)
    g, r, m = 4, 16, 48
    u = torch.randn(g * r, m)
    got = orthogonal_update(u, row_blocks=g, ns_dtype="float32")
    want = torch.cat([orthogonal_update(block, ns_dtype="float32") for block in u.split(r)])
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    whole = orthogonal_update(u, ns_dtype="float32")
    assert (got - whole).abs().max() > 1e-2  # the split really changes the update
    w = torch.zeros(g * r, m, requires_grad=True)
    _step_with(Muon([{"params": [w], "row_blocks": g}], lr=1.0, weight_decay=0.0, momentum=0.0), [w], [u])
    torch.testing.assert_close(w, -want, atol=1e-6, rtol=1e-5)


# (e) update RMS = rms * lr
@pytest.mark.parametrize("shape", [(256, 256), (64, 192)])
def test_update_rms(shape):
    torch.manual_seed(4)
    w = torch.zeros(shape, requires_grad=True)
    _step_with(Muon([w], lr=1e-2, weight_decay=0.0, ns_dtype="float32"), [w], [torch.randn(shape)])
    rms = w.detach().pow(2).mean().sqrt().item()
    assert rms == pytest.approx(0.18 * 1e-2, rel=0.01)


def test_muon_rejects_vectors():
    with pytest.raises(ValueError, match=r"shape \(8,\).*AdamW"):
        Muon([torch.zeros(8, requires_grad=True)])
    with pytest.raises(ValueError, match="row_blocks=3"):
        Muon([{"params": [torch.zeros(8, 4, requires_grad=True)], "row_blocks": 3}])


# (f) which parameter goes where
def test_group_assignment_on_tiny_model():
    model = _tiny_model()
    labels = describe_groups(model)
    names = [n for n, _ in model.named_parameters()]
    assert sorted(labels) == sorted(names)
    opt = build_optimizers(model, OptimConfig())
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(names)  # every parameter exactly once
    where = {name: label.split(":")[0] for name, label in labels.items()}
    for name in (
        "embed.weight",
        "head.weight",
        "layers.0.attn.attn_sink",
        "hc_head_base",
        "hc_head_scale",
        "layers.1.hc_attn_base",
        "layers.0.attn_norm.weight",
        "layers.0.attn.q_norm.weight",
        "layers.1.attn.compressor.ape",
        "layers.1.attn.indexer.compressor.norm.weight",
        "mtp.0.enorm.weight",
        "norm.weight",
    ):
        assert where[name] == "adamw", name
    for name in (
        "layers.0.attn.wq_a.weight",
        "layers.0.ffn.experts.w1",
        "layers.0.ffn.experts.w2",
        "hc_head_fn",
        "layers.0.hc_ffn_fn",
        "layers.0.ffn.gate.weight",
        "layers.1.attn.indexer.wq_b.weight",
        "layers.1.attn.compressor.wkv.weight",
        "mtp.0.e_proj.weight",
        "mtp.0.h_proj.weight",
    ):
        assert where[name] == "muon", name
    assert labels["layers.0.attn.wo_a.weight"] == "muon:row_blocks"
    wo_a_group = next(g for g in opt["muon"].param_groups if g["row_blocks"] != 1)
    assert wo_a_group["row_blocks"] == model.cfg.o_groups
    all_adamw = describe_groups(model, OptimConfig(name="adamw"))
    assert {label.split(":")[0] for label in all_adamw.values()} == {"adamw"}


# (g) checkpointing: state_dict round trip, plain and through torch.distributed.checkpoint's helpers
def _grads(model, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=gen) for p in model.parameters()]


@pytest.mark.parametrize("via_dcp", [False, True])
def test_state_dict_round_trip(via_dcp):
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    cfg = OptimConfig(lr=1e-3, warmup_steps=0)
    a = _tiny_model()
    opt_a = build_optimizers(a, cfg)
    for seed in (1, 2):
        _step_with(opt_a, list(a.parameters()), _grads(a, seed))
    buf = io.BytesIO()
    state = get_optimizer_state_dict(a, opt_a) if via_dcp else opt_a.state_dict()
    torch.save({"model": a.state_dict(), "optim": state}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)

    b = _tiny_model(seed=7)
    b.load_state_dict(saved["model"])
    opt_b = build_optimizers(b, cfg)
    if via_dcp:
        set_optimizer_state_dict(b, opt_b, saved["optim"])
    else:
        opt_b.load_state_dict(saved["optim"])
    for model, opt in ((a, opt_a), (b, opt_b)):
        _step_with(opt, list(model.parameters()), _grads(model, 3))
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name


# (h) schedules
def test_wsd_schedule():
    cfg = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, schedule="wsd", decay_fraction=0.2)
    assert lr_at(0, cfg, 100) == pytest.approx(1e-4)
    assert lr_at(4, cfg, 100) == pytest.approx(5e-4)
    assert lr_at(9, cfg, 100) == pytest.approx(1e-3)
    assert lr_at(50, cfg, 100) == lr_at(79, cfg, 100) == pytest.approx(1e-3)
    assert decay_start(cfg, 100) == 80
    assert lr_at(80, cfg, 100) < 1e-3
    assert lr_at(89, cfg, 100) == pytest.approx(5.5e-4)  # halfway through the cosine
    assert lr_at(99, cfg, 100) == pytest.approx(1e-4)
    assert lr_at(150, cfg, 100) == pytest.approx(1e-4)
    linear = OptimConfig(lr=1e-3, min_lr=0.0, warmup_steps=0, decay_fraction=0.5, decay_shape="linear")
    assert lr_at(0, linear, 100) == pytest.approx(1e-3)
    assert lr_at(74, linear, 100) == pytest.approx(5e-4)


def test_cosine_schedule():
    cfg = OptimConfig(lr=1e-3, min_lr=0.0, warmup_steps=10, schedule="cosine")
    assert lr_at(9, cfg, 110) == pytest.approx(1e-3)
    assert lr_at(59, cfg, 110) == pytest.approx(5e-4)
    assert lr_at(34, cfg, 110) == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_at(109, cfg, 110) == pytest.approx(0.0)


def test_mtp_weight_drops_when_the_lr_decays():
    cfg = OptimConfig(warmup_steps=5, decay_fraction=0.1)
    assert mtp_weight_at(0, cfg, 1000) == 0.3
    assert mtp_weight_at(899, cfg, 1000) == 0.3
    assert mtp_weight_at(900, cfg, 1000) == 0.1
    assert lr_at(899, cfg, 1000) == cfg.lr > lr_at(900, cfg, 1000)
    cfg = OptimConfig(warmup_steps=5, schedule="cosine")
    assert mtp_weight_at(4, cfg, 200) == 0.3 and mtp_weight_at(5, cfg, 200) == 0.1


# (i) config validation names the field
@pytest.mark.parametrize(
    "field, value",
    [
        ("name", "sgd"),
        ("lr", 0.0),
        ("min_lr", 1.0),
        ("weight_decay", -0.1),
        ("adam_beta2", 1.0),
        ("adam_eps", 0.0),
        ("muon_momentum", 1.5),
        ("muon_ns", "cubic"),
        ("muon_ns_dtype", "fp16"),
        ("muon_rms", 0.0),
        ("schedule", "step"),
        ("warmup_steps", -1),
        ("decay_fraction", 1.5),
        ("decay_shape", "exp"),
    ],
)
def test_invalid_config_names_the_field(field, value):
    with pytest.raises(ConfigError, match=rf"^optim\.{field}: "):
        OptimConfig(**{field: value})


# (j) a toy model learns a fixed batch with Muon
def test_toy_model_trains_with_muon():
    torch.manual_seed(0)
    model = _tiny_model()
    opt = build_optimizers(model, OptimConfig(lr=1e-2, warmup_steps=0))
    rows = torch.randint(0, model.cfg.vocab_size, (2, 33))
    inputs, labels = rows[:, :-1], rows[:, 1:]
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = F.cross_entropy(model(inputs).flatten(0, 1), labels.flatten())
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
