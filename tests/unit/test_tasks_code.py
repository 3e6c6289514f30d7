"""The offline code domain (dsv4train/data/tasks/code.py): generator, splits, SFT records, judge, jsonl loader.

Expected values are written by hand: the oracle table below is computed on paper, the judge's verdicts come from
solutions written here to pass or fail in a known way, and the rendered chat text is spelled out with the special
strings typed again (as in test_chat.py), never taken from the module under test.
"""

import json
import os
import random
import time
from pathlib import Path

import pytest

from dsv4train.data.chat import Conversation, render
from dsv4train.data.tasks.code import (
    ANSWER_INSTRUCTION,
    FAMILIES,
    CodeSample,
    Example,
    SandboxLimits,
    SandboxPolicy,
    extract_code,
    generate_sample,
    judge,
    load_jsonl,
    make_split,
    score,
    split_of,
    to_chat_record,
)

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
U = "<｜User｜>"
A = "<｜Assistant｜>"

FAMILY = {f.name: f for f in FAMILIES}

# A hand-made task: visible example and hidden tests are chosen so that `return 6` passes what is shown and fails
# what is hidden, and summing the odd numbers fails exactly hidden test 1.
SUM_EVENS = CodeSample(
    id="hand-sum-evens",
    prompt="Write a Python function `sum_evens(nums)` that returns the sum of the even numbers in nums.",
    entry_point="sum_evens",
    reference_solution="def sum_evens(nums):\n    return sum(x for x in nums if x % 2 == 0)\n",
    visible_examples=(Example("sum_evens([1, 2, 3, 4])", "6"),),
    hidden_tests=(
        "assert sum_evens([]) == 0",
        "assert sum_evens([1, 2, 3, 4]) == 6",
        "assert sum_evens([-2, -3]) == -2",
        "assert sum_evens([7]) == 0",
    ),
)
CORRECT = "Here you go:\n```python\ndef sum_evens(nums):\n    return sum(x for x in nums if x % 2 == 0)\n```\n"
SUMS_ODDS = "```python\ndef sum_evens(nums):\n    return sum(x for x in nums if x % 2 == 1)\n```"
NO_LIMIT_ON_PROCESSES = SandboxLimits(processes=None)  # these tests fork on purpose; RLIMIT_NPROC would stop it


def probing(tmp_path, **changes) -> SandboxPolicy:
    """The sandbox's policy, letting a probe write its findings to `tmp_path` (outside the sandbox, refused by
    default) and report host pids (a PID namespace numbers its processes from 1)."""
    return SandboxPolicy(writable_paths=(str(tmp_path),), pid_namespace=False, **changes)


def block(source: str) -> str:
    return f"```python\n{source}\n```"


