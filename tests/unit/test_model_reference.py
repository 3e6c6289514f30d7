"""Model components against explicit float64 references and invariants (no transformers needed)."""

import math

import pytest
import torch
import torch.nn.functional as F

from dsv4train.config.errors import ConfigError
from dsv4train.models.attention_core import CompressedKeys, hybrid_attention
from dsv4train.models.compressor import visible_entries
from dsv4train.models.grouped_gemm import grouped_linear
from dsv4train.models.indexer import kl_loss
from dsv4train.models.mhc import sinkhorn
from dsv4train.models.model import DSV4Model
from dsv4train.models.moe import build_hash_table, sequence_balance_loss, update_router_bias
from dsv4train.testing.toy_configs import tiny_config

torch.set_default_dtype(torch.float32)


def naive_attention(q, kv, sink, window, comp_kv, n_visible, topk):
    """Per-query float64 loop: one softmax over window keys, compressed keys and the sink."""
    B, S, H, C = q.shape
    out = torch.zeros(B, S, H, C, dtype=torch.float64)
    for b in range(B):
        for t in range(S):
            keys = [kv[b, s] for s in range(max(0, t - window + 1), t + 1)]
            if comp_kv is not None:
                ids = range(int(n_visible[t])) if topk is None else [i for i in topk[b, t].tolist() if i >= 0]
                keys += [comp_kv[b, i] for i in ids]
            K = torch.stack(keys).double()
            for h in range(H):
                z = K @ q[b, t, h].double() / math.sqrt(C)
                e = torch.exp(z - z.max())
                denom = e.sum() + torch.exp(sink[h].double() - z.max())
                out[b, t, h] = (e / denom) @ K
    return out


@pytest.mark.parametrize("mode", ["swa", "dense", "sparse"])
@pytest.mark.parametrize("S,window", [(13, 4), (9, 16), (16, 4)])
def test_hybrid_attention_matches_naive_loop(mode, S, window):
    torch.manual_seed(0)
    B, H, C, ratio = 2, 3, 8, 4
    q, kv, sink = torch.randn(B, S, H, C), torch.randn(B, S, C), torch.randn(H)
    comp, comp_kv, nvis, topk = None, None, None, None
    if mode != "swa":
        T = S // ratio
        comp_kv = torch.randn(B, T, C)
        nvis = visible_entries(torch.arange(S), ratio)
        if mode == "sparse":
            k = 2
            scores = torch.randn(B, S, T).masked_fill(torch.arange(T) >= nvis.unsqueeze(-1), -float("inf"))
            topk = scores.topk(min(k, T), -1).indices
            topk = torch.where(topk >= nvis.view(1, -1, 1), -1, topk)
        comp = CompressedKeys(comp_kv, nvis, topk)
    out, _ = hybrid_attention(q, F.pad(kv, (0, 0, window, 0)), sink, window, comp)
    ref = naive_attention(q, kv, sink, window, comp_kv, nvis, topk)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)

    # A later piece of the sequence given the W keys before it (context parallelism) gets the same outputs.
    start = S - S // 2
    if start < window:  # context parallelism requires a whole window before every shard (ParallelDims.validate)
        return
    prev = F.pad(kv, (0, 0, window, 0))[:, start : start + window]
    part_comp = (
        None if comp is None else CompressedKeys(comp_kv, nvis[start:], None if topk is None else topk[:, start:])
    )
    part, _ = hybrid_attention(
        q[:, start:], torch.cat((prev, kv[:, start:]), 1), sink, window, part_comp, sees_previous=True
    )
    torch.testing.assert_close(part.double(), ref[:, start:], rtol=1e-5, atol=1e-5)


def test_sinkhorn_is_doubly_stochastic():
    torch.manual_seed(0)
    logits = torch.randn(100, 4, 4) * 3
    row_err = []
    for iters in (1, 5, 20, 200):
        p = sinkhorn(logits, iters=iters, eps=1e-6)
        assert (p > 0).all()
        torch.testing.assert_close(p.sum(-2), torch.ones(100, 4), atol=1e-3, rtol=0)  # ends on a column pass
        row_err.append((p.sum(-1) - 1).abs().max().item())
    assert row_err == sorted(row_err, reverse=True) and row_err[-1] < 5e-3, row_err
    p = sinkhorn(torch.randn(100, 4, 4), iters=20, eps=1e-6)  # typical logits: rows converge by 20 passes
    torch.testing.assert_close(p.sum(-1), torch.ones(100, 4), atol=1e-3, rtol=0)


