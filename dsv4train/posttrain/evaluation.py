"""`dsv4 eval`: the accuracy of a model on the offline domains (dsv4train/data/tasks/), per task.

For each task the problems are `make_split(split, n, seed)` of its module (the same problems `dsv4 data tasks
--seed S` writes to test.jsonl). Each prompt is the SFT record's user turn, taken from the record that
`math.to_record` / `code.to_chat_record` write, so a fine-tuned model sees exactly its training format, rendered
with `chat.render(..., mode, add_generation_prompt=True)` (chat mode ends the prompt with `<｜Assistant｜></think>`,
think mode with `<｜Assistant｜><think>`) and tokenized without added special tokens (BOS is in the text). The
completions come from the generation engine (`dsv4train.inference.engine`, KV cache; greedy, or sampled with one
seed per problem and sample; `generate=` takes any function with its signature, e.g. `inference.full_forward`'s),
are decoded with the special tokens kept (the scorers read the answer after the last `</think>`), minus a trailing
EOS, and scored by the task's own verifier (`math.score`, `code.score`: 1.0 or 0.0 and a reason).

Accuracy is the mean score over the n problems; with `samples` K > 1 it is pass@1 averaged over the K samples of
each problem (the mean over problems of each problem's mean score). A prompt longer than the model's
`max_seq_len - 1` tokens is not generated: it is counted in `prompt_too_long` and scored 0 (never dropped, so n
stays the number of problems asked for). `finished` counts the generations that ended with EOS (of `generations`
= (n - prompt_too_long) * K); the others ran into `max_new_tokens` or `max_seq_len`.

The result, written as JSON, is `{"<task>": {"accuracy", "n", "mode", "split", "samples", "temperature",
"max_new_tokens", "prompt_too_long", "finished", "generations", "examples": [first 3 {prompt, completion, score,
reason}]}, "model": path, "tokenizer": what was done to it, "seconds": wall time}`.
"""

from __future__ import annotations

import hashlib
import json
import math as pymath
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer
from torch import nn

from dsv4train.config.errors import ConfigError
from dsv4train.data import chat
from dsv4train.data.tasks import code, math
from dsv4train.inference.engine import generate_with_engine
from dsv4train.inference.full_forward import DEFAULT_BATCH_SIZE
from dsv4train.train.run_files import run_dir_of

TASKS = ("math", "code")
MODES = ("chat", "think")
SPLITS = ("train", "test")
N_EXAMPLES = 3
EVAL_JSON = "eval.json"
SAMPLED_TEMPERATURE = 1.0  # the temperature of --samples K > 1 when none is given: the model's own distribution


@dataclass(frozen=True)
class EvalSettings:
    """What to evaluate and how. `temperature` None means greedy (0.0) for one sample, SAMPLED_TEMPERATURE for
    several; several samples of a greedy decoder would be K copies of one answer, so that is refused."""

    tasks: tuple[str, ...] = TASKS
    split: str = "test"
    mode: str = "chat"
    n: int = 50
    samples: int = 1
    temperature: float | None = None
    max_new_tokens: int = 256
    batch_size: int = DEFAULT_BATCH_SIZE
    seed: int = 0
    math_difficulty: int = 2  # data/tasks/math.py DIFFICULTIES; must be the one the SFT records were written with
    code_difficulty: int = 2  # data/tasks/code.py DIFFICULTIES; likewise
    progress: bool = True

    def __post_init__(self):
        unknown = [t for t in self.tasks if t not in TASKS]
        _require(bool(self.tasks) and not unknown, "--tasks", f"unknown {unknown}; choose from {', '.join(TASKS)}")
        _require(len(set(self.tasks)) == len(self.tasks), "--tasks", f"{list(self.tasks)} names a task twice")
        _require(self.split in SPLITS, "--split", f"must be one of {SPLITS}, got {self.split!r}")
        _require(self.mode in MODES, "--mode", f"must be one of {MODES}, got {self.mode!r}")
        for key, value in (("--n", self.n), ("--samples", self.samples), ("--max-new-tokens", self.max_new_tokens)):
            _require(_positive_int(value), key, f"must be a positive integer, got {value!r}")
        _require(_positive_int(self.batch_size), "--batch-size", f"must be a positive integer, got {self.batch_size!r}")
        if self.temperature is not None:
            ok = pymath.isfinite(self.temperature) and self.temperature >= 0
            _require(ok, "--temperature", f"must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        _require(
            self.samples == 1 or self.sampling_temperature > 0,
            "--samples",
            f"{self.samples} samples need --temperature > 0 (greedy decoding gives the same answer every time); "
            f"leave --temperature out for {SAMPLED_TEMPERATURE}",
        )

    @property
    def sampling_temperature(self) -> float:
        if self.temperature is not None:
            return float(self.temperature)
        return 0.0 if self.samples == 1 else SAMPLED_TEMPERATURE


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


