"""transformers DeepseekV4 interop: config and state-dict names in both directions (arch ref §11.2).

Pure renames plus the one structural change HF makes: routed experts' w1 and w3 are fused into
`experts.gate_up_proj [E, 2I, d]` (gate rows first). MTP has no HF counterpart (dropped on export; a model
imported from HF has `n_mtp_layers = 0`). File reading and writing lives in `models/pretrained.py`."""

from __future__ import annotations

import torch

from dsv4train.config.errors import ConfigError
from dsv4train.config.model import ModelConfig

HF_LAYER_TYPES = {"swa": "sliding_attention", "csa": "compressed_sparse_attention",
                  "hca": "heavily_compressed_attention"}
_OUR_LAYER_TYPES = {hf: ours for ours, hf in HF_LAYER_TYPES.items()}
_RATIO_LAYER_TYPES = {0: "swa", 4: "csa", 128: "hca"}  # legacy `compress_ratios` lists in old configs
_TOP = {"embed.weight": "model.embed_tokens.weight", "head.weight": "lm_head.weight",
        "norm.weight": "model.norm.weight", "hc_head_fn": "model.hc_head.hc_fn",
        "hc_head_base": "model.hc_head.hc_base", "hc_head_scale": "model.hc_head.hc_scale"}
_ATTN = {"wq_a.weight": "q_a_proj.weight", "q_norm.weight": "q_a_norm.weight", "wq_b.weight": "q_b_proj.weight",
         "wkv.weight": "kv_proj.weight", "kv_norm.weight": "kv_norm.weight", "wo_a.weight": "o_a_proj.weight",
         "wo_b.weight": "o_b_proj.weight", "attn_sink": "sinks",
         "indexer.wq_b.weight": "compressor.indexer.q_b_proj.weight",
         "indexer.weights_proj.weight": "compressor.indexer.scorer.weights_proj.weight"}
_COMPRESSOR = {"wkv.weight": "kv_proj.weight", "wgate.weight": "gate_proj.weight", "ape": "position_bias",
               "norm.weight": "kv_norm.weight"}
_SHARED = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}
_LAYER = {"attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
          "ffn.gate.weight": "mlp.gate.weight", "ffn.gate.bias": "mlp.gate.e_score_correction_bias",
          "ffn.gate.tid2eid": "mlp.gate.tid2eid", "ffn.experts.w2": "mlp.experts.down_proj"}


def hf_config_kwargs(cfg: ModelConfig) -> dict:
    """Keyword arguments for transformers.DeepseekV4Config describing the same model (MTP is not in HF)."""
    rope = {"rope_type": "default"}
    if cfg.original_seq_len > 0:
        rope = {"rope_type": "yarn", "factor": cfg.rope_factor, "beta_fast": cfg.beta_fast,
                "beta_slow": cfg.beta_slow, "original_max_position_embeddings": cfg.original_seq_len}
    return dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, moe_intermediate_size=cfg.moe_inter_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, head_dim=cfg.head_dim,
        q_lora_rank=cfg.q_lora_rank, num_experts_per_tok=cfg.n_activated_experts,
        n_routed_experts=cfg.n_routed_experts, routed_scaling_factor=cfg.route_scale,
        layer_types=[HF_LAYER_TYPES[t] for t in cfg.layer_types],
        compress_rates={HF_LAYER_TYPES["csa"]: cfg.csa_ratio, HF_LAYER_TYPES["hca"]: cfg.hca_ratio},
        rope_theta=cfg.rope_theta, compress_rope_theta=cfg.compress_rope_theta, hc_mult=cfg.hc_mult,
        hc_sinkhorn_iters=cfg.hc_sinkhorn_iters, hc_eps=cfg.hc_eps,
        mlp_layer_types=["hash_moe"] * cfg.n_hash_layers + ["moe"] * (cfg.n_layers - cfg.n_hash_layers),
        swiglu_limit=cfg.swiglu_limit, sliding_window=cfg.window_size, o_groups=cfg.o_groups,
        o_lora_rank=cfg.o_lora_rank, index_n_heads=cfg.index_n_heads, index_head_dim=cfg.index_head_dim,
        index_topk=cfg.index_topk, partial_rotary_factor=cfg.rope_head_dim / cfg.head_dim,
        rms_norm_eps=cfg.norm_eps, rope_parameters=rope,
        max_position_embeddings=int(cfg.original_seq_len * cfg.rope_factor) if cfg.original_seq_len else cfg.max_seq_len,
        num_nextn_predict_layers=0)


