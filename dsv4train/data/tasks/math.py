"""The `math` domain: seeded multi-step arithmetic and word problems with an exact answer, and their verifier.

Problems are sized for a toy model: small operands, 2–4 operations, every intermediate value bounded. Each problem
is a start value and a list of operations; its *canonical key* is that arithmetic alone (for example `7+5*3-4`),
whatever words it is dressed in. Three surfaces share one key:

    instructions   Start with 7. Add 5, then multiply by 3, then subtract 4. What number do you get?
    expression     Compute ((7 + 5) * 3) - 4.
    word           Mia has 7 shells. Mia gets 5 more shells. ... How many shells does Mia have now?

The split: a hash of the canonical key decides train or test (`split_of`, `TEST_SHARE` of all keys go to test), so
the same arithmetic can never land in both splits, whatever `n`, `seed`, `difficulty` or surface. Within a split a
key appears at most once. `make_split` draws problems from a seeded RNG and keeps those whose key belongs to the
requested split.

Answer format: the user message asks for the final answer as `\\boxed{N}` (the convention of DeepSeek-R1/V3 math
prompts and of math-verify), N a whole number or a fraction `a/b` in lowest terms. The assistant content ends with
`\\boxed{N}`. Thinking mode carries the steps as reasoning, one line each (`12 * 3 = 36`); chat mode answers
directly, without steps.

The verifier `score` reads the last `\\boxed{...}` after the last `</think>` (reasoning is not the answer) and
compares it with the reference as an exact rational number: `1,000` == 1000, `3.0` == 3, `-0` == 0, `6/8` ==
`\\frac{3}{4}` == 0.75. An answer that is not a plain number (`2^5`, `\\sqrt{4}`) goes to math-verify when the
`math_verify` package is importable; a plain number never does, because math-verify compares numbers after
rounding (0.333333 would match 1/3) and this domain's answers are exact. The reason string names which check
decided.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import random
import re
import threading
from dataclasses import dataclass
from fractions import Fraction
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

from dsv4train.data.chat import THINK_END

DOMAIN = "math"
Split = Literal["train", "test"]
SPLITS: tuple[Split, ...] = ("train", "test")
Mode = Literal["think", "chat"]
MODES: tuple[Mode, ...] = ("think", "chat")

# Share of canonical keys that belong to the test split. Changing it moves problems between splits: never change it
# for a data set that was already used.
TEST_SHARE = 0.2
# Bounds on every intermediate value, so a toy model never meets a large number.
MAX_ABS_VALUE = 999
MAX_DENOMINATOR = 100
_REJECTION_TRIES = 8

ANSWER_OPEN = "\\boxed{"
INSTRUCTION = "Give the final answer as \\boxed{N}, where N is a whole number or a fraction a/b in lowest terms."
# A \boxed{} holding more than this is malformed; it also keeps int() away from huge digit strings.
MAX_ANSWER_CHARS = 64
# math-verify's own default; it times out with signal.alarm, which only works in the main thread.
MATH_VERIFY_TIMEOUT_S = 5


class MathDataError(ValueError):
    """A line of a math data file that cannot be read; the message names the file and line."""


@dataclass(frozen=True)
class MathSample:
    """One problem. `answer` is canonical: `str(Fraction)`, e.g. "32" or "-7/2". `id` names the canonical key."""

    id: str
    prompt: str
    answer: str
    reasoning_steps: tuple[str, ...]


@dataclass(frozen=True)
class Difficulty:
    """How hard `make_split` makes a problem: operation count, operand sizes, allowed operations."""

    num_ops: tuple[int, int]  # inclusive range of operations per problem
    max_operand: int  # for + and -
    max_factor: int  # for * and / (and the bags-of-items step of word problems)
    ops: tuple[str, ...]
    exact_integers: bool  # every intermediate value is a non-negative integer (word problems always are)


DIFFICULTIES: dict[int, Difficulty] = {
    1: Difficulty(num_ops=(2, 2), max_operand=20, max_factor=0, ops=("+", "-"), exact_integers=True),
    2: Difficulty(num_ops=(2, 3), max_operand=20, max_factor=6, ops=("+", "-", "*"), exact_integers=True),
    3: Difficulty(num_ops=(3, 4), max_operand=20, max_factor=9, ops=("+", "-", "*", "/"), exact_integers=False),
}

SURFACES = ("instructions", "expression", "word")
NAMES = ("Ana", "Ben", "Mia", "Leo", "Sara", "Omar", "Ivy", "Noah", "Lena", "Raj")
ITEMS = ("apples", "marbles", "stickers", "shells", "coins", "pencils", "cards", "stamps")


# ---------------------------------------------------------------------------------------------------------------------
# Problems
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One operation on the running value. `factors=(a, b)` is a word problem's "a bags of b": it adds a*b."""

    op: str
    operand: int
    factors: tuple[int, int] | None = None

    def apply(self, value: Fraction) -> Fraction:
        if self.op == "+":
            return value + self.operand
        if self.op == "-":
            return value - self.operand
        if self.op == "*":
            return value * self.operand
        return value / self.operand

    def token(self) -> str:
        if self.factors is not None:
            return f"{self.op}{self.factors[0]}x{self.factors[1]}"
        return f"{self.op}{self.operand}"


