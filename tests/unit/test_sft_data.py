"""SFT data (dsv4train/data/sft.py): reading records, target masks, too-long samples, BFD packing, packed rows, the
resumable batch stream.

Expected values are written by hand (line numbers, target strings, the tensors of a hand-built packing, a hand-traced
BFD) or come from references written here (a brute-force optimal packing, a plain-loop best fit).
"""

import itertools
import json
import os
import random
import re
import socket

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dsv4train.data import chat
from dsv4train.data.chat import Conversation, Message, ToolCall, ToolDefinition
from dsv4train.data.sft import (
    SFTBatches,
    SFTDataError,
    TokenizedSample,
    fit_to_length,
    pack_best_fit_decreasing,
    packed_batch,
    read_sft_records,
    tokenize_sample,
    tokenize_samples,
)
from dsv4train.data.tasks import code as code_task, math as math_task
from dsv4train.data.tokenizer import train_tokenizer

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
U = "<｜User｜>"
A = "<｜Assistant｜>"
X = -100  # IGNORE, written out so the expected tensors below read as hand-written

# ---------------------------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------------------------

Q = {"role": "user", "content": "q"}
ANS = {"role": "assistant", "content": "a"}


def rec(*messages, **extra):
    return {"messages": list(messages), "domain": "math", "mode": "chat", **extra}


GOOD = rec(Q, ANS)
# (line text, the problem the report must name); the file below interleaves them with good lines
BAD_LINES = [
    (json.dumps(rec({"role": "wizard", "content": "q"}, ANS)), "unknown role 'wizard'"),
    (json.dumps(rec(ANS, Q)), "assistant turn must follow a user turn"),
    (json.dumps(rec(Q, {"role": "assistant", "content": ""})), "empty assistant turn"),
    (json.dumps(rec(Q, ANS, id=7)), r"unknown keys \['id'\]"),
    (json.dumps(rec(Q, ANS, mode="thinking")), "mode 'thinking'"),
    ('{"messages": [', "not JSON"),
    (json.dumps({"domain": "math", "mode": "chat"}), 'no "messages"'),
    (json.dumps(rec(Q)), "no assistant turn"),
    (json.dumps({"messages": [Q, ANS], "mode": "chat"}), "domain None"),
]


