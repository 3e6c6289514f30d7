"""The offline `math` domain (dsv4train/data/tasks/math.py): generator, splits, SFT records, verifier, GSM8K loader.

Expected values are written by hand, or recomputed from the prompt text by the small parser below (written for the
test, sharing no code with the generator), so a generator whose prompt and answer disagree fails.
"""

import ast
import json
import operator
import re
import time
import types
from fractions import Fraction

import pytest

from dsv4train.data.chat import Conversation, render
from dsv4train.data.tasks import math as math_task
from dsv4train.data.tasks.math import (
    DIFFICULTIES,
    Difficulty,
    MathDataError,
    MathSample,
    Step,
    canonical_key,
    load_gsm8k_jsonl,
    make_split,
    reasoning_lines,
    score,
    split_of,
    to_record,
)

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
U = "<｜User｜>"
A = "<｜Assistant｜>"
INSTRUCTION = "Give the final answer as \\boxed{N}, where N is a whole number or a fraction a/b in lowest terms."

# ---------------------------------------------------------------------------------------------------------------------
# An independent reading of the three prompt surfaces: (start, [(op, operand), ...]); "a bags of b" is ("bags", a, b).
# ---------------------------------------------------------------------------------------------------------------------

_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}
_AST_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}
_WORDS = {"add": "+", "subtract": "-", "multiply by": "*", "divide by": "/"}


def _read_expression(node):
    if isinstance(node, ast.Constant):
        return node.value, []
    start, ops = _read_expression(node.left)
    return start, ops + [(_AST_OPS[type(node.op)], node.right.value)]


def _read_prompt(prompt):
    """The arithmetic a prompt asks for, read from its words alone."""
    if prompt.startswith("Compute "):
        return _read_expression(ast.parse(prompt[len("Compute ") : -1], mode="eval").body)
    if prompt.startswith("Start with "):
        start, rest = re.fullmatch(r"Start with (\d+)\. (.*)\. What number do you get\?", prompt).groups()
        ops = []
        for phrase in rest.lower().split(", then "):
            word, k = re.fullmatch(r"(add|subtract|multiply by|divide by) (\d+)", phrase).groups()
            ops.append((_WORDS[word], int(k)))
        return int(start), ops
    start = int(re.match(r"\w+ has (\d+) \w+\.", prompt).group(1))
    ops = []
    for sentence in re.split(r"(?<=\.) ", prompt)[1:-1]:
        if m := re.search(r"buys (\d+) bags with (\d+)", sentence):
            ops.append(("bags", int(m.group(1)), int(m.group(2))))
        elif m := re.search(r"gets (\d+) more", sentence):
            ops.append(("+", int(m.group(1))))
        elif m := re.search(r"gives (\d+) ", sentence):
            ops.append(("-", int(m.group(1))))
        elif m := re.search(r"with (\d+) times as many", sentence):
            ops.append(("*", int(m.group(1))))
        elif m := re.search(r"into (\d+) equal piles and keeps one", sentence):
            ops.append(("/", int(m.group(1))))
        else:
            raise AssertionError(f"unknown sentence {sentence!r} in {prompt!r}")
    return start, ops


def _values(start, ops):
    values = [Fraction(start)]
    for op, *k in ops:
        values.append(values[-1] + k[0] * k[1] if op == "bags" else _OPS[op](values[-1], k[0]))
    return values


def _check_reasoning_line(line):
    """A reasoning line `a op b = c` is true arithmetic; returns c."""
    left, op, right, result = re.fullmatch(r"\(?(-?\d+(?:/\d+)?)\)? ([-+*/]) (\d+) = (-?\d+(?:/\d+)?)", line).groups()
    assert _OPS[op](Fraction(left), Fraction(right)) == Fraction(result), line
    return Fraction(result)


# ---------------------------------------------------------------------------------------------------------------------
# Generator
# ---------------------------------------------------------------------------------------------------------------------


def test_canonical_key_and_reasoning_of_a_hand_made_problem():
    steps = (Step("+", 5), Step("*", 3), Step("-", 4))
    assert canonical_key(7, steps) == "7+5*3-4"
    assert reasoning_lines(7, steps) == ("7 + 5 = 12", "12 * 3 = 36", "36 - 4 = 32")
    bags = (Step("+", 12, (3, 4)), Step("/", 4))
    assert canonical_key(8, bags) == "8+3x4/4"
    assert reasoning_lines(8, bags) == ("3 * 4 = 12", "8 + 12 = 20", "20 / 4 = 5")
    assert reasoning_lines(3, (Step("/", 2), Step("-", 4))) == ("3 / 2 = 3/2", "(3/2) - 4 = -5/2")


