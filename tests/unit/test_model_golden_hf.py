"""Each model component against its transformers DeepseekV4 counterpart (fp32, random non-trivial weights); the
whole model's logits and parameter gradients against DeepseekV4ForCausalLM; MTP and the indexer KL (which
transformers lacks) against float64 references built from the spec around transformers' modules."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
from transformers import DeepseekV4Config  # noqa: E402
from transformers.models.deepseek_v4 import modeling_deepseek_v4 as hfm  # noqa: E402

from dsv4train.config.pretrain import TrainConfig  # noqa: E402
from dsv4train.models.attention import Attention  # noqa: E402
from dsv4train.models.block import Block  # noqa: E402
from dsv4train.models.compressor import Compressor  # noqa: E402
from dsv4train.models.hf import HF_LAYER_TYPES, hf_config_kwargs, hf_layer_key, hf_names, to_hf_state_dict  # noqa: E402
from dsv4train.models.mhc import hc_collapse, hc_head, hc_weights  # noqa: E402
from dsv4train.models.model import DSV4Model  # noqa: E402
from dsv4train.models.moe import MoE, build_hash_table  # noqa: E402
from dsv4train.models.rope import inv_freq  # noqa: E402
from dsv4train.testing.toy_configs import TIE_FREE_INDEX_HEADS, tiny_config  # noqa: E402
from dsv4train.train.learner import Learner  # noqa: E402
from dsv4train.train.losses import NextTokenLoss, lm_batch  # noqa: E402


def hf_config(c):
    return DeepseekV4Config(**hf_config_kwargs(c))


def randomize(*modules):
    torch.manual_seed(1)
    with torch.no_grad():
        for m in modules:
            for p in m.parameters():
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.dim() == 1 and p.numel() > 32 else 0.0))


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_rope_frequencies_match_hf_yarn_and_plain():
    cfg = tiny_config()
    rot = hfm.DeepseekV4RotaryEmbedding(hf_config(cfg))
    torch.testing.assert_close(torch.tensor(inv_freq(cfg, "swa")), rot.main_inv_freq.float())
    torch.testing.assert_close(torch.tensor(inv_freq(cfg, "csa")), rot.compress_inv_freq.float())
    assert not torch.allclose(rot.main_inv_freq, rot.compress_inv_freq)


@pytest.mark.parametrize("hc_mult", [2, 3, 4])
def test_mhc_matches_hf_hyper_connection_and_head(hc_mult):
    cfg = tiny_config(hc_mult=hc_mult)
    hf_cfg = hf_config(cfg)
    hc, head = hfm.DeepseekV4HyperConnection(hf_cfg), hfm.DeepseekV4HyperHead(hf_cfg)
    randomize(hc, head)
    x = torch.randn(2, 5, hc_mult, cfg.dim)
    post_ref, comb_ref, collapsed_ref = hc(x)
    pre, post, comb = hc_weights(x, hc.fn, hc.base, hc.scale, cfg.hc_sinkhorn_iters, cfg.hc_eps, cfg.norm_eps)
    torch.testing.assert_close(post, post_ref)
    torch.testing.assert_close(comb, comb_ref)
    torch.testing.assert_close(hc_collapse(x, pre), collapsed_ref)
    y = hc_head(x, head.hc_fn, head.hc_base, head.hc_scale, cfg.hc_eps, cfg.norm_eps)
    torch.testing.assert_close(y, head(x))


@pytest.mark.parametrize("kind", ["hca", "csa"])
def test_compressor_matches_hf(kind):
    cfg = tiny_config([kind])
    hf_cfg = hf_config(cfg)
    ratio = cfg.compress_ratio(kind)
    ours = Compressor(cfg.dim, cfg.head_dim, ratio, overlap=kind == "csa", eps=cfg.norm_eps)
    if kind == "hca":
        ref = hfm.DeepseekV4HCACompressor(hf_cfg)
    else:
        ref = hfm.DeepseekV4CSACompressor(hf_cfg)
    randomize(ref)
    ours.load_state_dict(
        from_hf_layer(ours.state_dict(), ref.state_dict(), "attn.compressor.", "self_attn.compressor.", 0)
    )
    S = 4 * ratio + 3  # a tail shorter than the ratio is dropped
    x = torch.randn(2, S, cfg.dim)
    pos = torch.arange(S).unsqueeze(0)
    if kind == "hca":
        expected = ref(x, None, pos, None, 0)[0].squeeze(1)
    else:  # the HF CSA compressor also runs its indexer: replicate only the pooling path through a cache-free call
        ref.indexer = _NoIndexer()
        expected = ref(x, torch.randn(2, S, cfg.q_lora_rank), pos, None, 0)[0].squeeze(1)
    got = ours(x, inv_freq(cfg, kind))
    assert got.shape == (2, 4, cfg.head_dim)
    torch.testing.assert_close(got, expected)


class _NoIndexer(torch.nn.Module):
    def forward(self, hidden_states, *args):
        B, S, _ = hidden_states.shape
        return torch.zeros(B, S, 1, dtype=torch.long)


def from_hf_layer(keys, hf_sd: dict, prefix: str, strip: str, inter: int) -> dict:
    """Our layer-level state dict from an HF one, through the shipped name map `hf_layer_key`.
    `prefix` turns a key of our module into a block key (e.g. "attn."); `strip` is removed from the HF name
    when the HF tensors come from a sub-module (e.g. "self_attn."). Fused gate_up is split into w1 / w3."""
    out = {}
    for key in keys:
        w3 = key.endswith("experts.w3")
        name = hf_layer_key(prefix + (key.replace("experts.w3", "experts.w1") if w3 else key))
        value = hf_sd[name[len(strip) :]]
        if key.endswith("experts.w1") or w3:
            value = value[:, inter:] if w3 else value[:, :inter]
        out[key] = value
    return out


@pytest.mark.parametrize("kind", ["swa", "hca", "csa"])
def test_attention_layer_matches_hf(kind):
    cfg = tiny_config([kind], indexer_mode="sparse", index_n_heads=TIE_FREE_INDEX_HEADS)
    hf_cfg = hf_config(cfg)
    hf_cfg._attn_implementation = "eager"
    ref = hfm.DeepseekV4Attention(hf_cfg, 0).eval()
    randomize(ref)
    ours = Attention(cfg, kind).eval()
    ours.load_state_dict(from_hf_layer(ours.state_dict(), ref.state_dict(), "attn.", "self_attn.", 0))
    S = 37
    x = torch.randn(2, S, cfg.dim)
    pos = torch.arange(S).unsqueeze(0)
    rot = hfm.DeepseekV4RotaryEmbedding(hf_cfg)
    pe = {t: rot(x, pos, layer_type=t) for t in ("main", "compress")}
    mask = torch.full((S, S), float("-inf")).triu(1)
    mask = mask.masked_fill(torch.arange(S).view(-1, 1) - torch.arange(S).view(1, -1) >= cfg.window_size, float("-inf"))
    expected, _ = ref(x, pe, pos, mask.view(1, 1, S, S).expand(2, 1, S, S))
    with torch.no_grad():
        got, _ = ours(x)
    assert rel_err(got, expected) < 1e-5


@pytest.mark.parametrize("hashed", [False, True])
def test_moe_matches_hf(hashed):
    cfg = tiny_config(["swa"], n_hash_layers=1 if hashed else 0)
    hf_cfg = hf_config(cfg)
    ref = hfm.DeepseekV4SparseMoeBlock(hf_cfg, 0)
    randomize(ref)
    ours = MoE(cfg, hashed)
    if hashed:
        ref.gate.tid2eid.copy_(build_hash_table(cfg.vocab_size, cfg.n_routed_experts, cfg.n_activated_experts, seed=3))
    else:
        ref.gate.e_score_correction_bias.copy_(torch.randn(cfg.n_routed_experts) * 0.2)
    sd = from_hf_layer(ours.state_dict(), ref.state_dict(), "ffn.", "mlp.", cfg.moe_inter_dim)
    ours.load_state_dict(sd)
    x = torch.randn(2, 11, cfg.dim) * 3  # large enough that the SwiGLU clamp is active
    ids = torch.randint(0, cfg.vocab_size, (2, 11))
    with torch.no_grad():
        got, aux = ours(x, ids)
        expected = ref(x, input_ids=ids)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert int(aux.counts_E.sum()) == 2 * 11 * cfg.n_activated_experts


def test_block_matches_hf_decoder_layer():
    cfg = tiny_config(["csa"], hc_mult=3, n_hash_layers=1, index_n_heads=TIE_FREE_INDEX_HEADS)
    hf_cfg = hf_config(cfg)
    hf_cfg._attn_implementation = "eager"
    ref = hfm.DeepseekV4DecoderLayer(hf_cfg, 0).eval()
    randomize(ref)
    table = build_hash_table(cfg.vocab_size, cfg.n_routed_experts, cfg.n_activated_experts, seed=2)
    ref.mlp.gate.tid2eid.copy_(table)
    ours = Block(cfg, "csa", hashed=True).eval()
    sd = from_hf_layer(ours.state_dict(), ref.state_dict(), "", "", cfg.moe_inter_dim)
    ours.load_state_dict(sd)
    S = 29
    x = torch.randn(2, S, 3, cfg.dim)
    ids = torch.randint(0, cfg.vocab_size, (2, S))
    pos = torch.arange(S).unsqueeze(0)
    rot = hfm.DeepseekV4RotaryEmbedding(hf_cfg)
    pe = {t: rot(x, pos, layer_type=t) for t in ("main", "compress")}
    mask = torch.full((S, S), float("-inf")).triu(1)
    mask = mask.masked_fill(torch.arange(S).view(-1, 1) - torch.arange(S).view(1, -1) >= cfg.window_size, float("-inf"))
    with torch.no_grad():
        expected = ref(
            x,
            input_ids=ids,
            position_embeddings=pe,
            position_ids=pos,
            attention_mask=mask.view(1, 1, S, S).expand(2, 1, S, S),
        )
        got, _ = ours(x, ids)
    assert rel_err(got, expected) < 1e-5


GOLDEN = [  # the whole-model configs: every layer type, hash layers, hc_mult 4/2/3, o_groups 2/4, top-k 3/2
    (("swa", "csa", "hca", "csa"), {}),
    (("csa", "hca", "swa"), {"hc_mult": 2, "n_hash_layers": 2}),
    (("hca", "csa"), {"hc_mult": 3, "o_groups": 4, "index_topk": 2}),
]
DENSE_TOPK = 16  # >= the 11 compressed entries of 45 tokens at ratio 4: transformers' top-k then keeps every
# visible entry, which is dense CSA (transformers has no dense mode of its own)


def golden_pair(layer_types, overrides, indexer_mode="sparse", dtype=torch.float32):
    """Our model (fp32, random non-trivial sinks, ape, hc base/scale, norms, router biases) and transformers'
    DeepseekV4ForCausalLM holding the same weights, exported through models/hf.py, in `dtype`."""
    torch.manual_seed(0)
    cfg = tiny_config(layer_types, indexer_mode=indexer_mode, **{"index_n_heads": TIE_FREE_INDEX_HEADS, **overrides})
    model = DSV4Model(cfg)
    model.init_weights(1)
    randomize(model)
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "hashed") and not m.hashed:
                m.bias.copy_(torch.randn_like(m.bias) * 0.1)
    ref = transformers.DeepseekV4ForCausalLM(hf_eager_config(cfg)).to(dtype)
    missing, unexpected = ref.load_state_dict(to_hf_state_dict(model.state_dict()), strict=False)
    assert not unexpected and all("inv_freq" in k for k in missing), (missing, unexpected)
    return model, ref


def hf_eager_config(cfg):
    """Eager attention (the only kind V4 supports) and eager experts (grouped_mm has no float64 kernel)."""
    hf_cfg = hf_config(cfg)
    hf_cfg._attn_implementation = "eager"
    hf_cfg._experts_implementation = "eager"
    return hf_cfg


@pytest.mark.parametrize("layer_types,overrides", GOLDEN)
def test_whole_model_logits_match_hf(layer_types, overrides):
    """Export our weights to transformers names; fp32 logits agree to < 1e-4 relative (measured ~2e-7)."""
    model, ref = golden_pair(layer_types, overrides)
    model.eval(), ref.eval()
    ids = torch.randint(0, model.cfg.vocab_size, (2, 45))
    with torch.no_grad():
        assert rel_err(model(ids), ref(ids).logits) < 1e-4


# ----------------------------------------------------------------------------- gradients
@pytest.mark.parametrize(
    "layer_types,overrides,mode",
    [*((lt, ov, "sparse") for lt, ov in GOLDEN), (GOLDEN[0][0], {"index_topk": DENSE_TOPK}, "dense")],
)
def test_whole_model_parameter_grads_match_hf(layer_types, overrides, mode):
    """d CE(logits, fixed random targets) / d parameter, fp32, both models in training mode, for every parameter
    the two have (names mapped by models/hf.py; our experts' w1 / w3 are the halves of HF's gate_up_proj; MTP has
    no HF counterpart and is not run by `model(ids)`). Relative L2 error per tensor, from two fp32 implementations
    that round differently: < 2e-5 (measured <= 6.8e-6), and < 2e-4 for the mHC / HC-head `base` and `scale`
    (measured <= 5.9e-5, on an α_post: a few numbers whose gradients sum cancelling terms over every token, so
    the error is fp32 rounding of the terms, not of the sum; as large against a float64 transformers). A
    detached or dropped path is off by O(1).
    The lightning indexer (wq_b, weights_proj and its compressor) gets no gradient from the LM loss in either
    model: transformers' DeepseekV4Indexer returns only top-k indices, which build an additive mask of constants
    (DeepseekV4CSACompressor.forward), and ours detaches the indexer's inputs (arch ref §3.6)."""
    model, ref = golden_pair(layer_types, overrides, mode)
    model.train(), ref.train()
    gen = torch.Generator().manual_seed(2)
    ids, targets = (torch.randint(0, model.cfg.vocab_size, (2, 45), generator=gen) for _ in range(2))
    F.cross_entropy(model(ids).flatten(0, 1), targets.flatten()).backward()
    F.cross_entropy(ref(ids).logits.flatten(0, 1), targets.flatten()).backward()
    hf_params = dict(ref.named_parameters())
    names = hf_names(n for n, _ in model.named_parameters() if not n.startswith("mtp."))
    inter = model.cfg.moe_inter_dim
    covered, no_grad = set(), []
    for name, param in model.named_parameters():
        if name.startswith("mtp."):
            continue
        hf_name = names[name[:-1] + "1"] if name.endswith("experts.w3") else names[name]
        hf_grad = hf_params[hf_name].grad
        covered.add(hf_name)
        if hf_grad is not None and name.endswith(("experts.w1", "experts.w3")):
            hf_grad = hf_grad[:, inter:] if name.endswith("w3") else hf_grad[:, :inter]
        if param.grad is None or hf_grad is None:
            assert param.grad is None and hf_grad is None, name
            no_grad.append(name)
            continue
        err = rel_err(param.grad, hf_grad)
        assert err < (2e-4 if name.endswith(("_base", "_scale")) else 2e-5), (name, err)
    assert covered == set(hf_params)  # every transformers parameter was compared
    assert no_grad and all(".attn.indexer." in n for n in no_grad), no_grad
    n_csa = model.cfg.layer_types.count("csa")
    assert len(no_grad) == 6 * n_csa  # wq_b, weights_proj, compressor wkv / wgate / ape / norm per CSA layer