def alive(pid: int) -> bool:
    """Running or sleeping; a zombie (killed, not yet reaped by whoever inherited it) counts as gone."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def wait_gone(pid: int, within_s: float = 2.0) -> bool:
    deadline = time.monotonic() + within_s
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


# ----------------------------------------------------------------------------------------------------------------
# The judge
# ----------------------------------------------------------------------------------------------------------------


def test_a_correct_solution_scores_one():
    reward, reason = score(CORRECT, SUM_EVENS, timeout_s=5.0)
    assert (reward, reason) == (1.0, "passed: all 4 hidden tests")


def test_a_wrong_solution_scores_zero_and_names_the_failing_test():
    verdict = judge(SUMS_ODDS, SUM_EVENS)
    assert verdict.reward == 0.0
    assert verdict.status == "test_failed"
    assert verdict.failed_test == 1  # [] sums to 0 either way; [1, 2, 3, 4] gives 4, not 6
    assert verdict.reason == "test failed: hidden test 1 `assert sum_evens([1, 2, 3, 4]) == 6`: assertion failed"


def test_the_hidden_tests_are_run_not_the_visible_examples():
    hardcoded = block("def sum_evens(nums):\n    return 6")  # passes the one example the prompt shows
    verdict = judge(hardcoded, SUM_EVENS)
    assert (verdict.reward, verdict.failed_test) == (0.0, 0)


def test_an_exception_in_a_test_is_a_failed_test_with_its_type():
    verdict = judge(block("def sum_evens(nums):\n    return 1 // len(nums) * 0"), SUM_EVENS)
    assert verdict.status == "test_failed" and verdict.failed_test == 0
    assert verdict.reason.endswith("raised ZeroDivisionError: integer division or modulo by zero")


def test_the_last_block_of_the_answer_is_judged():
    draft_then_final = f"First try:\n{SUMS_ODDS}\nFixed:\n{CORRECT}"
    final_then_wrong = f"{CORRECT}\nActually:\n{SUMS_ODDS}"
    assert score(draft_then_final, SUM_EVENS)[0] == 1.0
    assert score(final_then_wrong, SUM_EVENS)[0] == 0.0


def test_blocks_inside_the_reasoning_do_not_count():
    reasoning_only = f"<think>{CORRECT}</think>I wrote it above."
    assert judge(reasoning_only, SUM_EVENS).status == "no_code_block"
    assert score(f"<think>{SUMS_ODDS}</think>{CORRECT}", SUM_EVENS)[0] == 1.0


@pytest.mark.parametrize(
    "completion",
    [
        "def sum_evens(nums):\n    return sum(x for x in nums if x % 2 == 0)",  # no fence at all
        "```\ndef sum_evens(nums):\n    return 0\n```",  # a fence without the language
        "```python\ndef sum_evens(nums):\n    return 0\n",  # cut off before the closing fence
    ],
)
def test_no_python_block_scores_zero(completion):
    assert score(completion, SUM_EVENS) == (0.0, "no code block: the answer has no closed ```python fenced block")


def test_extract_code_takes_the_body_of_the_last_python_block():
    text = "```py\na = 1\n```\ntext\n```Python\nb = 2\nc = 3\n```\n```text\nnot code\n```"
    assert extract_code(text) == "b = 2\nc = 3\n"


def test_a_syntax_error_is_reported_with_its_line():
    verdict = judge(block("def sum_evens(nums):\n    return (1 +"), SUM_EVENS)
    assert verdict.status == "syntax_error" and verdict.reward == 0.0
    assert verdict.reason.startswith("syntax error: line 2:")


def test_a_missing_function_is_reported():
    verdict = judge(block("def sum_even(nums):\n    return 0"), SUM_EVENS)
    assert (verdict.status, verdict.reason) == (
        "missing_entry_point",
        "missing entry point: the code defines no function `sum_evens`",
    )


def test_a_solution_that_raises_while_defined_crashed():
    verdict = judge(block("raise RuntimeError('boom')"), SUM_EVENS)
    assert verdict.status == "crashed"
    assert verdict.reason == "crashed: the solution raised while being defined: RuntimeError: boom"


def test_exiting_early_or_forging_a_result_is_a_crash_not_a_pass():
    early_exit = block("import os\nos._exit(3)")
    forged = block(
        "import json, os\n"
        "open('result.json', 'w').write(json.dumps({'status': 'passed', 'detail': '4'}))\n"
        "print('passed: all 4 hidden tests')\n"
        "os._exit(0)"
    )
    assert score(early_exit, SUM_EVENS) == (0.0, "crashed: the process exited with code 3 before reporting a result")
    assert score(forged, SUM_EVENS) == (0.0, "crashed: the process exited with code 0 before reporting a result")


def test_an_infinite_loop_times_out_and_leaves_no_process(tmp_path):
    pid_file = tmp_path / "pid"
    looping = block(
        f"import os\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
        "def sum_evens(nums):\n    while True:\n        pass"
    )
    started = time.monotonic()
    verdict = judge(looping, SUM_EVENS, timeout_s=1.0, policy=probing(tmp_path))
    elapsed = time.monotonic() - started
    assert (verdict.reward, verdict.status) == (0.0, "timeout")
    assert verdict.reason == "timeout: still running after 1 s (the process group was killed)"
    assert elapsed < 4.0  # 1 s of timeout plus start-up and clean-up on a loaded 2-core machine
    assert not alive(int(pid_file.read_text()))


def test_a_sleeping_solution_times_out_on_the_wall_clock():
    verdict = judge(block("import time\ndef sum_evens(nums):\n    time.sleep(60)"), SUM_EVENS, timeout_s=1.0)
    assert verdict.status == "timeout"


@pytest.mark.parametrize("exits", [False, True], ids=["times-out", "exits-normally"])
def test_the_whole_process_group_is_killed(tmp_path, exits):
    """A grandchild that the solution forks dies with it: on a timeout, and also when the solution returns (a
    background process must not outlive the judge)."""
    pid_file = tmp_path / "grandchild"
    loop = "" if exits else "    while True:\n        pass\n"
    forking = block(
        "import os, time\n"
        "if os.fork() == 0:\n"
        f"    open({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
        "    time.sleep(60)\n"
        "    os._exit(0)\n"
        "while not os.path.exists(" + repr(str(pid_file)) + "):\n    time.sleep(0.01)\n"
        "def sum_evens(nums):\n" + (loop or "    return sum(x for x in nums if x % 2 == 0)\n")
    )
    policy = probing(tmp_path, allow_processes=True)  # the audit hook would refuse the fork
    verdict = judge(forking, SUM_EVENS, timeout_s=2.0, limits=NO_LIMIT_ON_PROCESSES, policy=policy)
    assert verdict.status == ("passed" if exits else "timeout"), verdict.reason
    assert wait_gone(int(pid_file.read_text()))


def test_printing_a_lot_is_captured_up_to_the_cap():
    chatty = block(
        "import sys\nprint('x' * 3_000_000)\nsys.stderr.write('e' * 3_000_000)\n"
        "def sum_evens(nums):\n    print('y' * 100_000)\n    return sum(x for x in nums if x % 2 == 0)"
    )
    verdict = judge(chatty, SUM_EVENS, max_output_bytes=1000)
    assert verdict.reward == 1.0  # printing is allowed; it is only not kept
    assert verdict.output_truncated
    assert verdict.stdout == "x" * 1000 and verdict.stderr == "e" * 1000


def test_cpu_time_limit_reports_a_timeout():
    spinning = block("def sum_evens(nums):\n    while True:\n        pass")
    verdict = judge(spinning, SUM_EVENS, timeout_s=10.0, limits=SandboxLimits(cpu_s=1))
    assert (verdict.status, verdict.reason) == ("timeout", "timeout: the CPU time limit was reached (SIGXCPU)")


def test_address_space_limit_turns_a_huge_allocation_into_a_failure():
    greedy = block("def sum_evens(nums):\n    return len(bytearray(4 << 30))")
    verdict = judge(greedy, SUM_EVENS, limits=SandboxLimits(address_space_bytes=512 << 20))
    assert verdict.status == "test_failed" and verdict.reason.endswith("raised MemoryError: ")


def test_file_size_limit_stops_a_large_write(tmp_path):
    big = tmp_path / "big"
    writer = block(f"open({str(big)!r}, 'wb').write(b'0' * (4 << 20))\ndef sum_evens(nums):\n    return 0")
    verdict = judge(writer, SUM_EVENS, limits=SandboxLimits(file_size_bytes=1 << 20), policy=probing(tmp_path))
    # CPython ignores SIGXFSZ, so the write fails with EFBIG instead of killing the process
    assert verdict.reason == "crashed: the solution raised while being defined: OSError: [Errno 27] File too large"
    assert big.stat().st_size <= 1 << 20


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores RLIMIT_NPROC")
def test_the_solution_cannot_start_processes():
    forking = block("import os\ndef sum_evens(nums):\n    os.fork()\n    return 0")
    verdict = judge(forking, SUM_EVENS, policy=SandboxPolicy(allow_processes=True))  # RLIMIT_NPROC alone, no hook
    assert verdict.status == "test_failed" and "BlockingIOError" in verdict.reason


def test_the_solution_sees_no_parent_environment_and_runs_in_a_removed_temp_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("DSV4_JUDGE_CANARY", "secret")
    cwd_file = tmp_path / "cwd"
    probe = block(
        f"import os\nopen({str(cwd_file)!r}, 'w').write(os.getcwd())\n"
        "assert 'DSV4_JUDGE_CANARY' not in os.environ\n"
        "def sum_evens(nums):\n    return sum(x for x in nums if x % 2 == 0)"
    )
    assert judge(probe, SUM_EVENS, policy=probing(tmp_path)).reward == 1.0
    workdir = Path(cwd_file.read_text())
    assert workdir.name.startswith("dsv4-code-judge-") and not workdir.exists()


# ----------------------------------------------------------------------------------------------------------------
# Families: oracles against hand-computed values, references against the oracles
# ----------------------------------------------------------------------------------------------------------------

# (family, params, args, expected), each expected value worked out by hand
HAND_VALUES = [
    ("remainder_filter", {"agg": "sum", "k": 3, "r": 1}, ([1, 4, -2, 3],), 3),  # 1 + 4 + (-2, since -2 % 3 == 1)
    ("remainder_filter", {"agg": "count", "k": 4, "r": 3}, ([3, 7, -1, 4, 11],), 4),
    ("clamp", {"lo": -5, "hi": 12}, (-9,), -5),
    ("clamp", {"lo": -5, "hi": 12}, (13,), 12),
    ("clamp", {"lo": -5, "hi": 12}, (0,), 0),
    ("count_letters", {"letters": "ae", "ignore_case": True}, ("A bEe a",), 4),
    ("count_letters", {"letters": "ae", "ignore_case": False}, ("A bEe a",), 2),
    ("running_window", {"op": "max", "window": None}, ([3, 1, 4, 1, 5],), [3, 3, 4, 4, 5]),
    ("running_window", {"op": "sum", "window": 2}, ([1, 2, 3, 4],), [1, 3, 5, 7]),
    ("running_window", {"op": "product", "window": 3}, ([2, -1, 3, 2],), [2, -2, -6, -6]),
    ("running_window", {"op": "min", "window": 2}, ([5, 3, 4],), [5, 3, 3]),
    (
        "fizzbuzz",
        {"a": 2, "b": 3, "word_a": "Fizz", "word_b": "Buzz"},
        (7,),
        ["1", "Fizz", "Buzz", "Fizz", "5", "FizzBuzz", "7"],
    ),
    ("digit_power_sum", {"base": 10, "power": 2}, (-123,), 14),
    ("digit_power_sum", {"base": 2, "power": 1}, (13,), 3),  # 1101
    ("digit_power_sum", {"base": 16, "power": 1}, (255,), 30),  # ff
    ("shift_letters", {"shift": 3, "upper_too": False}, ("xyz Abc!",), "abc Aef!"),
    ("shift_letters", {"shift": 3, "upper_too": True}, ("Zz",), "Cc"),
    ("reverse_words", {"sep": ",", "joiner": " ", "transform": "title"}, ("plum,star",), "Star Plum"),
    ("reverse_words", {"sep": "-", "joiner": "|", "transform": "upper"}, ("a-bc-d",), "D|BC|A"),
    ("count_threshold", {"cmp": "at_least", "t": 2}, ([1, 2, 3],), 2),
    ("count_threshold", {"cmp": "below", "t": 2}, ([1, 2, 3],), 1),
    ("every_nth", {"k": 3, "start": 1, "reverse": True}, ([10, 11, 12, 13, 14, 15, 16],), [14, 11]),
    ("recurrence", {"a0": 2, "a1": 1, "p": 1, "q": 1}, (5,), 11),  # Lucas numbers 2 1 3 4 7 11
    ("recurrence", {"a0": 0, "a1": 1, "p": 2, "q": 3}, (3,), 7),  # 0 1 2 7
]


def test_every_family_has_hand_values():
    assert {row[0] for row in HAND_VALUES} == set(FAMILY)


@pytest.mark.parametrize("name, params, args, expected", HAND_VALUES)
def test_oracles_match_hand_values(name, params, args, expected):
    assert FAMILY[name].oracle(params, args) == expected


def test_references_pass_hand_written_tests():
    """The reference source of each (family, params) of the table, judged on the table's values."""
    by_spec: dict[str, list] = {}
    for name, params, args, expected in HAND_VALUES:
        by_spec.setdefault(json.dumps([name, params], sort_keys=True), []).append((name, params, args, expected))
    for rows in by_spec.values():
        name, params = rows[0][0], rows[0][1]
        family = FAMILY[name]
        entry = family.entry_point(params)
        tests = tuple(f"assert {entry}({', '.join(map(repr, a))}) == {e!r}" for _, _, a, e in rows)
        sample = CodeSample("t", "", entry, family.reference(params), (), tests)
        assert score(block(family.reference(params)), sample) == (1.0, f"passed: all {len(tests)} hidden tests")


