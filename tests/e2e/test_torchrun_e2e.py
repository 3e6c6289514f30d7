"""`torchrun ... -m dsv4train.cli pretrain parallel.dp=2 parallel.ep=2` (4 gloo processes on CPU), `parallel.pp=2`
and `parallel.cp=2` as a user types them: the same losses as one process with the same global batch, and
checkpoints resume in another layout with the same next losses (dp2 × ep2, pp2 and cp2 on one process, dp2 × ep2
and one process on pp2)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.dist]
REPO = Path(__file__).resolve().parents[2]
COMMON = [
    "model=toy",
    "train.seq_len=32",
    "train.steps=4",
    "train.checkpoint_every=2",
    "train.keep_checkpoints=3",
    "train.eval_every=2",
    "train.eval_batches=1",
    "train.dense_indexer_steps=1",
    "optim.warmup_steps=1",
    "train.progress_bar=false",
]


def _env():
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _losses(run_dir: Path) -> dict[int, dict]:
    rows = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:
            rows[row["step"]] = row  # a resumed run re-logs its steps; the last one counts
    return rows


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "sample"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "dsv4train.cli",
            "data",
            "prepare",
            "--input",
            str(REPO / "data" / "sample"),
            "--vocab-size",
            "512",
            "--name",
            "sample",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=REPO,
    )
    assert r.returncode == 0, r.stderr
    return out


def _one_process(run_dir, data_dir, rows):
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "dsv4train.cli",
            "pretrain",
            *COMMON,
            f"data.dir={data_dir}",
            f"train.micro_batch_size={rows}",
            f"run.dir={run_dir}",
        ],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=REPO,
        timeout=600,
    )


def _torchrun(nproc: int, run_dir, data_dir, *overrides):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    return subprocess.run(
        [
            torchrun,
            "--standalone",
            f"--nproc_per_node={nproc}",
            "-m",
            "dsv4train.cli",
            "pretrain",
            *COMMON,
            *overrides,
            f"data.dir={data_dir}",
            f"run.dir={run_dir}",
        ],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=REPO,
        timeout=900,
    )


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, data_dir):
    """The one-process reference run (4 rows per step), shared by the tests; they copy it before changing it."""
    run_dir = tmp_path_factory.mktemp("one") / "run"
    r = _one_process(run_dir, data_dir, rows=4)
    assert r.returncode == 0, r.stderr
    return run_dir


@pytest.fixture(scope="module")
def dp2_ep2(tmp_path_factory, data_dir):
    """The 4-process dp2 × ep2 run (1 row per data rank, the reference's 4 rows per step), shared by the tests;
    they copy it before changing it."""
    run_dir = tmp_path_factory.mktemp("four") / "run"
    r = _torchrun(4, run_dir, data_dir, "parallel.dp=2", "parallel.ep=2", "train.micro_batch_size=1")
    assert r.returncode == 0, r.stderr[-4000:]
    assert "4 processes (dp2 × ep2)" in r.stdout
    return run_dir


def _stopped_at_step_2(run_dir: Path, dst: Path) -> Path:
    """A copy of a finished 4-step run as if it had stopped after its step-2 checkpoint (no step_4, no metrics)."""
    shutil.copytree(run_dir, dst)
    shutil.rmtree(dst / "checkpoints" / "step_4")
    (dst / "metrics.jsonl").write_text("")
    return dst


def _assert_resumed(r: subprocess.CompletedProcess, run_dir: Path, want: dict) -> None:
    """The run resumed from step 2 and logged steps 3 and 4 with the one-process losses."""
    assert r.returncode == 0, r.stderr[-4000:]
    assert "resuming from" in r.stdout and "step_2" in r.stdout
    got = _losses(run_dir)
    assert sorted(got) == [3, 4]
    for step in (3, 4):
        assert got[step]["loss"] == pytest.approx(want[step]["loss"], rel=1e-5), step


def _assert_matches_one_process(run_dir: Path, want: dict) -> None:
    """Steps 1-4 with one process's losses, gradient norms and router-bias norms (every router: under pp each
    stage holds some), and its final validation loss."""
    got = _losses(run_dir)
    assert sorted(got) == [1, 2, 3, 4]
    for step in got:
        assert got[step]["loss"] == pytest.approx(want[step]["loss"], rel=1e-5), step
        assert got[step]["grad_norm"] == pytest.approx(want[step]["grad_norm"], rel=1e-4), step
        assert got[step]["router_bias_norm"] == pytest.approx(want[step]["router_bias_norm"], rel=1e-6), step
    assert got[4]["val_loss"] == pytest.approx(want[4]["val_loss"], rel=1e-5)


def test_torchrun_dp2_ep2_matches_one_process_and_resumes_on_one(tmp_path, data_dir, one_process, dp2_ep2):
    want = _losses(one_process)
    _assert_matches_one_process(dp2_ep2, want)
    shards = sorted(p.name for p in (dp2_ep2 / "checkpoints" / "step_2").glob("*.distcp"))
    assert len(shards) == 4, shards

    # The 4-process checkpoint of step 2 resumes on one process (another layout) and goes on with the same losses.
    run_dir = _stopped_at_step_2(dp2_ep2, tmp_path / "four_to_one")
    _assert_resumed(_one_process(run_dir, data_dir, rows=4), run_dir, want)


def test_torchrun_dp2_ep2_resumes_on_pp2(tmp_path, data_dir, one_process, dp2_ep2):
    """The dp2 × ep2 checkpoint of step 2 (4 FSDP/EP shards) resumes on 2 pipeline stages, same losses."""
    run_dir = _stopped_at_step_2(dp2_ep2, tmp_path / "four_to_pp")
    resumed = _torchrun(2, run_dir, data_dir, "parallel.pp=2", "train.micro_batch_size=4")
    _assert_resumed(resumed, run_dir, _losses(one_process))


def test_torchrun_pp2_matches_one_process_and_resumes_on_one(tmp_path, data_dir, one_process):
    """`torchrun --nproc_per_node=2 ... parallel.pp=2` (1F1B, each micro-batch of 4 rows in 2 pipeline chunks): the
    losses of one process, a checkpoint with one shard per stage, and that checkpoint resumes on one process."""
    multi = _torchrun(2, tmp_path / "pp", data_dir, "parallel.pp=2", "train.micro_batch_size=4")
    assert multi.returncode == 0, multi.stderr[-4000:]
    assert "2 processes (pp2)" in multi.stdout

    want = _losses(one_process)
    _assert_matches_one_process(tmp_path / "pp", want)
    shards = sorted(p.name for p in (tmp_path / "pp" / "checkpoints" / "step_2").glob("*.distcp"))
    assert len(shards) == 2, shards

    run_dir = _stopped_at_step_2(tmp_path / "pp", tmp_path / "pp_to_one")
    _assert_resumed(_one_process(run_dir, data_dir, rows=4), run_dir, want)

    # And the other way: the one-process checkpoint of step 2 resumes on the two pipeline stages.
    run_dir = _stopped_at_step_2(one_process, tmp_path / "one_to_pp")
    _assert_resumed(_torchrun(2, run_dir, data_dir, "parallel.pp=2", "train.micro_batch_size=4"), run_dir, want)


def test_torchrun_cp2_matches_one_process_and_resumes_on_one(tmp_path, data_dir, one_process):
    """`torchrun --nproc_per_node=2 ... parallel.cp=2`: each process runs 16 of the 32 tokens of every row (the toy
    model's window and HCA block are 16), with the same losses, gradient norms and validation loss as one process;
    its step-2 checkpoint resumes on one process."""
    multi = _torchrun(2, tmp_path / "cp", data_dir, "parallel.cp=2", "train.micro_batch_size=4")
    assert multi.returncode == 0, multi.stderr[-4000:]
    assert "2 processes (cp2)" in multi.stdout

    want = _losses(one_process)
    _assert_matches_one_process(tmp_path / "cp", want)

    run_dir = _stopped_at_step_2(tmp_path / "cp", tmp_path / "cp_to_one")
    _assert_resumed(_one_process(run_dir, data_dir, rows=4), run_dir, want)
