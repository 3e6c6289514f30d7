"""Model weights on disk: the dsv4 format and transformers' `save_pretrained` format, both safetensors.

- dsv4 folder: `dsv4_model.json` ({"format": "dsv4", "version": 1, "model": ModelConfig fields}) and
  `model.safetensors` with our canonical names (official V4 names, stacked experts, MTP kept).
- transformers or hub folder: `config.json` (model_type "deepseek_v4") and `model.safetensors`, or shards listed
  in `model.safetensors.index.json`, in any layout `models/hf.py` reads: what transformers' `save_pretrained`
  writes (HF names, or the mixed names of a freshly built model) and the official hub names, bf16/fp32 or with
  FP8 block scales and FP4-packed experts (dequantised to float32 on load). `mtp.*` tensors (hub only) are kept.
- A training run directory or one of its `checkpoints/step_<N>/` folders is read by `train/checkpoint.py`.

`detect_format` tells the three apart from the files present; `dsv4train.load_pretrained` (train/pretrained.py,
a layer above: models/ imports nothing from train/) reads each with its reader. Writers refuse a folder that
already has files, so nothing already written is overwritten.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from dsv4train.config.errors import ConfigError
from dsv4train.config.model import ModelConfig
from dsv4train.models.hf import (
    config_from_hf,
    from_hf_state_dict,
    hf_config_kwargs,
    hf_fp8_block,
    official_name,
    to_hf_state_dict,
)
from dsv4train.models.model import DSV4Model
from dsv4train.utils.json_files import read_json_object

DSV4_META = "dsv4_model.json"
WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
FORMAT_VERSION = 1


def _fresh_dir(path: Path) -> Path:
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(
            f"{path} already exists and is not an empty folder; choose a new destination (nothing was written)"
        )
    path.mkdir(parents=True, exist_ok=True)
    return path


def _to_save(sd: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        v = v.detach().to("cpu")
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        out[k] = v.contiguous().clone()  # safetensors refuses shared storage (e.g. the halves of a chunk)
    return out


def save_dsv4(model: DSV4Model, path, dtype: torch.dtype | None = None) -> Path:
    """Write `model` as a dsv4 folder at `path` (must not exist or be empty)."""
    path = _fresh_dir(path)
    save_file(_to_save(model.state_dict(), dtype), str(path / WEIGHTS), metadata={"format": "pt"})
    meta = {"format": "dsv4", "version": FORMAT_VERSION, "model": asdict(model.cfg)}
    (path / DSV4_META).write_text(json.dumps(meta, indent=2) + "\n")
    return path


def hf_config_json(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict:
    """A `config.json` that transformers reads as DeepseekV4Config for the same model."""
    return {
        "architectures": ["DeepseekV4ForCausalLM"],
        "model_type": "deepseek_v4",
        "dtype": str(dtype).removeprefix("torch."),
        "bos_token_id": 0,
        "eos_token_id": 1,
        "tie_word_embeddings": False,
        **hf_config_kwargs(cfg),
    }


def save_hf(model: DSV4Model, path, dtype: torch.dtype | None = None) -> Path:
    """Write `model` as a transformers `save_pretrained` folder of DeepseekV4ForCausalLM (MTP is dropped)."""
    path = _fresh_dir(path)
    sd = _to_save(to_hf_state_dict(model.state_dict()), dtype)
    save_file(sd, str(path / WEIGHTS), metadata={"format": "pt"})
    saved_dtype = dtype or model.embed.weight.dtype
    (path / "config.json").write_text(json.dumps(hf_config_json(model.cfg, saved_dtype), indent=2) + "\n")
    return path


def read_json(path: Path) -> dict:
    """A JSON object from `path`; a file that is not valid JSON (or not an object) raises a ConfigError naming it."""
    return read_json_object(path, "repair the file or write it again")


def _weight_files(path: Path) -> list[Path]:
    """The safetensors files of a folder: the shards named in its index, or its one `model.safetensors`."""
    if (path / HF_INDEX).exists():
        weight_map = read_json(path / HF_INDEX).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConfigError(f'{path / HF_INDEX}: needs a non-empty "weight_map" object (tensor name -> shard)')
        files = [path / name for name in sorted(set(weight_map.values()))]
        absent = [f.name for f in files if not f.exists()]
        if absent:
            raise FileNotFoundError(f"{path / HF_INDEX} lists shards that are not in {path}: {absent[:5]}")
        return files
    if (path / WEIGHTS).exists():
        return [path / WEIGHTS]
    raise FileNotFoundError(f"{path} has neither {WEIGHTS} nor {HF_INDEX}")


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    sd = {}
    for file in _weight_files(path):
        try:
            shard = load_file(str(file))
        except (SafetensorError, OSError) as e:
            raise ConfigError(f"{file}: not a readable safetensors file ({e})") from None
        clash = sorted(set(shard) & set(sd))
        if clash:
            raise ConfigError(f"{file}: tensors {clash[:5]} are also in another shard of {path}")
        sd.update(shard)
    return sd


def _mtp_layers_in(path: Path) -> int:
    """How many MTP layers (`mtp.{i}.*`, official names) the weights of a folder carry; only headers are read."""
    names = set()
    for file in _weight_files(path):
        try:
            with safe_open(str(file), "pt") as f:
                names.update(f.keys())
        except (SafetensorError, OSError) as e:
            raise ConfigError(f"{file}: not a readable safetensors file ({e})") from None
    ids = {int(m[1]) for m in (re.match(r"^mtp\.(\d+)\.", official_name(k)) for k in names) if m}
    return max(ids) + 1 if ids else 0


def detect_format(path) -> str:
    """'dsv4', 'hf' or 'checkpoint' (a training run or DCP step folder); a clear error otherwise."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if (path / DSV4_META).exists():
        return "dsv4"
    if (path / "config.json").exists():
        return "hf"
    if (path / ".metadata").exists() or (path / "checkpoints").is_dir():
        return "checkpoint"
    raise FileNotFoundError(
        f"{path} is not a dsv4 folder ({DSV4_META}), a transformers folder (config.json) or a "
        "training run / checkpoint folder"
    )