def test_generated_references_pass_their_hidden_tests():
    """Two samples of each family, train and test mixed: reference source against oracle values."""
    per_family: dict[str, list[CodeSample]] = {}
    for s in make_split("test", 40, seed=3) + make_split("train", 80, seed=3):
        if len(per_family.setdefault(s.family, [])) < 2:
            per_family[s.family].append(s)
    assert set(per_family) == set(FAMILY)
    for group in per_family.values():
        for s in group:
            assert len(s.hidden_tests) >= 3 and len(s.visible_examples) == 3
            assert score(block(s.reference_solution), s) == (1.0, f"passed: all {len(s.hidden_tests)} hidden tests")


def test_no_visible_example_is_a_hidden_test():
    for s in make_split("train", 300, seed=1):
        shown = {e.as_assert() for e in s.visible_examples}
        assert not shown & set(s.hidden_tests), s.id
        assert all(e.call in s.prompt and e.expected in s.prompt for e in s.visible_examples)


# ----------------------------------------------------------------------------------------------------------------
# Splits
# ----------------------------------------------------------------------------------------------------------------


def test_splits_are_disjoint_by_specification_for_large_n():
    """Different seeds on purpose: the split must not depend on the seed."""
    train = make_split("train", 3000, seed=0)
    test = make_split("test", 1000, seed=1)
    assert len({s.id for s in train}) == 3000 and len({s.id for s in test}) == 1000
    assert not {s.spec for s in train} & {s.spec for s in test}
    assert {s.family for s in test} == set(FAMILY)  # every family has specifications on the test side
    assert all(split_of(s.spec) == "train" for s in train) and all(split_of(s.spec) == "test" for s in test)


