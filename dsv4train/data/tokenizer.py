"""Byte-level BPE tokenizer trained with `tokenizers`, with DeepSeek-V4's special strings reserved at fixed ids.

Every tokenizer the project trains reserves `RESERVED_TOKENS` at ids 0..8, so a pre-trained base and its SFT share
one vocabulary and code may rely on the ids (0 BOS and 1 EOS as in DeepSeek-V4):

    0 BOS `<｜begin▁of▁sentence｜>`   3 `<｜User｜>`               6 `<think>`
    1 EOS `<｜end▁of▁sentence｜>`     4 `<｜Assistant｜>`          7 `</think>`
    2 `<｜pad｜>`                     5 `<｜latest_reminder｜>`    8 `｜DSML｜`

All are `tokenizers` special tokens: split out of any text before BPE (so each is one id wherever it appears, and
data can never spell it with ordinary tokens), and dropped by `decode(..., skip_special_tokens=True)`. `<｜pad｜>`
stays at id 2 only so folders prepared before the chat tokens existed keep their layout; padding uses EOS (arch
ref §9.4).

A tokenizer made elsewhere, or by an older version of this module, may lack the chat strings: `ensure_chat_tokens`
appends the missing ones at the end of its vocabulary (the model's rows for them are then grown by
`dsv4train/train/vocabulary.py`), and `chat_token_ids` names any that are still missing.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from dsv4train.config.errors import ConfigError
from dsv4train.data.chat import ASSISTANT, BOS, DSML, EOS, LATEST_REMINDER, THINK_END, THINK_START, USER

PAD = "<｜pad｜>"
# The fixed layout: RESERVED_TOKENS[i] has id i in every tokenizer `train_tokenizer` makes.
RESERVED_TOKENS = (BOS, EOS, PAD, USER, ASSISTANT, LATEST_REMINDER, THINK_START, THINK_END, DSML)
# The strings the chat format (dsv4train/data/chat.py) needs as single tokens, in the order they are appended.
CHAT_SPECIAL_TOKENS = tuple(s for s in RESERVED_TOKENS if s != PAD)

__all__ = [
    "BOS",
    "CHAT_SPECIAL_TOKENS",
    "EOS",
    "PAD",
    "RESERVED_TOKENS",
    "chat_token_ids",
    "ensure_chat_tokens",
    "find_tokenizer_json",
    "load_tokenizer",
    "missing_chat_tokens",
    "required_vocab_size",
    "split_at_reserved",
    "train_tokenizer",
]


_RESERVED_PATTERN = re.compile("|".join(map(re.escape, RESERVED_TOKENS)))


def split_at_reserved(docs: Iterable[str]) -> Iterator[str]:
    """The non-empty pieces of each document between reserved strings: what BPE sees once `encode` has split the
    special tokens out. `tokenizers`' trainer does not split them itself, so without this a corpus holding chat text
    would spend merges on pieces of `<｜User｜>` that encoding can never produce."""
    for doc in docs:
        yield from (piece for piece in _RESERVED_PATTERN.split(doc) if piece)


def train_tokenizer(docs: list[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE of `vocab_size` tokens trained on `docs`, with `RESERVED_TOKENS[i]` at id i. Merges are
    learned only within the text between reserved strings (`split_at_reserved`). The 256 byte symbols and the
    reserved tokens are always there, so a smaller `vocab_size` gives `256 + len(RESERVED_TOKENS)` tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(RESERVED_TOKENS),
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(split_at_reserved(docs), trainer=trainer)
    wrong = {s: tok.token_to_id(s) for i, s in enumerate(RESERVED_TOKENS) if tok.token_to_id(s) != i}
    assert not wrong, f"tokenizers did not reserve the special tokens at ids 0..{len(RESERVED_TOKENS) - 1}: {wrong}"
    return tok


TOKENIZER_JSON = "tokenizer.json"


def find_tokenizer_json(path: str | Path) -> Path:
    """`path` itself when it is a file, else the tokenizer.json inside the folder `path` (a folder made by `dsv4 data
    prepare`, a run directory, or a Hugging Face tokenizer folder)."""
    path = Path(path)
    if path.is_file():
        return path
    if (path / TOKENIZER_JSON).is_file():
        return path / TOKENIZER_JSON
    what = "folder has no" if path.is_dir() else "does not exist; expected a folder with a"
    raise FileNotFoundError(f"tokenizer {path}: {what} {TOKENIZER_JSON} (give a tokenizer.json or a prepared folder)")


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The Tokenizer at `path` (a tokenizer.json, or a folder holding one); a file `tokenizers` cannot read is a
    ConfigError naming it."""
    file = find_tokenizer_json(path)
    try:
        return Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a bare Exception on a malformed file
        raise ConfigError(f"tokenizer {file} cannot be read by `tokenizers` ({e})") from None


