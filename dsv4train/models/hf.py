"""transformers DeepseekV4 and official hub interop: config and state-dict names in both directions (arch ref
§11.1, §11.2).

Export (`to_hf_state_dict`): pure renames to transformers' names plus the one structural change HF makes, routed
experts' w1 and w3 fused into `experts.gate_up_proj [E, 2I, d]` (gate rows first). MTP has no HF counterpart and
is dropped.

Import (`from_hf_state_dict`): every key is mapped to its official name (`official_name`), whichever of these
layouts it comes in, and the experts are stacked:
- transformers' names (`model.layers.0.self_attn.q_a_proj.weight`, fused `mlp.experts.gate_up_proj`), written by
  `save_pretrained` of a model loaded from such a folder (its `kv_norm`s come back as `norm`);
- the mixed names `save_pretrained` writes for a freshly built model or one loaded from hub names
  (`head.weight`, `model.embed_tokens.weight`, `model.layers.0.attn.attn_sink`, per-expert
  `model.layers.0.ffn.experts.3.w1.weight`);
- the official hub names (`embed.weight`, `layers.0.attn.wq_a.weight`, `mtp.0.*`), in bf16/fp32 or with FP8
  `.scale` blocks and FP4-packed routed experts, dequantised by `models/hub_format.py`. MTP is kept.
Each of them may be one `model.safetensors` or shards listed in `model.safetensors.index.json`; file reading and
writing lives in `models/pretrained.py`."""

from __future__ import annotations

import re

import torch

from dsv4train.config.errors import ConfigError
from dsv4train.config.model import ModelConfig
from dsv4train.models.hub_format import FP8_BLOCK, dequantize_state_dict

HF_LAYER_TYPES = {
    "swa": "sliding_attention",
    "csa": "compressed_sparse_attention",
    "hca": "heavily_compressed_attention",
}
_OUR_LAYER_TYPES = {hf: ours for ours, hf in HF_LAYER_TYPES.items()}
_TOP = {
    "embed.weight": "model.embed_tokens.weight",
    "head.weight": "lm_head.weight",
    "norm.weight": "model.norm.weight",
    "hc_head_fn": "model.hc_head.hc_fn",
    "hc_head_base": "model.hc_head.hc_base",
    "hc_head_scale": "model.hc_head.hc_scale",
}
_ATTN = {
    "wq_a.weight": "q_a_proj.weight",
    "q_norm.weight": "q_a_norm.weight",
    "wq_b.weight": "q_b_proj.weight",
    "wkv.weight": "kv_proj.weight",
    "kv_norm.weight": "kv_norm.weight",
    "wo_a.weight": "o_a_proj.weight",
    "wo_b.weight": "o_b_proj.weight",
    "attn_sink": "sinks",
    "indexer.wq_b.weight": "compressor.indexer.q_b_proj.weight",
    "indexer.weights_proj.weight": "compressor.indexer.scorer.weights_proj.weight",
}
_COMPRESSOR = {
    "wkv.weight": "kv_proj.weight",
    "wgate.weight": "gate_proj.weight",
    "ape": "position_bias",
    "norm.weight": "kv_norm.weight",
}
_SHARED = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}
_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn.gate.weight": "mlp.gate.weight",
    "ffn.gate.bias": "mlp.gate.e_score_correction_bias",
    "ffn.gate.tid2eid": "mlp.gate.tid2eid",
    "ffn.experts.w2": "mlp.experts.down_proj",
}