# ----------------------------------------------------------------------------- MTP and the indexer KL, float64
# References for what transformers does not have (MTP, the indexer's training loss), written from the spec around
# transformers' modules in float64. They keep autograd, so they give reference gradients too.
def rms64(x, weight, eps):
    """RMSNorm over the last dim (weight None: the unweighted one)."""
    y = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)
    return y if weight is None else y * weight


def window_mask(S, window):
    """Additive [1, 1, S, S] mask: query t sees keys t - window < s <= t."""
    d = torch.arange(S).view(-1, 1) - torch.arange(S).view(1, -1)
    return torch.zeros(S, S, dtype=torch.float64).masked_fill((d < 0) | (d >= window), float("-inf")).view(1, 1, S, S)


def hf_final_streams(ref, ids):
    """transformers' logits and its final residual streams X_L [B, S, n, d] (the input of its HyperHead)."""
    seen = {}
    hook = ref.model.hc_head.register_forward_pre_hook(lambda mod, args: seen.setdefault("x", args[0]))
    logits = ref(ids).logits
    hook.remove()
    return logits, seen["x"]


MTP_OWN = ("e_proj.", "h_proj.", "enorm.", "hnorm.", "norm.", "hc_head_")  # MTP weights outside its V4 block


def hf_mtp_block64(model):
    """The MTP module's V4 block (sliding-window attention, non-hash MoE, its own mHC; arch ref §6) as
    transformers' DeepseekV4DecoderLayer in float64 holding our `mtp.0.*` block weights. Returns (a function of
    the streams [B, S, n, d], the layer)."""
    cfg = dataclasses.replace(model.cfg, layer_types=["swa"], n_hash_layers=0)
    hf_cfg = hf_eager_config(cfg)
    layer = hfm.DeepseekV4DecoderLayer(hf_cfg, 0)
    block = {
        "layers.0." + k[len("mtp.0.") :]: v
        for k, v in model.state_dict().items()
        if k.startswith("mtp.0.") and not k[len("mtp.0.") :].startswith(MTP_OWN)
    }
    layer.load_state_dict({k[len("model.layers.0.") :]: v for k, v in to_hf_state_dict(block).items()})
    layer = layer.double().train()
    rot = hfm.DeepseekV4RotaryEmbedding(hf_cfg)

    def run(x_BSND):
        B, S = x_BSND.shape[:2]
        pos = torch.arange(S).unsqueeze(0)
        pe = {t: rot(x_BSND, pos, layer_type=t) for t in ("main", "compress")}
        return layer(
            x_BSND,
            input_ids=None,
            position_embeddings=pe,
            position_ids=pos,
            attention_mask=window_mask(S, cfg.window_size).expand(B, 1, S, S),
        )

    return run, layer


