"""`dsv4 convert from-hf SRC DST` and `dsv4 convert to-hf SRC DST`: move weights between a Hugging Face folder of
DeepseekV4ForCausalLM and a dsv4 folder. SRC of `from-hf` is a folder with a config.json: any layout transformers'
`save_pretrained` writes, or the official hub layout (bf16, or FP8 block scales with FP4 experts, dequantised;
its MTP layer is kept), one file or sharded. SRC of `to-hf` is a dsv4 folder, a training run directory or a
`checkpoints/step_<N>/` folder; the MTP layer is not written (transformers has none). DST must not exist or be
empty."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "keep": None}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dsv4 convert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("direction", choices=("from-hf", "to-hf"))
    p.add_argument("src", type=Path)
    p.add_argument("dst", type=Path)
    p.add_argument(
        "--dtype",
        choices=list(DTYPES),
        default="keep",
        help="floating-point dtype of the written tensors (default: as loaded, fp32)",
    )
    return p


def convert_main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    from dsv4train.config.errors import ConfigError
    from dsv4train.models.pretrained import detect_format, save_dsv4, save_hf
    from dsv4train.train.pretrained import load_pretrained

    if args.dst.exists() and (not args.dst.is_dir() or any(args.dst.iterdir())):
        print(f"dsv4 convert: {args.dst} already exists and is not empty; choose a new destination", file=sys.stderr)
        return 2
    try:
        fmt = detect_format(args.src)
        if args.direction == "from-hf" and fmt != "hf":
            raise ConfigError(f"{args.src} is not a transformers folder (no config.json); `from-hf` needs one")
        if args.direction == "to-hf" and fmt == "hf":
            raise ConfigError(f"{args.src} is already a transformers folder")
        t0 = time.perf_counter()
        model = load_pretrained(args.src)
        save = save_dsv4 if args.direction == "from-hf" else save_hf
        save(model, args.dst, dtype=DTYPES[args.dtype])
    except (ConfigError, FileNotFoundError, KeyError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e  # a KeyError's str() adds quotes
        print(f"dsv4 convert: {message}", file=sys.stderr)
        return 2
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"wrote {args.dst} ({'dsv4' if args.direction == 'from-hf' else 'transformers'} format, "
        f"{n_params / 1e6:.1f}M parameters, {model.cfg.n_layers} layers + {model.cfg.n_mtp_layers} MTP) in "
        f"{time.perf_counter() - t0:.1f} s"
    )
    if args.direction == "to-hf" and model.cfg.n_mtp_layers:
        print("note: the MTP layer has no transformers counterpart and was not written")
    return 0