def format_number(value: Fraction) -> str:
    """Canonical text of an exact number: "32", "-7/2"."""
    return str(value)


def canonical_key(start: int, steps: tuple[Step, ...]) -> str:
    """The arithmetic of a problem, independent of its wording: `7+5*3-4` (applied left to right)."""
    return str(start) + "".join(step.token() for step in steps)


def _key_digest(key: str) -> bytes:
    return hashlib.sha256(f"{DOMAIN}:{key}".encode()).digest()


def split_of(key: str) -> Split:
    """The split a canonical key belongs to: fixed by its hash, the same for every caller, seed and size."""
    return "test" if int.from_bytes(_key_digest(key)[:8], "big") < TEST_SHARE * 2**64 else "train"


def _within_bounds(value: Fraction, exact_integers: bool) -> bool:
    if abs(value) > MAX_ABS_VALUE or value.denominator > MAX_DENOMINATOR:
        return False
    return not exact_integers or (value.denominator == 1 and value >= 0)


@cache
def _step_candidates(op: str, spec: Difficulty) -> tuple[Step, ...]:
    """Every step `op` can take at this difficulty, before the bounds on the running value."""
    if op == "bags":
        factors = range(2, spec.max_factor + 1)
        return tuple(Step("+", a * b, (a, b)) for a in factors for b in factors)
    top = spec.max_operand if op in ("+", "-") else spec.max_factor
    return tuple(Step(op, k) for k in range(2, top + 1))


def _draw_step(rng: random.Random, value: Fraction, op: str, spec: Difficulty, exact_integers: bool) -> Step | None:
    """A step `op` drawn uniformly among those that keep `value` within bounds, or None when there is none.

    Rejection sampling first (a few tries are cheap and usually enough), then the exhaustive list: either way the
    draw is uniform over the valid steps.
    """
    candidates = _step_candidates(op, spec)
    for _ in range(_REJECTION_TRIES):
        step = rng.choice(candidates)
        if _within_bounds(step.apply(value), exact_integers):
            return step
    valid = [step for step in candidates if _within_bounds(step.apply(value), exact_integers)]
    return rng.choice(valid) if valid else None


def _draw_steps(rng: random.Random, start: int, spec: Difficulty, surface: str) -> tuple[Step, ...] | None:
    """A random chain of operations from `start`, or None when some step has no option within bounds."""
    exact_integers = spec.exact_integers or surface == "word"
    ops = list(spec.ops) + (["bags"] if surface == "word" and "*" in spec.ops else [])
    value, steps = Fraction(start), []
    for _ in range(rng.randint(*spec.num_ops)):
        rng.shuffle(ops)
        step = next((s for s in (_draw_step(rng, value, op, spec, exact_integers) for op in ops) if s), None)
        if step is None:
            return None
        value = step.apply(value)
        steps.append(step)
    return tuple(steps)