def mtp_reference64(model, ref64, ids, next_ids):
    """(MTP logits, main logits, the MTP block's DecoderLayer, float64 leaves for our other weights) per arch
    ref §6 and §4.2: at position t, X⁰ = h_proj(hnorm(X_L[t])) + e_proj(enorm(Embed(next_ids[t]))) broadcast
    over the streams, with X_L the final streams of transformers' model; the V4 block; the MTP's own HC head
    pre = σ(α·(RMS(vec X)·Φᵀ) + b) + ε, y = Σ_j pre_j X_j; its norm; the shared head."""
    c, p = model.cfg, "mtp.0."
    w = {k: v.detach().double().requires_grad_() for k, v in model.named_parameters()}
    logits, X_L = hf_final_streams(ref64, ids)
    e = w["embed.weight"][next_ids]
    x = rms64(X_L, w[p + "hnorm.weight"], c.norm_eps) @ w[p + "h_proj.weight"].T + (
        rms64(e, w[p + "enorm.weight"], c.norm_eps) @ w[p + "e_proj.weight"].T
    ).unsqueeze(-2)
    block, layer = hf_mtp_block64(model)
    x = block(x)
    mix = rms64(x.flatten(-2), None, c.norm_eps) @ w[p + "hc_head_fn"].T
    pre = torch.sigmoid(mix * w[p + "hc_head_scale"] + w[p + "hc_head_base"]) + c.hc_eps
    y = (pre.unsqueeze(-1) * x).sum(-2)
    return rms64(y, w[p + "norm.weight"], c.norm_eps) @ w["head.weight"].T, logits, layer, w