def write_jsonl(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def mixed_jsonl(tmp_path):
    """Good line 1, then bad, good, bad, ... with a blank line after line 2 (blank lines still count as lines)."""
    lines = [json.dumps(GOOD)]
    for bad, _ in BAD_LINES:
        lines += [bad, json.dumps(GOOD)]
    lines.insert(2, "")
    return write_jsonl(tmp_path / "mixed.jsonl", lines)


# bad record k (0-based) sits on line 2 (k = 0) or 2k + 3 (k >= 1): line 3 is blank, then bad/good alternate
BAD_LINE_NUMBERS = [2] + [2 * k + 3 for k in range(1, len(BAD_LINES))]


def test_skip_counts_every_bad_record_and_keeps_the_first_five(tmp_path):
    path = mixed_jsonl(tmp_path)
    samples, report = read_sft_records(path, on_bad_record="skip")
    assert len(samples) == len(BAD_LINES) + 1
    assert (report.n_records, report.n_bad) == (2 * len(BAD_LINES) + 1, len(BAD_LINES))
    assert [b.index for b in report.first] == BAD_LINE_NUMBERS[:5]
    for bad, (_, problem) in zip(report.first, BAD_LINES):
        assert bad.path == str(path) and bad.unit == "line"
        assert re.search(problem, bad.error), (bad, problem)
    assert [s.source for s in samples[:3]] == [f"{path} line 1", f"{path} line 4", f"{path} line 6"]
    assert str(report).startswith(f"{len(BAD_LINES)} of {2 * len(BAD_LINES) + 1} records skipped; {path} line 2:")


@pytest.mark.parametrize("k", range(len(BAD_LINES)))
def test_each_kind_of_bad_record_raises_with_file_line_and_problem(tmp_path, k):
    bad, problem = BAD_LINES[k]
    path = write_jsonl(tmp_path / "one.jsonl", [json.dumps(GOOD), json.dumps(GOOD), bad])
    with pytest.raises(SFTDataError, match=rf"one\.jsonl line 3: .*{problem}"):
        read_sft_records(path, on_bad_record="error")
    samples, report = read_sft_records(path, on_bad_record="skip")
    assert (len(samples), report.n_bad, report.first[0].index) == (2, 1, 3)


def test_missing_empty_and_all_bad_files_are_errors(tmp_path):
    with pytest.raises(SFTDataError, match="nope.jsonl: no such file"):
        read_sft_records(tmp_path / "nope.jsonl")
    with pytest.raises(SFTDataError, match="is a directory"):
        read_sft_records(tmp_path)
    empty = write_jsonl(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(SFTDataError, match="empty.jsonl: empty"):
        read_sft_records(empty)
    bad = write_jsonl(tmp_path / "bad.jsonl", [BAD_LINES[0][0], BAD_LINES[1][0]])
    with pytest.raises(SFTDataError, match="bad.jsonl: none of its 2 records is usable"):
        read_sft_records(bad)
    with pytest.raises(SFTDataError, match="unknown file type '.csv'"):
        (tmp_path / "x.csv").write_text("a\n")
        read_sft_records(tmp_path / "x.csv")
    with pytest.raises(SFTDataError, match="no SFT data files"):
        read_sft_records([])
    raw = tmp_path / "latin1.jsonl"
    raw.write_bytes(json.dumps(GOOD).encode() + b"\n\xff\xfe\n")
    with pytest.raises(SFTDataError, match="latin1.jsonl line 2: not UTF-8"):
        read_sft_records(raw, on_bad_record="error")


TOOL_RECORD = {
    "messages": [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": None,  # OpenAI writes null content on a pure tool-call turn
            "reasoning_content": "need tool",
            "tool_calls": [{"id": "a", "type": "function", "function": {"name": "ping", "arguments": '{"n": null}'}}],
        },
        {"role": "tool", "content": "pong", "tool_call_id": "a"},
        {"role": "assistant", "content": "It pongs."},
    ],
    "tools": [{"type": "function", "function": {"name": "ping", "description": "Ping"}}],
    "domain": "agent",
    "mode": "think",
}
PLAIN_RECORD = {
    "messages": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2", "reasoning": "add"}],
    "domain": "math",
    "mode": "think_max",
}
PARQUET_BAD = dict(PLAIN_RECORD, mode="fast")


def test_parquet_gives_the_same_samples_as_jsonl_and_reports_rows(tmp_path):
    records = [TOOL_RECORD, PARQUET_BAD, PLAIN_RECORD]
    # one struct type for all messages: every message gets every key, null where it has none
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "r.parquet")
    write_jsonl(tmp_path / "r.jsonl", [json.dumps(r) for r in records])

    from_parquet, parquet_report = read_sft_records(tmp_path / "r.parquet")
    from_jsonl, jsonl_report = read_sft_records(tmp_path / "r.jsonl")
    assert [s.conversation for s in from_parquet] == [s.conversation for s in from_jsonl]
    assert [(s.mode, s.domain) for s in from_parquet] == [("think", "agent"), ("think_max", "math")]
    assert from_parquet[0].conversation.messages[2].tool_calls[0].arguments == {"n": None}
    assert [(b.unit, b.index) for b in parquet_report.first] == [("row", 1)]  # rows count from 0
    assert [(b.unit, b.index) for b in jsonl_report.first] == [("line", 2)]  # lines count from 1
    assert "mode 'fast'" in parquet_report.first[0].error
    with pytest.raises(SFTDataError, match=r"r\.parquet row 1: .*mode 'fast'"):
        read_sft_records(tmp_path / "r.parquet", on_bad_record="error")
    both, report = read_sft_records([tmp_path / "r.jsonl", tmp_path / "r.parquet"])
    assert (len(both), report.n_records, report.n_bad) == (4, 6, 2)


