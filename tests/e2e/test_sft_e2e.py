"""`dsv4 sft` end to end, in subprocesses as a user runs it: a run directory like pre-training's, the loss on the
assistant's tokens only, bad records counted with their line numbers, a tokenizer without the chat tokens grown
and said so, resume by running the same command again, and refusals that name the problem."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from dsv4train.data.chat import EOS
from dsv4train.data.tasks.records import domain_records
from dsv4train.data.tokenizer import BOS, train_tokenizer
from dsv4train.models.model import DSV4Model
from dsv4train.models.pretrained import save_dsv4
from dsv4train.testing.toy_configs import tiny_config

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]
FAST = [
    "train.steps=4",
    "train.seq_len=128",
    "train.micro_batch_size=2",
    "train.eval_every=2",
    "train.eval_batches=1",
    "train.checkpoint_every=2",
    "train.progress_bar=false",
    "optim.warmup_steps=1",
]


def _dsv4(args, **kw):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "dsv4train.cli", *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=600
    )


def _records(n: int) -> list[dict]:
    return [*domain_records("math", "train", n, seed=0), *domain_records("code", "train", n // 4, seed=0)]


def _write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def _base(folder: Path, tokenizer: Tokenizer) -> Path:
    """A dsv4 folder of a small randomly initialised model, its tokenizer.json beside the weights."""
    cfg = tiny_config(vocab_size=tokenizer.get_vocab_size(), max_seq_len=128)
    model = DSV4Model(cfg)
    model.init_weights(0)
    save_dsv4(model, folder)
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> Path:
    """Good records, with four bad ones at known lines: unknown role (2), not JSON (4), empty assistant turn (7), an
    unknown key (9)."""
    good = [json.dumps(r) for r in _records(40)]
    bad = {
        2: json.dumps({"messages": [{"role": "robot", "content": "hi"}], "domain": "math", "mode": "chat"}),
        4: "{not json",
        7: json.dumps(
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}], "mode": "chat"}
        ),
        9: json.dumps({**_records(1)[0], "colour": "blue"}),
    }
    lines = list(good)
    for line_number in sorted(bad):
        lines.insert(line_number - 1, bad[line_number])
    return _write_jsonl(tmp_path_factory.mktemp("sft") / "train.jsonl", lines)


@pytest.fixture(scope="module")
def chat_tokenizer() -> Tokenizer:
    docs = [json.dumps(r) for r in _records(40)]
    return train_tokenizer(docs, 512)


def test_sft_run_directory_summary_and_resume(tmp_path, records, chat_tokenizer):
    base = _base(tmp_path / "base", chat_tokenizer)
    run = tmp_path / "run"
    r = _dsv4(["sft", f"sft.init={base}", f"data.train=[{records}]", f"run.dir={run}", *FAST])
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("config.resolved.yaml", "metrics.jsonl", "summary.json", "tokenizer.json"):
        assert (run / name).is_file(), name
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps_done"] == 4
    data = summary["data"]
    assert data["train_files"]["records"] == len(_records(40)) + 4
    assert data["train_files"]["bad"] == 4
    assert [b.split(":")[0].rsplit(" ", 1)[-1] for b in data["train_files"]["first_bad"]] == ["2", "4", "7", "9"]
    assert data["train_samples"] + data["val_samples"] + data["train_too_long"]["dropped"] + data["val_too_long"][
        "dropped"
    ] == len(_records(40))
    assert "every chat special token" in summary["tokenizer"]
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(s["loss"])) for s in steps if "loss" in s)

    # the run directory is a model load_pretrained accepts
    from dsv4train.train.pretrained import load_pretrained

    assert load_pretrained(run).cfg.vocab_size == chat_tokenizer.get_vocab_size()

    # the same command with more steps resumes from step 4
    r = _dsv4(["sft", f"sft.init={base}", f"data.train=[{records}]", f"run.dir={run}", *FAST, "train.steps=6"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from" in r.stdout and "step_4" in r.stdout
    assert json.loads((run / "summary.json").read_text())["resumed_from"] == 4


def test_on_bad_record_error_names_the_line(tmp_path, records, chat_tokenizer):
    base = _base(tmp_path / "base", chat_tokenizer)
    r = _dsv4(
        ["sft", f"sft.init={base}", f"data.train=[{records}]", f"run.dir={tmp_path / 'run'}", *FAST]
        + ["sft.on_bad_record=error"]
    )
    assert r.returncode == 2
    assert f"{records} line 2" in r.stderr and "robot" in r.stderr


def test_tokenizer_without_chat_tokens_is_grown_and_said_so(tmp_path, records):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=[BOS, EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([json.dumps(r) for r in _records(20)], trainer=trainer)
    old = tok.get_vocab_size()
    base = _base(tmp_path / "base", tok)
    run = tmp_path / "run"
    r = _dsv4(["sft", f"sft.init={base}", f"data.train=[{records}]", f"run.dir={run}", *FAST, "train.steps=2"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"model vocabulary {old} -> {old + 6}" in r.stdout
    saved = Tokenizer.from_file(str(run / "tokenizer.json"))
    assert saved.token_to_id("<｜Assistant｜>") >= old


@pytest.mark.parametrize("problem", ["missing", "not_a_model", "vocab"])
def test_bad_init_is_refused_before_any_work(tmp_path, records, chat_tokenizer, problem):
    if problem == "missing":
        init, want = tmp_path / "nowhere", "no such file or folder"
    elif problem == "not_a_model":
        (tmp_path / "junk").mkdir()
        chat_tokenizer.save(str(tmp_path / "junk" / "tokenizer.json"))
        init, want = tmp_path / "junk", "junk"
    else:  # a model with fewer rows than the tokenizer has ids (and the tokenizer has the chat tokens)
        cfg = tiny_config(vocab_size=256)
        model = DSV4Model(cfg)
        model.init_weights(0)
        init = save_dsv4(model, tmp_path / "small")
        chat_tokenizer.save(str(init / "tokenizer.json"))
        want = "do not belong together"
    run = tmp_path / "run"
    r = _dsv4(["sft", f"sft.init={init}", f"data.train=[{records}]", f"run.dir={run}", *FAST])
    assert r.returncode == 2, r.stderr[-2000:]
    assert want in r.stderr
    assert not (run / "checkpoints").exists()


def test_missing_init_is_named(tmp_path, records):
    r = _dsv4(["sft", f"data.train=[{records}]", f"run.dir={tmp_path / 'run'}"])
    assert r.returncode == 2
    assert "sft.init: required" in r.stderr


def _step_losses(run_dir: Path) -> list[float]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [m["lm_loss"] for m in lines if "lm_loss" in m]


def test_sft_under_torchrun_dp2_matches_one_process(tmp_path, records, chat_tokenizer):
    """The same global batches (2 rows a step: 2 on one process, 1 on each of 2 data ranks) give the same losses; the
    Learner's token-weighted reduction makes the two equal up to the order of float sums (gloo all-reduce)."""
    import shutil

    base = _base(tmp_path / "base", chat_tokenizer)
    args = [f"sft.init={base}", f"data.train=[{records}]", *FAST, "train.steps=3", "train.checkpoint_every=0"]
    one = _dsv4(["sft", *args, f"run.dir={tmp_path / 'one'}"])
    assert one.returncode == 0, one.stderr[-3000:]
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    two = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node=2", "-m", "dsv4train.cli", "sft", *args]
        + ["train.micro_batch_size=1", "parallel.dp=2", f"run.dir={tmp_path / 'dp2'}"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
        timeout=600,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    want, got = _step_losses(tmp_path / "one"), _step_losses(tmp_path / "dp2")
    assert len(want) == len(got) == 3
    # step 1 differs only by the order of float sums (1e-6); the two updates after it carry that difference on
    # (measured 1.5e-5 at step 3). Ranks reading the wrong rows would be off by percents from step 1 on.
    assert got[0] == pytest.approx(want[0], rel=1e-6)
    assert got == pytest.approx(want, rel=1e-4)


def test_rows_longer_than_the_model_bound_need_sft_max_seq_len(tmp_path, records, chat_tokenizer):
    base = _base(tmp_path / "base", chat_tokenizer)  # max_seq_len 128
    args = ["sft", f"sft.init={base}", f"data.train=[{records}]", *FAST, "train.seq_len=192", "train.steps=2"]
    r = _dsv4([*args, f"run.dir={tmp_path / 'refused'}"])
    assert r.returncode == 2 and "sft.max_seq_len=192" in r.stderr, r.stderr[-2000:]
    run = tmp_path / "run"
    r = _dsv4([*args, "sft.max_seq_len=192", f"run.dir={run}"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "max_seq_len 128 -> 192" in r.stdout
    from dsv4train.train.pretrained import load_pretrained

    assert load_pretrained(run).cfg.max_seq_len == 192
