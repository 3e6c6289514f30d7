"""`dsv4 data prepare`: raw text -> BPE tokenizer -> megatron indexed dataset (see dsv4train/data/prepare.py).
`dsv4 data tasks`: SFT records of the offline math and code domains (see dsv4train/data/tasks/).

    dsv4 data prepare --stdlib --vocab-size 4096 --name stdlib --out data/prepared/stdlib
    dsv4 data prepare --input data/sample --vocab-size 512 --out data/prepared/sample
    dsv4 data prepare --input corpus/ more.jsonl --tokenizer tok/ --name web --out data/prepared/mix
    dsv4 data prepare --input code.parquet --text-key content --name code --append --out data/prepared/mix
    dsv4 data tasks --out data/sft --domains math,code --train 2000 --test 200

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
    tp = sub.add_parser("tasks", help="write SFT records of the offline domains (train.jsonl, test.jsonl)")
    tp.add_argument("--out", type=Path, required=True, help="output folder")
    tp.add_argument("--domains", default="math,code", help="comma-separated: math, code (default: both)")
    tp.add_argument("--train", type=int, default=2000, help="train samples per domain (two records each: think, chat)")
    tp.add_argument("--test", type=int, default=200, help="test samples per domain")
    tp.add_argument("--seed", type=int, default=0)
    tp.add_argument("--math-difficulty", type=int, default=2, help="1: two +/- steps; 2: adds *; 3: adds / (default 2)")
    tp.add_argument(
        "--code-difficulty", type=int, default=2, help="1: four one-line families, one example; 2: all (default 2)"
    )
    return p


def _tasks(args: dict) -> int:
    from dsv4train.data.tasks.records import write_task_records

    try:
        written = write_task_records(
            args["out"],
            args["domains"].split(","),
            args["train"],
            args["test"],
            args["seed"],
            args["math_difficulty"],
            args["code_difficulty"],
        )
    except ValueError as e:
        print(f"dsv4 data tasks: {e}", file=sys.stderr)
        return 2
    files = [f"{args['out']}/{name} ({n:,} records)" for name, n in written.items()]
    print(f"wrote {', '.join(files)}")
    return 0


def data_main(argv: list[str]) -> int:
    args = vars(_parser().parse_args(argv))
    if args.pop("cmd") == "tasks":
        return _tasks(args)
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