def test_parquet_reading_needs_no_network_and_writes_nothing_under_home(tmp_path, monkeypatch):
    import datasets

    pq.write_table(pa.Table.from_pylist([PLAIN_RECORD]), tmp_path / "r.parquet")

    def no_network(*args, **kwargs):
        raise AssertionError("SFT data reading tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    home_cache = datasets.config.HF_DATASETS_CACHE

    def listing():
        return sorted(os.listdir(home_cache)) if os.path.isdir(home_cache) else []

    before = listing()
    samples, _ = read_sft_records(tmp_path / "r.parquet")
    assert len(samples) == 1 and listing() == before


def test_unreadable_parquet_names_the_file(tmp_path):
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(SFTDataError, match="broken.parquet: not a readable parquet file"):
        read_sft_records(tmp_path / "broken.parquet")


# ---------------------------------------------------------------------------------------------------------------
# Tokenizing with target masks
# ---------------------------------------------------------------------------------------------------------------


def math_and_code_records(n_math=40, n_code=22):
    math_samples = math_task.make_split("train", n_math, seed=3)
    code_samples = [s for s in code_task.make_split("train", n_code, seed=3) if s.reference_solution]
    out = [math_task.to_record(s, mode) for s in math_samples for mode in ("think", "chat")]
    out += [code_task.to_chat_record(s, mode) for s in code_samples for mode in ("think", "chat")]
    return out


@pytest.fixture(scope="module")
def tok():
    """A byte-level BPE of 512 tokens trained on rendered task conversations. If `train_tokenizer` does not yet
    reserve the chat special strings, they are added here as special tokens (ids past the BPE vocabulary)."""
    docs = [chat.render(Conversation.from_dict(r, ("domain", "mode")), r["mode"]) for r in math_and_code_records()]
    tokenizer = train_tokenizer(docs[:300], 512)
    missing = [s for s in chat.SPECIAL_STRINGS if tokenizer.token_to_id(s) is None]
    if missing:
        tokenizer.add_special_tokens(missing)
    return tokenizer


def eos(tok):
    return tok.token_to_id(EOS)


def runs(ids, mask, tok, value=True):
    """The decoded text of each maximal run of tokens whose mask is `value`."""
    out, current = [], []
    for i, m in zip(ids.tolist(), mask.tolist()):
        if m == value:
            current.append(i)
        elif current:
            out.append(tok.decode(current, skip_special_tokens=False))
            current = []
    if current:
        out.append(tok.decode(current, skip_special_tokens=False))
    return out


def test_target_mask_of_a_multi_turn_thinking_conversation(tok):
    c = Conversation(
        (
            Message("user", "q1"),
            Message("assistant", "a1", "r1"),
            Message("user", "q2"),
            Message("assistant", "a2", "r2"),
        )
    )
    s = tokenize_sample(c, "think", tok, eos(tok))
    # think mode without tools: the earlier turn's reasoning is dropped, the last turn opens with <think>
    assert runs(s.ids, s.target_mask, tok) == ["a1" + EOS, "r2</think>a2" + EOS]
    assert runs(s.ids, s.target_mask, tok, value=False) == [BOS + U + "q1" + A + "</think>", U + "q2" + A + "<think>"]
    starts = np.flatnonzero(np.diff(s.target_mask.astype(int)) == 1) + 1
    assert [tok.id_to_token(int(s.ids[j - 1])) for j in starts] == ["</think>", "<think>"]
    assert s.ids[-1] == eos(tok) and s.ids[0] == tok.token_to_id(BOS)
    # n_targets counts the labels: "a1"+EOS and "r2</think>a2"+EOS tokens
    assert s.n_targets == int(s.target_mask.sum())


def test_target_mask_with_tool_calls_and_results_in_chat_mode(tok):
    c = Conversation.from_dict(TOOL_RECORD, ("domain", "mode"))
    s = tokenize_sample(c, "chat", tok, eos(tok))
    calls = '\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="ping">\n<｜DSML｜parameter name="n" string="false">null'
    calls += "</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>"
    assert runs(s.ids, s.target_mask, tok) == [calls + EOS, "It pongs." + EOS]
    prompt_tail = U + "<tool_result>pong</tool_result>" + A + "</think>"
    assert runs(s.ids, s.target_mask, tok, value=False)[1] == prompt_tail


CHAT_CASES = {
    "tools_interleaved": Conversation(
        (
            Message("system", "S"),
            Message("user", "Wetter in Zürich?"),
            Message(
                "assistant",
                "Checking.",
                "need tool",
                (ToolCall("weather", {"city": "Zürich", "days": 2}, id="a"), ToolCall("ping", {}, id="b")),
            ),
            Message("tool", "pong", tool_call_id="b"),
            Message("tool", "5°C 🌧", tool_call_id="a"),
            Message("assistant", "5°C and pong.", "got it"),
            Message("user", "thanks"),
            Message("assistant", "You're welcome."),
        ),
        (ToolDefinition("weather", "Weather for a city", {"type": "object"}), ToolDefinition("ping")),
    ),
    "calls_without_tools": Conversation(
        (
            Message("user", "q"),
            Message("assistant", tool_calls=(ToolCall("ping", {"n": [1, {"x": None}], "s": "a\nb"}),)),
        )
    ),
    "reminder": Conversation(
        (
            Message("system", "S"),
            Message("latest_reminder", "today"),
            Message("user", "q"),
            Message("assistant", "a", "r"),
        )
    ),
    "reasoning_only": Conversation((Message("user", "q"), Message("assistant", reasoning="thinking only"))),
}


def test_spans_fall_on_token_boundaries_on_many_conversations(tok):
    cases = [(Conversation.from_dict(r, ("domain", "mode")), r["mode"]) for r in math_and_code_records()]
    cases += [(c, mode) for c in CHAT_CASES.values() for mode in chat.MODES]
    for c, mode in cases:
        s = tokenize_sample(c, mode, tok, eos(tok))
        rendered = chat.render_with_spans(c, mode, add_generation_prompt=False)
        assert tok.decode(s.ids.tolist(), skip_special_tokens=False) == rendered.text
        # each span is one run of targets, and spans that touch (none here: a user turn separates them) would merge
        assert runs(s.ids, s.target_mask, tok) == [rendered.text[sp.start : sp.end] for sp in rendered.assistant_spans]
        assert s.ids[-1] == eos(tok) and s.n_targets > 0


def test_a_conversation_ending_on_a_user_turn_has_no_targets_after_its_last_answer(tok):
    c = Conversation((Message("user", "q1"), Message("assistant", "a1"), Message("user", "q2")))
    s = tokenize_sample(c, "chat", tok, eos(tok))
    assert runs(s.ids, s.target_mask, tok) == ["a1" + EOS]
    assert tok.decode(s.ids[s.ids.tolist().index(eos(tok)) + 1 :].tolist(), skip_special_tokens=False) == U + "q2"


class ChunkTokenizer:
    """Every 2 characters one token: tokens straddle the assistant span edges (the span of the conversation below
    starts at character 51)."""

    class Encoding:
        def __init__(self, text):
            self.offsets = [(i, min(i + 2, len(text))) for i in range(0, len(text), 2)]
            self.ids = [9] * len(self.offsets)

    def encode(self, text, add_special_tokens=False):
        return self.Encoding(text)


def test_a_token_straddling_a_span_edge_raises_naming_the_sample(tok):
    c = Conversation((Message("user", "q"), Message("assistant", "hello")))
    with pytest.raises(SFTDataError, match=r"data\.jsonl line 4: token \d+ .* straddles the edge of assistant span"):
        tokenize_sample(c, "chat", ChunkTokenizer(), 1, name="data.jsonl line 4")
    with pytest.raises(SFTDataError, match="does not end with token 2 .EOS."):
        tokenize_sample(c, "chat", tok, 2)


def test_tokenize_samples_names_each_sample(tmp_path, tok):
    path = write_jsonl(tmp_path / "r.jsonl", [json.dumps(TOOL_RECORD), json.dumps(PLAIN_RECORD)])
    samples, _ = read_sft_records(path)
    tokenized = tokenize_samples(samples, tok, eos(tok))
    # think mode with tools: every answer opens with <think>, so one without reasoning starts with </think>
    last_answers = [runs(t.ids, t.target_mask, tok)[-1] for t in tokenized]
    assert last_answers == ["</think>It pongs." + EOS, "add</think>2" + EOS]
    with pytest.raises(SFTDataError, match=r"r\.jsonl line 1: token"):
        tokenize_samples(samples, ChunkTokenizer(), 1)


# ---------------------------------------------------------------------------------------------------------------
# Too long: drop or truncate, always counted
# ---------------------------------------------------------------------------------------------------------------


def sample(ids, targets):
    """A TokenizedSample from ids and the positions of its target tokens."""
    mask = np.zeros(len(ids), dtype=bool)
    mask[list(targets)] = True
    return TokenizedSample(np.asarray(ids, dtype=np.int64), mask)


def test_too_long_drop_and_truncate_are_counted():
    short = sample([10, 11, 12], [2])
    long_early_target = sample([20, 21, 22, 23, 24, 25], [2, 5])  # keeps target 2 when cut to 5
    long_late_target = sample([30, 31, 32, 33, 34, 35, 36], [6])  # no target in its first 5 tokens
    target_only_at_0 = sample([40, 41, 42, 43, 44, 45], [0])  # token 0 is never a label
    exact = sample([50, 51, 52, 53, 54], [4])
    data = [short, long_early_target, long_late_target, target_only_at_0, exact]

    kept, report = fit_to_length(data, 5, "drop")
    assert [k.ids.tolist() for k in kept] == [[10, 11, 12], [50, 51, 52, 53, 54]]
    assert (report.samples, report.too_long, report.truncated, report.dropped) == (5, 3, 0, 3)
    assert report.tokens_cut == 6 + 7 + 6

    kept, report = fit_to_length(data, 5, "truncate")
    assert [k.ids.tolist() for k in kept] == [[10, 11, 12], [20, 21, 22, 23, 24], [50, 51, 52, 53, 54]]
    assert kept[1].target_mask.tolist() == [False, False, True, False, False]
    assert (report.samples, report.too_long, report.truncated, report.dropped) == (5, 3, 1, 2)
    assert report.tokens_cut == 1 + 7 + 6
    assert report.to_dict()["policy"] == "truncate"
    with pytest.raises(ValueError, match="too_long must be"):
        fit_to_length(data, 5, "cut")


# ---------------------------------------------------------------------------------------------------------------
# Best-fit decreasing
# ---------------------------------------------------------------------------------------------------------------


def test_bfd_on_a_hand_traced_example():
    # capacity 10; placed longest first, equal lengths by index: 8(i4) 6(i1) 5(i5) 4(i0) 4(i2) 4(i3) 1(i6)
    #   8 -> new bin 0 (room 2); 6 -> new bin 1 (room 4); 5 -> new bin 2 (room 5)
    #   4(i0) fits bins 1 (room 4) and 2 (room 5): the tighter, bin 1 (room 0)
    #   4(i2) -> bin 2 (room 1); 4(i3) fits nowhere -> new bin 3 (room 6)
    #   1(i6) fits bins 0 (room 2), 2 (room 1), 3 (room 6): the tighter, bin 2
    # (first fit would put i6 in bin 0, worst fit in bin 3 and i0 in bin 2)
    assert pack_best_fit_decreasing([4, 6, 4, 4, 8, 5, 1], 10) == [[4], [1, 0], [5, 2, 6], [3]]
    # equal room: the bin opened first; equal lengths: index order
    assert pack_best_fit_decreasing([3, 3, 3, 3], 6) == [[0, 1], [2, 3]]
    assert pack_best_fit_decreasing([2, 5, 5, 2], 7) == [[1, 0], [2, 3]]
    assert pack_best_fit_decreasing([], 4) == []
    with pytest.raises(ValueError, match="item 1 has length 5"):
        pack_best_fit_decreasing([1, 5], 4)
    with pytest.raises(ValueError, match="item 0 has length 0"):
        pack_best_fit_decreasing([0], 4)


def optimal_bins(lengths, capacity):
    """The fewest bins, by exhaustive search (items longest first into each distinct room, or a new bin)."""
    items = sorted(lengths, reverse=True)
    best = len(items)

    def place(k, rooms):
        nonlocal best
        if len(rooms) >= best:
            return
        if k == len(items):
            best = len(rooms)
            return
        tried = set()
        for b, room in enumerate(rooms):
            if room >= items[k] and room not in tried:
                tried.add(room)
                place(k + 1, rooms[:b] + [room - items[k]] + rooms[b + 1 :])
        place(k + 1, rooms + [capacity - items[k]])

    place(0, [])
    return best


def best_fit_by_scanning(lengths, capacity):
    """A plain O(n·bins) best-fit decreasing with the documented tie-breaks."""
    bins, rooms = [], []
    for i in sorted(range(len(lengths)), key=lambda k: (-lengths[k], k)):
        fits = [b for b in range(len(bins)) if rooms[b] >= lengths[i]]
        if fits:
            b = min(fits, key=lambda b: (rooms[b], b))
        else:
            b = len(bins)
            bins.append([])
            rooms.append(capacity)
        bins[b].append(i)
        rooms[b] -= lengths[i]
    return bins


def test_bfd_against_brute_force_optimum_and_a_scanning_reference():
    rng = random.Random(0)
    worse_than_optimal = 0
    for _ in range(300):
        capacity = rng.randint(6, 16)
        lengths = [rng.randint(1, capacity) for _ in range(rng.randint(1, 9))]
        bins = pack_best_fit_decreasing(lengths, capacity)
        assert sorted(itertools.chain(*bins)) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in b) <= capacity for b in bins)
        opt = optimal_bins(lengths, capacity)
        assert opt <= len(bins) <= 11 / 9 * opt + 6 / 9
        worse_than_optimal += len(bins) > opt
        assert bins == best_fit_by_scanning(lengths, capacity)
    for _ in range(20):  # larger inputs: many equal rooms and lengths exercise the tie-breaks
        lengths = [rng.randint(1, 30) for _ in range(200)]
        assert pack_best_fit_decreasing(lengths, 32) == best_fit_by_scanning(lengths, 32)
    assert worse_than_optimal < 30  # the bound is loose; BFD is optimal on most small inputs