def _operand_text(value: Fraction) -> str:
    return format_number(value) if value.denominator == 1 else f"({format_number(value)})"


def reasoning_lines(start: int, steps: tuple[Step, ...]) -> tuple[str, ...]:
    """One line per arithmetic step, `12 * 3 = 36`; a bags step takes two lines (the product, then the sum)."""
    value, lines = Fraction(start), []
    for step in steps:
        new_value = step.apply(value)
        if step.factors is not None:
            a, b = step.factors
            lines.append(f"{a} * {b} = {a * b}")
        lines.append(f"{_operand_text(value)} {step.op} {step.operand} = {format_number(new_value)}")
        value = new_value
    return tuple(lines)


_INSTRUCTION_WORDS = {"+": "add {k}", "-": "subtract {k}", "*": "multiply by {k}", "/": "divide by {k}"}


def _instructions_prompt(start: int, steps: tuple[Step, ...]) -> str:
    phrases = ", then ".join(_INSTRUCTION_WORDS[step.op].format(k=step.operand) for step in steps)
    return f"Start with {start}. {phrases[0].upper()}{phrases[1:]}. What number do you get?"


def _expression_prompt(start: int, steps: tuple[Step, ...]) -> str:
    expression = str(start)
    for i, step in enumerate(steps):
        left = expression if i == 0 else f"({expression})"
        expression = f"{left} {step.op} {step.operand}"
    return f"Compute {expression}."


def _word_sentence(step: Step, name: str, item: str) -> str:
    if step.factors is not None:
        return f"{name} buys {step.factors[0]} bags with {step.factors[1]} {item} in each."
    k = step.operand
    return {
        "+": f"{name} gets {k} more {item}.",
        "-": f"{name} gives {k} {item} to a friend.",
        "*": f"Then {name} ends up with {k} times as many {item} as before.",
        "/": f"{name} splits the {item} into {k} equal piles and keeps one pile.",
    }[step.op]


def _word_prompt(rng: random.Random, start: int, steps: tuple[Step, ...]) -> str:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    sentences = [f"{name} has {start} {item}."] + [_word_sentence(step, name, item) for step in steps]
    return " ".join(sentences) + f" How many {item} does {name} have now?"


def _answer(start: int, steps: tuple[Step, ...]) -> Fraction:
    value = Fraction(start)
    for step in steps:
        value = step.apply(value)
    return value


def _draw_sample(rng: random.Random, spec: Difficulty, split: Split) -> tuple[str, MathSample] | None:
    surface = rng.choice(SURFACES)
    start = rng.randint(2, spec.max_operand)
    steps = _draw_steps(rng, start, spec, surface)
    if steps is None:
        return None
    key = canonical_key(start, steps)
    if surface == "instructions":
        prompt = _instructions_prompt(start, steps)
    elif surface == "expression":
        prompt = _expression_prompt(start, steps)
    else:
        prompt = _word_prompt(rng, start, steps)
    sample = MathSample(
        id=f"math-{split}-{_key_digest(key).hex()[:12]}",
        prompt=prompt,
        answer=format_number(_answer(start, steps)),
        reasoning_steps=reasoning_lines(start, steps),
    )
    return key, sample


