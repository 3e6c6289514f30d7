"""`dsv4 data prepare`: raw text -> tokenizer -> megatron indexed dataset, in one output folder.

Inputs: the offline stdlib corpus, text files or folders (one document per file), `.jsonl` (one JSON object per
line with a text field) and `.parquet` (streamed with `datasets`). The folder holds `tokenizer.json`,
`<name>.bin/.idx` per dataset (one entry per document, EOS appended, so boundaries are kept) and
`manifest.json`. `--append` adds a dataset to an existing folder with its tokenizer.

Everything is read and checked before the first byte is written; a failure while writing removes what this
call wrote, so a folder is either as it was or complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tokenizers import Tokenizer
from tqdm import tqdm

from dsv4train.config.errors import ConfigError
from dsv4train.data.corpus import stdlib_documents
from dsv4train.data.indexed import write_documents
from dsv4train.data.tokenizer import BOS, EOS, RESERVED_TOKENS, find_tokenizer_json, load_tokenizer, train_tokenizer
from dsv4train.utils.json_files import read_json_object

TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst")
TABLE_SUFFIXES = (".jsonl", ".parquet")
MANIFEST, TOKENIZER = "manifest.json", "tokenizer.json"
MIN_VOCAB = 256 + len(RESERVED_TOKENS)  # the byte alphabet and the reserved special tokens (data/tokenizer.py)


@dataclass
class PrepareArgs:
    out: Path
    name: str = "main"
    inputs: list[Path] = field(default_factory=list)
    stdlib: bool = False
    max_docs: int | None = None
    text_key: str = "text"
    tokenizer: Path | None = None
    vocab_size: int = 4096
    append: bool = False


@dataclass
class _Tok:
    tok: Tokenizer
    source: str  # a path, or how it was trained
    bos_id: int | None
    eos_id: int
    path: Path | None = None  # copied verbatim into the folder when given


def input_files(inputs: list[Path]) -> list[Path]:
    """The files to read, in a fixed order; every missing or unsupported input is named."""
    files = []
    for path in inputs:
        if not path.exists():
            raise FileNotFoundError(f"input {path} does not exist")
        if path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if p.is_file()
                and p.suffix in TEXT_SUFFIXES + TABLE_SUFFIXES
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not found:
                raise ConfigError(f"input folder {path} has no {'/'.join(TEXT_SUFFIXES + TABLE_SUFFIXES)} files")
            files += found
        elif path.suffix in TEXT_SUFFIXES + TABLE_SUFFIXES:
            files.append(path)
        else:
            raise ConfigError(
                f"input {path}: unsupported type {path.suffix!r}; expected a folder or "
                f"{'/'.join(TEXT_SUFFIXES + TABLE_SUFFIXES)}"
            )
    return files


def _read_jsonl(path: Path, key: str) -> Iterator[str]:
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict) or key not in row:
                raise ConfigError(f"{path}:{n}: no {key!r} field (choose it with --text-key)")
            yield str(row[key])


def _read_parquet(path: Path, key: str) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise ConfigError(f"{path}: reading parquet needs the `datasets` package (pip install datasets)") from None
    datasets.disable_progress_bars()
    table = datasets.load_dataset("parquet", data_files=str(path), split="train", streaming=True)
    if key not in (table.column_names or []):
        raise ConfigError(f"{path}: no {key!r} column (columns: {table.column_names}); choose it with --text-key")
    for row in table.select_columns([key]):
        yield str(row[key])


def read_documents(args: PrepareArgs) -> list[str]:
    files = input_files(args.inputs)
    docs = list(stdlib_documents(args.max_docs)) if args.stdlib else []
    for f in tqdm(files, desc="read", unit="file", disable=len(files) < 20):
        if f.suffix == ".jsonl":
            docs += _read_jsonl(f, args.text_key)
        elif f.suffix == ".parquet":
            docs += _read_parquet(f, args.text_key)
        else:
            docs.append(f.read_text(encoding="utf-8", errors="replace"))
    docs = [d for d in docs if d.strip()][: args.max_docs]
    if not docs:
        raise ConfigError("no documents found: give --stdlib or --input with text, .jsonl or .parquet files")
    return docs


def _special_id(tok: Tokenizer, path: Path, which: str, v4_token: str) -> int | None:
    """V4's special token if the vocabulary has it, else the one an HF folder's tokenizer_config.json names."""
    if tok.token_to_id(v4_token) is not None:
        return tok.token_to_id(v4_token)
    config = path.parent / "tokenizer_config.json"
    if not config.is_file():
        return None
    value = json.loads(config.read_text()).get(f"{which}_token")
    value = value.get("content") if isinstance(value, dict) else value
    return tok.token_to_id(value) if isinstance(value, str) else None


def _load_tokenizer(given: Path) -> tuple[Tokenizer, Path]:
    """A tokenizer.json, or the one inside an HF tokenizer folder, and its path."""
    return load_tokenizer(given), find_tokenizer_json(given)


def _given_tokenizer(given: Path) -> _Tok:
    tok, path = _load_tokenizer(given)
    eos = _special_id(tok, path, "eos", EOS)
    if eos is None:
        raise ConfigError(
            f"tokenizer {path} has no {EOS!r} token and no eos_token in a tokenizer_config.json "
            "beside it; documents need an end-of-document id"
        )
    return _Tok(tok, str(path.resolve()), _special_id(tok, path, "bos", BOS), eos, path)


def resolve_tokenizer(args: PrepareArgs, docs: list[str], manifest: dict | None) -> _Tok:
    """The folder's tokenizer when appending (a --tokenizer must match it), a given one, or a freshly trained one."""
    if manifest is not None:
        tok = Tokenizer.from_file(str(args.out / TOKENIZER))
        if args.tokenizer is not None and _load_tokenizer(args.tokenizer)[0].to_str() != tok.to_str():
            raise ConfigError(
                f"--tokenizer {args.tokenizer} differs from {args.out / TOKENIZER}; every dataset in "
                "a folder shares one tokenizer (drop --tokenizer or use a new --out)"
            )
        return _Tok(tok, manifest["tokenizer"], manifest["bos_id"], manifest["eos_id"])
    if args.tokenizer is not None:
        return _given_tokenizer(args.tokenizer)
    tok = train_tokenizer(docs, args.vocab_size)
    return _Tok(tok, f"trained byte-level BPE, vocab {args.vocab_size}", tok.token_to_id(BOS), tok.token_to_id(EOS))