# ---------------------------------------------------------------------------------------------------------------
# Packed rows
# ---------------------------------------------------------------------------------------------------------------

PAD = 1  # the eos id used as padding in the hand-built batch


def test_packed_rows_on_a_hand_built_packing():
    a = sample([10, 11, 12, 13], [2, 3])
    b = sample([20, 21, 22], [0, 1, 2])  # a target on a first token is never a label (nothing precedes it)
    c = sample([30, 31, 32, 33, 34], [2, 4])
    batch = packed_batch([a, b, c], [[2, 1], [0]], seq_len=8, eos_id=PAD)
    # row 0: c then b; row 1: a then 4 tokens of EOS padding (a document of its own, no targets)
    expected = {
        "input_ids": [[30, 31, 32, 33, 34, 20, 21, 22], [10, 11, 12, 13, 1, 1, 1, 1]],
        "positions": [[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 3, 0, 1, 2, 3]],
        "labels": [[X, 32, X, 34, X, 21, 22, X], [X, 12, 13, X, X, X, X, X]],
        "next_ids": [[31, 32, 33, 34, 34, 21, 22, 22], [11, 12, 13, 13, 1, 1, 1, 1]],
        "mtp_labels": [[32, X, 34, X, X, 22, X, X], [12, 13, X, X, X, X, X, X]],
    }
    assert set(batch) == set(expected)
    for key, rows in expected.items():
        assert batch[key].dtype == torch.int64, key
        assert batch[key].tolist() == rows, key
    with pytest.raises(ValueError, match="bin 0 holds 9 tokens, more than 8"):
        packed_batch([a, c], [[0, 1]], seq_len=8, eos_id=PAD)