def make_split(split: Split = "train", n: int = 1000, seed: int = 0, difficulty: int = 2) -> list[MathSample]:
    """`n` distinct problems of `split`, the same list for the same arguments. Train and test never share a key."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: expected one of {SPLITS}")
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"difficulty {difficulty!r}: expected one of {sorted(DIFFICULTIES)}")
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n={n!r}: expected a non-negative integer")
    spec = DIFFICULTIES[difficulty]
    rng = random.Random(f"{DOMAIN}/{split}/{difficulty}/{seed}")  # str seeds hash with sha512: stable across runs
    seen: set[str] = set()
    samples: list[MathSample] = []
    draws = 100 * n + 1000
    for _ in range(draws):
        if len(samples) == n:
            break
        drawn = _draw_sample(rng, spec, split)
        if drawn is None or drawn[0] in seen or split_of(drawn[0]) != split:
            continue
        seen.add(drawn[0])
        samples.append(drawn[1])
    if len(samples) < n:
        raise ValueError(
            f"found only {len(samples)} distinct {split} problems at difficulty {difficulty} in {draws} draws, "
            f"{n} asked: ask for fewer or raise the difficulty (its problem space is larger)"
        )
    return samples


# ---------------------------------------------------------------------------------------------------------------------
# SFT records
# ---------------------------------------------------------------------------------------------------------------------


def user_message(sample: MathSample) -> str:
    """The user turn: the problem, then the answer-format instruction (eval prompts must use the same text)."""
    return f"{sample.prompt}\n{INSTRUCTION}"


def final_answer(answer: str) -> str:
    """The assistant content: it ends with the answer in the format `score` reads."""
    return f"The answer is {ANSWER_OPEN}{answer}}}"


def to_record(sample: MathSample, mode: Mode = "think") -> dict[str, Any]:
    """An SFT record `{"messages", "domain", "mode"}`; thinking mode adds the steps as `reasoning_content`."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: expected one of {MODES}")
    assistant: dict[str, Any] = {"role": "assistant", "content": final_answer(sample.answer)}
    if mode == "think":
        assistant["reasoning_content"] = "\n".join(sample.reasoning_steps)
    messages = [{"role": "user", "content": user_message(sample)}, assistant]
    return {"messages": messages, "domain": DOMAIN, "mode": mode}


# ---------------------------------------------------------------------------------------------------------------------
# Verifier
# ---------------------------------------------------------------------------------------------------------------------

