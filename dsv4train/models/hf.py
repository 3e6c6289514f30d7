"""transformers DeepseekV4 interop: config and state-dict names (arch ref §11.2). Export direction today;
`load_pretrained` and the `dsv4 convert` CLI are still to come (issue 2)."""

from __future__ import annotations

import torch

from dsv4train.config.model import ModelConfig

HF_LAYER_TYPES = {"swa": "sliding_attention", "csa": "compressed_sparse_attention",
                  "hca": "heavily_compressed_attention"}
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
        max_position_embeddings=max(cfg.original_seq_len * int(cfg.rope_factor), cfg.max_seq_len),
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
    top = {"embed.weight": "model.embed_tokens.weight", "head.weight": "lm_head.weight",
           "norm.weight": "model.norm.weight", "hc_head_fn": "model.hc_head.hc_fn",
           "hc_head_base": "model.hc_head.hc_base", "hc_head_scale": "model.hc_head.hc_scale"}
    out = {}
    for key, value in sd.items():
        if key.startswith("mtp."):
            continue
        if key in top:
            out[top[key]] = value
            continue
        _, i, rest = key.split(".", 2)
        name = hf_layer_key(rest)
        if name is None:
            continue
        if rest == "ffn.experts.w1":  # gate rows first, then up
            value = torch.cat((value, sd[key.replace("experts.w1", "experts.w3")]), dim=1)
        out[f"model.layers.{i}.{name}"] = value
    return out