@pytest.mark.parametrize("difficulty", sorted(DIFFICULTIES))
def test_every_prompt_answer_and_reasoning_agree(difficulty):
    spec = DIFFICULTIES[difficulty]
    samples = make_split("train", 300, seed=3, difficulty=difficulty) + make_split("test", 100, 3, difficulty)
    surfaces = set()
    for sample in samples:
        surfaces.add(sample.prompt.split()[0] if sample.prompt.split()[0] in ("Compute", "Start") else "word")
        start, ops = _read_prompt(sample.prompt)
        values = _values(start, ops)
        assert Fraction(sample.answer) == values[-1], sample
        assert str(values[-1]) == sample.answer  # canonical form: lowest terms, no "+", no ".0"
        assert spec.num_ops[0] <= len(ops) <= spec.num_ops[1], sample
        assert {op for op, *_ in ops} <= set(spec.ops) | ({"bags"} if "*" in spec.ops else set()), sample
        assert all(abs(v) <= 999 and v.denominator <= 100 for v in values), sample
        if spec.exact_integers or sample.prompt.split()[1] == "has":
            assert all(v.denominator == 1 and v >= 0 for v in values), sample
        results = [_check_reasoning_line(line) for line in sample.reasoning_steps]
        assert results[-1] == values[-1] and set(values[1:]) <= set(results), sample
    assert surfaces == {"Compute", "Start", "word"}
    if not spec.exact_integers:
        assert any("/" in s.answer for s in samples) and any(s.answer.startswith("-") for s in samples)


def test_make_split_is_deterministic_and_seeded():
    assert make_split("train", 50, seed=1) == make_split("train", 50, seed=1)
    assert make_split("train", 50, seed=1) != make_split("train", 50, seed=2)
    assert make_split("train", 20, seed=1) == make_split("train", 50, seed=1)[:20]  # a prefix: n only truncates
    assert make_split("train", 0) == []


@pytest.mark.parametrize("difficulty", [1, 2])
def test_train_and_test_share_no_problem_for_large_n(difficulty):
    train = make_split("train", 4000, seed=0, difficulty=difficulty)
    test = make_split("test", 1000, seed=1, difficulty=difficulty)
    assert not {s.prompt for s in train} & {s.prompt for s in test}
    # Stronger: no arithmetic is shared either, whatever surface dresses it.
    train_math = {(start, tuple(ops)) for start, ops in map(_read_prompt, (s.prompt for s in train))}
    test_math = {(start, tuple(ops)) for start, ops in map(_read_prompt, (s.prompt for s in test))}
    assert not train_math & test_math
    assert len(test_math) == 1000  # distinct within a split
    assert len({s.id for s in train}) == 4000


def test_split_share_and_split_does_not_depend_on_caller():
    keys = [f"{a}+{b}*{c}" for a in range(2, 22) for b in range(2, 22) for c in range(2, 12)]
    share = sum(split_of(k) == "test" for k in keys) / len(keys)
    assert 0.18 < share < 0.22, share  # 4000 keys, binomial sd ~0.006 around TEST_SHARE = 0.2
    assert split_of("7+5*3-4") == split_of("7+5*3-4")


def test_make_split_bad_arguments_and_an_exhausted_space(monkeypatch):
    with pytest.raises(ValueError, match="split 'dev'"):
        make_split("dev", 5)
    with pytest.raises(ValueError, match="difficulty 7"):
        make_split("train", 5, difficulty=7)
    with pytest.raises(ValueError, match="n=-1"):
        make_split("train", -1)
    tiny = Difficulty(num_ops=(2, 2), max_operand=2, max_factor=0, ops=("+",), exact_integers=True)
    monkeypatch.setitem(DIFFICULTIES, 9, tiny)  # one problem only: 2 + 2 + 2
    only_split = split_of("2+2+2")
    assert [s.answer for s in make_split(only_split, 1, difficulty=9)] == ["6"]
    with pytest.raises(ValueError, match="found only 1 distinct .* 2 asked: ask for fewer"):
        make_split(only_split, 2, difficulty=9)


# ---------------------------------------------------------------------------------------------------------------------
# SFT records
# ---------------------------------------------------------------------------------------------------------------------


def test_records_render_exactly_in_both_modes():
    sample = MathSample(id="m", prompt="Compute 2 + 3.", answer="5", reasoning_steps=("2 + 3 = 5",))
    think, chat = to_record(sample, "think"), to_record(sample, "chat")
    assert set(think) == {"messages", "domain", "mode"} and think["domain"] == "math" and chat["mode"] == "chat"
    user = f"{U}Compute 2 + 3.\n{INSTRUCTION}{A}"
    rendered_think = render(Conversation.from_dict(think, ignore_keys=("domain", "mode")), mode="think")
    assert rendered_think == f"{BOS}{user}<think>2 + 3 = 5</think>The answer is \\boxed{{5}}{EOS}"
    rendered_chat = render(Conversation.from_dict(chat, ignore_keys=("domain", "mode")), mode="chat")
    assert rendered_chat == f"{BOS}{user}</think>The answer is \\boxed{{5}}{EOS}"
    assert "reasoning_content" not in chat["messages"][1]
    with pytest.raises(ValueError, match="mode 'think_max'"):
        to_record(sample, "think_max")