def read_config(path) -> ModelConfig:
    """The ModelConfig stored with the weights at `path` (dsv4 or transformers folder)."""
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "dsv4":
        meta = read_json(path / DSV4_META)
        if meta.get("format") != "dsv4" or int(meta.get("version", 0)) > FORMAT_VERSION:
            raise ConfigError(
                f"{path / DSV4_META}: unsupported format/version {meta.get('format')}/"
                f"{meta.get('version')}; this dsv4train reads version <= {FORMAT_VERSION}"
            )
        if not isinstance(meta.get("model"), dict):
            raise ConfigError(f'{path / DSV4_META}: needs a "model" object with the ModelConfig fields')
        try:
            return ModelConfig(**meta["model"])
        except TypeError as e:  # an unknown or missing field
            raise ConfigError(
                f'{path / DSV4_META}: "model" does not match this dsv4train\'s ModelConfig ({e})'
            ) from None
    if fmt == "hf":
        return config_from_hf(
            read_json(path / "config.json"), name=path.resolve().name, n_mtp_layers=_mtp_layers_in(path)
        )
    raise ConfigError(f"{path}: read the config of a training checkpoint with dsv4train.train.checkpoint")


def build_empty(cfg: ModelConfig, device="cpu") -> DSV4Model:
    """A model with allocated but unset storage (no random init), ready for `load_state_dict`."""
    with torch.device("meta"):
        model = DSV4Model(cfg)
    return model.to_empty(device=device)


def check_vocab_size(cfg: ModelConfig, vocab_size: int | None, path) -> None:
    """A ConfigError unless the weights at `path` (config `cfg`) have `vocab_size` tokens (None: any)."""
    if vocab_size is not None and vocab_size != cfg.vocab_size:
        raise ConfigError(
            f"model.vocab_size: the checkpoint at {path} has {cfg.vocab_size} tokens but "
            f"{vocab_size} were expected (is the tokenizer the one this model was trained with?)"
        )


def load_weights(path, device="cpu", dtype: torch.dtype | None = None, vocab_size: int | None = None) -> DSV4Model:
    """Load a dsv4 or transformers folder into a DSV4Model in eval mode."""
    path = Path(path)
    fmt = detect_format(path)
    cfg = read_config(path)
    check_vocab_size(cfg, vocab_size, path)
    model = build_empty(cfg, device)
    sd = _read_safetensors(path)
    if fmt == "hf":
        fp8_block = hf_fp8_block(read_json(path / "config.json"))
        sd = from_hf_state_dict(sd, model.state_dict().keys(), fp8_block=fp8_block)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise ConfigError(f"{path}: the weights do not match its config: {e}") from None
    if dtype is not None:
        model.to(dtype)
    return model.eval()