MANIFEST_KEYS = {"tokenizer": str, "vocab_size": int, "eos_id": int, "datasets": dict}  # bos_id may be null


def read_manifest(path: Path) -> dict:
    """The manifest.json of a prepared folder, checked enough to append to it; a damaged one is named (nothing in
    the folder is touched)."""
    fix = (
        "restore it from a copy, or prepare into a new --out (a folder's manifest is written by `dsv4 data "
        "prepare` and lists its datasets)"
    )
    try:
        manifest = read_json_object(path, fix)
    except OSError as e:
        raise ConfigError(f"{path} cannot be read ({e}); {fix}") from None
    bad = [
        f"{key!r} (want {kind.__name__})"
        for key, kind in MANIFEST_KEYS.items()
        if not isinstance(manifest.get(key), kind) or isinstance(manifest.get(key), bool)
    ]
    if "bos_id" not in manifest or not isinstance(manifest["bos_id"], (int, type(None))):
        bad.append("'bos_id' (want int or null)")
    if bad:
        raise ConfigError(f"{path} is missing or has a wrong type for {', '.join(bad)}; {fix}")
    return manifest


def _check(args: PrepareArgs) -> dict | None:
    """Refuse bad arguments and an output folder in the wrong state; returns the manifest when appending."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", args.name) or args.name in ("manifest", "tokenizer"):
        raise ConfigError(f"--name {args.name!r}: use letters, digits, '_', '-', '.' (not manifest/tokenizer)")
    if args.tokenizer is None and args.vocab_size < MIN_VOCAB:
        raise ConfigError(f"--vocab-size {args.vocab_size}: a byte-level BPE needs at least {MIN_VOCAB}")
    if args.max_docs is not None and args.max_docs < 1:
        raise ConfigError(f"--max-docs {args.max_docs}: must be >= 1")
    if args.out.exists() and not args.out.is_dir():
        raise FileExistsError(f"{args.out} is a file, not a folder")
    if not args.append:
        if args.out.exists() and any(args.out.iterdir()):
            raise FileExistsError(
                f"{args.out} already exists and is not empty; choose a new --out, or add a dataset to it with --append"
            )
        return None
    path = args.out / MANIFEST
    if not path.is_file() or not (args.out / TOKENIZER).is_file():
        raise FileNotFoundError(
            f"--append needs a folder made by `dsv4 data prepare`; {path} or its {TOKENIZER} is missing"
        )
    manifest = read_manifest(path)
    if args.name in manifest["datasets"]:
        raise FileExistsError(f"dataset {args.name!r} already exists in {args.out}; pick another --name")
    return manifest


def _encoded(tok: _Tok, docs: list[str], name: str, chunk: int = 256) -> Iterator[list[int]]:
    with tqdm(total=len(docs), desc=f"tokenize {name}", unit="doc") as bar:
        for i in range(0, len(docs), chunk):
            for enc in tok.tok.encode_batch(docs[i : i + chunk], add_special_tokens=False):
                yield enc.ids + [tok.eos_id]
            bar.update(len(docs[i : i + chunk]))


def _write(args: PrepareArgs, tok: _Tok, docs: list[str], manifest: dict | None, t0: float) -> dict:
    out, created, written = args.out, not args.out.exists(), []
    if manifest is None:
        vocab = max(tok.tok.get_vocab_size(), max(tok.tok.get_vocab().values()) + 1)
        manifest = {
            "tokenizer": tok.source,
            "vocab_size": vocab,
            "bos_id": tok.bos_id,
            "eos_id": tok.eos_id,
            "datasets": {},
        }
    try:
        out.mkdir(parents=True, exist_ok=True)
        partial = out / f".{args.name}.partial"
        written += [Path(f"{partial}.bin"), Path(f"{partial}.idx")]
        n_docs, n_tokens = write_documents(partial, _encoded(tok, docs, args.name), manifest["vocab_size"])
        for suffix in (".bin", ".idx"):
            written.append(out / f"{args.name}{suffix}")
            os.replace(f"{partial}{suffix}", written[-1])
        if not (out / TOKENIZER).exists():
            written.append(out / TOKENIZER)
            if tok.path is not None:
                shutil.copyfile(tok.path, written[-1])
            else:
                tok.tok.save(str(written[-1]))
        manifest["datasets"][args.name] = {
            "documents": n_docs,
            "tokens": n_tokens,
            "inputs": (["stdlib"] if args.stdlib else []) + [str(p.resolve()) for p in args.inputs],
            "seconds": round(time.perf_counter() - t0, 1),
        }
        written.append(out / f".{MANIFEST}.partial")
        written[-1].write_text(json.dumps(manifest, indent=2) + "\n")
        os.replace(written[-1], out / MANIFEST)  # the folder is complete once this lands
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    return manifest


def prepare(args: PrepareArgs) -> dict:
    """Write the dataset; returns the manifest. Refuses a non-empty folder unless appending."""
    t0 = time.perf_counter()
    manifest = _check(args)
    docs = read_documents(args)
    tok = resolve_tokenizer(args, docs, manifest)
    return _write(args, tok, docs, manifest, t0)