def required_vocab_size(tok: Tokenizer) -> int:
    """Rows a model needs for every id of `tok`: its largest id + 1 (not `get_vocab_size()`, which counts tokens and
    so falls short when the ids have gaps)."""
    return max(tok.get_vocab(with_added_tokens=True).values()) + 1


def _special_ids(tok: Tokenizer) -> dict[str, int]:
    """Content -> id of the tokenizer's added tokens that are marked special."""
    return {t.content: i for i, t in tok.get_added_tokens_decoder().items() if t.special}


def _ordinary_ids(tok: Tokenizer, strings: list[str]) -> dict[str, int]:
    """The `strings` that `tok` holds as ordinary (not special) tokens: a BPE entry or a non-special added token."""
    return {s: tok.token_to_id(s) for s in strings if tok.token_to_id(s) is not None}


def missing_chat_tokens(tok: Tokenizer) -> list[str]:
    """The chat special strings `tok` does not hold as special tokens, in `CHAT_SPECIAL_TOKENS` order."""
    specials = _special_ids(tok)
    return [s for s in CHAT_SPECIAL_TOKENS if s not in specials]


def chat_token_ids(tok: Tokenizer) -> dict[str, int]:
    """Id of every chat special string. Raises ValueError naming the strings `tok` lacks and those it holds only as
    ordinary tokens (a BPE entry is not split out of text; a non-special one survives `skip_special_tokens`).

    A special token is always one id: `tokenizers` matches special tokens in the text before BPE, longest first."""
    specials = _special_ids(tok)
    missing = missing_chat_tokens(tok)
    if missing:
        ordinary = _ordinary_ids(tok, missing)
        absent = [s for s in missing if s not in ordinary]
        problems = [f"absent {absent}"] if absent else []
        problems += [f"held as ordinary tokens, not special (string: id) {ordinary}"] if ordinary else []
        raise ValueError(
            f"the tokenizer lacks chat special tokens: {'; '.join(problems)}; add absent ones with "
            "dsv4train.data.tokenizer.ensure_chat_tokens and grow the model with "
            "dsv4train.train.vocabulary.grow_vocabulary"
        )
    return {s: specials[s] for s in CHAT_SPECIAL_TOKENS}


def ensure_chat_tokens(tok: Tokenizer) -> list[str]:
    """Add the chat special strings `tok` lacks, in place, at the end of its vocabulary; returns the ones added.

    The added strings get consecutive ids from `required_vocab_size(tok)` on, in `CHAT_SPECIAL_TOKENS` order, so every
    existing id keeps its meaning and the model only needs new rows. A tokenizer that has them all is left as it is
    (the call is idempotent). A string the vocabulary already holds as an ordinary token (a BPE entry or a
    non-special added token) is refused: `tokenizers` would mark that existing id special instead of appending one,
    silently changing what an id the model was trained on means."""
    specials = _special_ids(tok)
    missing = [s for s in CHAT_SPECIAL_TOKENS if s not in specials]
    ordinary = _ordinary_ids(tok, missing)
    if ordinary:
        raise ValueError(
            f"the tokenizer holds {ordinary} as ordinary tokens (string: id); the chat format needs them as special "
            "tokens at new ids, and turning an id the model already learned into a special token would change its "
            "meaning: use a tokenizer without them, or one made by dsv4train.data.tokenizer.train_tokenizer"
        )
    if not missing:
        return []
    first = required_vocab_size(tok)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in missing])
    got = {s: tok.token_to_id(s) for s in missing}
    want = {s: first + i for i, s in enumerate(missing)}
    assert got == want, f"tokenizers placed the new special tokens at {got}, expected {want} (end of the vocabulary)"
    return missing