def hf_config_kwargs(cfg: ModelConfig) -> dict:
    """Keyword arguments for transformers.DeepseekV4Config describing the same model (MTP is not in HF)."""
    rope = {"rope_type": "default"}
    if cfg.original_seq_len > 0:
        rope = {
            "rope_type": "yarn",
            "factor": cfg.rope_factor,
            "beta_fast": cfg.beta_fast,
            "beta_slow": cfg.beta_slow,
            "original_max_position_embeddings": cfg.original_seq_len,
        }
    return dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.dim,
        moe_intermediate_size=cfg.moe_inter_dim,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        head_dim=cfg.head_dim,
        q_lora_rank=cfg.q_lora_rank,
        num_experts_per_tok=cfg.n_activated_experts,
        n_routed_experts=cfg.n_routed_experts,
        routed_scaling_factor=cfg.route_scale,
        layer_types=[HF_LAYER_TYPES[t] for t in cfg.layer_types],
        compress_rates={HF_LAYER_TYPES["csa"]: cfg.csa_ratio, HF_LAYER_TYPES["hca"]: cfg.hca_ratio},
        rope_theta=cfg.rope_theta,
        compress_rope_theta=cfg.compress_rope_theta,
        hc_mult=cfg.hc_mult,
        hc_sinkhorn_iters=cfg.hc_sinkhorn_iters,
        hc_eps=cfg.hc_eps,
        mlp_layer_types=["hash_moe"] * cfg.n_hash_layers + ["moe"] * (cfg.n_layers - cfg.n_hash_layers),
        swiglu_limit=cfg.swiglu_limit,
        sliding_window=cfg.window_size,
        o_groups=cfg.o_groups,
        o_lora_rank=cfg.o_lora_rank,
        index_n_heads=cfg.index_n_heads,
        index_head_dim=cfg.index_head_dim,
        index_topk=cfg.index_topk,
        partial_rotary_factor=cfg.rope_head_dim / cfg.head_dim,
        rms_norm_eps=cfg.norm_eps,
        rope_parameters=rope,
        max_position_embeddings=int(cfg.original_seq_len * cfg.rope_factor)
        if cfg.original_seq_len
        else cfg.max_seq_len,
        num_nextn_predict_layers=0,
    )


def hf_layer_key(rest: str) -> str | None:
    """HF name (below `model.layers.{i}.`) of one of our per-layer keys; None for w3 (fused into w1)."""
    if rest in _LAYER:
        return _LAYER[rest]
    for ours, hf in (("hc_attn_", "attn_hc."), ("hc_ffn_", "ffn_hc.")):
        if rest.startswith(ours):
            return hf + rest[len(ours) :]
    if rest.startswith("attn."):
        r = rest[len("attn.") :]
        if r in _ATTN:
            return "self_attn." + _ATTN[r]
        for ours, hf in (("indexer.compressor.", "compressor.indexer."), ("compressor.", "compressor.")):
            if r.startswith(ours):
                return "self_attn." + hf + _COMPRESSOR[r[len(ours) :]]
    if rest.startswith("ffn.shared_experts."):
        return f"mlp.shared_experts.{_SHARED[rest.split('.')[2]]}.weight"
    if rest == "ffn.experts.w1":
        return "mlp.experts.gate_up_proj"
    if rest == "ffn.experts.w3":
        return None
    raise KeyError(f"no transformers name for layer key {rest!r}")