def test_make_split_is_deterministic_and_seeded():
    assert make_split("test", 50, seed=7) == make_split("test", 50, seed=7)
    assert [s.id for s in make_split("test", 50, seed=7)] != [s.id for s in make_split("test", 50, seed=8)]
    assert make_split("train", 0) == []


def test_make_split_rejects_bad_arguments():
    with pytest.raises(ValueError, match="split must be one of"):
        make_split("validation", 3)
    with pytest.raises(ValueError, match="n must be >= 0"):
        make_split("train", -1)


def test_the_split_depends_on_the_specification_not_the_inputs():
    family = FAMILY["clamp"]
    params = {"lo": -3, "hi": 4}
    a = generate_sample(random.Random(0), family, params)
    b = generate_sample(random.Random(1), family, params)
    assert a.id != b.id and a.spec == b.spec


# ----------------------------------------------------------------------------------------------------------------
# SFT records
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["think", "chat"])
def test_records_validate_and_render_in_the_v4_format(mode):
    for sample in make_split("train", 60, seed=2):
        record = to_chat_record(sample, mode)
        assert set(record) == {"messages", "domain", "mode"}
        assert (record["domain"], record["mode"]) == ("code", mode)
        conversation = Conversation.from_dict(record, ignore_keys=("domain", "mode"))
        user = f"{sample.prompt}\n\n{ANSWER_INSTRUCTION}"
        answer = f"```python\n{sample.reference_solution.rstrip()}\n```"
        opening = f"<think>{sample.reasoning}</think>" if mode == "think" else "</think>"
        assert render(conversation, mode=mode) == f"{BOS}{U}{user}{A}{opening}{answer}{EOS}"
        assert conversation.to_dict() == {"messages": record["messages"]}  # from_dict → to_dict is the identity
        assert "```python" in user and extract_code(answer) == sample.reference_solution.rstrip() + "\n"