_LATEX_FRACTION = re.compile(r"([+-]?)\\[dt]?frac\{([+-]?\d+)\}\{([+-]?\d+)\}")
_SLASH_FRACTION = re.compile(r"([+-]?\d+)\s*/\s*([+-]?\d+)")
_DECIMAL = re.compile(r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


def parse_number(text: str) -> Fraction | None:
    """An exact number written as an integer, a decimal, `1,000`, `a/b` or `\\frac{a}{b}`; None for anything else."""
    s = re.sub(r"\\[,! ]", "", text).replace("\u2212", "-").strip().strip("$").strip()
    if len(s) > MAX_ANSWER_CHARS:
        return None
    fraction = _LATEX_FRACTION.fullmatch(s)
    if fraction:
        sign, numerator, denominator = fraction.groups()
        s = f"{sign}{numerator}/{denominator}".replace("--", "").replace("+-", "-")
    fraction = _SLASH_FRACTION.fullmatch(s)
    if fraction:
        numerator, denominator = (int(part) for part in fraction.groups())
        return None if denominator == 0 else Fraction(numerator, denominator)
    if _DECIMAL.fullmatch(s):
        return Fraction(s.replace(",", ""))
    return None


def reference_value(answer: str | int | Fraction) -> Fraction:
    """The reference answer as an exact number; a reference that is not one is a bug in the data."""
    if isinstance(answer, Fraction):
        return answer
    if isinstance(answer, int) and not isinstance(answer, bool):
        return Fraction(answer)
    if isinstance(answer, str):
        value = parse_number(answer)
        if value is not None:
            return value
    raise ValueError(f"reference answer {answer!r} is not an exact number (int, Fraction, or a string like '-7/2')")


def extract_boxed(text: str) -> tuple[str | None, str]:
    """(content of the last `\\boxed{...}`, "") or (None, what is wrong). Braces inside it must balance."""
    start = text.rfind(ANSWER_OPEN)
    if start < 0:
        return None, "no \\boxed{...} final answer"
    depth, begin = 1, start + len(ANSWER_OPEN)
    for i in range(begin, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            content = text[begin:i].strip()
            if not content:
                return None, "malformed: empty \\boxed{}"
            if len(content) > MAX_ANSWER_CHARS:
                return None, f"malformed: \\boxed{{}} holds {len(content)} characters (limit {MAX_ANSWER_CHARS})"
            return content, ""
    return None, "malformed: the last \\boxed{ is never closed"


@cache
def _math_verify() -> ModuleType | None:
    try:
        return importlib.import_module("math_verify")
    except ImportError:
        return None


def _latex(value: Fraction) -> str:
    if value.denominator == 1:
        return str(value.numerator)
    sign = "-" if value < 0 else ""
    return f"{sign}\\frac{{{abs(value.numerator)}}}{{{value.denominator}}}"


def _score_with_math_verify(math_verify: ModuleType, content: str, gold: Fraction) -> tuple[float, str]:
    timeout = MATH_VERIFY_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
    try:
        target = math_verify.parse(f"{ANSWER_OPEN}{content}}}", parsing_timeout=timeout)
        reference = math_verify.parse(f"${_latex(gold)}$", parsing_timeout=timeout)
        correct = bool(target) and bool(math_verify.verify(reference, target, timeout_seconds=timeout))
    except Exception as error:  # math-verify's parsers raise many kinds; any failure scores 0 and says why
        return 0.0, f"wrong (math-verify failed on \\boxed{{{content}}}: {type(error).__name__}: {error})"
    verdict = "correct" if correct else "wrong"
    return float(correct), f"{verdict} (math-verify): got \\boxed{{{content}}}, expected {format_number(gold)}"


def score(completion_text: str, answer: str | int | Fraction) -> tuple[float, str]:
    """(1.0 or 0.0, why): the last `\\boxed{}` after the last `</think>`, compared exactly with `answer`."""
    gold = reference_value(answer)
    content, problem = extract_boxed(completion_text.rpartition(THINK_END)[2])
    if content is None:
        return 0.0, problem
    value = parse_number(content)
    if value is not None:
        verdict = "correct" if value == gold else "wrong"
        got = f"got {content!r} = {format_number(value)}, expected {format_number(gold)}"
        return float(value == gold), f"{verdict} (exact numeric): {got}"
    math_verify = _math_verify()
    if math_verify is None:
        return 0.0, f"wrong (exact numeric; math-verify is not installed): \\boxed{{{content}}} is not a number"
    return _score_with_math_verify(math_verify, content, gold)


# ---------------------------------------------------------------------------------------------------------------------
# Real data
# ---------------------------------------------------------------------------------------------------------------------

_GSM8K_CALCULATOR = re.compile(r"<<[^<>]*>>")
GSM8K_FINAL = "####"


def _gsm8k_sample(line: str, where: str, index: int) -> MathSample:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as error:
        raise MathDataError(f"{where}: not valid JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(row, dict):
        raise MathDataError(f"{where}: expected a JSON object with 'question' and 'answer', got {type(row).__name__}")
    for key in ("question", "answer"):
        if not isinstance(row.get(key), str) or not row[key].strip():
            raise MathDataError(f"{where}: '{key}' must be a non-empty string, got {row.get(key)!r}")
    solution, marker, final = row["answer"].rpartition(GSM8K_FINAL)
    if not marker:
        raise MathDataError(f"{where}: 'answer' has no final '{GSM8K_FINAL} <number>' line")
    value = parse_number(final)
    if value is None:
        raise MathDataError(f"{where}: the final answer {final.strip()!r} after '{GSM8K_FINAL}' is not a number")
    steps = tuple(_GSM8K_CALCULATOR.sub("", part).strip() for part in solution.splitlines() if part.strip())
    return MathSample(
        id=f"gsm8k-{index}", prompt=row["question"].strip(), answer=format_number(value), reasoning_steps=steps
    )


def load_gsm8k_jsonl(path: str | Path) -> list[MathSample]:
    """GSM8K-style jsonl: one `{"question", "answer"}` per line, the answer's steps then `#### N`. Blank lines skip.

    The calculator annotations `<<48/2=24>>` are removed from the steps. Extra keys are ignored. A bad line raises
    MathDataError naming `path:line`. `id` is `gsm8k-<line number>`.
    """
    path = Path(path)
    samples = []
    with path.open(encoding="utf-8") as lines:
        for line_number, line in enumerate(lines, start=1):
            if line.strip():
                samples.append(_gsm8k_sample(line, f"{path}:{line_number}", line_number))
    return samples
