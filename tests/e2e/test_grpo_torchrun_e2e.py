"""`torchrun --nproc_per_node=2 -m dsv4train.cli grpo parallel.dp=2 ...` as a user runs it (2 gloo processes on
CPU, rollouts in the driver process): the run finishes, writes its metrics, samples and a checkpoint of both ranks'
shards, and running the same command with more steps resumes from it. Its first step trains on the samples one
process draws (the same loss), and after the resume the second step draws the prompts and completions an
uninterrupted one-process run draws (the prompt pool's position and the RNG come back from the driver's state).

The update itself against one process, layout by layout: tests/distributed/test_grpo_layouts.py."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dsv4train.config.hydra_entry import compose_config
from dsv4train.posttrain.grpo.controller import grpo
from dsv4train.testing.grpo_base import save_grpo_base

pytestmark = [pytest.mark.e2e, pytest.mark.dist]
REPO = Path(__file__).resolve().parents[2]
# 3 prompts x 2 samples in micro-batches of 2: 3 micro-batches, so the second rank trains one and one padding. A
# random model scores 0 on math, so dynamic sampling would drop every group: off, the update runs on advantages of 0
# and the k1 KL against the reference (β > 0), whose gradient does not vanish while the policy is the reference.
COMMON = [
    "grpo.ray=false",
    "grpo.tasks=[math]",
    "grpo.prompts_per_step=3",
    "grpo.group_size=2",
    "grpo.max_new_tokens=6",
    "grpo.dynamic_sampling=false",
    "grpo.beta=0.01",
    "grpo.kl_kind=k1",
    "grpo.eval_n=1",
    "grpo.eval_max_new_tokens=4",
    "train.micro_batch_size=2",
    "train.checkpoint_every=1",
    "train.eval_every=100",
    "train.progress_bar=false",
]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A dsv4 folder: a small random model and its tokenizer.json (as tests/e2e/test_grpo_e2e.py makes it)."""
    return save_grpo_base(tmp_path_factory.mktemp("grpo_torchrun") / "base")


def _torchrun(base: Path, run_dir: Path, steps: int) -> subprocess.CompletedProcess:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    args = [f"grpo.init={base}", f"run.dir={run_dir}", f"train.steps={steps}", "parallel.dp=2", *COMMON]
    return subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node=2", "-m", "dsv4train.cli", "grpo", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
        cwd=REPO,
        timeout=600,
    )


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_grpo_under_torchrun_dp2_trains_checkpoints_and_resumes(tmp_path, base):
    one = tmp_path / "one"
    cfg, resolved = compose_config("grpo", [f"grpo.init={base}", f"run.dir={one}", "train.steps=2", *COMMON])
    grpo(cfg, resolved)
    want, want_samples = _lines(one / "metrics.jsonl"), _lines(one / "samples.jsonl")

    run = tmp_path / "dp2"
    first = _torchrun(base, run, steps=1)
    assert first.returncode == 0, first.stderr[-4000:]
    assert "2 processes (dp2)" in first.stdout
    assert "held-out accuracy at the start" in first.stdout  # the driver evaluated its unsharded copy
    for name in ("config.resolved.yaml", "metrics.jsonl", "samples.jsonl", "summary.json", "tokenizer.json"):
        assert (run / name).is_file(), name
    assert len(list((run / "checkpoints" / "step_1").glob("*.distcp"))) == 2  # both ranks' shards
    start, step1 = _lines(run / "metrics.jsonl")
    assert start == {"step": 0, "eval/math_accuracy": want[0]["eval/math_accuracy"]}  # the start's evaluation
    assert step1["step"] == 1 and step1["skipped"] is False and step1["trained_samples"] == 6
    # the same 6 samples as one process (the rollout worker got the gathered init weights), and over both ranks the
    # one-process gradient (fp32 reduction order: measured 3e-7 of it)
    assert step1["response_length"] == want[1]["response_length"]
    assert step1["grad_norm"] == pytest.approx(want[1]["grad_norm"], rel=1e-5)

    second = _torchrun(base, run, steps=2)  # the same command, one step more: resumes
    assert second.returncode == 0, second.stderr[-4000:]
    assert "resuming from" in second.stdout and "step_1" in second.stdout
    metrics = _lines(run / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [0, 1, 2]  # the start's evaluation is not repeated on resuming
    assert metrics[2]["policy_version"] == 1 and metrics[2]["skipped"] is False
    assert {"eval/math_accuracy", "loss", "grad_norm"} <= set(metrics[2])
    samples = _lines(run / "samples.jsonl")
    assert [s["step"] for s in samples] == [1, 2]
    assert samples[1]["prompt"] == want_samples[1]["prompt"]  # the pool resumed where the driver left it
    assert [c["text"] for c in samples[1]["completions"]] == [c["text"] for c in want_samples[1]["completions"]]
    # and the resumed policy (weights and optimizer state from both ranks' shards) trains as the uninterrupted one
    assert metrics[2]["kl"] == pytest.approx(want[2]["kl"], rel=1e-4)
    assert metrics[2]["grad_norm"] == pytest.approx(want[2]["grad_norm"], rel=1e-4)
    assert json.loads((run / "summary.json").read_text())["steps_done"] == 2