def hf_layer_key(rest: str) -> str | None:
    """HF name (below `model.layers.{i}.`) of one of our per-layer keys; None for w3 (fused into w1)."""
    if rest in _LAYER:
        return _LAYER[rest]
    for ours, hf in (("hc_attn_", "attn_hc."), ("hc_ffn_", "ffn_hc.")):
        if rest.startswith(ours):
            return hf + rest[len(ours):]
    if rest.startswith("attn."):
        r = rest[len("attn."):]
        if r in _ATTN:
            return "self_attn." + _ATTN[r]
        for ours, hf in (("indexer.compressor.", "compressor.indexer."), ("compressor.", "compressor.")):
            if r.startswith(ours):
                return "self_attn." + hf + _COMPRESSOR[r[len(ours):]]
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
    if hf.get("compress_ratios"):  # legacy per-layer ints 0/4/128 (may carry a trailing MTP entry)
        return [_RATIO_LAYER_TYPES[int(r)] for r in list(hf["compress_ratios"])[:n]]
    return ["hca"] * min(n, 2) + ["csa" if i % 2 else "hca" for i in range(max(n - 2, 0))]  # transformers' default


def _hf_hash_layers(hf: dict, n: int) -> int:
    mlp = hf.get("mlp_layer_types")
    if not mlp:
        return min(n, int(hf.get("num_hash_layers", 3)))
    n_hash = sum(1 for t in mlp[:n] if t == "hash_moe")
    if list(mlp[:n_hash]) != ["hash_moe"] * n_hash:
        raise ConfigError(f"config.json mlp_layer_types: hash_moe layers must come first, got {mlp}")
    return n_hash


def _hf_rope(hf: dict) -> dict:
    rp = hf.get("rope_parameters") or {}
    main, compress = rp.get("main"), rp.get("compress")
    if not isinstance(compress, dict):  # flat form: the YaRN keys apply to the compressed layers
        main, compress = {}, {k: v for k, v in rp.items() if k not in ("main", "compress")}
    out = dict(rope_theta=float((main or {}).get("rope_theta", hf.get("rope_theta", 10000.0))),
               compress_rope_theta=float(compress.get("rope_theta", hf.get("compress_rope_theta", 160000.0))),
               original_seq_len=0)
    if compress.get("rope_type", compress.get("type", "default")) == "yarn":
        out.update(rope_factor=float(compress["factor"]), beta_fast=int(compress.get("beta_fast", 32)),
                   beta_slow=int(compress.get("beta_slow", 1)),
                   original_seq_len=int(compress["original_max_position_embeddings"]))
    return out


