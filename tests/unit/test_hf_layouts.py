"""`load_pretrained` reads every layout transformers 5.23 writes and the official hub layout (arch ref §7.1, §7.2,
§11.1, §11.2), single-file and sharded: the weights come back exactly, FP8 blocks and FP4-packed experts dequantise
to what our exact quantisers produced (checked against a nibble lookup table written here), and the logits equal
transformers' on the same folder or our model built from the original weights. Malformed files name themselves."""

import json
import re
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

transformers = pytest.importorskip("transformers")

import dsv4train  # noqa: E402
from dsv4train.cli.main import main as dsv4  # noqa: E402
from dsv4train.config.errors import ConfigError  # noqa: E402
from dsv4train.config.model import ModelConfig  # noqa: E402
from dsv4train.models.flavors import get_flavor  # noqa: E402
from dsv4train.models.hf import config_from_hf, hf_config_kwargs, to_hf_state_dict  # noqa: E402
from dsv4train.models.hub_format import CheckpointLayoutError  # noqa: E402
from dsv4train.models.model import DSV4Model  # noqa: E402
from dsv4train.models.pretrained import hf_config_json, save_dsv4, save_hf  # noqa: E402
from dsv4train.quant.formats import quant_e2m1, quant_e4m3_blocks  # noqa: E402
from dsv4train.testing.sensitive_models import sensitive_model  # noqa: E402
from dsv4train.testing.toy_configs import TIE_FREE_INDEX_HEADS, tiny_config  # noqa: E402

# every layer type, a hash layer and an MTP layer
CFG = tiny_config(
    ["swa", "csa", "hca"], indexer_mode="sparse", hc_mult=2, n_hash_layers=1, index_n_heads=TIE_FREE_INDEX_HEADS
)
# FP8 weights that span several 128x128 blocks with partial last blocks (wq_b [192, 32], e_proj [160, 160]) and
# FP4 experts whose input dims (160, 64) are whole 1x32 blocks
HUB_CFG = tiny_config(
    ["swa", "csa", "hca"],
    indexer_mode="sparse",
    dim=160,
    n_heads=6,
    moe_inter_dim=64,
    hc_mult=2,
    n_hash_layers=1,
    index_n_heads=TIE_FREE_INDEX_HEADS,
)
# transformers vs ours on the same fp32 weights: the same maths in a different operation order (Sinkhorn, the
# softmax with sinks, the grouped output projection); measured 1.7e-7 to 2.6e-7 relative (~2 float32 ulps)
HF_REL_TOL = 2e-6

E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
FP4_NIBBLE = E2M1 + tuple(-v for v in E2M1)  # bit 3 is the sign
FP8_SUFFIXES = (
    "attn.wq_a.weight",
    "attn.wq_b.weight",
    "attn.wkv.weight",
    "attn.wo_a.weight",
    "attn.wo_b.weight",
    "attn.indexer.wq_b.weight",
    "shared_experts.w1.weight",
    "shared_experts.w2.weight",
    "shared_experts.w3.weight",
    "e_proj.weight",
    "h_proj.weight",
)


def _model(cfg: ModelConfig, seed: int = 0) -> DSV4Model:
    """Initialised, then every tensor the init sets to a constant (norms 1; sinks, ape, router bias 0; mHC scales)
    perturbed, so a swapped or misplaced one changes the weights and the logits."""
    return sensitive_model(cfg, seed, noise_seed=seed + 100)


def _ids(cfg: ModelConfig, seq: int = 40) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (2, seq), generator=torch.Generator().manual_seed(1))


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _file_keys(folder) -> set[str]:
    keys = set()
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), "pt") as s:
            keys.update(s.keys())
    return keys


def _model_from(cfg: ModelConfig, sd: dict) -> DSV4Model:
    model = DSV4Model(cfg)
    model.load_state_dict(sd, strict=True)
    return model.eval()


# ---- the official hub layout, written here from arch ref §7.1 / §11.1 ----


