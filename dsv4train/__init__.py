"""dsv4train: DeepSeek-V4-style pre-training and post-training at reduced scale."""

__version__ = "0.1.0"


def load_pretrained(path, **kwargs):
    """Load a dsv4 checkpoint or a transformers `save_pretrained` folder of DeepseekV4ForCausalLM.

    Returns a model whose `model(input_ids)` gives logits [B, S, V]."""
    from dsv4train.models.hf import load_pretrained as _load

    return _load(path, **kwargs)
