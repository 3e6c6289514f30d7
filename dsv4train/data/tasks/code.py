"""The offline `code` domain: small Python functions described in words, judged by hidden unit tests.

Three parts, each usable alone:

- A seeded generator (`make_split`) of function-writing tasks from eleven families (sum or count by remainder,
  clamp, count chosen letters, windowed running max/min/sum/product, fizzbuzz with chosen words, digit power sum in
  a base, letter shift, reverse and rejoin words, count against a threshold, every k-th item, a linear recurrence).
  `difficulty` 1 keeps the four whose solution is one line (threshold count, every k-th item, clamp, remainder
  filter) and shows one example instead of three; 2 (the default) is all eleven.
  Each family has random parameters that change the function asked for, a reference solution (source text, what a
  model should write) and a separate oracle in this module that computes the expected values of the tests, so the
  test "the reference passes its hidden tests" checks two independent implementations against each other.
  Train and test are disjoint by construction: the split of a task is decided by a hash of its *specification*
  (family and parameters, not the example inputs), with no seed in it, so no function asked in `test` is ever
  trained on, whatever seeds the two splits are drawn with.
- Chat records in the SFT schema (`to_chat_record`): the user turn is the task plus the instruction to answer with
  one ```python block; the assistant turn is that block with the reference solution; thinking mode adds a short
  reasoning trace. Records read back with `dsv4train.data.chat.Conversation.from_dict(record, ("domain", "mode"))`.
- A judge (`judge`, and `score` for the `(reward, reason)` pair the trainers use): the last ```python block of the
  answer (after the last `</think>` when there is one) runs with the hidden tests in the sandbox of
  `dsv4train.posttrain.rewards.sandbox` (its docstring has each layer, what it stops and what it does not): a fresh
  `python -I -S -B` in its own temporary directory, session and process group; network and PID namespaces where the
  kernel allows them (`Judgement.extra["network"]` is "namespace", else "blocked": sockets are then refused by the
  audit hook alone); resource limits (`SandboxLimits`: CPU seconds, address space, file size, open files, processes)
  set by that process on itself before the candidate's code runs; an audit hook that refuses sockets, new processes,
  signals to other processes, ctypes and files outside the sandbox directory; output capped, and the group killed
  past 64 MiB; a wall-clock timeout; the whole group killed at the end in every case. Reward 1.0 only when every
  hidden test passes; a refused action (status "refused", the reason names it, e.g. "refused: os.fork: ..."), the
  output limit, a timeout or a crash scores 0 with its reason, and the run goes on.
- `load_jsonl` reads MBPP/HumanEval-style files into the same samples, for users with real data.

Why the limits are set by the child and not in `preexec_fn`: Python documents `preexec_fn` as unsafe when the
parent has threads (it may deadlock), and the judge is meant to run inside trainers and evaluation pools that do.
The child applies the limits as its first act, before reading the candidate, so the candidate runs under the same
limits either way.

What the judge does not do:

- Make a hostile candidate's *score* trustworthy. The tests run in the candidate's interpreter, so code that reads
  the harness's frames (the nonce of the result file is there) or patches `builtins` can fake a pass. The sandbox
  contains what such code can do to the machine; the nonce only stops naive forgery (printing "passed", writing a
  result file, exiting early).
- Keep files from root without the hook: as root there is no mount namespace or privilege drop behind it, and
  RLIMIT_NPROC does not apply (the hook refuses forks). Code that corrupts the interpreter's memory gets past the
  hook; the namespaces, limits and the group kill still hold (the sandbox module's docstring).
- Limit memory beyond the address space (no cgroup), time per test (one timeout for the whole run), or cache and
  parallelise: one sandboxed process per call.
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import os
import random
import re
import secrets
import signal
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from dsv4train.data.chat import THINK_END
from dsv4train.posttrain.rewards.sandbox import SandboxLimits, SandboxPolicy, SandboxResult, run_python

DOMAIN = "code"
SPLITS = ("train", "test")
TEST_FRACTION = 0.2  # share of task specifications that hash to the test split
ANSWER_INSTRUCTION = "Answer with the complete function in one ```python fenced code block."
N_VISIBLE_EXAMPLES = 3
N_HIDDEN_TESTS = 8

Split = Literal["train", "test"]
RecordMode = Literal["think", "chat"]
Status = Literal[
    "passed",
    "no_code_block",
    "syntax_error",
    "missing_entry_point",
    "test_failed",
    "timeout",
    "crashed",
    "refused",  # the sandbox refused an action (a socket, a process, a file outside its directory, ...)
    "output_limit",  # it printed so much that the process group was killed
]
_LOG = logging.getLogger("dsv4train.rewards")


# ----------------------------------------------------------------------------------------------------------------
# Samples
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    """One call and the repr of its expected value, e.g. `clamp(-9)` and `-5`; shown in prompts, asserted in tests."""

    call: str
    expected: str

    def as_assert(self) -> str:
        return f"assert {self.call} == {self.expected}"


@dataclass(frozen=True)
class CodeSample:
    """One task. `hidden_tests` are Python snippets run one by one after the solution, in its namespace; a snippet
    fails by raising. `reference_solution` and `reasoning` are None for loaded data that has none. `spec` is the
    canonical specification the split was decided by (empty for loaded data)."""

    id: str
    prompt: str
    entry_point: str
    reference_solution: str | None
    visible_examples: tuple[Example, ...]
    hidden_tests: tuple[str, ...]
    family: str = ""
    reasoning: str | None = None
    spec: str = ""


@dataclass(frozen=True)
class _Family:
    """A task template. `draw_params` picks the specification; everything else is a pure function of it."""

    name: str
    draw_params: Callable[[random.Random], dict[str, Any]]
    entry_point: Callable[[dict[str, Any]], str]
    describe: Callable[[dict[str, Any]], str]  # the task in words, naming the function and its argument
    reference: Callable[[dict[str, Any]], str]  # the solution's source text
    oracle: Callable[[dict[str, Any], tuple], Any]  # expected value, written independently of `reference`
    draw_args: Callable[[random.Random, dict[str, Any]], tuple]
    edge_args: Callable[[dict[str, Any]], list[tuple]]  # always among the hidden tests
    explain: Callable[[dict[str, Any]], str]  # the reasoning trace's plan


def _ints(rng: random.Random, lo: int = -20, hi: int = 20, min_len: int = 1, max_len: int = 8) -> list[int]:
    return [rng.randint(lo, hi) for _ in range(rng.randint(min_len, max_len))]


_WORDS = ("apple", "river", "stone", "cloud", "tiger", "lemon", "night", "plum", "wave", "star", "moss", "fern")
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _random_text(rng: random.Random, alphabet: str, min_len: int = 0, max_len: int = 14) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(min_len, max_len)))


# --- remainder filter: sum or count the elements with x % k == r ------------------------------------------------


def _remainder_params(rng):
    k = rng.randint(2, 9)
    return {"agg": rng.choice(["sum", "count"]), "k": k, "r": rng.randint(0, k - 1)}


def _remainder_oracle(p, args):
    total = 0
    for x in args[0]:
        if x - (x // p["k"]) * p["k"] == p["r"]:  # floor remainder, as Python's % computes it
            total += x if p["agg"] == "sum" else 1
    return total


_REMAINDER = _Family(
    name="remainder_filter",
    draw_params=_remainder_params,
    entry_point=lambda p: f"{p['agg']}_with_remainder",
    describe=lambda p: (
        f"Write a Python function `{p['agg']}_with_remainder(nums)` that takes a list of integers and returns the "
        + ("sum" if p["agg"] == "sum" else "number")
        + f" of the elements x with x % {p['k']} == {p['r']} (Python's % operator, so negative numbers count too); "
        "it returns 0 when there are none."
    ),
    reference=lambda p: (
        f"def {p['agg']}_with_remainder(nums):\n"
        + (
            f"    return sum(x for x in nums if x % {p['k']} == {p['r']})\n"
            if p["agg"] == "sum"
            else f"    return sum(1 for x in nums if x % {p['k']} == {p['r']})\n"
        )
    ),
    oracle=_remainder_oracle,
    draw_args=lambda rng, p: (_ints(rng),),
    edge_args=lambda p: [([],)],
    explain=lambda p: (
        f"I keep the elements whose remainder modulo {p['k']} is {p['r']} and "
        + ("add them up" if p["agg"] == "sum" else "count them")
        + "; an empty list gives 0."
    ),
)


# --- clamp ------------------------------------------------------------------------------------------------------


def _clamp_oracle(p, args):
    (x,) = args
    if x < p["lo"]:
        return p["lo"]
    if x > p["hi"]:
        return p["hi"]
    return x


_CLAMP = _Family(
    name="clamp",
    draw_params=lambda rng: {"lo": rng.randint(-20, 0), "hi": rng.randint(1, 20)},
    entry_point=lambda p: "clamp",
    describe=lambda p: (
        f"Write a Python function `clamp(x)` that takes an integer x and returns it limited to the range "
        f"[{p['lo']}, {p['hi']}]: {p['lo']} if x is smaller, {p['hi']} if x is larger, x itself otherwise."
    ),
    reference=lambda p: f"def clamp(x):\n    return max({p['lo']}, min({p['hi']}, x))\n",
    oracle=_clamp_oracle,
    draw_args=lambda rng, p: (rng.randint(p["lo"] - 10, p["hi"] + 10),),
    edge_args=lambda p: [(p["lo"],), (p["hi"],), (p["lo"] - 1,), (p["hi"] + 1,)],
    explain=lambda p: f"min with {p['hi']} caps x from above, then max with {p['lo']} raises it from below.",
)


# --- count chosen letters ---------------------------------------------------------------------------------------


def _letters_params(rng):
    letters = "".join(sorted(rng.sample(_LETTERS, rng.randint(2, 5))))
    return {"letters": letters, "ignore_case": rng.random() < 0.5}


def _letters_oracle(p, args):
    text = args[0].lower() if p["ignore_case"] else args[0]
    return sum(text.count(ch) for ch in p["letters"])


def _letters_args(rng, p):
    alphabet = p["letters"] * 3 + "xyz ." + (p["letters"].upper() * 2 if p["ignore_case"] else "QW")
    return (_random_text(rng, alphabet),)


_LETTER_COUNT = _Family(
    name="count_letters",
    draw_params=_letters_params,
    entry_point=lambda p: "count_chosen",
    describe=lambda p: (
        f"Write a Python function `count_chosen(text)` that takes a string and returns how many of its characters "
        f"are one of the letters {', '.join(repr(c) for c in p['letters'])}"
        + (", ignoring case (uppercase letters count too)." if p["ignore_case"] else "; case matters (only lowercase).")
    ),
    reference=lambda p: (
        "def count_chosen(text):\n"
        + ("    text = text.lower()\n" if p["ignore_case"] else "")
        + f"    return sum(1 for c in text if c in {p['letters']!r})\n"
    ),
    oracle=_letters_oracle,
    draw_args=_letters_args,
    edge_args=lambda p: [("",), (p["letters"].upper(),)],
    explain=lambda p: (
        ("I lowercase the text first, then " if p["ignore_case"] else "Without changing case, ")
        + f"count the characters that are in {p['letters']!r}."
    ),
)


# --- windowed running max / min / sum / product -----------------------------------------------------------------


def _running_oracle(p, args):
    nums, out = args[0], []
    for i in range(len(nums)):
        start = 0 if p["window"] is None else max(0, i - p["window"] + 1)
        acc = nums[start]
        for x in nums[start + 1 : i + 1]:
            acc = {"max": max, "min": min, "sum": lambda a, b: a + b, "product": lambda a, b: a * b}[p["op"]](acc, x)
        out.append(acc)
    return out


def _running_reference(p):
    window = "0" if p["window"] is None else f"max(0, i - {p['window'] - 1})"
    if p["op"] in ("max", "min", "sum"):
        body = f"        out.append({p['op']}(nums[{window}:i + 1]))\n"
    else:
        body = (
            f"        prod = 1\n        for x in nums[{window}:i + 1]:\n            prod *= x\n"
            "        out.append(prod)\n"
        )
    return f"def running_{p['op']}(nums):\n    out = []\n    for i in range(len(nums)):\n{body}    return out\n"


def _running_scope(p):
    if p["window"] is None:
        return "all elements up to and including position i"
    return f"the last {p['window']} elements up to and including position i (fewer at the start)"


_RUNNING = _Family(
    name="running_window",
    draw_params=lambda rng: {
        "op": rng.choice(["max", "min", "sum", "product"]),
        "window": rng.choice([None, *range(2, 11)]),
    },
    entry_point=lambda p: f"running_{p['op']}",
    describe=lambda p: (
        f"Write a Python function `running_{p['op']}(nums)` that takes a list of integers and returns a list of the "
        f"same length whose element i is the {p['op']} of {_running_scope(p)}."
    ),
    reference=_running_reference,
    oracle=_running_oracle,
    draw_args=lambda rng, p: (_ints(rng, -9, 9, 1, 9) if p["op"] == "product" else _ints(rng, -30, 30, 1, 10),),
    edge_args=lambda p: [([],), ([5],)],
    explain=lambda p: f"For each position i I take the {p['op']} over {_running_scope(p)}; an empty list gives [].",
)


# --- fizzbuzz with chosen divisors and words --------------------------------------------------------------------

_FIZZ_WORDS = ("Fizz", "Buzz", "Bang", "Pop", "Zap", "Ding", "Woof", "Tick", "Boom", "Hop", "Zip", "Clap")


def _fizz_params(rng):
    a, b = sorted(rng.sample(range(2, 10), 2))
    while b % a == 0:  # else "the other multiples of b" would be empty
        a, b = sorted(rng.sample(range(2, 10), 2))
    word_a, word_b = rng.sample(_FIZZ_WORDS, 2)
    return {"a": a, "b": b, "word_a": word_a, "word_b": word_b}


def _fizz_oracle(p, args):
    out = []
    for i in range(1, args[0] + 1):
        word = (p["word_a"] if i % p["a"] == 0 else "") + (p["word_b"] if i % p["b"] == 0 else "")
        out.append(word or str(i))
    return out


_FIZZBUZZ = _Family(
    name="fizzbuzz",
    draw_params=_fizz_params,
    entry_point=lambda p: "fizzbuzz_words",
    describe=lambda p: (
        "Write a Python function `fizzbuzz_words(n)` that returns a list of strings for the numbers 1 to n: "
        f"{p['word_a'] + p['word_b']!r} for multiples of both {p['a']} and {p['b']}, {p['word_a']!r} for the other "
        f"multiples of {p['a']}, {p['word_b']!r} for the other multiples of {p['b']}, and the number itself as a "
        "string otherwise."
    ),
    reference=lambda p: (
        "def fizzbuzz_words(n):\n"
        "    out = []\n"
        "    for i in range(1, n + 1):\n"
        f"        if i % {p['a']} == 0 and i % {p['b']} == 0:\n"
        f"            out.append({p['word_a'] + p['word_b']!r})\n"
        f"        elif i % {p['a']} == 0:\n"
        f"            out.append({p['word_a']!r})\n"
        f"        elif i % {p['b']} == 0:\n"
        f"            out.append({p['word_b']!r})\n"
        "        else:\n"
        "            out.append(str(i))\n"
        "    return out\n"
    ),
    oracle=_fizz_oracle,
    draw_args=lambda rng, p: (rng.randint(1, 25),),
    edge_args=lambda p: [(0,), (p["a"] * p["b"],)],
    explain=lambda p: (
        f"Loop i from 1 to n and test both divisors first ({p['a']} and {p['b']}), then each one, then fall back to "
        "str(i)."
    ),
)


# --- digit power sum in a base ----------------------------------------------------------------------------------


def _digits_oracle(p, args):
    n = abs(args[0])
    if n == 0:
        return 0
    digits = []
    while n:
        digits.append(n % p["base"])
        n //= p["base"]
    return sum(d ** p["power"] for d in digits)


def _digits_describe(p):
    power = {1: "", 2: " squared", 3: " cubed"}[p["power"]]
    return (
        f"Write a Python function `digit_power_sum(n)` that takes an integer n and returns the sum of the digits of "
        f"|n| written in base {p['base']}, each digit{power}" + (" (just the digit)" if p["power"] == 1 else "") + "."
    )


_DIGITS = _Family(
    name="digit_power_sum",
    draw_params=lambda rng: {"base": rng.randint(2, 16), "power": rng.randint(1, 3)},
    entry_point=lambda p: "digit_power_sum",
    describe=_digits_describe,
    reference=lambda p: (
        "def digit_power_sum(n):\n"
        "    n = abs(n)\n"
        "    total = 0\n"
        "    while n > 0:\n"
        f"        n, digit = divmod(n, {p['base']})\n"
        f"        total += digit ** {p['power']}\n"
        "    return total\n"
    ),
    oracle=_digits_oracle,
    draw_args=lambda rng, p: (rng.randint(-5000, 5000),),
    edge_args=lambda p: [(0,), (p["base"],), (-(p["base"] - 1),)],
    explain=lambda p: (
        f"Take |n|, peel off base-{p['base']} digits with divmod and add each digit to the power {p['power']}."
    ),
)


# --- letter shift -----------------------------------------------------------------------------------------------


def _shift_oracle(p, args):
    k = p["shift"]
    lower = _LETTERS[k:] + _LETTERS[:k]
    table = str.maketrans(_LETTERS, lower)
    if p["upper_too"]:
        table.update(str.maketrans(_LETTERS.upper(), lower.upper()))
    return args[0].translate(table)


def _shift_reference(p):
    lines = ["def shift_letters(text):", "    out = []", "    for c in text:", "        if 'a' <= c <= 'z':"]
    lines.append(f"            out.append(chr((ord(c) - ord('a') + {p['shift']}) % 26 + ord('a')))")
    if p["upper_too"]:
        lines += ["        elif 'A' <= c <= 'Z':"]
        lines.append(f"            out.append(chr((ord(c) - ord('A') + {p['shift']}) % 26 + ord('A')))")
    lines += ["        else:", "            out.append(c)", "    return ''.join(out)"]
    return "\n".join(lines) + "\n"


_SHIFT = _Family(
    name="shift_letters",
    draw_params=lambda rng: {"shift": rng.randint(1, 25), "upper_too": rng.random() < 0.5},
    entry_point=lambda p: "shift_letters",
    describe=lambda p: (
        f"Write a Python function `shift_letters(text)` that returns the text with every lowercase letter moved "
        f"{p['shift']} places forward in the alphabet, wrapping from 'z' back to 'a'"
        + (
            "; uppercase letters move the same way within 'A'-'Z', and every other character stays."
            if p["upper_too"]
            else "; every other character, uppercase letters included, stays as it is."
        )
    ),
    reference=_shift_reference,
    oracle=_shift_oracle,
    draw_args=lambda rng, p: (_random_text(rng, _LETTERS + "ABCXYZ -!", 1, 12),),
    edge_args=lambda p: [("",), ("zZ",)],
    explain=lambda p: (
        f"Each lowercase letter goes to (position + {p['shift']}) mod 26"
        + ("; uppercase the same within A-Z" if p["upper_too"] else "; uppercase is left alone")
        + ", everything else is copied."
    ),
)


# --- reverse and rejoin words -----------------------------------------------------------------------------------

_SEPARATORS = (" ", ",", "-", ";", "/", "|")
_TRANSFORMS = {"keep": "as they are", "upper": "in uppercase", "title": "with their first letter capitalised"}


def _words_oracle(p, args):
    words = args[0].split(p["sep"])[::-1]
    if p["transform"] == "upper":
        words = [w.upper() for w in words]
    elif p["transform"] == "title":
        words = [w[:1].upper() + w[1:] for w in words]
    return p["joiner"].join(words)


def _words_reference(p):
    call = {"keep": "w", "upper": "w.upper()", "title": "w.capitalize()"}[p["transform"]]
    return (
        "def reverse_words(text):\n"
        f"    words = text.split({p['sep']!r})\n"
        f"    return {p['joiner']!r}.join({call} for w in reversed(words))\n"
    )


_REVERSE_WORDS = _Family(
    name="reverse_words",
    draw_params=lambda rng: {
        "sep": rng.choice(_SEPARATORS),
        "joiner": rng.choice(_SEPARATORS),
        "transform": rng.choice(list(_TRANSFORMS)),
    },
    entry_point=lambda p: "reverse_words",
    describe=lambda p: (
        f"Write a Python function `reverse_words(text)` that splits the text on {p['sep']!r}, reverses the order of "
        f"the pieces, and joins them with {p['joiner']!r}, the pieces {_TRANSFORMS[p['transform']]}. The text is "
        "lowercase words separated by single separators."
    ),
    reference=_words_reference,
    oracle=_words_oracle,
    draw_args=lambda rng, p: (p["sep"].join(rng.choice(_WORDS) for _ in range(rng.randint(1, 5))),),
    edge_args=lambda p: [("moss",)],
    explain=lambda p: f"split({p['sep']!r}), reverse, write the pieces {_TRANSFORMS[p['transform']]}, join.",
)


# --- count against a threshold ----------------------------------------------------------------------------------

_COMPARISONS = {"above": ">", "at_least": ">=", "below": "<", "at_most": "<="}
_COMPARISON_WORDS = {"above": "greater than", "at_least": "at least", "below": "less than", "at_most": "at most"}


def _threshold_oracle(p, args):
    t = p["t"]
    keep = {
        "above": lambda x: x > t,
        "at_least": lambda x: x >= t,
        "below": lambda x: x < t,
        "at_most": lambda x: x <= t,
    }[p["cmp"]]
    return len([x for x in args[0] if keep(x)])


_THRESHOLD = _Family(
    name="count_threshold",
    draw_params=lambda rng: {"cmp": rng.choice(list(_COMPARISONS)), "t": rng.randint(-30, 30)},
    entry_point=lambda p: f"count_{p['cmp']}",
    describe=lambda p: (
        f"Write a Python function `count_{p['cmp']}(nums)` that takes a list of integers and returns how many of "
        f"them are {_COMPARISON_WORDS[p['cmp']]} {p['t']}."
    ),
    reference=lambda p: (
        f"def count_{p['cmp']}(nums):\n    return sum(1 for x in nums if x {_COMPARISONS[p['cmp']]} {p['t']})\n"
    ),
    oracle=_threshold_oracle,
    draw_args=lambda rng, p: (_ints(rng, p["t"] - 10, p["t"] + 10, 1, 9),),
    edge_args=lambda p: [([],), ([p["t"]],)],
    explain=lambda p: f"Count the x with x {_COMPARISONS[p['cmp']]} {p['t']}; equality matters, so the operator does.",
)


# --- every k-th item --------------------------------------------------------------------------------------------


def _nth_params(rng):
    k = rng.randint(2, 6)
    return {"k": k, "start": rng.randint(0, k - 1), "reverse": rng.random() < 0.5}


def _nth_oracle(p, args):
    picked = [x for i, x in enumerate(args[0]) if i >= p["start"] and (i - p["start"]) % p["k"] == 0]
    return picked[::-1] if p["reverse"] else picked


_EVERY_NTH = _Family(
    name="every_nth",
    draw_params=_nth_params,
    entry_point=lambda p: "every_nth",
    describe=lambda p: (
        f"Write a Python function `every_nth(items)` that takes a list and returns the items at positions "
        f"{p['start']}, {p['start'] + p['k']}, {p['start'] + 2 * p['k']}, ... (every {p['k']}th item starting at "
        f"index {p['start']}, counting from 0)" + (", in reverse order." if p["reverse"] else ", in order.")
    ),
    reference=lambda p: (
        f"def every_nth(items):\n    return items[{p['start']}::{p['k']}]" + ("[::-1]\n" if p["reverse"] else "\n")
    ),
    oracle=_nth_oracle,
    draw_args=lambda rng, p: (_ints(rng, 0, 50, 0, 14),),
    edge_args=lambda p: [([],), (list(range(p["start"])),)],
    explain=lambda p: (
        f"A slice does it: start {p['start']}, step {p['k']}" + (", then reverse the result." if p["reverse"] else ".")
    ),
)


# --- linear recurrence ------------------------------------------------------------------------------------------


def _recurrence_oracle(p, args):
    terms = [p["a0"], p["a1"]]
    while len(terms) <= args[0]:
        terms.append(p["p"] * terms[-1] + p["q"] * terms[-2])
    return terms[args[0]]


_RECURRENCE = _Family(
    name="recurrence",
    draw_params=lambda rng: {
        "a0": rng.randint(0, 3),
        "a1": rng.randint(1, 4),
        "p": rng.randint(1, 2),
        "q": rng.randint(1, 3),
    },
    entry_point=lambda p: "sequence_term",
    describe=lambda p: (
        f"Write a Python function `sequence_term(n)` that returns term n (n >= 0) of the sequence with "
        f"a(0) = {p['a0']}, a(1) = {p['a1']} and a(n) = {p['p']} * a(n-1) + {p['q']} * a(n-2)."
    ),
    reference=lambda p: (
        "def sequence_term(n):\n"
        f"    prev, cur = {p['a0']}, {p['a1']}\n"
        "    if n == 0:\n"
        "        return prev\n"
        "    for _ in range(n - 1):\n"
        f"        prev, cur = cur, {p['p']} * cur + {p['q']} * prev\n"
        "    return cur\n"
    ),
    oracle=_recurrence_oracle,
    draw_args=lambda rng, p: (rng.randint(2, 15),),
    edge_args=lambda p: [(0,), (1,)],
    explain=lambda p: "Iterate with two variables (the last two terms) instead of recursing; n = 0 and 1 are given.",
)


FAMILIES: tuple[_Family, ...] = (
    _REMAINDER,
    _CLAMP,
    _LETTER_COUNT,
    _RUNNING,
    _FIZZBUZZ,
    _DIGITS,
    _SHIFT,
    _REVERSE_WORDS,
    _THRESHOLD,
    _EVERY_NTH,
    _RECURRENCE,
)


@dataclass(frozen=True)
class Difficulty:
    """Which families a difficulty draws from and how many examples its prompts show."""

    families: tuple[_Family, ...]
    n_visible: int


# 1: the four families whose solution is one line with the specification's numbers in it, one example shown, so
#    prompt and answer are short (about 60 and 25 tokens); 2: all eleven families, three examples.
DIFFICULTIES = {
    1: Difficulty((_THRESHOLD, _EVERY_NTH, _CLAMP, _REMAINDER), n_visible=1),
    2: Difficulty(FAMILIES, n_visible=N_VISIBLE_EXAMPLES),
}


# ----------------------------------------------------------------------------------------------------------------
# Generation and splits
# ----------------------------------------------------------------------------------------------------------------


def canonical_task(family: str, params: dict[str, Any]) -> str:
    """The specification a split is decided by: family and parameters, as sorted JSON (inputs do not count)."""
    return json.dumps({"family": family, "params": params}, sort_keys=True)


def split_of(canonical: str) -> Split:
    """`test` for the TEST_FRACTION of specifications whose hash falls low, `train` for the rest; no seed involved."""
    bucket = int.from_bytes(hashlib.sha256(canonical.encode()).digest()[:8], "big") / 2**64
    return "test" if bucket < TEST_FRACTION else "train"


def _call(entry_point: str, args: tuple) -> str:
    return f"{entry_point}({', '.join(repr(a) for a in args)})"


def _examples(
    family: _Family, params: dict[str, Any], rng: random.Random, n_visible: int = N_VISIBLE_EXAMPLES
) -> tuple[list[Example], list[Example]]:
    """`n_visible` visible examples (random, distinct) and hidden tests (the family's edge cases, then random); no
    call is both shown and hidden, so passing the hidden tests needs more than copying the examples."""
    entry = family.entry_point(params)
    seen: set[str] = set()

    def make(args: tuple) -> Example | None:
        call = _call(entry, args)
        if call in seen:
            return None
        seen.add(call)
        return Example(call, repr(family.oracle(params, args)))

    visible: list[Example] = []
    hidden = [e for e in (make(a) for a in family.edge_args(params)) if e is not None]
    for target, n in ((visible, n_visible), (hidden, N_HIDDEN_TESTS)):
        for _ in range(200):  # distinct draws run out only for tiny input spaces; then fewer tests
            if len(target) >= n:
                break
            example = make(family.draw_args(rng, params))
            if example is not None:
                target.append(example)
    return visible, hidden


def _prompt(description: str, visible: Sequence[Example]) -> str:
    lines = [description, "", "Examples:"]
    lines += [f"{e.call} == {e.expected}" for e in visible]
    return "\n".join(lines)


def generate_sample(
    rng: random.Random, family: _Family, params: dict[str, Any], n_visible: int = N_VISIBLE_EXAMPLES
) -> CodeSample:
    """One sample of `family` with the given specification; the test inputs come from `rng`."""
    visible, hidden = _examples(family, params, rng, n_visible)
    hidden_tests = tuple(e.as_assert() for e in hidden)
    canonical = canonical_task(family.name, params)
    digest = hashlib.sha256(json.dumps([canonical, [e.call for e in visible], hidden_tests]).encode()).hexdigest()
    first = visible[0]
    reasoning = f"{family.explain(params)} Check with the first example: {first.call} should be {first.expected}."
    return CodeSample(
        id=f"code-{digest[:16]}",
        prompt=_prompt(family.describe(params), visible),
        entry_point=family.entry_point(params),
        reference_solution=family.reference(params),
        visible_examples=tuple(visible),
        hidden_tests=hidden_tests,
        family=family.name,
        reasoning=reasoning,
        spec=canonical,
    )


def make_split(split: Split, n: int, seed: int = 0, difficulty: int = 2) -> list[CodeSample]:
    """`n` distinct samples of `split`, the same for the same (split, n, seed, difficulty). Families of the
    difficulty are drawn uniformly and a specification that hashes to the other split is skipped, so the two
    splits never share a specification (at any difficulty: the split ignores it)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"difficulty {difficulty!r}: expected one of {sorted(DIFFICULTIES)}")
    spec = DIFFICULTIES[difficulty]
    # difficulty 2 keeps the seed string it had before difficulties existed, so its samples did not change
    rng = random.Random(f"{DOMAIN}:{split}:{seed}" if difficulty == 2 else f"{DOMAIN}:{split}:{difficulty}:{seed}")
    samples: list[CodeSample] = []
    seen: set[str] = set()
    max_draws = 100 * n + 1000
    for _ in range(max_draws):
        if len(samples) == n:
            return samples
        family = rng.choice(spec.families)
        params = family.draw_params(rng)
        if split_of(canonical_task(family.name, params)) != split:
            continue
        sample = generate_sample(rng, family, params, spec.n_visible)
        if sample.id not in seen:
            seen.add(sample.id)
            samples.append(sample)
    if len(samples) == n:
        return samples
    raise ValueError(f"drew only {len(samples)} distinct {split} samples of {n} in {max_draws} draws; ask for fewer")


