"""`dsv4 eval` (dsv4train/posttrain/evaluation.py, dsv4train/cli/eval.py): prompts in the SFT records' format, the
scorer path (a scripted "model" that spells a known right or wrong answer gives accuracy exactly 1 or 0, per task
and mode), pass@1 over K samples, prompts too long counted, the JSON, where it is written, the CLI on a tiny saved
model, and the arguments it refuses."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from dsv4train.cli.eval import eval_main
from dsv4train.data import chat
from dsv4train.data.tasks import code, math
from dsv4train.data.tasks.records import domain_records
from dsv4train.data.tokenizer import train_tokenizer
from dsv4train.inference.full_forward import generate_full_forward
from dsv4train.models.model import DSV4Model
from dsv4train.models.pretrained import save_dsv4
from dsv4train.posttrain.evaluation import (
    EvalSettings,
    default_out_path,
    evaluate,
    pass_at_1,
    prompt_text,
    task_problems,
)
from dsv4train.testing.toy_configs import tiny_config

# The V4 chat format written out (arch ref §9.4), independently of dsv4train/data/chat.py.
BOS, EOS_TEXT, USER, ASSISTANT = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"
THINK_START, THINK_END = "<think>", "</think>"
N = 2
ENTRY_KEYS = {
    "accuracy",
    "n",
    "mode",
    "split",
    "samples",
    "temperature",
    "max_new_tokens",
    "prompt_too_long",
    "finished",
    "generations",
    "examples",
}


@pytest.fixture(scope="module")
def tok():
    """A byte-level BPE of 512 tokens (chat tokens at their fixed ids) trained on a few hundred rendered records."""
    records = [*domain_records("math", "train", 120, seed=0), *domain_records("code", "train", 40, seed=0)]
    docs = [chat.render(chat.Conversation.from_dict(r, ("domain", "mode")), r["mode"]) for r in records]
    return train_tokenizer(docs, 512)


def hand_prompt(task: str, sample, mode: str) -> str:
    """The prompt the SFT records imply, written from the task modules' documented user-turn format."""
    if task == "math":
        user = f"{sample.prompt}\n{math.INSTRUCTION}"
    else:
        user = f"{sample.prompt}\n\n{code.ANSWER_INSTRUCTION}"
    return BOS + USER + user + ASSISTANT + (THINK_END if mode == "chat" else THINK_START)


def samples_of(task: str, n: int = N, split: str = "test", seed: int = 0):
    return (math if task == "math" else code).make_split(split, n, seed)


def right_answer(task: str, sample, mode: str) -> str:
    if task == "math":
        answer, reasoning = f"The answer is \\boxed{{{sample.answer}}}", "\n".join(sample.reasoning_steps)
    else:
        answer, reasoning = code.answer_block(sample.reference_solution), sample.reasoning
    return answer if mode == "chat" else reasoning + THINK_END + answer


def wrong_answer(task: str, sample, mode: str) -> str:
    if task == "math":
        answer = f"The answer is \\boxed{{{sample.answer}1}}"  # another number: "7" -> "71", "-7/2" -> "-7/21"
    else:
        answer = code.answer_block(f"def {sample.entry_point}(*args):\n    return None")
    return answer if mode == "chat" else "Let me think." + THINK_END + answer


class ScriptedLM(nn.Module):
    """A causal "model" that continues each scripted prompt (token ids) with its script and then EOS, at any
    temperature: the scripted token's logit is 0 and every other one -1e4, so softmax gives it probability 1. A
    prompt with no script is an error (a prompt the evaluation built differently from the test's)."""

    def __init__(self, scripts: dict[tuple[int, ...], list[list[int]]], vocab: int, eos_id: int, max_seq_len=1024):
        super().__init__()
        self.scripts, self.vocab, self.eos_id = scripts, vocab, eos_id
        self.cfg = SimpleNamespace(max_seq_len=max_seq_len)
        self.calls = 0

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        B, L = input_ids.shape
        logits = torch.full((B, L, self.vocab), -1e4)
        for b in range(B):
            row = input_ids[b].tolist()
            prompt = next((p for p in self.scripts if tuple(row[: len(p)]) == p), None)
            if prompt is None:
                raise KeyError(f"ScriptedLM: no script for a prompt starting {row[:12]}")
            script = self.scripts[prompt]
            for t in range(len(prompt) - 1, L):
                j = t + 1 - len(prompt)
                logits[b, t, script[j] if j < len(script) else self.eos_id] = 0.0
        return logits


