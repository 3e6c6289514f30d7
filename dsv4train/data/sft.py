"""SFT data: chat records on disk -> tokenized samples with target masks -> packed, document-masked rows.

    read_sft_records(paths)                   records -> SFTSample (Conversation, mode, domain); bad ones counted
    tokenize_sample(conversation, mode, ...)  -> TokenizedSample(ids, target_mask): what the assistant generates
    fit_to_length(samples, seq_len, ...)      samples longer than a row: dropped or truncated, always counted
    pack_best_fit_decreasing(lengths, cap)    which samples share a row
    packed_batch(samples, bins, ...)          -> [R, seq_len] input_ids, positions, labels, next_ids, mtp_labels
    SFTBatches                                seeded, resumable stream of micro-batches of R packed rows

Conventions of a packed row (what the model and the losses read):
- Every sample is its own document; `positions` counts 0, 1, ... inside it, so a 0 starts a new document. The tail
  of a row is EOS padding, one more document starting at position 0, with no targets.
- `labels[t]` is token t+1 of the same document when that token is a target (the assistant generated it), else
  IGNORE; `mtp_labels[t]` is token t+2 of the same document when it is a target, else IGNORE; `next_ids[t]` is
  token t+1 of the same document, and at a document's last position the token itself (the MTP block's dummy input
  there: its target is IGNORE anyway). Nothing ever reads across a document boundary.
- A target token is one inside a character span of `chat.render_with_spans`: reasoning, answer, tool calls and the
  closing EOS of every assistant turn. The first token of a document is never a label (nothing before it predicts
  it; it is BOS in every rendered sample).
"""

from __future__ import annotations

import json
import tempfile
from bisect import bisect_left, insort
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from dsv4train.config.errors import ConfigError
from dsv4train.data.chat import MODES, ChatFormatError, Conversation, Mode, conversation_from_dict, render_with_spans
from dsv4train.train.losses import IGNORE

MAX_REPORTED_BAD_RECORDS = 5
OnBadRecord = Literal["skip", "error"]
TooLong = Literal["drop", "truncate"]


class SFTDataError(ConfigError):
    """SFT data that cannot be used: the message names the file (and line or row) and what to do."""


# ----------------------------------------------------------------------------------------------------------------
# Reading records
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SFTSample:
    """One validated record. `source` says where it came from (`file line N` or `file row N`)."""

    conversation: Conversation
    mode: Mode
    domain: str
    source: str


@dataclass(frozen=True)
class BadRecord:
    """`index` is a 1-based line number for jsonl (as editors count) and a 0-based row index for parquet."""

    path: str
    index: int
    unit: Literal["line", "row"]
    error: str

    def __str__(self) -> str:
        return f"{self.path} {self.unit} {self.index}: {self.error}"


@dataclass
class BadRecordReport:
    """How many records were read and skipped; the first few bad ones are kept with where and why."""

    n_records: int = 0
    n_bad: int = 0
    first: list[BadRecord] = field(default_factory=list)

    def add(self, bad: BadRecord) -> None:
        self.n_bad += 1
        if len(self.first) < MAX_REPORTED_BAD_RECORDS:
            self.first.append(bad)

    def to_dict(self) -> dict[str, Any]:
        return {"records": self.n_records, "bad": self.n_bad, "first_bad": [str(b) for b in self.first]}

    def __str__(self) -> str:
        head = f"{self.n_bad} of {self.n_records} records skipped"
        return "; ".join([head, *map(str, self.first)]) + ("; ..." if self.n_bad > len(self.first) else "")