def test_each_document_of_a_packed_row_has_the_labels_it_has_alone(tok):
    records = math_and_code_records(12, 6)
    conversations = [(Conversation.from_dict(r, ("domain", "mode")), r["mode"]) for r in records]
    samples = [tokenize_sample(c, mode, tok, eos(tok)) for c, mode in conversations]
    seq_len = max(len(s) for s in samples) + 40
    bins = pack_best_fit_decreasing([len(s) for s in samples], seq_len)
    assert len(bins) < len(samples)  # several samples share rows
    batch = packed_batch(samples, bins, seq_len, eos(tok))
    assert int((batch["labels"] != X).sum()) == sum(s.n_targets for s in samples)
    for r, members in enumerate(bins):
        o = 0
        for i in members:
            alone = packed_batch(samples, [[i]], len(samples[i]), eos(tok))
            for key in alone:
                assert batch[key][r, o : o + len(samples[i])].tolist() == alone[key][0].tolist(), key
            o += len(samples[i])


# ---------------------------------------------------------------------------------------------------------------
# The batch stream
# ---------------------------------------------------------------------------------------------------------------


def stream_samples(n=23, seed=0):
    rng = np.random.default_rng(seed)
    return [sample(rng.integers(10, 99, size=k), [k - 1]) for k in rng.integers(2, 12, size=n)]