def test_visible_entries_follow_reference_rule():
    # entry i visible iff i < floor((t+1)/m): a block that ends exactly at t is visible
    assert visible_entries(torch.arange(9), 4).tolist() == [0, 0, 0, 1, 1, 1, 1, 2, 2]


@pytest.mark.parametrize("layer_type", ["swa", "csa", "hca"])
@pytest.mark.parametrize("indexer_mode", ["dense", "sparse"])
def test_causality_every_layer_type(layer_type, indexer_mode):
    """Changing tokens t+1.. never changes logits (or MTP logits) at positions <= t."""
    torch.manual_seed(0)
    cfg = tiny_config([layer_type, layer_type], indexer_mode=indexer_mode)
    model = DSV4Model(cfg)
    model.init_weights(3)
    model.eval()
    S, t = 40, 21
    ids = torch.randint(0, cfg.vocab_size, (2, S))
    ids2 = ids.clone()
    ids2[:, t + 1 :] = torch.randint(0, cfg.vocab_size, (2, S - t - 1))
    with torch.no_grad():
        a, b = model(ids, with_aux=True), model(ids2, with_aux=True)
    torch.testing.assert_close(a.logits[:, : t + 1], b.logits[:, : t + 1], rtol=0, atol=1e-5)
    assert not torch.allclose(a.logits[:, t + 1 :], b.logits[:, t + 1 :])
    # MTP at position t reads token t+1, so it may change from t on, never before
    torch.testing.assert_close(a.mtp_logits[:, :t], b.mtp_logits[:, :t], rtol=0, atol=1e-5)


def test_kl_loss_matches_float64_formula():
    torch.manual_seed(0)
    B, S, H, J = 2, 5, 3, 6
    teacher = torch.rand(B, S, H, J)
    student = torch.randn(B, S, J)
    valid = torch.rand(B, S, J) > 0.3
    valid[0, 0] = False  # a query with no visible entry is skipped
    got = kl_loss(teacher, student, valid)
    total, n = 0.0, 0
    for b in range(B):
        for s in range(S):
            v = valid[b, s]
            if not v.any():
                continue
            p = teacher[b, s].double().sum(0)[v]
            p = p / p.sum()
            logq = torch.log_softmax(student[b, s].double()[v], -1)
            total += float((p * (p.log() - logq)).sum())
            n += 1
    assert got.item() == pytest.approx(total / n, rel=1e-5)


def test_balance_loss_matches_definition():
    torch.manual_seed(0)
    B, S, E, K = 2, 7, 5, 2
    scores = torch.rand(B, S, E) + 0.1
    idx = torch.stack([torch.randperm(E)[:K] for _ in range(B * S)]).view(B, S, K)
    ref = 0.0
    for b in range(B):
        f = torch.zeros(E, dtype=torch.float64)
        for s in range(S):
            for e in idx[b, s]:
                f[e] += E / (K * S)
        p = (scores[b].double() / scores[b].double().sum(-1, keepdim=True)).mean(0)
        ref += float((f * p).sum()) / B
    assert sequence_balance_loss(scores, idx).item() == pytest.approx(ref, rel=1e-6)


def test_bias_update_moves_load_toward_uniform():
    torch.manual_seed(0)
    cfg = tiny_config(["swa", "swa"], n_hash_layers=0, n_mtp_layers=0)
    model = DSV4Model(cfg)
    model.init_weights(0)
    with torch.no_grad():  # skew the routers so experts 0 and 1 take every token
        for layer in model.layers:
            layer.ffn.gate.bias[:2] += 0.5
    ids = torch.randint(0, cfg.vocab_size, (4, 64))

    def imbalance():
        with torch.no_grad():
            c = model(ids, with_aux=True).expert_counts.float()
        return (c.max(-1).values / c.mean(-1)).mean().item(), c

    before, counts = imbalance()
    for _ in range(40):
        update_router_bias(model, counts, speed=0.02)
        _, counts = imbalance()
    after, _ = imbalance()
    assert after < before - 0.3, (before, after)