def test_a_sample_without_a_reference_has_no_record():
    bare = CodeSample("x", "p", "f", None, (), ("assert f() == 1",))
    with pytest.raises(ValueError, match="no reference solution"):
        to_chat_record(bare, "chat")
    with pytest.raises(ValueError, match="mode must be"):
        to_chat_record(SUM_EVENS, "think_max")
    with pytest.raises(ValueError, match="no reasoning trace"):
        to_chat_record(SUM_EVENS, "think")


# ----------------------------------------------------------------------------------------------------------------
# MBPP / HumanEval jsonl
# ----------------------------------------------------------------------------------------------------------------

MBPP = {
    "task_id": 11,
    "text": "Write a python function to remove first and last occurrence of a given character from the string.",
    "code": "def remove_Occ(s, ch):\n    i = s.find(ch)\n    s = s[:i] + s[i + 1:] if i >= 0 else s\n"
    "    j = s.rfind(ch)\n    return s[:j] + s[j + 1:] if j >= 0 else s\n",
    "test_list": ['assert remove_Occ("hello","l") == "heo"', 'assert remove_Occ("abcda","a") == "bcd"'],
    "test_setup_code": "",
}
HUMANEVAL = {
    "task_id": "HumanEval/0",
    "prompt": 'def add(a, b):\n    """Return a + b."""\n',
    "canonical_solution": "    return a + b\n",
    "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
    "entry_point": "add",
}