def sample_from_record(record: Any, source: str) -> SFTSample:
    """Validate one record (raises ChatFormatError naming the problem): the chat layer checks roles, order, empty
    assistant turns and unknown keys; here `domain`, `mode`, and that some assistant turn gives a target."""
    if not isinstance(record, dict):
        raise ChatFormatError(f"a record must be a JSON object, got {type(record).__name__}")
    if "messages" not in record:
        raise ChatFormatError('record has no "messages"')
    mode = record.get("mode")
    if mode not in MODES:
        raise ChatFormatError(f"record: mode {mode!r}; expected one of {MODES}")
    domain = record.get("domain")
    if not isinstance(domain, str) or not domain:
        raise ChatFormatError(f'record: domain {domain!r}; expected a non-empty string naming its task (e.g. "math")')
    conversation = conversation_from_dict(record, ignore_keys=("domain", "mode"))
    if not any(m.role == "assistant" for m in conversation.messages):
        raise ChatFormatError("record has no assistant turn, so nothing to learn from")
    return SFTSample(conversation=conversation, mode=mode, domain=domain, source=source)


def _jsonl_records(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    """(line number, record, None) or (line number, None, why it is not JSON); blank lines are not records."""
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield number, None, f"not UTF-8 text ({err.reason} at byte {err.start})"
                continue
            if not line.strip():
                continue
            try:
                yield number, json.loads(line), None
            except json.JSONDecodeError as err:
                yield number, None, f"not JSON ({err.msg} at column {err.colno})"


def _drop_nulls(value: Any) -> Any:
    """Objects without their null fields, recursively (see `read_sft_records` on parquet)."""
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def _parquet_records(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    import datasets  # here, not at module import: it is heavy and only parquet needs it

    bars_were_on = not datasets.utils.are_progress_bars_disabled()
    datasets.utils.disable_progress_bars()
    try:
        with tempfile.TemporaryDirectory(prefix="dsv4-sft-parquet-") as cache:
            table = datasets.Dataset.from_parquet(str(path), cache_dir=cache, keep_in_memory=True)
    except Exception as err:  # datasets wraps arrow's errors in several types; the file is unreadable either way
        raise SFTDataError(f"{path}: not a readable parquet file ({type(err).__name__}: {err})") from None
    finally:
        if bars_were_on:
            datasets.utils.enable_progress_bars()
    for row, record in enumerate(table):
        yield row, _drop_nulls(record), None


def _records_of(path: Path) -> tuple[Iterator[tuple[int, Any, str | None]], Literal["line", "row"]]:
    if path.suffix in (".jsonl", ".json"):
        return _jsonl_records(path), "line"
    if path.suffix == ".parquet":
        return _parquet_records(path), "row"
    raise SFTDataError(f"{path}: unknown file type {path.suffix!r}; SFT records are .jsonl (.json lines) or .parquet")


def read_sft_records(
    paths: str | Path | Sequence[str | Path], on_bad_record: OnBadRecord = "skip"
) -> tuple[list[SFTSample], BadRecordReport]:
    """Validated samples of every record in `paths` (in file order), and the report of the bad ones.

    `on_bad_record="skip"` counts a bad record and goes on; "error" raises SFTDataError at the first one, naming
    file, line (or row) and problem. A missing or empty file, or a file with no good record, is always an error.

    jsonl is read line by line with `json`, not through `datasets`: `datasets` (arrow's JSON reader) fails the whole
    file at its first line that is not JSON, so none of the file's other records could be read or counted. Parquet
    goes through `datasets` (into a temporary cache, so nothing is written under the user's home; it reads local
    files without the network; both tested). A parquet column is one struct type for all rows, so a key that any
    message has appears in every message as null: nulls are dropped from objects before validation. For the chat
    layer that is the same record (it reads a null like an absent key), except that a JSON null inside a tool's
    parameter schema or an argument object does not survive parquet (arguments given as the OpenAI JSON string do),
    and an unknown key is only reported on rows where it is not null.
    """
    if on_bad_record not in ("skip", "error"):
        raise ValueError(f"on_bad_record must be 'skip' or 'error', got {on_bad_record!r}")
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not paths:
        raise SFTDataError("no SFT data files given")
    samples: list[SFTSample] = []
    report = BadRecordReport()
    for path in map(Path, paths):
        if not path.is_file():
            hint = " (it is a directory; pass its files)" if path.is_dir() else ""
            raise SFTDataError(f"{path}: no such file{hint}")
        records, unit = _records_of(path)
        seen = good = 0
        for index, record, problem in records:
            seen += 1
            if problem is None:
                try:
                    samples.append(sample_from_record(record, f"{path} {unit} {index}"))
                    good += 1
                    continue
                except ChatFormatError as err:
                    problem = str(err)
            if on_bad_record == "error":
                raise SFTDataError(
                    f"{path} {unit} {index}: {problem}; fix the record or skip bad records (on_bad_record='skip')"
                )
            report.add(BadRecord(str(path), index, unit, problem))
        report.n_records += seen
        if seen == 0:
            raise SFTDataError(f"{path}: empty, no records")
        if good == 0:
            raise SFTDataError(f"{path}: none of its {seen} records is usable ({report})")
    return samples, report


# ----------------------------------------------------------------------------------------------------------------
# Tokenizing with target masks
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class TokenizedSample:
    """`ids` int64 [L]; `target_mask` bool [L]: token j was generated by the assistant (so the label at j-1)."""

    ids: np.ndarray
    target_mask: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def n_targets(self) -> int:
        """Targets that are labels: the first token has no position before it to predict it."""
        return int(self.target_mask[1:].sum())


def tokenize_sample(
    conversation: Conversation, mode: Mode, tokenizer, eos_id: int, name: str = "sample"
) -> TokenizedSample:
    """Token ids of the rendered conversation (no generation prompt) and which of them are targets.

    `tokenizer` is a `tokenizers.Tokenizer` whose special strings (chat.SPECIAL_STRINGS) are special tokens. A token
    is a target iff its characters (from the tokenizer's offsets) lie inside an assistant span. Spans begin right
    after a special token and end with EOS, so no token can straddle a span edge; one that does means the tokenizer
    does not treat the special strings as single tokens, and raises (naming `name`), as does a span that does not
    end with `eos_id` (so a conversation that ends with an assistant turn ends with EOS; one that ends with a user
    turn keeps it as context without targets).
    """
    rendered = render_with_spans(conversation, mode, add_generation_prompt=False)
    encoding = tokenizer.encode(rendered.text, add_special_tokens=False)
    ids = np.asarray(encoding.ids, dtype=np.int64)
    offsets = np.asarray(encoding.offsets, dtype=np.int64).reshape(-1, 2)
    start, end = offsets[:, 0], offsets[:, 1]
    target = np.zeros(len(ids), dtype=bool)
    for span in rendered.assistant_spans:
        inside = (start >= span.start) & (end <= span.end)
        overlaps = (start < span.end) & (end > span.start)
        straddling = np.flatnonzero(overlaps & ~inside)
        if len(straddling):
            j = int(straddling[0])
            raise SFTDataError(
                f"{name}: token {j} (characters {start[j]}..{end[j]}, {rendered.text[start[j] : end[j]]!r}) straddles "
                f"the edge of assistant span {span.start}..{span.end}; the tokenizer must hold the chat special "
                "strings as special tokens (dsv4train.data.tokenizer reserves them)"
            )
        last = np.flatnonzero(inside)
        if not len(last) or ids[last[-1]] != eos_id:
            raise SFTDataError(
                f"{name}: assistant span {span.start}..{span.end} does not end with token {eos_id} (EOS); the "
                "tokenizer must encode EOS as that single special token"
            )
        target |= inside
    return TokenizedSample(ids=ids, target_mask=target)


def tokenize_samples(samples: Sequence[SFTSample], tokenizer, eos_id: int) -> list[TokenizedSample]:
    return [tokenize_sample(s.conversation, s.mode, tokenizer, eos_id, name=s.source) for s in samples]


# ----------------------------------------------------------------------------------------------------------------
# Samples longer than a row
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TooLongReport:
    """`too_long` = `truncated` + `dropped`: with "drop" every long sample is dropped; with "truncate" only those
    whose first seq_len tokens hold no target."""

    seq_len: int
    policy: TooLong
    samples: int
    too_long: int
    truncated: int
    dropped: int
    tokens_cut: int  # tokens of long samples not trained on (the cut tails, and whole dropped samples)

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def fit_to_length(
    samples: Sequence[TokenizedSample], seq_len: int, too_long: TooLong
) -> tuple[list[TokenizedSample], TooLongReport]:
    """Samples of at most seq_len tokens: longer ones dropped, or cut to their first seq_len tokens ("truncate",
    dropped if no target is left); the rest unchanged and in order."""
    if too_long not in ("drop", "truncate"):
        raise ValueError(f"too_long must be 'drop' or 'truncate', got {too_long!r}")
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2 (a label needs a token before it), got {seq_len}")
    kept: list[TokenizedSample] = []
    n_long = n_truncated = n_dropped = cut = 0
    for s in samples:
        if len(s) <= seq_len:
            kept.append(s)
            continue
        n_long += 1
        head = TokenizedSample(ids=s.ids[:seq_len], target_mask=s.target_mask[:seq_len])
        if too_long == "truncate" and head.n_targets > 0:
            kept.append(head)
            n_truncated += 1
            cut += len(s) - seq_len
        else:
            n_dropped += 1
            cut += len(s)
    report = TooLongReport(seq_len, too_long, len(samples), n_long, n_truncated, n_dropped, cut)
    return kept, report


# ----------------------------------------------------------------------------------------------------------------
# Packing
# ----------------------------------------------------------------------------------------------------------------


def pack_best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of item indices, each bin's lengths summing to at most `capacity` (best-fit decreasing).

    Items are placed longest first (equal lengths in index order); each goes to the open bin with the least room
    left that still holds it (equal room: the bin opened first), or opens a new bin. Bins are returned in the order
    they were opened, items in the order they were placed. Deterministic; O(n log n) searches. BFD uses at most
    11/9·OPT + 6/9 bins (Dósa 2007 for FFD; BFD has the same bound).
    """
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
    bad = [(i, n) for i, n in enumerate(lengths) if not 1 <= n <= capacity]
    if bad:
        i, n = bad[0]
        raise ValueError(f"item {i} has length {n}; every length must be in 1..capacity={capacity}")
    bins: list[list[int]] = []
    open_bins: list[tuple[int, int]] = []  # (room left, bin index), sorted: best fit = first with room >= length
    for i in sorted(range(len(lengths)), key=lambda k: (-lengths[k], k)):
        n = lengths[i]
        k = bisect_left(open_bins, (n, -1))
        if k == len(open_bins):
            room, b = capacity, len(bins)
            bins.append([])
        else:
            room, b = open_bins.pop(k)
        bins[b].append(i)
        if room - n > 0:
            insort(open_bins, (room - n, b))
    return bins


def packed_batch(
    samples: Sequence[TokenizedSample], bins: Sequence[Sequence[int]], seq_len: int, eos_id: int
) -> dict[str, torch.Tensor]:
    """One row per bin, its samples in bin order then EOS padding (module docstring for the tensors)."""
    shape = (len(bins), seq_len)
    input_ids = np.full(shape, eos_id, dtype=np.int64)
    next_ids = np.full(shape, eos_id, dtype=np.int64)
    positions = np.zeros(shape, dtype=np.int64)
    labels = np.full(shape, IGNORE, dtype=np.int64)
    mtp_labels = np.full(shape, IGNORE, dtype=np.int64)
    for r, members in enumerate(bins):
        o = 0
        for i in members:
            ids, target = samples[i].ids, samples[i].target_mask
            n = len(ids)
            if o + n > seq_len:
                raise ValueError(f"bin {r} holds {sum(len(samples[j]) for j in members)} tokens, more than {seq_len}")
            input_ids[r, o : o + n] = ids
            positions[r, o : o + n] = np.arange(n)
            labels[r, o : o + n - 1] = np.where(target[1:], ids[1:], IGNORE)
            next_ids[r, o : o + n - 1] = ids[1:]
            next_ids[r, o + n - 1] = ids[-1]
            mtp_labels[r, o : o + n - 2] = np.where(target[2:], ids[2:], IGNORE)
            o += n
        positions[r, o:] = np.arange(seq_len - o)  # the padding is a document of its own
    arrays = {
        "input_ids": input_ids,
        "positions": positions,
        "labels": labels,
        "next_ids": next_ids,
        "mtp_labels": mtp_labels,
    }
    return {k: torch.from_numpy(v) for k, v in arrays.items()}


class SFTBatches:
    """Micro-batches of `rows_per_batch` packed rows, forever, in a seeded order; resumable.

    The samples are packed once (best-fit decreasing over all of them: the fewest rows), and each epoch visits every
    row once in a permutation seeded by (seed, epoch). Re-packing each epoch would buy nothing: attention and
    positions are per document and the loss is a token sum, so which samples share a row does not change the
    gradient; only which rows make a batch does, and that is shuffled. A batch takes the next rows of the stream and
    runs on into the next epoch, so every batch is full. `state_dict()` is a few integers (the data's size and seed
    too, to refuse resuming on other data).
    """

    def __init__(
        self, samples: Sequence[TokenizedSample], seq_len: int, rows_per_batch: int, eos_id: int, seed: int = 0
    ):
        if rows_per_batch < 1:
            raise ValueError(f"rows_per_batch must be >= 1, got {rows_per_batch}")
        if not samples:
            raise SFTDataError("no SFT samples to pack (all dropped or none read)")
        lengths = [len(s) for s in samples]
        longest = max(lengths)
        if longest > seq_len:
            raise ValueError(f"a sample has {longest} tokens, more than seq_len={seq_len}; apply fit_to_length first")
        self.samples, self.seq_len, self.eos_id = samples, seq_len, eos_id
        self.rows_per_batch, self.seed = rows_per_batch, seed
        self.bins = pack_best_fit_decreasing(lengths, seq_len)
        self.n_tokens = sum(lengths)
        self.n_targets = sum(s.n_targets for s in samples)
        self.epoch, self.row = 0, 0
        self._orders: dict[int, np.ndarray] = {}

    @property
    def n_rows(self) -> int:
        return len(self.bins)

    @property
    def fill(self) -> float:
        """Share of row positions holding sample tokens (the rest is padding)."""
        return self.n_tokens / (self.n_rows * self.seq_len)

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            if len(self._orders) > 2:
                self._orders.clear()
            self._orders[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n_rows)
        return self._orders[epoch]

    def next_rows(self) -> list[int]:
        """Indices into `bins` of the next micro-batch; advances the stream."""
        picks = []
        for _ in range(self.rows_per_batch):
            picks.append(int(self._order(self.epoch)[self.row]))
            self.row += 1
            if self.row == self.n_rows:
                self.epoch, self.row = self.epoch + 1, 0
        return picks

    def next_batch(self) -> dict[str, torch.Tensor]:
        bins = [self.bins[i] for i in self.next_rows()]
        return packed_batch(self.samples, bins, self.seq_len, self.eos_id)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "row": self.row, "seed": self.seed, "rows": self.n_rows, "tokens": self.n_tokens}

    def load_state_dict(self, state: dict[str, int]) -> None:
        saved = (int(state["seed"]), int(state["rows"]), int(state["tokens"]))
        if saved != (self.seed, self.n_rows, self.n_tokens):
            raise SFTDataError(
                f"the saved SFT stream had seed {saved[0]}, {saved[1]} rows and {saved[2]} tokens, this one seed "
                f"{self.seed}, {self.n_rows} rows and {self.n_tokens} tokens; resume with the same data, "
                "tokenizer, seq_len and seed"
            )
        if not 0 <= int(state["row"]) < self.n_rows or int(state["epoch"]) < 0:
            raise SFTDataError(f"bad SFT stream state {state}: row must be in 0..{self.n_rows - 1}, epoch >= 0")
        self.epoch, self.row = int(state["epoch"]), int(state["row"])