# ----------------------------------------------------------------------------------------------------------------
# Chat records (the SFT schema)
# ----------------------------------------------------------------------------------------------------------------


def answer_block(source: str) -> str:
    return f"```python\n{source.rstrip()}\n```"


def to_chat_record(sample: CodeSample, mode: RecordMode) -> dict[str, Any]:
    """`{"messages": [user, assistant], "domain": "code", "mode": mode}`; thinking mode adds `reasoning_content`
    (the key `chat.Conversation.to_dict` writes, so a record survives from_dict → to_dict unchanged)."""
    if mode not in ("think", "chat"):
        raise ValueError(f"mode must be 'think' or 'chat', got {mode!r}")
    if sample.reference_solution is None:
        raise ValueError(f"sample {sample.id} has no reference solution, so it has no SFT target; use it for eval")
    assistant: dict[str, Any] = {"role": "assistant", "content": answer_block(sample.reference_solution)}
    if mode == "think":
        if not sample.reasoning:
            raise ValueError(f"sample {sample.id} has no reasoning trace for thinking mode; use mode='chat'")
        assistant["reasoning_content"] = sample.reasoning
    user = {"role": "user", "content": f"{sample.prompt}\n\n{ANSWER_INSTRUCTION}"}
    return {"messages": [user, assistant], "domain": DOMAIN, "mode": mode}