def test_mbpp_and_humaneval_records_load_and_judge(tmp_path):
    path = tmp_path / "real.jsonl"
    path.write_text(json.dumps(MBPP) + "\n\n" + json.dumps(HUMANEVAL) + "\n")
    mbpp, humaneval = load_jsonl(path)
    assert (mbpp.id, mbpp.entry_point, mbpp.prompt) == ("11", "remove_Occ", MBPP["text"])
    assert (humaneval.id, humaneval.entry_point) == ("HumanEval/0", "add")
    assert humaneval.reference_solution == 'def add(a, b):\n    """Return a + b."""\n    return a + b\n'
    for sample in (mbpp, humaneval):
        assert score(block(sample.reference_solution), sample)[0] == 1.0
    assert score(block("def add(a, b):\n    return a - b"), humaneval)[0] == 0.0
    assert score(block("def remove_Occ(s, ch):\n    return s[1:-1]"), mbpp)[0] == 0.0  # "hello" → "ell", not "heo"
    assert to_chat_record(mbpp, "chat")["messages"][1]["content"] == block(MBPP["code"].rstrip())


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "not valid JSON"),
        ('{"prompt": "p", "entry_point": "f"}', 'no tests: give "test_list"'),
        ('{"prompt": "p", "test_list": ["assert f() == 1"]}', 'no "entry_point"'),
        ('{"entry_point": "f", "test_list": ["assert f() == 1"]}', 'no "prompt"'),
        ('{"prompt": "p", "entry_point": "f", "test_list": []}', "'test_list' must be a non-empty list"),
        ('{"prompt": "p", "entry_point": "not valid", "test": "x"}', "must be a Python identifier"),
        ("[1, 2]", "must be a JSON object"),
    ],
)
def test_bad_jsonl_lines_are_named(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(HUMANEVAL) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=message) as err:
        load_jsonl(path)
    assert f"{path}:2:" in str(err.value)


# ----------------------------------------------------------------------------------------------------------------
# Difficulty
# ----------------------------------------------------------------------------------------------------------------

ONE_LINE_FAMILIES = {"count_threshold", "every_nth", "clamp", "remainder_filter"}  # difficulty 1, by the docs


def test_difficulty_1_is_the_one_line_families_with_one_example_and_disjoint_splits():
    train = make_split("train", 600, seed=0, difficulty=1)
    test = make_split("test", 150, seed=4, difficulty=1)
    assert {s.family for s in train} == {s.family for s in test} == ONE_LINE_FAMILIES
    assert not {s.spec for s in train} & {s.spec for s in test}
    for s in train[:40] + test[:40]:
        assert len(s.visible_examples) == 1 and len(s.prompt.split("Examples:\n")[1].splitlines()) == 1
        assert s.reference_solution.count("\n") == 2  # `def ...:` and one line of body
        assert score(block(s.reference_solution), s)[0] == 1.0


def test_difficulty_2_is_the_default_with_all_families():
    assert make_split("test", 20, seed=5) == make_split("test", 20, seed=5, difficulty=2)
    assert {s.family for s in make_split("test", 200, seed=5)} == set(FAMILY)
    with pytest.raises(ValueError, match="difficulty 3"):
        make_split("test", 3, difficulty=3)