def scripted(tok, task: str, mode: str, answers: list[str]) -> ScriptedLM:
    """A ScriptedLM answering the first len(answers) problems of `task` with these texts (each followed by EOS)."""
    eos_id = tok.token_to_id(EOS_TEXT)
    scripts = {}
    for sample, answer in zip(samples_of(task, len(answers)), answers):
        prompt_ids = tok.encode(hand_prompt(task, sample, mode), add_special_tokens=False).ids
        scripts[tuple(prompt_ids)] = tok.encode(answer, add_special_tokens=False).ids + [eos_id]
    return ScriptedLM(scripts, tok.get_vocab_size(), eos_id)


def evaluate_fake(model: nn.Module, tok, s: EvalSettings) -> dict:
    """`evaluate` of a scripted model: those have the plain forward only, not the KV cache the engine needs, so they
    generate through the engine's reference (inference/full_forward.py)."""
    return evaluate(model, tok, s, generate=generate_full_forward)


def settings(task: str, mode: str, **kw) -> EvalSettings:
    return EvalSettings(**{"tasks": (task,), "mode": mode, "n": N, "max_new_tokens": 400, "progress": False, **kw})


# ---------------------------------------------------------------------------------------------------- prompts
@pytest.mark.parametrize("task", ["math", "code"])
@pytest.mark.parametrize("mode", ["chat", "think"])
def test_prompts_are_the_sft_records_text_up_to_the_answer(task, mode):
    """The eval prompt is what the SFT record's rendering has before the assistant's span: an SFT model sees its
    training format, and the hand-written format agrees."""
    records = [r for r in domain_records(task, "test", N, seed=0) if r["mode"] == mode]
    for problem, record, sample in zip(task_problems(task, "test", N, 0, mode), records, samples_of(task)):
        rendered = chat.render_with_spans(chat.Conversation.from_dict(record, ("domain", "mode")), mode, False)
        text = prompt_text(problem.user_text, mode)
        assert text == rendered.text[: rendered.assistant_spans[0].start]
        assert text == hand_prompt(task, sample, mode)


# ---------------------------------------------------------------------------------------------------- scoring
@pytest.mark.parametrize("task", ["math", "code"])
@pytest.mark.parametrize("mode", ["chat", "think"])
def test_a_right_answer_scores_one_and_a_wrong_one_zero(tok, task, mode):
    for answer, expected in ((right_answer, 1.0), (wrong_answer, 0.0)):
        model = scripted(tok, task, mode, [answer(task, s, mode) for s in samples_of(task)])
        entry = evaluate_fake(model, tok, settings(task, mode))[task]
        assert entry["accuracy"] == expected, entry["examples"]
        assert entry["n"] == N and entry["finished"] == N and entry["generations"] == N
        assert [e["score"] for e in entry["examples"]] == [expected] * N


@pytest.mark.parametrize("task", ["math", "code"])
def test_an_answer_given_only_in_the_reasoning_scores_zero(tok, task):
    """Think mode: the scorers read the answer after `</think>`, so the completion must keep that special token."""
    answers = [right_answer(task, s, "chat") + THINK_END + "I am not sure." for s in samples_of(task)]
    entry = evaluate_fake(scripted(tok, task, "think", answers), tok, settings(task, "think"))[task]
    assert entry["accuracy"] == 0.0, entry["examples"]
    assert entry["examples"][0]["completion"] == answers[0]  # special tokens kept, the final EOS removed


def test_half_right_gives_one_half(tok):
    samples = samples_of("math")
    model = scripted(tok, "math", "chat", [right_answer("math", samples[0], "chat"), "The answer is \\boxed{x}"])
    entry = evaluate_fake(model, tok, settings("math", "chat"))["math"]
    assert entry["accuracy"] == 0.5
    assert entry["examples"][1]["reason"].startswith("wrong")


# ---------------------------------------------------------------------------------------------------- samples
def test_pass_at_1_averages_each_problems_samples_then_the_problems():
    assert pass_at_1([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]]) == pytest.approx(1.75 / 3)
    assert pass_at_1([[1.0], [0.0]]) == 0.5