@pytest.mark.parametrize("difficulty", sorted(DIFFICULTIES))
def test_every_generated_record_validates_renders_and_scores_full(difficulty):
    for sample in make_split("test", 100, seed=5, difficulty=difficulty):
        for mode in ("think", "chat"):
            record = to_record(sample, mode)
            text = render(Conversation.from_dict(record, ignore_keys=("domain", "mode")), mode=mode)
            assert text.endswith(f"\\boxed{{{sample.answer}}}{EOS}")
            reply = record["messages"][1]
            assert score(reply["content"], sample.answer)[0] == 1.0
            if mode == "think":
                assert reply["reasoning_content"].split("\n") == list(sample.reasoning_steps)


# ---------------------------------------------------------------------------------------------------------------------
# Verifier
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def no_math_verify(monkeypatch):
    """Pin the exact-numeric path, whether or not math-verify happens to be installed."""
    monkeypatch.setattr(math_task, "_math_verify", lambda: None)


@pytest.mark.parametrize(
    ("completion", "answer", "reward", "reason"),
    [
        ("12 * 3 = 36, minus 4. The answer is \\boxed{32}", "32", 1.0, "correct (exact numeric)"),
        ("The answer is \\boxed{31}", "32", 0.0, "wrong (exact numeric): got '31' = 31, expected 32"),
        ("The answer is 32.", "32", 0.0, "no \\boxed{...} final answer"),
        ("Answer: 32", 32, 0.0, "no \\boxed{...} final answer"),
        ("first \\boxed{31}, no wait: \\boxed{32}", "32", 1.0, "correct"),  # the last marker counts
        ("first \\boxed{32}, no wait: \\boxed{31}", "32", 0.0, "wrong"),
        ("\\boxed{32} and then \\boxed{32", "32", 0.0, "malformed: the last \\boxed{ is never closed"),
        ("\\boxed{ }", "32", 0.0, "malformed: empty \\boxed{}"),
        ("\\boxed{thirty-two}", "32", 0.0, "wrong (exact numeric; math-verify is not installed)"),
        ("\\boxed{1,000}", 1000, 1.0, "correct"),
        ("\\boxed{1,00}", 100, 0.0, "wrong (exact numeric; math-verify is not installed)"),
        ("\\boxed{3.0}", "3", 1.0, "correct"),
        ("\\boxed{-0}", 0, 1.0, "correct"),
        ("\\boxed{+7}", 7, 1.0, "correct"),
        ("\\boxed{\u22125}", "-5", 1.0, "correct"),  # a Unicode minus sign
        ("\\boxed{$12$}", 12, 1.0, "correct"),
        ("\\boxed{6/8}", "3/4", 1.0, "correct"),
        ("\\boxed{0.75}", Fraction(3, 4), 1.0, "correct"),
        ("\\boxed{\\frac{3}{4}}", "3/4", 1.0, "correct"),
        ("\\boxed{-\\dfrac{7}{2}}", "-7/2", 1.0, "correct"),
        ("\\boxed{\\frac{-7}{2}}", "-7/2", 1.0, "correct"),
        ("\\boxed{0.3333}", "1/3", 0.0, "wrong"),  # exact, not rounded
        ("\\boxed{1/0}", 0, 0.0, "wrong (exact numeric; math-verify is not installed)"),
        ("\\boxed{32} apples", "31", 0.0, "wrong"),
        ("<think>maybe \\boxed{31}</think>So \\boxed{32}", "32", 1.0, "correct"),
        ("<think>it is \\boxed{32}</think>I am not sure.", "32", 0.0, "no \\boxed{...}"),  # reasoning is not the answer
    ],
)
def test_score_hand_written_completions(no_math_verify, completion, answer, reward, reason):
    got_reward, got_reason = score(completion, answer)
    assert (got_reward, got_reason[: len(reason)]) == (reward, reason), got_reason


def test_score_very_long_completions(no_math_verify):
    filler = "let me think again. " * 50_000  # 1 MB
    began = time.perf_counter()
    assert score(filler + "\\boxed{32}", 32)[0] == 1.0
    assert score("\\boxed{31}" + filler, 32) == (0.0, "wrong (exact numeric): got '31' = 31, expected 32")
    assert score("\\boxed{" + "{" * 100_000, 32) == (0.0, "malformed: the last \\boxed{ is never closed")
    assert time.perf_counter() - began < 5  # linear scans; a quadratic one takes minutes here
    reward, reason = score("\\boxed{" + "1" * 10_000 + "}", 32)
    assert (reward, reason) == (0.0, "malformed: \\boxed{} holds 10000 characters (limit 64)")