# ----------------------------------------------------------------------------------------------------------------
# The judge
# ----------------------------------------------------------------------------------------------------------------

_CODE_BLOCK = re.compile(r"^```(?:python3?|py)[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL | re.IGNORECASE)


def extract_code(completion: str) -> str | None:
    """The last closed ```python block of the answer; text up to the last `</think>` (the reasoning, where drafts
    live) is not searched. An unclosed block (a generation cut off by the length limit) does not count."""
    answer = completion.rsplit(THINK_END, 1)[-1]
    blocks = _CODE_BLOCK.findall(answer)
    return blocks[-1] if blocks else None


@dataclass(frozen=True)
class Judgement:
    reward: float
    status: Status
    reason: str
    failed_test: int | None = None  # index into hidden_tests
    stdout: str = ""
    stderr: str = ""
    output_truncated: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


# The harness the sandboxed interpreter runs (dsv4train/posttrain/rewards/sandbox.py has already set its limits and
# audit hook): the solution, then each test, then the result file with this run's nonce.
_RUNNER = r"""
import json, sys

def _short(text, limit=300):
    return text if len(text) <= limit else text[:limit] + "..."

def _error(exc):
    return _short(f"{type(exc).__name__}: {exc}")

def _run(config):
    try:
        code = compile(open("solution.py", encoding="utf-8").read(), "solution.py", "exec")
    except SyntaxError as exc:
        return {"status": "syntax_error", "detail": f"line {exc.lineno}: {exc.msg}"}
    except (ValueError, MemoryError, RecursionError) as exc:
        return {"status": "syntax_error", "detail": _error(exc)}
    namespace = {"__name__": "solution"}  # a demo under `if __name__ == "__main__":` does not run
    try:
        exec(code, namespace)
    except BaseException as exc:
        return {"status": "crashed", "detail": f"the solution raised while being defined: {_error(exc)}"}
    if not callable(namespace.get(config["entry_point"])):
        return {"status": "missing_entry_point", "detail": config["entry_point"]}
    for index, test in enumerate(config["tests"]):
        try:
            exec(compile(test, f"<hidden test {index}>", "exec"), namespace)
        except AssertionError as exc:
            message = f": {_short(str(exc))}" if str(exc) else ""
            return {"status": "test_failed", "test": index, "detail": "assertion failed" + message}
        except BaseException as exc:
            return {"status": "test_failed", "test": index, "detail": f"raised {_error(exc)}"}
    return {"status": "passed", "detail": str(len(config["tests"]))}

config = json.loads(sys.stdin.readline())
nonce = config.pop("nonce")
result = _run(config)
result["nonce"] = nonce
with open("result.json", "w", encoding="utf-8") as f:
    json.dump(result, f)
"""


DEFAULT_LIMITS = SandboxLimits()
DEFAULT_POLICY = SandboxPolicy()  # everything refused that the sandbox can refuse


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _verdict(run: SandboxResult, result: dict[str, Any] | None, timeout_s: float, tests: Sequence[str]):
    """(status, reason, failed test index) from what the sandboxed run left behind. A refusal outranks everything
    (the candidate tried what the sandbox forbids, whatever happened next), then the output limit, then time."""
    if run.refused is not None:
        return "refused", f"refused: {run.refused}", None
    if run.output_exceeded:
        return "output_limit", "output limit: it printed too much (the process group was killed)", None
    if run.timed_out:
        return "timeout", f"timeout: still running after {timeout_s:g} s (the process group was killed)", None
    if run.returncode == -signal.SIGXCPU:
        return "timeout", "timeout: the CPU time limit was reached (SIGXCPU)", None
    if result is None:
        code = run.returncode
        how = f"was killed by {_signal_name(-code)}" if code < 0 else f"exited with code {code}"
        return "crashed", f"crashed: the process {how} before reporting a result", None
    status, detail = result["status"], result.get("detail", "")
    if status == "passed":
        return "passed", f"passed: all {detail} hidden tests", None
    if status == "test_failed":
        index = result.get("test")
        if not isinstance(index, int) or not 0 <= index < len(tests):
            return "crashed", "crashed: the result names no hidden test (written by the solution?)", None
        test = tests[index] if len(tests[index]) <= 200 else tests[index][:200] + "..."
        return "test_failed", f"test failed: hidden test {index} `{test}`: {detail}", index
    if status == "missing_entry_point":
        return status, f"missing entry point: the code defines no function `{detail}`", None
    if status == "syntax_error":
        return status, f"syntax error: {detail}", None
    return "crashed", f"crashed: {detail}", None


def judge(
    completion: str,
    sample: CodeSample,
    timeout_s: float = 5.0,
    limits: SandboxLimits = DEFAULT_LIMITS,
    max_output_bytes: int = 16384,
    policy: SandboxPolicy = DEFAULT_POLICY,
) -> Judgement:
    """Run the last ```python block of `completion` against `sample.hidden_tests` in the sandbox (module docstring;
    dsv4train/posttrain/rewards/sandbox.py for its layers). Stdout and stderr keep their first `max_output_bytes`
    bytes each. A refused action, the output limit, a timeout or a crash scores 0 with the reason, logged at
    warning level for the first two (they are the candidate attacking the sandbox, not failing the task)."""
    code = extract_code(completion)
    if code is None:
        return Judgement(0.0, "no_code_block", "no code block: the answer has no closed ```python fenced block")
    nonce = secrets.token_hex(16)
    config = {"nonce": nonce, "entry_point": sample.entry_point, "tests": list(sample.hidden_tests)}
    run = run_python(
        _RUNNER,
        files={"solution.py": code},
        stdin=(json.dumps(config) + "\n").encode(),
        limits=limits,
        policy=policy,
        timeout_s=timeout_s,
        max_output_bytes=max_output_bytes,
        read_back=("result.json",),
        prefix="dsv4-code-judge-",
    )
    result = _parse_result(run.files.get("result.json"), nonce)
    status, reason, failed = _verdict(run, result, timeout_s, sample.hidden_tests)
    if status in ("refused", "output_limit"):
        _LOG.warning("code judge: sample %s scores 0: %s", sample.id, reason)
    return Judgement(
        reward=1.0 if status == "passed" else 0.0,
        status=status,
        reason=reason,
        failed_test=failed,
        stdout=run.stdout,
        stderr=run.stderr,
        output_truncated=run.output_truncated,
        extra={
            "returncode": run.returncode,
            "network": run.network,
            "pid_namespace": run.pid_namespace,
            "pid": run.pid,
            "wall_s": run.wall_s,
        },
    )


def _parse_result(data: bytes | None, nonce: str) -> dict[str, Any] | None:
    """The harness's result, or None when there is none or it lacks this run's nonce (written by someone else)."""
    if data is None:
        return None
    try:
        result = json.loads(data.decode("utf-8"))
    except ValueError:
        return None
    if not isinstance(result, dict) or result.get("nonce") != nonce or "status" not in result:
        return None
    return result


def score(completion_text: str, sample: CodeSample, timeout_s: float = 5.0) -> tuple[float, str]:
    """(1.0 if every hidden test passes else 0.0, the reason), the reward GRPO and `dsv4 eval` use."""
    verdict = judge(completion_text, sample, timeout_s=timeout_s)
    return verdict.reward, verdict.reason


# ----------------------------------------------------------------------------------------------------------------
# MBPP / HumanEval-style jsonl
# ----------------------------------------------------------------------------------------------------------------


def _first_function_name(source: str) -> str | None:
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return None
    return next((node.name for node in tree.body if isinstance(node, ast.FunctionDef)), None)


def _require_str(record: dict[str, Any], key: str, where: str) -> str:
    value = record[key]
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: {key!r} must be a non-empty string, got {type(value).__name__}")
    return value


def sample_from_record(record: Any, where: str) -> CodeSample:
    """One MBPP record (`prompt` or `text`, `test_list`, optional `test_setup_code`/`test_imports`, `code`) or
    HumanEval record (`prompt`, `test` defining `check(candidate)`, `entry_point`, `canonical_solution`)."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    prompt_key = "prompt" if "prompt" in record else "text" if "text" in record else None
    if prompt_key is None:
        raise ValueError(f'{where}: no "prompt" (or MBPP\'s "text"): the task for the model is missing')
    prompt = _require_str(record, prompt_key, where)
    reference = record.get("code")
    if isinstance(record.get("canonical_solution"), str):  # HumanEval: the prompt is the head, this the body
        reference = prompt + record["canonical_solution"]
    if reference is not None and not isinstance(reference, str):
        raise ValueError(f"{where}: 'code' must be a string, got {type(reference).__name__}")
    entry_point = record.get("entry_point") or (_first_function_name(reference) if reference else None)
    if entry_point is None:
        raise ValueError(f'{where}: no "entry_point", and no "code" whose first function would name it; add one')
    if not isinstance(entry_point, str) or not entry_point.isidentifier():
        raise ValueError(f"{where}: 'entry_point' must be a Python identifier, got {entry_point!r}")
    if "test_list" in record:
        tests = record["test_list"]
        if not isinstance(tests, list) or not tests or not all(isinstance(t, str) and t.strip() for t in tests):
            raise ValueError(f"{where}: 'test_list' must be a non-empty list of test strings")
        imports = record.get("test_imports") or []
        setup = "\n".join([*imports, record.get("test_setup_code") or ""]).strip()
        hidden = tuple(f"{setup}\n{t}" if setup else t for t in tests)
    elif "test" in record:
        test = _require_str(record, "test", where)
        hidden = (f"{test}\n\ncheck({entry_point})\n",)
    else:
        raise ValueError(f'{where}: no tests: give "test_list" (MBPP) or "test" with check(candidate) (HumanEval)')
    task_id = record.get("task_id")
    return CodeSample(
        id=str(task_id) if task_id is not None else where,
        prompt=prompt,
        entry_point=entry_point,
        reference_solution=reference,
        visible_examples=(),
        hidden_tests=hidden,
        family=record.get("source", "jsonl") if isinstance(record.get("source"), str) else "jsonl",
    )


def load_jsonl(path: str | os.PathLike) -> list[CodeSample]:
    """Every record of an MBPP/HumanEval-style jsonl file; blank lines are skipped, any bad line raises a
    ValueError naming the file and the line."""
    path = Path(path)
    samples = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
            samples.append(sample_from_record(record, where))
    return samples


def iter_records(samples: Iterable[CodeSample], mode: RecordMode) -> Iterable[dict[str, Any]]:
    """SFT records of `samples` in one mode (a convenience for writing jsonl)."""
    return (to_chat_record(s, mode) for s in samples)