def _hub_precision(key: str) -> str:
    """The instruct checkpoint's storage of a tensor (arch ref §7.1)."""
    if key.endswith("tid2eid"):
        return "int32"
    if ".ffn.experts." in key:
        return "fp4"
    if key.endswith(FP8_SUFFIXES):
        return "fp8"
    if "hc_" in key or key.endswith(("attn_sink", ".ape", "gate.bias")):
        return "fp32"
    return "bf16"


def _fp8(w: torch.Tensor):
    """Our exact FP8 quantiser on w zero-padded to whole 128x128 blocks (padding changes no block's amax):
    (E4M3 weight, E8M0 scale [ceil(N/128), ceil(K/128)], dequantised weight)."""
    n, k = w.shape
    w_hat, s = quant_e4m3_blocks(F.pad(w.float(), (0, -k % 128, 0, -n % 128)), 128)
    stored = (w_hat / torch.kron(s, torch.ones(128, 128)))[:n, :k].to(torch.float8_e4m3fn)
    scale = s.to(torch.float8_e8m0fnu)
    assert torch.equal(scale.float(), s)  # powers of two: E8M0 holds them exactly
    return stored, scale, w_hat[:n, :k]


def _fp4(w: torch.Tensor):
    """Our exact FP4 quantiser, packed here: (int8 [N, K/2], low nibble = first element; E8M0 scale [N, K/32];
    dequantised weight)."""
    codes, s = quant_e2m1(w, 32)
    index = torch.full(codes.shape, 99, dtype=torch.uint8)
    for i, v in enumerate(E2M1):
        index[codes.abs() == v] = i
    assert int(index.max()) < 8
    nibble = index | (torch.signbit(codes).to(torch.uint8) << 3)
    packed = (nibble[:, 0::2] | (nibble[:, 1::2] << 4)).view(torch.int8)
    return packed, s.to(torch.float8_e8m0fnu), codes * torch.kron(s, torch.ones(1, 32))


def _decode_fp8(stored, scale) -> torch.Tensor:
    """Independent dequantisation: E4M3 in float64 times 2^(byte - 127) of each 128x128 block."""
    n, k = stored.shape
    s = 2.0 ** (scale.view(torch.uint8).double() - 127)
    return stored.double() * torch.kron(s, torch.ones(128, 128, dtype=torch.float64))[:n, :k]