def test_every_epoch_visits_every_row_once_in_a_seeded_order():
    stream = SFTBatches(stream_samples(), seq_len=16, rows_per_batch=1, eos_id=PAD, seed=5)
    n = stream.n_rows
    picks = [stream.next_rows()[0] for _ in range(3 * n)]
    epochs = [picks[k * n : (k + 1) * n] for k in range(3)]
    assert all(sorted(e) == list(range(n)) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    again = SFTBatches(stream_samples(), seq_len=16, rows_per_batch=1, eos_id=PAD, seed=5)
    assert [again.next_rows()[0] for _ in range(n)] == epochs[0]
    other = SFTBatches(stream_samples(), seq_len=16, rows_per_batch=1, eos_id=PAD, seed=6)
    assert [other.next_rows()[0] for _ in range(n)] != epochs[0]
    assert stream.fill == pytest.approx(stream.n_tokens / (n * 16))
    # batches of 3 rows take the same stream, running on into the next epoch: every batch is full
    threes = SFTBatches(stream_samples(), seq_len=16, rows_per_batch=3, eos_id=PAD, seed=5)
    assert n % 3 != 0
    assert list(itertools.chain(*(threes.next_rows() for _ in range(n)))) == picks
    assert threes.next_batch()["input_ids"].shape == (3, 16)


def test_resume_continues_exactly_across_an_epoch_boundary():
    def make():
        return SFTBatches(stream_samples(), seq_len=16, rows_per_batch=3, eos_id=PAD, seed=1)

    run = make()
    assert run.n_rows % 3 != 0  # batches straddle epochs
    for _ in range(run.n_rows // 3):
        run.next_batch()
    state = run.state_dict()
    assert all(isinstance(v, int) for v in state.values())
    expected = [run.next_batch() for _ in range(4)]
    assert run.epoch == 1

    resumed = make()
    resumed.load_state_dict(json.loads(json.dumps(state)))
    for want in expected:
        got = resumed.next_batch()
        assert all(torch.equal(got[k], want[k]) for k in want)

    other_data = SFTBatches(stream_samples(n=22), seq_len=16, rows_per_batch=3, eos_id=PAD, seed=1)
    with pytest.raises(SFTDataError, match="resume with the same data"):
        other_data.load_state_dict(state)
    with pytest.raises(SFTDataError, match="resume with the same data"):
        SFTBatches(stream_samples(), seq_len=16, rows_per_batch=3, eos_id=PAD, seed=2).load_state_dict(state)


def test_the_stream_refuses_samples_longer_than_a_row():
    with pytest.raises(ValueError, match="apply fit_to_length first"):
        SFTBatches([sample(range(10, 30), [19])], seq_len=16, rows_per_batch=1, eos_id=PAD)
    with pytest.raises(SFTDataError, match="no SFT samples"):
        SFTBatches([], seq_len=16, rows_per_batch=1, eos_id=PAD)