def to_hf_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our canonical state dict -> DeepseekV4ForCausalLM names. MTP (`mtp.*`) has no HF counterpart and is dropped."""
    out = {}
    for key, name in hf_names(sd).items():
        if name is None:
            continue
        value = sd[key]
        if key.endswith("ffn.experts.w1"):  # gate rows first, then up
            value = torch.cat((value, sd[key[:-1] + "3"]), dim=1)
        out[name] = value
    return out


def _hf_layer_types(hf: dict, n: int) -> list[str]:
    if hf.get("layer_types"):
        names = list(hf["layer_types"])[:n]
        bad = [t for t in names if t not in _OUR_LAYER_TYPES]
        if bad:
            raise ConfigError(f"config.json layer_types: unknown entries {bad}; expected {list(_OUR_LAYER_TYPES)}")
        return [_OUR_LAYER_TYPES[t] for t in names]
    if hf.get("compress_ratios"):  # the hub's per-layer ratios (0 = sliding window only, 4 = CSA, other = HCA)
        return ["swa" if int(r) == 0 else "csa" if int(r) == 4 else "hca" for r in list(hf["compress_ratios"])[:n]]
    return ["hca"] * min(n, 2) + ["csa" if i % 2 else "hca" for i in range(max(n - 2, 0))]  # transformers' default


def _hf_compress_rates(hf: dict, n: int) -> dict[str, int]:
    """csa_ratio / hca_ratio from `compress_rates`, the legacy `compress_rate_{csa,hca}`, or the hub's per-layer
    `compress_ratios` (the official code makes ratio 4 the overlapping CSA and any other ratio HCA)."""
    rates = {"csa_ratio": 4, "hca_ratio": 128}
    ratios = [int(r) for r in (hf.get("compress_ratios") or [])[:n]]
    hca = sorted({r for r in ratios if r not in (0, 4)})
    if not hf.get("layer_types") and hca:
        if len(hca) > 1:
            raise ConfigError(
                f"config.json compress_ratios: HCA layers with different ratios {hca}; dsv4train uses one hca_ratio"
            )
        rates["hca_ratio"] = hca[0]
    given = hf.get("compress_rates") or {}
    for key, ours, legacy in (
        ("compressed_sparse_attention", "csa_ratio", "compress_rate_csa"),
        ("heavily_compressed_attention", "hca_ratio", "compress_rate_hca"),
    ):
        if hf.get(legacy) is not None:
            rates[ours] = int(hf[legacy])
        if given.get(key) is not None:
            rates[ours] = int(given[key])
    return rates


def hf_fp8_block(hf: dict) -> int:
    """FP8 block size of a quantised checkpoint's `quantization_config` (128 when there is none); other quantisation
    schemes are refused with the key named."""
    q = hf.get("quantization_config")
    if not q:
        return FP8_BLOCK
    if not isinstance(q, dict) or q.get("quant_method", "fp8") != "fp8" or q.get("fmt", "e4m3") != "e4m3":
        raise ConfigError(
            f"config.json quantization_config: dsv4train reads FP8 (e4m3) block-scaled checkpoints "
            f"with FP4 experts, got {q!r}"
        )
    block = list(q.get("weight_block_size") or [FP8_BLOCK, FP8_BLOCK])
    if len(block) != 2 or block[0] != block[1] or int(block[0]) <= 0:
        raise ConfigError(
            f"config.json quantization_config.weight_block_size: expected square blocks [b, b], got {block}"
        )
    return int(block[0])


def _hf_hash_layers(hf: dict, n: int) -> int:
    mlp = hf.get("mlp_layer_types")
    if not mlp:
        return min(n, int(hf.get("num_hash_layers", 3)))
    n_hash = sum(1 for t in mlp[:n] if t == "hash_moe")
    if list(mlp[:n_hash]) != ["hash_moe"] * n_hash:
        raise ConfigError(f"config.json mlp_layer_types: hash_moe layers must come first, got {mlp}")
    return n_hash


def _hf_rope(hf: dict) -> dict:
    rp = hf.get("rope_parameters") or hf.get("rope_scaling") or {}  # the hub's config.json has `rope_scaling`
    main, compress = rp.get("main"), rp.get("compress")
    if not isinstance(compress, dict):  # flat form: the YaRN keys apply to the compressed layers
        main, compress = {}, {k: v for k, v in rp.items() if k not in ("main", "compress")}
    out = dict(
        rope_theta=float((main or {}).get("rope_theta", hf.get("rope_theta", 10000.0))),
        compress_rope_theta=float(compress.get("rope_theta", hf.get("compress_rope_theta", 160000.0))),
        original_seq_len=0,
    )
    if compress.get("rope_type", compress.get("type", "default")) == "yarn":
        out.update(
            rope_factor=float(compress["factor"]),
            beta_fast=int(compress.get("beta_fast", 32)),
            beta_slow=int(compress.get("beta_slow", 1)),
            original_seq_len=int(compress["original_max_position_embeddings"]),
        )
    return out


def _need(hf: dict, key: str):
    if hf.get(key) is None:
        raise ConfigError(
            f"config.json {key}: missing; a DeepseekV4 config.json needs it (transformers' "
            "save_pretrained writes every field)"
        )
    return hf[key]


def config_from_hf(hf: dict, **overrides) -> ModelConfig:
    """ModelConfig for a `config.json` of DeepseekV4ForCausalLM (as a dict): the one transformers writes, or the
    hub's (`compress_ratios`, `num_hash_layers`, `qk_rope_head_dim`, `rope_scaling`, `quantization_config`). The
    result has no MTP layer; `load_pretrained` passes `n_mtp_layers` when the weights carry `mtp.*` tensors.
    Unsupported variants and missing keys fail with the key named."""
    if hf.get("model_type") != "deepseek_v4":
        raise ConfigError(f"config.json model_type: expected 'deepseek_v4', got {hf.get('model_type')!r}")
    for key, want in (
        ("num_key_value_heads", 1),
        ("scoring_func", "sqrtsoftplus"),
        ("norm_topk_prob", True),
        ("hidden_act", "silu"),
        ("tie_word_embeddings", False),
    ):
        if key in hf and hf[key] != want:
            raise ConfigError(f"config.json {key}: dsv4train supports only {want!r}, got {hf[key]!r}")
    hf_fp8_block(hf)
    n = int(_need(hf, "num_hidden_layers"))
    head_dim = int(_need(hf, "head_dim"))
    if hf.get("partial_rotary_factor") is not None:
        rope_head_dim = round(head_dim * float(hf["partial_rotary_factor"]))
    else:
        rope_head_dim = int(hf.get("qk_rope_head_dim", head_dim // 8))
    kwargs = dict(
        name=str(hf.get("_name_or_path") or "hf-import"),
        vocab_size=int(_need(hf, "vocab_size")),
        dim=int(_need(hf, "hidden_size")),
        layer_types=_hf_layer_types(hf, n),
        n_heads=int(_need(hf, "num_attention_heads")),
        head_dim=head_dim,
        rope_head_dim=rope_head_dim,
        q_lora_rank=int(_need(hf, "q_lora_rank")),
        o_groups=int(_need(hf, "o_groups")),
        o_lora_rank=int(_need(hf, "o_lora_rank")),
        window_size=int(_need(hf, "sliding_window")),
        **_hf_compress_rates(hf, n),
        index_n_heads=int(_need(hf, "index_n_heads")),
        index_head_dim=int(_need(hf, "index_head_dim")),
        index_topk=int(_need(hf, "index_topk")),
        n_routed_experts=int(_need(hf, "n_routed_experts")),
        n_shared_experts=int(hf.get("n_shared_experts", 1)),
        n_activated_experts=int(_need(hf, "num_experts_per_tok")),
        moe_inter_dim=int(_need(hf, "moe_intermediate_size")),
        route_scale=float(_need(hf, "routed_scaling_factor")),
        n_hash_layers=_hf_hash_layers(hf, n),
        swiglu_limit=float(hf.get("swiglu_limit", 10.0)),
        hc_mult=int(hf.get("hc_mult", 4)),
        hc_sinkhorn_iters=int(hf.get("hc_sinkhorn_iters", 20)),
        hc_eps=float(hf.get("hc_eps", 1e-6)),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        n_mtp_layers=0,
        max_seq_len=int(hf.get("max_position_embeddings", 4096)),
        **_hf_rope(hf),
    )
    kwargs.update(overrides)
    return ModelConfig(**kwargs)


def hf_names(our_keys) -> dict[str, str | None]:
    """Our key -> HF key (None where the tensor has no HF counterpart of its own: w3 fused into w1, MTP)."""
    out = {}
    for key in our_keys:
        if key in _TOP:
            out[key] = _TOP[key]
        elif key.startswith("mtp."):
            out[key] = None
        else:
            _, i, rest = key.split(".", 2)
            name = hf_layer_key(rest)
            out[key] = None if name is None else f"model.layers.{i}.{name}"
    return out


def _official_layer_rests() -> list[str]:
    """Every per-layer key (below `layers.{i}.`) of our canonical state dict, in official names."""
    hc = [f"hc_{part}_{p}" for part in ("attn", "ffn") for p in ("fn", "base", "scale")]
    compressors = [f"attn.{c}{r}" for c in ("compressor.", "indexer.compressor.") for r in _COMPRESSOR]
    return (
        list(_LAYER)
        + hc
        + ["attn." + r for r in _ATTN]
        + compressors
        + [f"ffn.shared_experts.{w}.weight" for w in _SHARED]
        + ["ffn.experts.w1"]
    )


_FUSED_GATE_UP = "ffn.experts.gate_up_proj"  # HF's fused [E, 2I, d]; split into w1/w3 by `from_hf_state_dict`
_HF_LAYER_TO_OFFICIAL = {
    **{hf_layer_key(r): r for r in _official_layer_rests()},
    "mlp.experts.gate_up_proj": _FUSED_GATE_UP,
}
_HF_TOP_TO_OFFICIAL = {hf.removeprefix("model."): ours for ours, hf in _TOP.items()}
_PER_EXPERT = re.compile(r"^(?P<owner>(?:layers|mtp)\.\d+\.ffn\.experts)\.(?P<j>\d+)\.(?P<w>w[123])\.weight$")


def official_name(key: str) -> str:
    """The official (hub) name, as our canonical state dict spells it, of a key in any layout transformers or the
    hub writes: HF names (`model.layers.0.self_attn.q_a_proj.weight`), official names with or without the
    `model.` prefix (`model.layers.0.attn.wq_a.weight`, `layers.0.attn.wq_a.weight`), and the spellings
    transformers 5.23's reverse renames produce (`attn.norm` / `self_attn.*.norm` for `kv_norm`). Per-expert keys
    keep their expert index (stacked later); unknown keys come back unchanged (reported as left over)."""
    k = key.removeprefix("model.")
    if k in _HF_TOP_TO_OFFICIAL:
        return _HF_TOP_TO_OFFICIAL[k]
    parts = k.split(".", 2)
    if len(parts) < 3 or parts[0] not in ("layers", "mtp") or not parts[1].isdigit():
        return k
    rest = parts[2]
    if rest.startswith("self_attn.") and rest.endswith(".norm.weight"):  # HF's kv_norm, saved back as `norm`
        rest = rest[: -len("norm.weight")] + "kv_norm.weight"
    elif rest == "attn.norm.weight":  # transformers' reverse of `.norm.` -> `.kv_norm.` hits the attention norm
        rest = "attn.kv_norm.weight"
    return f"{parts[0]}.{parts[1]}.{_HF_LAYER_TO_OFFICIAL.get(rest, rest)}"


def _stack_experts(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-expert `….ffn.experts.{j}.w{1,2,3}.weight` -> stacked `….ffn.experts.w{1,2,3}` [E, out, in]; HF's fused
    `gate_up_proj` [E, 2I, d] -> w1 (gate rows first) and w3."""
    out, groups = {}, {}
    for key, value in sd.items():
        m = _PER_EXPERT.match(key)
        if m:
            groups.setdefault(f"{m['owner']}.{m['w']}", {})[int(m["j"])] = value
        elif key.endswith(_FUSED_GATE_UP):
            stem = key[: -len("gate_up_proj")]
            if value.dim() != 3 or value.shape[1] % 2:
                raise KeyError(f"{key}: expected a fused [E, 2*moe_inter_dim, dim] tensor, got {tuple(value.shape)}")
            out[stem + "w1"], out[stem + "w3"] = value.chunk(2, dim=1)
        else:
            out[key] = value
    for key, experts in groups.items():
        absent = sorted(set(range(max(experts) + 1)) - set(experts))
        if absent:
            raise KeyError(
                f"{key}: the checkpoint has {len(experts)} experts up to {max(experts)} but lacks experts {absent[:8]}"
            )
        shapes = {tuple(t.shape) for t in experts.values()}
        if len(shapes) > 1:
            raise KeyError(f"{key}: the experts' weights have different shapes {sorted(shapes)}")
        out[key] = torch.stack([experts[j] for j in range(len(experts))])
    return out


