"""`dsv4 data prepare`: raw text -> BPE tokenizer -> megatron indexed dataset (see dsv4train/data/prepare.py).

    dsv4 data prepare --stdlib --vocab-size 4096 --name stdlib --out data/prepared/stdlib
    dsv4 data prepare --input data/sample --vocab-size 512 --out data/prepared/sample
    dsv4 data prepare --input corpus/ more.jsonl --tokenizer tok/ --name web --out data/prepared/mix
    dsv4 data prepare --input code.parquet --text-key content --name code --append --out data/prepared/mix

Exit status 2 (nothing written) for a missing input, a non-empty --out without --append, or a bad argument.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dsv4 data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser(
        "prepare",
        help="tokenize raw text into an indexed dataset",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    pp.add_argument("--out", type=Path, required=True, help="output folder (new or empty, or existing with --append)")
    pp.add_argument("--name", default="main", help="dataset name inside the folder (default: main)")
    pp.add_argument(
        "--input",
        dest="inputs",
        type=Path,
        nargs="+",
        action="extend",
        default=[],
        help="text files or folders (.txt .md .py .rst, one document per file), .jsonl or .parquet",
    )
    pp.add_argument("--stdlib", action="store_true", help="the Python standard library's source (offline)")
    pp.add_argument("--max-docs", type=int, default=None, help="keep only the first N documents")
    pp.add_argument("--text-key", default="text", help="field holding the text in .jsonl/.parquet (default: text)")
    pp.add_argument(
        "--tokenizer",
        type=Path,
        default=None,
        help="an existing tokenizer.json or a Hugging Face tokenizer folder holding one",
    )
    pp.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary when training a tokenizer")
    pp.add_argument("--append", action="store_true", help="add a dataset to an existing folder, same tokenizer")
    return p


def data_main(argv: list[str]) -> int:
    args = vars(_parser().parse_args(argv))
    args.pop("cmd")
    from dsv4train.config.errors import ConfigError
    from dsv4train.data.prepare import PrepareArgs, prepare

    try:
        manifest = prepare(PrepareArgs(**args))
    except (ConfigError, FileNotFoundError, FileExistsError) as e:
        print(f"dsv4 data prepare: {e}", file=sys.stderr)
        return 2
    ds = manifest["datasets"][args["name"]]
    print(
        f"wrote {args['out']}/{args['name']}.bin/.idx: {ds['documents']:,} documents, {ds['tokens']:,} tokens "
        f"(vocab {manifest['vocab_size']}) in {ds['seconds']} s"
    )
    return 0