def test_k_samples_are_each_generated_and_scored(tok):
    samples = samples_of("math")
    model = scripted(
        tok, "math", "chat", [right_answer("math", samples[0], "chat"), wrong_answer("math", samples[1], "chat")]
    )
    entry = evaluate_fake(model, tok, settings("math", "chat", samples=3))["math"]
    assert entry["samples"] == 3 and entry["temperature"] == 1.0  # the default for several samples
    assert entry["accuracy"] == 0.5 and entry["generations"] == 6 and entry["finished"] == 6


class CoinLM(nn.Module):
    """After a prompt of `prompt_len` tokens: one of the `branches`' first tokens with probability 1/2 each, then the
    rest of the branch it drew, then EOS."""

    def __init__(self, prompt_len: int, branches: list[list[int]], eos_id: int, vocab: int):
        super().__init__()
        self.prompt_len, self.branches, self.eos_id, self.vocab = prompt_len, branches, eos_id, vocab
        self.cfg = SimpleNamespace(max_seq_len=1024)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        B, L = input_ids.shape
        logits = torch.full((B, L, self.vocab), -1e4)
        logits[:, self.prompt_len - 1, [branch[0] for branch in self.branches]] = 0.0
        for b in range(B):
            if L <= self.prompt_len:
                continue
            branch = next(br for br in self.branches if br[0] == input_ids[b, self.prompt_len])
            for t in range(self.prompt_len, L):
                j = t + 1 - self.prompt_len
                logits[b, t, branch[j] if j < len(branch) else self.eos_id] = 0.0
        return logits


def test_samples_draw_with_their_own_seeds(tok):
    """A coin-flip model, one problem, 8 samples: each sample has its own seed, so they are not all one answer, and
    the same seed gives the same draws again."""
    sample = samples_of("math", 1)[0]
    prompt_len = len(tok.encode(hand_prompt("math", sample, "chat"), add_special_tokens=False).ids)
    branches = [
        tok.encode(f"{letter} The answer is \\boxed{{{value}}}", add_special_tokens=False).ids
        for letter, value in (("A", sample.answer), ("B", sample.answer + "1"))
    ]
    assert branches[0][0] != branches[1][0]  # the coin picks the branch by its first token
    model = CoinLM(prompt_len, branches, tok.token_to_id(EOS_TEXT), tok.get_vocab_size())
    s = settings("math", "chat", n=1, samples=8, temperature=1.0)
    first = evaluate_fake(model, tok, s)["math"]
    assert 0.0 < first["accuracy"] < 1.0 and first["finished"] == 8
    assert evaluate_fake(model, tok, s)["math"]["accuracy"] == first["accuracy"]


# ---------------------------------------------------------------------------------------------------- lengths
def test_prompts_too_long_are_counted_and_scored_zero(tok):
    samples = samples_of("math")
    model = scripted(tok, "math", "chat", [right_answer("math", s, "chat") for s in samples])
    shortest = min(len(tok.encode(hand_prompt("math", s, "chat"), add_special_tokens=False).ids) for s in samples)
    model.cfg.max_seq_len = shortest  # no prompt leaves room for a new token
    entry = evaluate_fake(model, tok, settings("math", "chat"))["math"]
    assert (entry["accuracy"], entry["prompt_too_long"], entry["generations"], entry["n"]) == (0.0, N, 0, N)
    assert entry["examples"][0]["reason"].startswith("prompt too long")
    assert model.calls == 0


def test_a_completion_cut_at_max_new_tokens_is_not_finished(tok):
    samples = samples_of("math")
    answers = [right_answer("math", s, "chat") for s in samples]
    model = scripted(tok, "math", "chat", answers)
    shortest = min(len(tok.encode(a, add_special_tokens=False).ids) for a in answers)
    entry = evaluate_fake(model, tok, settings("math", "chat", max_new_tokens=shortest - 1))["math"]  # `}` never comes
    assert (entry["accuracy"], entry["finished"], entry["generations"]) == (0.0, 0, N)
    assert entry["examples"][0]["reason"].startswith("malformed")


# ---------------------------------------------------------------------------------------------------- settings
@pytest.mark.parametrize(
    "kw, key",
    [
        ({"tasks": ("math", "poetry")}, "--tasks"),
        ({"tasks": ()}, "--tasks"),
        ({"n": 0}, "--n"),
        ({"samples": 2, "temperature": 0.0}, "--samples"),
        ({"samples": 0}, "--samples"),
        ({"temperature": -0.5}, "--temperature"),
        ({"mode": "think_max"}, "--mode"),
        ({"split": "dev"}, "--split"),
        ({"max_new_tokens": 0}, "--max-new-tokens"),
    ],
)
def test_bad_settings_name_the_option(kw, key):
    with pytest.raises(ValueError, match=f"^{key}: "):
        EvalSettings(**kw)