def test_score_rejects_a_reference_that_is_not_a_number():
    with pytest.raises(ValueError, match="reference answer 'abc'"):
        score("\\boxed{1}", "abc")
    with pytest.raises(ValueError, match="reference answer 1.5"):
        score("\\boxed{1}", 1.5)


def test_math_verify_decides_only_what_is_not_a_plain_number(monkeypatch):
    calls = []

    def parse(text, parsing_timeout=None):
        calls.append((text, parsing_timeout))
        return [text]

    def verify(gold, target, timeout_seconds=None):
        return gold == ["$32$"] and target == ["\\boxed{2^5}"]

    monkeypatch.setattr(math_task, "_math_verify", lambda: types.SimpleNamespace(parse=parse, verify=verify))
    assert score("\\boxed{2^5}", 32) == (1.0, "correct (math-verify): got \\boxed{2^5}, expected 32")
    assert calls == [("\\boxed{2^5}", 5), ("$32$", 5)]  # main thread: math-verify's signal timeout is usable
    assert score("\\boxed{2^4}", 32)[0] == 0.0
    calls.clear()
    assert score("\\boxed{31}", 32)[1].startswith("wrong (exact numeric)") and calls == []

    def broken(text, parsing_timeout=None):
        raise RuntimeError("parser crashed")

    monkeypatch.setattr(math_task, "_math_verify", lambda: types.SimpleNamespace(parse=broken, verify=verify))
    assert score("\\boxed{2^5}", 32) == (
        0.0,
        "wrong (math-verify failed on \\boxed{2^5}: RuntimeError: parser crashed)",
    )


def test_real_math_verify_when_installed():
    pytest.importorskip("math_verify")
    assert score("\\boxed{2^5}", 32)[0] == 1.0
    assert score("\\boxed{\\sqrt{9}}", 4)[0] == 0.0


# ---------------------------------------------------------------------------------------------------------------------
# GSM8K-style files
# ---------------------------------------------------------------------------------------------------------------------


def _write_lines(tmp_path, lines):
    path = tmp_path / "gsm8k.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_load_gsm8k_jsonl_reads_questions_steps_and_final_answers(tmp_path):
    first = {
        "question": "Natalia sold 48 clips in April and half as many in May. How many in total? ",
        "answer": "In May she sold 48/2 = <<48/2=24>>24 clips.\nIn total 48+24 = <<48+24=72>>72 clips.\n#### 72",
    }
    second = {"question": "A farm has 1,200 eggs minus 2.", "answer": "1200 - 2 = 1198\n#### 1,198", "extra": 1}
    path = _write_lines(tmp_path, [json.dumps(first), "", json.dumps(second)])
    assert load_gsm8k_jsonl(path) == [
        MathSample(
            id="gsm8k-1",
            prompt="Natalia sold 48 clips in April and half as many in May. How many in total?",
            answer="72",
            reasoning_steps=("In May she sold 48/2 = 24 clips.", "In total 48+24 = 72 clips."),
        ),
        MathSample(
            id="gsm8k-3", prompt="A farm has 1,200 eggs minus 2.", answer="1198", reasoning_steps=("1200 - 2 = 1198",)
        ),
    ]
    assert score(to_record(load_gsm8k_jsonl(path)[1], "chat")["messages"][1]["content"], "1198")[0] == 1.0


@pytest.mark.parametrize(
    ("bad_line", "problem"),
    [
        ('{"question": "q", "answer": "1 #### 2"', "not valid JSON"),
        ("[1, 2]", "expected a JSON object with 'question' and 'answer', got list"),
        ('{"answer": "#### 2"}', "'question' must be a non-empty string, got None"),
        ('{"question": "q", "answer": 5}', "'answer' must be a non-empty string, got 5"),
        ('{"question": "q", "answer": "it is 2"}', "'answer' has no final '#### <number>' line"),
        ('{"question": "q", "answer": "#### two"}', "the final answer 'two' after '####' is not a number"),
    ],
)
def test_load_gsm8k_jsonl_names_the_bad_line(tmp_path, bad_line, problem):
    good = json.dumps({"question": "q", "answer": "#### 1"})
    path = _write_lines(tmp_path, [good, good, bad_line])
    with pytest.raises(MathDataError) as caught:
        load_gsm8k_jsonl(path)
    assert str(caught.value).startswith(f"{path}:3: {problem}"), caught.value