def test_hash_table_is_deterministic_distinct_and_balanced():
    a = build_hash_table(1000, 8, 3, seed=1)
    assert torch.equal(a, build_hash_table(1000, 8, 3, seed=1))
    assert all(len(set(r)) == 3 for r in a.tolist())
    load = torch.bincount(a.flatten(), minlength=8)
    assert load.max() - load.min() <= 1
    counts = torch.randint(1, 1000, (1000,)).numpy()
    t = build_hash_table(1000, 8, 3, seed=1, token_counts=counts)
    mass = torch.zeros(8, dtype=torch.float64).index_add_(
        0, t.flatten(), torch.tensor(counts + 1.0).repeat_interleave(3)
    )
    assert mass.max() / mass.mean() < 1.02


@pytest.mark.parametrize("din,dout", [(8, 12), (6, 7)])  # aligned (grouped_mm) and unaligned (fallback)
def test_grouped_linear_matches_loop_with_empty_experts(din, dout):
    torch.manual_seed(0)
    E, N = 5, 23
    counts = torch.tensor([4, 0, 10, 0, 9])
    offsets = torch.cumsum(counts, 0)
    x = torch.randn(N, din, requires_grad=True)
    w = torch.randn(E, dout, din, requires_grad=True)
    y = grouped_linear(x, w, offsets)
    gy = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, (x, w), gy)
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    y2 = grouped_linear(x2, w2, offsets, use_grouped_mm=False)
    gx2, gw2 = torch.autograd.grad(y2, (x2, w2), gy)
    for a, b in ((y, y2), (gx, gx2), (gw, gw2)):
        torch.testing.assert_close(a, b)


def test_init_is_deterministic_and_independent_of_device():
    cfg = tiny_config()
    a = DSV4Model(cfg)
    a.init_weights(7)
    with torch.device("meta"):
        b = DSV4Model(cfg)
    b.to_empty(device="cpu")
    b.init_weights(7)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    c = DSV4Model(cfg)
    c.init_weights(8)
    assert not torch.equal(sa["layers.0.attn.wq_a.weight"], c.state_dict()["layers.0.attn.wq_a.weight"])


def test_every_parameter_gets_a_gradient_indexer_only_from_its_loss():
    torch.manual_seed(0)
    cfg = tiny_config(["csa", "hca", "csa"])
    model = DSV4Model(cfg)
    model.init_weights(0)
    ids = torch.randint(0, cfg.vocab_size, (2, 40))
    out = model(ids, with_aux=True)
    lm = out.logits.float().logsumexp(-1).mean() + out.mtp_logits.float().logsumexp(-1).mean()
    lm.backward(retain_graph=True)
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert no_grad and all(".indexer." in n for n in no_grad), no_grad  # LM loss never reaches the indexer
    model.zero_grad()
    out.indexer_loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad and all(".indexer." in n for n in with_grad), with_grad


@pytest.mark.parametrize(
    "field,value,needle",
    [
        ("window_size", 0, "model.window_size"),
        ("n_activated_experts", 9, "model.n_activated_experts"),
        ("o_groups", 3, "model.o_groups"),
        ("rope_head_dim", 64, "model.rope_head_dim"),
        ("layer_types", ["swa", "mla"], "model.layer_types"),
        ("indexer_mode", "both", "model.indexer_mode"),
    ],
)
def test_invalid_config_names_the_field(field, value, needle):
    with pytest.raises(ConfigError, match=needle):
        tiny_config(**{field: value}) if field != "layer_types" else tiny_config(value)


def test_out_of_vocab_ids_fail_clearly():
    model = DSV4Model(tiny_config(["swa"]))
    with pytest.raises(ValueError, match="input_ids must lie in"):
        model(torch.tensor([[1, 300]]))