def _decode_fp4(packed, scale) -> torch.Tensor:
    """Independent dequantisation through the 16-entry nibble table, low nibble first."""
    byte = packed.view(torch.uint8).long()
    table = torch.tensor(FP4_NIBBLE, dtype=torch.float64)
    codes = torch.stack((table[byte % 16], table[byte // 16]), dim=-1).flatten(-2)
    s = 2.0 ** (scale.view(torch.uint8).double() - 127)
    return codes * torch.kron(s, torch.ones(1, 32, dtype=torch.float64))


def _official_tensors(model: DSV4Model, mode: str):
    """(tensors in official hub names, per-expert; our canonical state dict the loader must return; the quantised
    tensors as {official weight name: (stored, scale)}). mode: fp32 (everything as is), bf16 (the hub's bf16/fp32
    split, fp8/fp4 tensors in bf16) or fp8_fp4 (the instruct checkpoint's storage)."""
    tensors, expected, quantised = {}, {}, {}
    for key, value in model.state_dict().items():
        stacked = key.endswith((".ffn.experts.w1", ".ffn.experts.w2", ".ffn.experts.w3"))
        items = (
            [(f"{key[:-3]}.{j}.{key[-2:]}.weight", value[j]) for j in range(value.shape[0])]
            if stacked
            else [(key, value)]
        )
        outs = []
        for name, v in items:
            kind = _hub_precision(name)
            if kind == "int32":
                tensors[name], dq = v.to(torch.int32), v
            elif mode == "fp32" or kind == "fp32":
                tensors[name], dq = v.float(), v.float()
            elif mode == "bf16" or kind == "bf16":
                tensors[name] = v.to(torch.bfloat16)
                dq = tensors[name].float()
            else:
                stored, scale, dq = (_fp8 if kind == "fp8" else _fp4)(v)
                tensors[name], tensors[name.removesuffix(".weight") + ".scale"] = stored, scale
                quantised[name] = (stored, scale)
            outs.append(dq)
        expected[key] = torch.stack(outs) if stacked else outs[0]
    return tensors, expected, quantised


def _hub_config_json(cfg: ModelConfig, quantised: bool) -> dict:
    """A config.json in the hub's own fields (arch ref §1.1): compress_ratios with a trailing MTP entry,
    num_hash_layers, qk_rope_head_dim, rope_scaling, quantization_config + expert_dtype."""
    ratio = {"swa": 0, "csa": cfg.csa_ratio, "hca": cfg.hca_ratio}
    out = {
        "architectures": ["DeepseekV4ForCausalLM"],
        "model_type": "deepseek_v4",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": 1,
        "head_dim": cfg.head_dim,
        "qk_rope_head_dim": cfg.rope_head_dim,
        "q_lora_rank": cfg.q_lora_rank,
        "o_groups": cfg.o_groups,
        "o_lora_rank": cfg.o_lora_rank,
        "sliding_window": cfg.window_size,
        "compress_ratios": [ratio[t] for t in cfg.layer_types] + [0],
        "compress_rope_theta": cfg.compress_rope_theta,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": {
            "type": "yarn",
            "factor": cfg.rope_factor,
            "beta_fast": cfg.beta_fast,
            "beta_slow": cfg.beta_slow,
            "original_max_position_embeddings": cfg.original_seq_len,
        },
        "index_n_heads": cfg.index_n_heads,
        "index_head_dim": cfg.index_head_dim,
        "index_topk": cfg.index_topk,
        "n_routed_experts": cfg.n_routed_experts,
        "n_shared_experts": 1,
        "num_experts_per_tok": cfg.n_activated_experts,
        "moe_intermediate_size": cfg.moe_inter_dim,
        "scoring_func": "sqrtsoftplus",
        "topk_method": "noaux_tc",
        "norm_topk_prob": True,
        "routed_scaling_factor": cfg.route_scale,
        "num_hash_layers": cfg.n_hash_layers,
        "swiglu_limit": cfg.swiglu_limit,
        "hc_mult": cfg.hc_mult,
        "hc_sinkhorn_iters": cfg.hc_sinkhorn_iters,
        "hc_eps": cfg.hc_eps,
        "rms_norm_eps": cfg.norm_eps,
        "num_nextn_predict_layers": 1,
        "max_position_embeddings": cfg.max_seq_len,
        "tie_word_embeddings": False,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "torch_dtype": "bfloat16",
    }
    if quantised:
        out["expert_dtype"] = "fp4"
        out["quantization_config"] = {
            "activation_scheme": "dynamic",
            "fmt": "e4m3",
            "quant_method": "fp8",
            "scale_fmt": "ue8m0",
            "weight_block_size": [128, 128],
        }
    return out


def _write_folder(folder, tensors: dict, config: dict, n_shards: int = 1):
    """A hub-style folder: config.json plus one model.safetensors, or n_shards files and their index."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    if n_shards == 1:
        save_file(tensors, str(folder / "model.safetensors"))
        return folder
    names = [f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors" for i in range(n_shards)]
    weight_map = {key: names[i % n_shards] for i, key in enumerate(sorted(tensors))}
    for name in names:
        save_file({k: v for k, v in tensors.items() if weight_map[k] == name}, str(folder / name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def _hub_folder(folder, model, mode="fp8_fp4", n_shards=1, edit=None):
    tensors, expected, quantised = _official_tensors(model, mode)
    if edit:
        edit(tensors)
    _write_folder(folder, tensors, _hub_config_json(model.cfg, mode == "fp8_fp4"), n_shards)
    return expected, quantised


# ---- transformers' own layouts ----


def _transformers_fresh(model: DSV4Model):
    """A DeepseekV4ForCausalLM built in memory (not loaded from disk) holding our model's weights."""
    ref = transformers.DeepseekV4ForCausalLM(transformers.DeepseekV4Config(**hf_config_kwargs(model.cfg)))
    _, unexpected = ref.load_state_dict(to_hf_state_dict(model.state_dict()), strict=False)
    assert not unexpected
    return ref.eval()


def _transformers_source(kind: str, model: DSV4Model, tmp_path):
    if kind == "fresh":
        return _transformers_fresh(model)
    if kind == "loaded-from-hf-names":
        save_hf(model, tmp_path / "src")
    else:  # official hub names, fp32, with a config.json transformers reads
        tensors, _, _ = _official_tensors(model, "fp32")
        _write_folder(tmp_path / "src", tensors, hf_config_json(model.cfg))
    return transformers.DeepseekV4ForCausalLM.from_pretrained(tmp_path / "src").eval()


@pytest.mark.parametrize("shard", [None, "40KB"], ids=["one-file", "sharded"])
@pytest.mark.parametrize("source", ["fresh", "loaded-from-hf-names", "loaded-from-hub-names"])
def test_every_transformers_save_pretrained_layout_loads(tmp_path, source, shard):
    model = _model(CFG, seed=2)
    ref = _transformers_source(source, model, tmp_path)
    ref.save_pretrained(tmp_path / "out", **({"max_shard_size": shard} if shard else {}))
    keys = _file_keys(tmp_path / "out")
    if source == "loaded-from-hf-names":  # HF names, fused experts
        assert "lm_head.weight" in keys and "model.layers.0.mlp.experts.gate_up_proj" in keys
    else:  # the mixed names of the issue: hub leaf names under `model.`, per-expert weights
        assert {"head.weight", "model.layers.0.attn.attn_sink", "model.layers.0.ffn.experts.3.w1.weight"} <= keys
    if shard:
        assert (tmp_path / "out" / "model.safetensors.index.json").exists()
        assert len(list((tmp_path / "out").glob("*.safetensors"))) > 1

    loaded = dsv4train.load_pretrained(tmp_path / "out")
    assert loaded.cfg.n_mtp_layers == 0  # transformers drops MTP
    ids = _ids(CFG)
    with torch.no_grad():
        ours, theirs = loaded(ids), ref(ids).logits
        assert torch.equal(ours, model(ids))  # the same fp32 weights through the same code
    assert _rel(ours, theirs) < HF_REL_TOL


def test_randomly_initialised_transformers_model_loads_with_its_logits(tmp_path):
    torch.manual_seed(0)
    ref = transformers.DeepseekV4ForCausalLM(transformers.DeepseekV4Config(**hf_config_kwargs(CFG))).eval()
    ref.save_pretrained(tmp_path / "hf")
    loaded = dsv4train.load_pretrained(tmp_path / "hf")
    ids = _ids(CFG)
    with torch.no_grad():
        theirs = ref(ids).logits
        assert theirs.abs().max() > 0
        assert _rel(loaded(ids), theirs) < HF_REL_TOL


# ---- the official hub layout ----


@pytest.mark.parametrize("n_shards", [1, 3], ids=["one-file", "sharded"])
@pytest.mark.parametrize("mode", ["bf16", "fp8_fp4"])
def test_official_hub_layout_loads_dequantised_with_mtp(tmp_path, mode, n_shards):
    model = _model(HUB_CFG, seed=4)
    expected, quantised = _hub_folder(tmp_path / "hub", model, mode, n_shards)
    if mode == "fp8_fp4":
        kinds = {_hub_precision(k) for k in quantised}
        assert kinds == {"fp8", "fp4"} and any(s.shape[0] > 1 for s, _ in quantised.values())
    loaded = dsv4train.load_pretrained(tmp_path / "hub")
    assert loaded.cfg == replace(model.cfg, name=loaded.cfg.name)
    got = loaded.state_dict()
    for key, want in expected.items():
        assert got[key].dtype == want.dtype and torch.equal(got[key], want), key
    for name, (stored, scale) in quantised.items():  # the file decoded independently, against the loaded weight
        if _hub_precision(name) == "fp8":
            decoded, loaded_weight = _decode_fp8(stored, scale), got[name]
        else:  # `….ffn.experts.{j}.w{1,2,3}.weight` is expert j of our stacked `….ffn.experts.w{1,2,3}`
            owner, j, w, _ = name.rsplit(".", 3)
            decoded, loaded_weight = _decode_fp4(stored, scale), got[f"{owner}.{w}"][int(j)]
        assert torch.equal(loaded_weight, decoded.float()), name

    ids = _ids(HUB_CFG)
    reference = _model_from(HUB_CFG, expected)
    with torch.no_grad():
        a, b = loaded(ids, with_aux=True), reference(ids, with_aux=True)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.mtp_logits, b.mtp_logits)


def _other_scale_spellings(tensors):
    """transformers' FP8 naming (`.weight_scale_inv`) with float32 scales; FP4 scales as raw E8M0 bytes (uint8)."""
    for key in [k for k in tensors if k.endswith(".scale")]:
        scale = tensors.pop(key)
        if ".ffn.experts." in key:
            tensors[key] = scale.view(torch.uint8)
        else:
            tensors[key.removesuffix(".scale") + ".weight_scale_inv"] = scale.float()


def test_other_scale_spellings_dequantise_the_same(tmp_path):
    model = _model(HUB_CFG, seed=4)
    expected, _ = _hub_folder(tmp_path / "hub", model, edit=_other_scale_spellings)
    assert any(k.endswith(".weight_scale_inv") for k in _file_keys(tmp_path / "hub"))
    got = dsv4train.load_pretrained(tmp_path / "hub").state_dict()
    for key, want in expected.items():
        assert torch.equal(got[key], want), key


def test_official_hub_config_json_reads_like_transformers_reads_it():
    flash = get_flavor("flash")
    hub = _hub_config_json(flash, quantised=True)
    hub["compress_ratios"] = [0, 0] + [4, 128] * 20 + [4] + [0]  # the released list (arch ref §1.1)
    ours = config_from_hf(hub)
    assert ours == replace(flash, name=ours.name, n_mtp_layers=0)
    assert config_from_hf(transformers.DeepseekV4Config(**hub).to_dict()) == ours


# ---- a model of a shape no other test uses, round trip ----

ODD = ModelConfig(
    name="odd",
    vocab_size=317,
    dim=96,
    layer_types=["hca", "swa", "csa", "csa", "hca"],
    n_heads=3,
    head_dim=48,
    rope_head_dim=12,
    q_lora_rank=40,
    o_groups=3,
    o_lora_rank=24,
    window_size=6,
    csa_ratio=4,
    hca_ratio=6,
    rope_theta=5000.0,
    compress_rope_theta=20000.0,
    rope_factor=2.0,
    original_seq_len=32,
    index_n_heads=15,  # odd, and tie-free (toy_configs.TIE_FREE_INDEX_HEADS)
    index_head_dim=24,
    index_topk=2,
    indexer_mode="sparse",
    n_routed_experts=6,
    n_activated_experts=3,
    moe_inter_dim=40,
    route_scale=2.0,
    n_hash_layers=2,
    swiglu_limit=7.0,
    hc_mult=3,
    hc_sinkhorn_iters=5,
    norm_eps=1e-5,
    n_mtp_layers=1,
    max_seq_len=64,
)


def test_odd_config_round_trips_through_transformers_and_convert(tmp_path):
    model = _model(ODD, seed=7)
    ids = _ids(ODD, seq=37)
    with torch.no_grad():
        want = model(ids)
    save_hf(model, tmp_path / "hf")
    loaded = dsv4train.load_pretrained(tmp_path / "hf")
    assert loaded.cfg == replace(ODD, name=loaded.cfg.name, n_mtp_layers=0, max_seq_len=loaded.cfg.max_seq_len)
    ref = transformers.DeepseekV4ForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ref.save_pretrained(tmp_path / "hf_resaved")
    assert dsv4(["convert", "from-hf", str(tmp_path / "hf_resaved"), str(tmp_path / "ds")]) == 0
    with torch.no_grad():
        assert torch.equal(loaded(ids), want)
        assert _rel(ref(ids).logits, want) < HF_REL_TOL
        assert torch.equal(dsv4train.load_pretrained(tmp_path / "ds")(ids), want)


# ---- bad inputs name the problem ----


def _drop_scale(tensors):
    del tensors["layers.0.attn.wq_a.scale"]


def _wrong_fp4_scale(tensors):
    key = "layers.1.ffn.experts.2.w2.scale"
    tensors[key] = torch.cat((tensors[key], tensors[key]), dim=1)


def _wrong_fp8_scale(tensors):
    tensors["layers.1.attn.wq_b.scale"] = tensors["layers.1.attn.wq_b.scale"][:1]


def _drop_expert(tensors):
    for w in ("w1", "w2", "w3"):
        for suffix in ("weight", "scale"):
            del tensors[f"layers.2.ffn.experts.1.{w}.{suffix}"]


@pytest.mark.parametrize(
    "edit, error, match",
    [
        (
            _drop_scale,
            CheckpointLayoutError,
            r"layers\.0\.attn\.wq_a\.weight: stored as torch\.float8_e4m3fn.*no "
            r"block scale",
        ),
        (
            _wrong_fp4_scale,
            CheckpointLayoutError,
            r"layers\.1\.ffn\.experts\.2\.w2\.weight: packed FP4 .* needs a "
            r"scale of shape \(160, 2\).*got \(160, 4\)",
        ),
        (
            _wrong_fp8_scale,
            CheckpointLayoutError,
            r"layers\.1\.attn\.wq_b\.weight: FP8 weight of shape \(192, 32\) "
            r"needs a scale of shape \(2, 1\).*got \(1, 1\)",
        ),
        (_drop_expert, KeyError, r"layers\.2\.ffn\.experts\.w[123]: .*lacks experts \[1\]"),
    ],
    ids=["fp8-without-scale", "fp4-wrong-scale", "fp8-wrong-scale", "missing-expert"],
)
def test_tensor_in_an_unexpected_layout_is_named(tmp_path, capsys, edit, error, match):
    _hub_folder(tmp_path / "hub", _model(HUB_CFG), edit=edit)
    with pytest.raises(error, match=match):
        dsv4train.load_pretrained(tmp_path / "hub")
    assert dsv4(["convert", "from-hf", str(tmp_path / "hub"), str(tmp_path / "ds")]) == 2
    err = capsys.readouterr().err
    assert re.search(r"^dsv4 convert: " + match, err) and "Traceback" not in err
    assert not (tmp_path / "ds").exists()


@pytest.mark.parametrize("victim", ["config.json", "model.safetensors.index.json", "dsv4_model.json"])
def test_malformed_json_names_the_file(tmp_path, capsys, victim):
    model = _model(CFG)
    if victim == "dsv4_model.json":
        save_dsv4(model, tmp_path / "src")
        argv = ["convert", "to-hf", str(tmp_path / "src"), str(tmp_path / "dst")]
    else:
        _hub_folder(tmp_path / "src", model, "bf16", n_shards=2 if victim.endswith("index.json") else 1)
        argv = ["convert", "from-hf", str(tmp_path / "src"), str(tmp_path / "dst")]
    bad = tmp_path / "src" / victim
    bad.write_text(bad.read_text()[:-7])  # truncated, as by an interrupted copy
    with pytest.raises(ConfigError, match=rf"{re.escape(str(bad))} is not valid JSON \(.* at line \d+, column \d+\)"):
        dsv4train.load_pretrained(tmp_path / "src")
    assert dsv4(argv) == 2
    err = capsys.readouterr().err
    assert f"{bad} is not valid JSON" in err and "Traceback" not in err
    assert not (tmp_path / "dst").exists()
    bad.write_text("[1, 2]")
    with pytest.raises(ConfigError, match=rf"{re.escape(str(bad))} holds a JSON list, not an object"):
        dsv4train.load_pretrained(tmp_path / "src")