def config_from_hf(hf: dict, **overrides) -> ModelConfig:
    """ModelConfig for a transformers `config.json` of DeepseekV4ForCausalLM (as a dict). The result has no MTP
    layer, because HF checkpoints do not carry MTP weights. Unsupported variants fail with the key named."""
    if hf.get("model_type") != "deepseek_v4":
        raise ConfigError(f"config.json model_type: expected 'deepseek_v4', got {hf.get('model_type')!r}")
    for key, want in (("num_key_value_heads", 1), ("scoring_func", "sqrtsoftplus"), ("norm_topk_prob", True),
                      ("hidden_act", "silu"), ("tie_word_embeddings", False)):
        if key in hf and hf[key] != want:
            raise ConfigError(f"config.json {key}: dsv4train supports only {want!r}, got {hf[key]!r}")
    n = int(hf["num_hidden_layers"])
    rates = {**{"compressed_sparse_attention": 4, "heavily_compressed_attention": 128},
             **(hf.get("compress_rates") or {})}
    head_dim = int(hf["head_dim"])
    if hf.get("partial_rotary_factor") is not None:
        rope_head_dim = round(head_dim * float(hf["partial_rotary_factor"]))
    else:
        rope_head_dim = int(hf.get("qk_rope_head_dim", head_dim // 8))
    kwargs = dict(
        name=str(hf.get("_name_or_path") or "hf-import"), vocab_size=int(hf["vocab_size"]),
        dim=int(hf["hidden_size"]), layer_types=_hf_layer_types(hf, n), n_heads=int(hf["num_attention_heads"]),
        head_dim=head_dim, rope_head_dim=rope_head_dim, q_lora_rank=int(hf["q_lora_rank"]),
        o_groups=int(hf["o_groups"]), o_lora_rank=int(hf["o_lora_rank"]), window_size=int(hf["sliding_window"]),
        csa_ratio=int(rates["compressed_sparse_attention"]), hca_ratio=int(rates["heavily_compressed_attention"]),
        index_n_heads=int(hf["index_n_heads"]), index_head_dim=int(hf["index_head_dim"]),
        index_topk=int(hf["index_topk"]), n_routed_experts=int(hf["n_routed_experts"]),
        n_shared_experts=int(hf.get("n_shared_experts", 1)), n_activated_experts=int(hf["num_experts_per_tok"]),
        moe_inter_dim=int(hf["moe_intermediate_size"]), route_scale=float(hf["routed_scaling_factor"]),
        n_hash_layers=_hf_hash_layers(hf, n), swiglu_limit=float(hf.get("swiglu_limit", 10.0)),
        hc_mult=int(hf.get("hc_mult", 4)), hc_sinkhorn_iters=int(hf.get("hc_sinkhorn_iters", 20)),
        hc_eps=float(hf.get("hc_eps", 1e-6)), norm_eps=float(hf.get("rms_norm_eps", 1e-6)), n_mtp_layers=0,
        max_seq_len=int(hf.get("max_position_embeddings", 4096)), **_hf_rope(hf))
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


def _canonical_hf_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5.23's `save_pretrained` writes attention-side `kv_norm` back as `norm` (its reverse renames
    are not one-to-one; arch ref §11.2), so both spellings are accepted."""
    out = {}
    for key, value in sd.items():
        if ".self_attn." in key and key.endswith(".norm.weight"):
            key = key[: -len("norm.weight")] + "kv_norm.weight"
        out[key] = value
    return out


def from_hf_state_dict(hf_sd: dict[str, torch.Tensor], our_keys) -> dict[str, torch.Tensor]:
    """HF tensors -> our names for the keys a DSV4Model has (`our_keys`, MTP keys excluded). Missing or
    left-over HF tensors raise a KeyError listing them, so a mismatched checkpoint never half-loads."""
    hf_sd = _canonical_hf_keys(hf_sd)
    names = hf_names(k for k in our_keys if not k.startswith("mtp."))
    out, used = {}, set()
    missing = sorted(hf for hf in names.values() if hf is not None and hf not in hf_sd)
    if missing:
        raise KeyError(f"transformers checkpoint lacks {len(missing)} tensors the model needs, e.g. {missing[:5]}")
    for ours, hf in names.items():
        if hf is None:
            continue
        value = hf_sd[hf]
        used.add(hf)
        if ours.endswith("ffn.experts.w1"):  # gate_up_proj [E, 2I, d]: gate rows first, then up
            gate, up = value.chunk(2, dim=1)
            out[ours], out[ours[:-1] + "3"] = gate, up
        else:
            out[ours] = value
    extra = sorted(k for k in hf_sd if k not in used and "rotary" not in k and "inv_freq" not in k)
    if extra:
        raise KeyError(f"transformers checkpoint has {len(extra)} tensors this config does not use, e.g. "
                       f"{extra[:5]}; is config.json the one saved with these weights?")
    return out