# ---------------------------------------------------------------------------------------------------- problems
@dataclass(frozen=True)
class Problem:
    """One problem: the user turn of its SFT record and its verifier, completion text -> (score, reason)."""

    user_text: str
    score: Callable[[str], tuple[float, str]] = field(repr=False)


def sft_user_text(record: dict[str, Any]) -> str:
    """The user turn of an SFT record (its first message), the text the model was fine-tuned to answer."""
    first = record["messages"][0]
    assert first["role"] == "user", f"an SFT record of the tasks starts with the user turn, got {first['role']!r}"
    return first["content"]


def task_problems(
    task: str, split: str, n: int, seed: int, mode: str, math_difficulty: int = 2, code_difficulty: int = 2
) -> list[Problem]:
    """The first n problems of `task`'s split for `seed`, each with the user text its SFT record of `mode` has."""
    if task == "math":
        return [
            Problem(sft_user_text(math.to_record(s, mode)), lambda text, s=s: math.score(text, s.answer))
            for s in math.make_split(split, n, seed, difficulty=math_difficulty)
        ]
    if task == "code":
        return [
            Problem(sft_user_text(code.to_chat_record(s, mode)), lambda text, s=s: code.score(text, s))
            for s in code.make_split(split, n, seed, difficulty=code_difficulty)
        ]
    raise ValueError(f"unknown task {task!r}: expected one of {TASKS}")


def prompt_text(user_text: str, mode: str) -> str:
    """The rendered conversation of one user turn, up to and including the assistant opening of `mode`."""
    conversation = chat.conversation_from_dict({"messages": [{"role": "user", "content": user_text}]})
    return chat.render(conversation, mode, add_generation_prompt=True)


def completion_text(tokenizer: Tokenizer, ids: Sequence[int]) -> str:
    """Generated ids as text, special tokens kept (`</think>` separates reasoning from answer), a final EOS removed."""
    text = tokenizer.decode(list(ids), skip_special_tokens=False)
    return text[: -len(chat.EOS)] if text.endswith(chat.EOS) else text


def sample_seed(seed: int, task: str, problem: int, sample: int) -> int:
    """The sampling seed of one (task, problem, sample): fixed by these alone, whatever n, batch or other tasks."""
    key = f"{seed}:{task}:{problem}:{sample}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") >> 1


def pass_at_1(scores_per_problem: Sequence[Sequence[float]]) -> float:
    """pass@1 averaged over samples: the mean over problems of each problem's mean score (K scores each)."""
    if not scores_per_problem:
        raise ValueError("no problems to average")
    return sum(sum(s) / len(s) for s in scores_per_problem) / len(scores_per_problem)


# ---------------------------------------------------------------------------------------------------- evaluating
Generate = Callable[..., list[list[int]]]  # generate_with_engine's signature


def evaluate_task(
    model: nn.Module, tokenizer: Tokenizer, task: str, settings: EvalSettings, generate: Generate = generate_with_engine
) -> dict[str, Any]:
    """The result entry of one task (module docstring)."""
    eos_id = tokenizer.token_to_id(chat.EOS)
    if eos_id is None:
        raise ConfigError(f"the tokenizer has no {chat.EOS!r} token; give the tokenizer the model was trained with")
    s = settings
    problems = task_problems(task, s.split, s.n, s.seed, s.mode, s.math_difficulty, s.code_difficulty)
    prompts = [prompt_text(p.user_text, settings.mode) for p in problems]
    prompt_ids = [tokenizer.encode(t, add_special_tokens=False).ids for t in prompts]
    max_seq_len = int(model.cfg.max_seq_len)
    fits = [i for i, ids in enumerate(prompt_ids) if len(ids) <= max_seq_len - 1]
    K = settings.samples
    requests = [(i, k) for i in fits for k in range(K)]
    generated = generate(
        model,
        [prompt_ids[i] for i, _ in requests],
        settings.max_new_tokens,
        eos_id,
        temperature=settings.sampling_temperature,
        batch_size=settings.batch_size,
        progress=settings.progress,
        request_seeds=[sample_seed(settings.seed, task, i, k) for i, k in requests],
    )

    too_long = f"prompt too long: the model's max_seq_len is {max_seq_len}, scored 0"
    scores = [[0.0] * K for _ in problems]
    completions: list[list[tuple[str, str]]] = [[("", f"{too_long} ({len(ids)} tokens)")] * K for ids in prompt_ids]
    for (i, k), ids in zip(requests, generated):
        text = completion_text(tokenizer, ids)
        scores[i][k], reason = problems[i].score(text)
        completions[i][k] = (text, reason)
    examples = [
        {
            "prompt": prompts[i],
            "completion": completions[i][0][0],
            "score": scores[i][0],
            "reason": completions[i][0][1],
        }
        for i in range(min(N_EXAMPLES, len(problems)))
    ]
    return {
        "accuracy": pass_at_1(scores),
        "n": len(problems),
        "mode": settings.mode,
        "split": settings.split,
        "samples": K,
        "temperature": settings.sampling_temperature,
        "max_new_tokens": settings.max_new_tokens,
        "prompt_too_long": len(problems) - len(fits),
        "finished": sum(1 for ids in generated if ids and ids[-1] == eos_id),
        "generations": len(generated),
        "examples": examples,
    }