def indexer_kl64(ref64, ids, cfg, mode):
    """The indexer loss, arch ref §8.4 (V3.2's DSA loss ported to CSA): summed over CSA layers, the mean over
    queries t with a candidate of KL(p_t || softmax(I_t)). p_t (no gradient): query t's probabilities on the
    compressed entries in the main attention's one softmax with the window keys and the sink (transformers'
    eager attention weights), summed over heads, renormalised over the candidates. I_t: transformers'
    lightning-indexer scores, computed from detached inputs (the loss reaches only the indexer). Candidates: the
    visible entries s < floor((t+1)/m) (dense, §3.5), or the top-k of them by I (sparse, §3.6)."""
    scores = []
    csa = [layer.self_attn for layer in ref64.model.layers if layer.self_attn.layer_type == HF_LAYER_TYPES["csa"]]
    hooks = [
        a.compressor.indexer.register_forward_pre_hook(
            lambda mod, args: tuple(t.detach() if torch.is_tensor(t) else t for t in args)
        )
        for a in csa
    ]
    hooks += [a.compressor.indexer.scorer.register_forward_hook(lambda mod, args, out: scores.append(out)) for a in csa]
    out = ref64(ids, output_attentions=True)
    for h in hooks:
        h.remove()
    probs = [pr.detach() for pr, layer in zip(out.attentions, ref64.model.layers) if layer.self_attn in csa]
    S, total = ids.shape[1], torch.zeros((), dtype=torch.float64)
    for probs_BHSX, I_BST in zip(probs, scores):
        T = I_BST.shape[-1]
        visible = torch.arange(T) < ((torch.arange(S) + 1) // cfg.csa_ratio).unsqueeze(-1)  # [S, T]
        cand = visible.expand_as(I_BST)
        if mode == "sparse":
            top = I_BST.detach().masked_fill(~visible, float("-inf")).topk(min(cfg.index_topk, T), -1).indices
            cand = torch.zeros_like(cand).scatter(-1, top, True) & visible
        p = probs_BHSX[..., S:].sum(1).masked_fill(~cand, 0.0)  # the compressed slots follow the S window keys
        p = p / p.sum(-1, keepdim=True)
        logq = I_BST.masked_fill(~cand, float("-inf")).log_softmax(-1)
        terms = torch.where(cand & (p > 0), p * (p.log() - logq), 0.0)
        total = total + terms.sum(-1)[cand.any(-1)].mean()
    return total


def reference_grads(model, ref64, mtp_layer, leaves):
    """Our parameter name -> its float64 reference gradient (None where the loss does not reach it): main-model
    parameters from transformers' model (w1 / w3 the halves of gate_up_proj), the MTP block's from its
    DecoderLayer, the other MTP weights and the head from the leaves of `mtp_reference64`; the embedding is
    shared by the main model and the MTP input, so both parts add."""
    main, block = dict(ref64.named_parameters()), dict(mtp_layer.named_parameters())
    names, inter, out = hf_names(n for n, _ in model.named_parameters()), model.cfg.moe_inter_dim, {}
    for name, _ in model.named_parameters():
        key = name[:-1] + "1" if name.endswith("experts.w3") else name
        rest = name[len("mtp.0.") :]
        if (name.startswith("mtp.0.") and rest.startswith(MTP_OWN)) or name == "head.weight":
            g = leaves[name].grad
        else:
            g = block[hf_layer_key(key[len("mtp.0.") :])].grad if name.startswith("mtp.0.") else main[names[key]].grad
            if g is not None and name.endswith(("experts.w1", "experts.w3")):
                g = g[:, inter:] if name.endswith("w3") else g[:, :inter]
        if name == "embed.weight" and leaves[name].grad is not None:
            g = leaves[name].grad if g is None else g + leaves[name].grad
        out[name] = g
    return out


@pytest.mark.parametrize("layer_types,overrides", GOLDEN)
def test_mtp_logits_match_float64_reference(layer_types, overrides):
    """Our MTP logits (`model(ids, with_aux=True)`, fp32) against `mtp_reference64` at every position but the last
    (whose token t+1 does not exist; the model feeds a dummy there). Relative L2 error < 1e-5: fp32 rounding through
    the main layers and the MTP block, measured <= 9.7e-7; wrong wiring (streams after the HC head, the embedding of
    token t instead of t+1, a missing norm, the main model's HC head) is off by > 1e-2."""
    model, ref64 = golden_pair(layer_types, overrides, dtype=torch.float64)
    model.eval()
    ids = torch.randint(0, model.cfg.vocab_size, (2, 45), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = model(ids, with_aux=True).mtp_logits
        want = mtp_reference64(model, ref64, ids, torch.cat((ids[:, 1:], ids[:, -1:]), 1))[0]
    assert rel_err(got[:, :-1].double(), want[:, :-1]) < 1e-5


@pytest.mark.parametrize("mode", ["dense", "sparse"])
@pytest.mark.parametrize("layer_types,overrides", GOLDEN)
def test_indexer_kl_matches_float64_reference(layer_types, overrides, mode):
    """`indexer_loss` of the training forward (fp32) against `indexer_kl64`, dense CSA and top-k. Relative error
    < 1e-5: fp32 probabilities and scores, measured <= 4.7e-7 (KL 0.02-0.07); a teacher summed over the window
    slots or the sink, not renormalised, or a student over other entries moves it by far more."""
    if mode == "dense":
        overrides = {**overrides, "index_topk": DENSE_TOPK}
    model, ref64 = golden_pair(layer_types, overrides, mode, dtype=torch.float64)
    model.train()
    ids = torch.randint(0, model.cfg.vocab_size, (2, 45), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = indexer_kl64(ref64, ids, model.cfg, mode)
    got = model(ids, with_aux=True).indexer_loss.detach()
    assert want > 0.01  # a non-trivial KL (the student is untrained)
    assert float(got) == pytest.approx(float(want), rel=1e-5)


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_mtp_and_indexer_loss_grads_match_float64_reference(mode):
    """d (MTP CE + indexer KL) / d parameter, ours in fp32 against the float64 references' autograd, for every
    parameter: the MTP loss reaches the main model through X_L and the shared embedding and head, the KL only the
    indexer, and neither the main model's final HC head and norm (their gradients are None in both). Relative
    L2 error per tensor < 2e-5, < 2e-4 for the mHC `base` / `scale`, for the reasons given in
    test_whole_model_parameter_grads_match_hf (measured <= 5.5e-6 and 3.5e-5)."""
    overrides = {"index_topk": DENSE_TOPK} if mode == "dense" else {}
    model, ref64 = golden_pair(GOLDEN[0][0], overrides, mode, dtype=torch.float64)
    model.train(), ref64.train()
    rows = torch.randint(0, model.cfg.vocab_size, (2, 46), generator=torch.Generator().manual_seed(6))
    inputs, labels = rows[:, :-1], rows[:, 1:]
    mtp_logits, _, mtp_layer, leaves = mtp_reference64(model, ref64, inputs, labels)
    (
        F.cross_entropy(mtp_logits[:, :-1].flatten(0, 1), rows[:, 2:].flatten())
        + indexer_kl64(ref64, inputs, model.cfg, mode)
    ).backward()
    want = reference_grads(model, ref64, mtp_layer, leaves)
    out = model(inputs, mtp_input_ids=labels, with_aux=True)
    (F.cross_entropy(out.mtp_logits[:, :-1].flatten(0, 1), rows[:, 2:].flatten()) + out.indexer_loss).backward()
    none = []
    for name, param in model.named_parameters():
        if param.grad is None or want[name] is None:
            assert param.grad is None and want[name] is None, name
            none.append(name)
            continue
        err = rel_err(param.grad.double(), want[name])
        assert err < (2e-4 if name.endswith(("_base", "_scale")) else 2e-5), (name, err)
    assert sorted(none) == ["hc_head_base", "hc_head_fn", "hc_head_scale", "norm.weight"]


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_trainer_losses_match_float64_reference(mode):
    """The Learner's logged lm_loss, mtp_loss and indexer_loss for one micro-batch of rows [B, S+1] against the
    float64 references: CE of token t+1 at t; MTP fed token t+1 (label t) at t, CE against token t+2 where it exists
    (the last position is unlabelled), summed and divided by the B·S next-token targets as DeepSeek-V3's
    L_MTP = -1/T Σ_{i=2+k}^{T+1} log P_i does; the indexer KL. Relative error < 1e-5, measured <= 1.3e-7 for the CEs and
    1e-6 for the KL."""
    overrides = {"index_topk": DENSE_TOPK} if mode == "dense" else {}
    model, ref64 = golden_pair(GOLDEN[0][0], overrides, mode, dtype=torch.float64)
    S = 45
    rows = torch.randint(0, model.cfg.vocab_size, (2, S + 1), generator=torch.Generator().manual_seed(5))
    inputs, labels = rows[:, :-1], rows[:, 1:]
    with torch.no_grad():
        mtp_logits, logits, _, _ = mtp_reference64(model, ref64, inputs, labels)
        ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
        mtp = F.cross_entropy(mtp_logits[:, :-1].flatten(0, 1), rows[:, 2:].flatten(), reduction="sum") / labels.numel()
        kl = indexer_kl64(ref64, inputs, model.cfg, mode)
    learner = Learner(model, torch.optim.SGD(model.parameters(), lr=0.0), TrainConfig(seq_len=S, micro_batch_size=2))
    res = learner.step([lm_batch(rows)], NextTokenLoss(mtp_weight=0.3))
    assert res.metrics["lm_loss"] == pytest.approx(float(ce), rel=1e-5)
    assert res.metrics["mtp_loss"] == pytest.approx(float(mtp), rel=1e-5)
    assert res.metrics["indexer_loss"] == pytest.approx(float(kl), rel=1e-5)
