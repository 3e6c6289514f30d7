"""Each model component against its transformers DeepseekV4 counterpart (fp32, random non-trivial weights)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import DeepseekV4Config  # noqa: E402
from transformers.models.deepseek_v4 import modeling_deepseek_v4 as hfm  # noqa: E402

from dsv4train.models.attention import Attention  # noqa: E402
from dsv4train.models.block import Block  # noqa: E402
from dsv4train.models.compressor import Compressor  # noqa: E402
from dsv4train.models.hf import hf_config_kwargs, hf_layer_key, to_hf_state_dict  # noqa: E402
from dsv4train.models.model import DSV4Model  # noqa: E402
from dsv4train.models.mhc import hc_collapse, hc_head, hc_weights  # noqa: E402
from dsv4train.models.moe import MoE, build_hash_table  # noqa: E402
from dsv4train.models.rope import inv_freq  # noqa: E402
from dsv4train.testing.toy_configs import tiny_config  # noqa: E402

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
    ours.load_state_dict(from_hf_layer(ours.state_dict(), ref.state_dict(), "attn.compressor.",
                                       "self_attn.compressor.", 0))
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
        value = hf_sd[name[len(strip):]]
        if key.endswith("experts.w1") or w3:
            value = value[:, inter:] if w3 else value[:, :inter]
        out[key] = value
    return out


@pytest.mark.parametrize("kind", ["swa", "hca", "csa"])
def test_attention_layer_matches_hf(kind):
    cfg = tiny_config([kind], indexer_mode="sparse")
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
    cfg = tiny_config(["csa"], hc_mult=3, n_hash_layers=1)
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
        expected = ref(x, input_ids=ids, position_embeddings=pe, position_ids=pos,
                       attention_mask=mask.view(1, 1, S, S).expand(2, 1, S, S))
        got, _ = ours(x, ids)
    assert rel_err(got, expected) < 1e-5


@pytest.mark.parametrize("layer_types,overrides", [
    (("swa", "csa", "hca", "csa"), {}),
    (("csa", "hca", "swa"), {"hc_mult": 2, "n_hash_layers": 2}),
    (("hca", "csa"), {"hc_mult": 3, "o_groups": 4, "index_topk": 2}),
])
def test_whole_model_logits_match_hf(layer_types, overrides):
    """Export our weights to transformers names; fp32 logits agree to < 1e-4 relative (measured ~2e-7)."""
    torch.manual_seed(0)
    cfg = tiny_config(layer_types, indexer_mode="sparse", **overrides)
    model = DSV4Model(cfg).eval()
    model.init_weights(1)
    randomize(model)  # non-trivial sinks, ape, hc base/scale, norms
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "hashed") and not m.hashed:
                m.bias.copy_(torch.randn_like(m.bias) * 0.1)
    hf_cfg = hf_config(cfg)
    hf_cfg._attn_implementation = "eager"
    ref = transformers.DeepseekV4ForCausalLM(hf_cfg).eval()
    missing, unexpected = ref.load_state_dict(to_hf_state_dict(model.state_dict()), strict=False)
    assert not unexpected and all("inv_freq" in k for k in missing), (missing, unexpected)
    ids = torch.randint(0, cfg.vocab_size, (2, 45))
    with torch.no_grad():
        assert rel_err(model(ids), ref(ids).logits) < 1e-4