def evaluate(
    model: nn.Module, tokenizer: Tokenizer, settings: EvalSettings, generate: Generate = generate_with_engine
) -> dict[str, dict[str, Any]]:
    """{task: result entry} for every task of `settings`; `model` is used as it is (device, indexer mode)."""
    return {task: evaluate_task(model, tokenizer, task, settings, generate) for task in settings.tasks}


# ---------------------------------------------------------------------------------------------------- a model on disk
def default_out_path(model_path: Path) -> Path:
    """Where eval.json goes without --out: inside the run directory or model folder MODEL is, and for a
    `checkpoints/step_<N>/` folder beside it as `checkpoints/step_<N>.eval.json` (inside, it would be deleted with
    the checkpoint when training rotates it out; one file per step, so evaluating several steps keeps them all)."""
    run = run_dir_of(model_path)
    if run is not None and run != model_path:
        return model_path.parent / f"{model_path.name}.eval.json"
    return model_path / EVAL_JSON


def load_for_eval(model_path: Path, tokenizer_path: str, device: torch.device) -> tuple[Tokenizer, nn.Module, str]:
    """(tokenizer, model in eval mode with the sparse indexer, as trained, on `device`, the tokenizer note)."""
    from dsv4train.posttrain.sft import load_init  # SFT's loader: chat tokens ensured, model rows grown to match

    tokenizer, model, note = load_init(str(model_path), tokenizer_path, seed=0)
    model = model.to(device).eval()
    model.set_indexer_mode("sparse")
    return tokenizer, model, note


def write_json_atomically(path: Path, payload: dict) -> None:
    """Write `payload` to `path` through a temporary file, so an interrupted write leaves the old file whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(partial, path)


def run_eval(
    model_path: Path,
    settings: EvalSettings,
    tokenizer_path: str = "",
    out: Path | None = None,
    device: torch.device | None = None,
    report: Callable[[str], None] = print,
) -> tuple[dict[str, Any], Path]:
    """Load MODEL, evaluate it, write the JSON (to `out` or `default_out_path`); returns (payload, where)."""
    started = time.perf_counter()
    device = device if device is not None else torch.device("cpu")
    if not model_path.exists():
        raise FileNotFoundError(
            f"MODEL {model_path}: no such file or folder (a dsv4 folder, a run directory or an HF export)"
        )
    tokenizer, model, note = load_for_eval(model_path, tokenizer_path, device)
    report(f"dsv4 eval: {model_path} on {device}; tokenizer: {note}")
    results = evaluate(model, tokenizer, settings)
    payload: dict[str, Any] = {
        **results,
        "model": str(model_path),
        "tokenizer": note,
        "seconds": round(time.perf_counter() - started, 3),
    }
    where = out if out is not None else default_out_path(model_path)
    write_json_atomically(where, payload)
    return payload, where


def format_table(results: dict[str, Any]) -> str:
    """The printed summary: one line per task."""
    header = (
        f"{'task':<6} {'mode':<6} {'split':<6} {'n':>5} {'K':>3} {'temp':>5} {'accuracy':>9} {'finished':>10} "
        f"{'too long':>9}"
    )
    lines = [header, "-" * len(header)]
    for task in TASKS:
        r = results.get(task)
        if r is None:
            continue
        finished = f"{r['finished']}/{r['generations']}"
        lines.append(
            f"{task:<6} {r['mode']:<6} {r['split']:<6} {r['n']:>5} {r['samples']:>3} {r['temperature']:>5.2f} "
            f"{r['accuracy']:>9.3f} {finished:>10} {r['prompt_too_long']:>9}"
        )
    return "\n".join(lines)