def from_hf_state_dict(hf_sd: dict[str, torch.Tensor], our_keys, fp8_block: int = FP8_BLOCK) -> dict[str, torch.Tensor]:
    """Tensors of a transformers or official hub checkpoint -> our canonical state dict for the keys a DSV4Model has
    (`our_keys`; `mtp.*` ones are taken where the checkpoint has them). Accepted: every layout transformers 5.23
    writes (HF names; the mixed official/HF names of a freshly built model; per-expert or fused experts) and the
    hub's official names with FP8 `.scale` blocks and FP4-packed experts, which are dequantised to float32.
    Missing or left-over tensors raise a KeyError listing them, so a mismatched checkpoint never half-loads."""
    sd = dequantize_state_dict(hf_sd, fp8_block=fp8_block)
    renamed, source = {}, {}
    for key, value in sd.items():
        name = official_name(key)
        if name in source:
            raise KeyError(f"checkpoint tensors {source[name]!r} and {key!r} are the same weight {name!r}; keep one")
        renamed[name], source[name] = value, key
    sd = _stack_experts(renamed)
    wanted = set(our_keys)
    missing = sorted(k for k in wanted if k not in sd)
    if missing:
        raise KeyError(f"checkpoint lacks {len(missing)} tensors the model needs (official names), e.g. {missing[:5]}")
    extra = sorted(k for k in sd if k not in wanted and "rotary" not in k and "inv_freq" not in k)
    if extra:
        raise KeyError(
            f"checkpoint has {len(extra)} tensors this config does not use, e.g. {extra[:5]}; is "
            f"config.json the one saved with these weights?"
        )
    return {k: sd[k] for k in wanted}
