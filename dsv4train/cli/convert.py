"""`dsv4 convert from-hf SRC DST` and `dsv4 convert to-hf SRC DST`: move weights between a Hugging Face folder of
DeepseekV4ForCausalLM and a dsv4 folder. SRC of `from-hf` is a folder with a config.json: any layout transformers'
`save_pretrained` writes, or the official hub layout (bf16, or FP8 block scales with FP4 experts, dequantised;
its MTP layer is kept), one file or sharded. SRC of `to-hf` is a dsv4 folder, a training run directory or a
`checkpoints/step_<N>/` folder; the MTP layer is not written (transformers has none). DST must not exist or be
empty.

`to-hf` also writes the tokenizer with the V4 chat template (tokenizer.json, tokenizer_config.json; see
dsv4train/data/hf_tokenizer.py for the `apply_chat_template` keywords of the three modes): the one `--tokenizer`
names, or, when SRC is a training run (or one of its checkpoints), the run's tokenizer: its own tokenizer.json (SFT
runs keep one) or that of its `data.dir` (from its config.resolved.yaml; a relative path is read from the current
directory). Without a tokenizer the export holds the weights only."""

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
    p.add_argument(
        "--tokenizer",
        type=Path,
        default=None,
        help="to-hf: a tokenizer.json, or a folder holding one (a `dsv4 data prepare` folder); "
        "default: the tokenizer of a training run SRC (its own, or its data folder's)",
    )
    return p


def _checked_tokenizer(path: Path, model_cfg):
    """The tokenizer at `path`, refused when its ids do not fit the model or its BOS/EOS are not the ids the
    exported config.json names."""
    from dsv4train.config.errors import ConfigError
    from dsv4train.data.chat import BOS, EOS
    from dsv4train.data.tokenizer import load_tokenizer, required_vocab_size
    from dsv4train.models.pretrained import hf_config_json

    tok = load_tokenizer(path)
    if required_vocab_size(tok) > model_cfg.vocab_size:
        raise ConfigError(
            f"tokenizer {path} has ids up to {required_vocab_size(tok) - 1} but the model has {model_cfg.vocab_size} "
            "embedding rows; give the tokenizer the model was trained with"
        )
    config = hf_config_json(model_cfg)
    for name, token in (("bos", BOS), ("eos", EOS)):
        if tok.token_to_id(token) != config[f"{name}_token_id"]:
            raise ConfigError(
                f"tokenizer {path}: {token!r} has id {tok.token_to_id(token)}, but the exported config.json "
                f"names {config[f'{name}_token_id']} as {name}_token_id; give the tokenizer the model was trained with"
            )
    return tok


def convert_main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    from dsv4train.config.errors import ConfigError
    from dsv4train.data.hf_tokenizer import chat_template, write_hf_tokenizer
    from dsv4train.data.tokenizer import missing_chat_tokens
    from dsv4train.models.pretrained import detect_format, save_dsv4, save_hf
    from dsv4train.train.pretrained import load_pretrained
    from dsv4train.train.run_files import run_tokenizer

    if args.dst.exists() and (not args.dst.is_dir() or any(args.dst.iterdir())):
        print(f"dsv4 convert: {args.dst} already exists and is not empty; choose a new destination", file=sys.stderr)
        return 2
    if args.direction == "from-hf" and args.tokenizer is not None:
        print("dsv4 convert: --tokenizer applies to `to-hf` only", file=sys.stderr)
        return 2
    try:
        fmt = detect_format(args.src)
        if args.direction == "from-hf" and fmt != "hf":
            raise ConfigError(f"{args.src} is not a transformers folder (no config.json); `from-hf` needs one")
        if args.direction == "to-hf" and fmt == "hf":
            raise ConfigError(f"{args.src} is already a transformers folder")
        t0 = time.perf_counter()
        model = load_pretrained(args.src)
        tokenizer_path, no_tokenizer_reason = args.tokenizer, ""
        if args.direction == "to-hf" and tokenizer_path is None:
            tokenizer_path, no_tokenizer_reason = run_tokenizer(args.src)
        tok = _checked_tokenizer(tokenizer_path, model.cfg) if tokenizer_path is not None else None
        missing = missing_chat_tokens(tok) if tok is not None else []  # no template then, and a note below
        if tok is not None and not missing:
            chat_template()  # an install without the template file fails here, before anything is written
        save = save_dsv4 if args.direction == "from-hf" else save_hf
        save(model, args.dst, dtype=DTYPES[args.dtype])
        if tok is not None:
            write_hf_tokenizer(tok, args.dst, model_max_length=model.cfg.max_seq_len, with_chat_template=not missing)
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
    if args.direction == "to-hf":
        if tok is None:
            print(f"note: no tokenizer ({no_tokenizer_reason}); the export holds the weights only (pass --tokenizer)")
        elif missing:
            print(f"note: tokenizer {tokenizer_path} lacks the chat tokens {missing}; written without a chat template")
        else:
            print(
                f"tokenizer: {tokenizer_path}, with the V4 chat template (apply_chat_template's thinking=True for "
                "think mode, and reasoning_effort='max' for think_max)"
            )
    return 0
