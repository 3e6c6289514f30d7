"""`dsv4 data prepare`: raw text -> tokenizer -> megatron indexed dataset, in one output folder.

Inputs: the offline stdlib corpus, text files or folders (one document per file), `.jsonl` (one JSON object per
line with a text field) and `.parquet` (read with `datasets`). The folder holds `tokenizer.json`,
`<name>.bin/.idx` per dataset (one entry per document, EOS appended, so boundaries are kept) and
`manifest.json`. `--append` adds a dataset to an existing folder with its tokenizer.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from dsv4train.config.errors import ConfigError
from dsv4train.data.corpus import stdlib_documents
from dsv4train.data.indexed import write_documents
from dsv4train.data.tokenizer import BOS, EOS, train_tokenizer

TEXT_SUFFIXES = {".txt", ".md", ".py", ".rst"}
MANIFEST = "manifest.json"


@dataclass
class PrepareArgs:
    out: Path
    name: str
    inputs: list[Path] = field(default_factory=list)
    stdlib: bool = False
    max_docs: int | None = None
    text_key: str = "text"
    tokenizer: Path | None = None
    vocab_size: int = 4096
    append: bool = False


def _read_jsonl(path: Path, key: str) -> list[str]:
    docs = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if key not in row:
            raise ConfigError(f"{path}:{n}: no {key!r} field (choose it with --text-key)")
        docs.append(str(row[key]))
    return docs


def _read_parquet(path: Path, key: str) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise ConfigError(f"{path}: reading parquet needs the `datasets` package (pip install datasets)") from None
    table = datasets.Dataset.from_parquet(str(path))
    if key not in table.column_names:
        raise ConfigError(f"{path}: no {key!r} column (columns: {table.column_names}); choose it with --text-key")
    return [str(t) for t in table[key]]


def read_documents(args: PrepareArgs) -> list[str]:
    docs = list(stdlib_documents(args.max_docs)) if args.stdlib else []
    for path in args.inputs:
        if not path.exists():
            raise FileNotFoundError(f"input {path} does not exist")
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            if f.suffix == ".jsonl":
                docs += _read_jsonl(f, args.text_key)
            elif f.suffix == ".parquet":
                docs += _read_parquet(f, args.text_key)
            elif f.suffix in TEXT_SUFFIXES:
                docs.append(f.read_text(encoding="utf-8", errors="replace"))
    docs = [d for d in docs if d.strip()]
    if args.max_docs is not None:
        docs = docs[: args.max_docs]
    if not docs:
        raise ConfigError("no documents found: give --stdlib or --input with .txt/.md/.py/.rst/.jsonl/.parquet")
    return docs


def _tokenizer(args: PrepareArgs, docs: list[str]):
    from tokenizers import Tokenizer

    existing = args.out / "tokenizer.json"
    if args.append:
        return Tokenizer.from_file(str(existing)), "existing"
    if args.tokenizer is not None:
        path = args.tokenizer / "tokenizer.json" if args.tokenizer.is_dir() else args.tokenizer
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer {path} does not exist")
        return Tokenizer.from_file(str(path)), str(path)
    return train_tokenizer(docs, args.vocab_size), f"trained byte-level BPE, vocab {args.vocab_size}"


def prepare(args: PrepareArgs) -> dict:
    """Write the dataset; returns the manifest. Refuses to touch a non-empty folder unless appending."""
    out = args.out
    manifest_path = out / MANIFEST
    if args.append:
        if not manifest_path.is_file():
            raise FileNotFoundError(f"--append needs an existing prepared folder; {manifest_path} is missing")
        manifest = json.loads(manifest_path.read_text())
        if args.name in manifest["datasets"]:
            raise ConfigError(f"dataset {args.name!r} already exists in {out}; pick another --name")
    elif out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} already exists and is not empty; choose a new --out or use --append")
    t0 = time.perf_counter()
    docs = read_documents(args)
    tok, tok_source = _tokenizer(args, docs)
    eos = tok.token_to_id(EOS)
    if eos is None:
        raise ConfigError(f"the tokenizer has no {EOS!r} token; dsv4train needs V4's BOS/EOS special tokens")
    out.mkdir(parents=True, exist_ok=True)
    if not args.append:
        tok.save(str(out / "tokenizer.json"))
        manifest = {"tokenizer": tok_source, "vocab_size": tok.get_vocab_size(), "bos_id": tok.token_to_id(BOS),
                    "eos_id": eos, "datasets": {}}
    encoded = (e.ids + [eos] for e in (tok.encode(d) for d in tqdm(docs, desc=f"tokenize {args.name}", unit="doc")))
    n_docs, n_tokens = write_documents(out / args.name, encoded, manifest["vocab_size"])
    manifest["datasets"][args.name] = {"documents": n_docs, "tokens": n_tokens,
                                       "inputs": (["stdlib"] if args.stdlib else []) + [str(p) for p in args.inputs],
                                       "seconds": round(time.perf_counter() - t0, 1)}
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