def test_one_sample_is_greedy_by_default_and_several_sample():
    assert EvalSettings().sampling_temperature == 0.0
    assert EvalSettings(samples=4).sampling_temperature == 1.0
    assert EvalSettings(samples=4, temperature=0.7).sampling_temperature == 0.7


# ---------------------------------------------------------------------------------------------------- the JSON path
def test_the_default_json_path(tmp_path):
    folder = tmp_path / "weights"
    folder.mkdir()
    assert default_out_path(folder) == folder / "eval.json"
    run = tmp_path / "run"
    (run / "checkpoints" / "step_4").mkdir(parents=True)
    (run / "config.resolved.yaml").write_text("seed: 0\n")
    assert default_out_path(run) == run / "eval.json"
    assert default_out_path(run / "checkpoints" / "step_4") == run / "checkpoints" / "step_4.eval.json"


# ---------------------------------------------------------------------------------------------------- the CLI
@pytest.fixture(scope="module")
def saved_model(tok, tmp_path_factory) -> Path:
    """A dsv4 folder of a tiny random model whose rows fit the tokenizer, its tokenizer.json beside the weights;
    max_seq_len 320 fits the code prompts (about 250 tokens with this tokenizer)."""
    model = DSV4Model(tiny_config(vocab_size=tok.get_vocab_size(), max_seq_len=320))
    model.init_weights(0)
    folder = save_dsv4(model, tmp_path_factory.mktemp("eval") / "model")
    tok.save(str(folder / "tokenizer.json"))
    return folder


def test_cli_end_to_end_writes_the_json_beside_the_model(saved_model, capsys):
    rc = eval_main([str(saved_model), "--n", "2", "--max-new-tokens", "3", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0, out
    payload = json.loads((saved_model / "eval.json").read_text())
    assert set(payload) == {"math", "code", "model", "tokenizer", "seconds"}
    assert payload["model"] == str(saved_model) and payload["seconds"] > 0
    for task in ("math", "code"):
        entry = payload[task]
        assert set(entry) == ENTRY_KEYS
        assert (entry["n"], entry["mode"], entry["split"], entry["samples"]) == (2, "chat", "test", 1)
        assert (entry["temperature"], entry["max_new_tokens"], entry["prompt_too_long"]) == (0.0, 3, 0)
        assert 0.0 <= entry["accuracy"] <= 1.0 and 0 <= entry["finished"] <= entry["generations"] == 2
        assert [set(e) for e in entry["examples"]] == [{"prompt", "completion", "score", "reason"}] * 2
        assert all(e["prompt"].endswith(ASSISTANT + THINK_END) for e in entry["examples"])
        assert f"{task:<6} chat   test       2" in out  # its table row


def test_cli_writes_to_out_in_think_mode_with_samples(saved_model, tmp_path, capsys):
    out_file = tmp_path / "nested" / "think.json"
    argv = [str(saved_model), "--tasks", "math", "--mode", "think", "--n", "1", "--samples", "2"]
    rc = eval_main([*argv, "--max-new-tokens", "2", "--no-progress", "--out", str(out_file)])
    assert rc == 0, capsys.readouterr()
    entry = json.loads(out_file.read_text())["math"]
    assert (entry["mode"], entry["samples"], entry["temperature"], entry["generations"]) == ("think", 2, 1.0, 2)
    assert entry["examples"][0]["prompt"].endswith(ASSISTANT + THINK_START)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["{missing}"], "no such file or folder"),
        (["{model}", "--tasks", "math,poetry"], "--tasks: unknown ['poetry']"),
        (["{model}", "--samples", "2", "--temperature", "0"], "--samples: 2 samples need --temperature > 0"),
        (["{model}", "--n", "0"], "--n: must be a positive integer, got 0"),
        (["{model}", "--tokenizer", "{missing}"], "tokenizer"),
    ],
)
def test_cli_refuses_bad_input_with_exit_2_and_a_message(saved_model, tmp_path, capsys, argv, message):
    argv = [a.format(model=saved_model, missing=tmp_path / "nope") for a in argv]
    assert eval_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("dsv4 eval: ") and message in err, err
    assert not (tmp_path / "nope").exists()
