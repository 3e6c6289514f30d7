"""dsv4train: DeepSeek-V4-style pre-training and post-training at reduced scale."""

__version__ = "0.1.0"


def load_pretrained(path, **kwargs):
    """Load a dsv4 checkpoint or a transformers `save_pretrained` folder of DeepseekV4ForCausalLM.

    Also takes a training run directory or one of its `checkpoints/step_<N>/` folders. Returns a model in eval
    mode whose `model(input_ids)` gives logits [B, S, V]. See `dsv4train.train.pretrained.load_pretrained`."""
    from dsv4train.train.pretrained import load_pretrained as _load

    return _load(path, **kwargs)
