"""`torchrun ... -m dsv4train.cli pretrain parallel.dp=2 parallel.ep=2` as a user types it (4 gloo processes on
CPU): the same losses as one process with the same global batch, and its checkpoint resumes on one process."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.dist]
REPO = Path(__file__).resolve().parents[2]
COMMON = ["model=toy", "train.seq_len=32", "train.steps=4", "train.checkpoint_every=2", "train.keep_checkpoints=3",
          "train.eval_every=2", "train.eval_batches=1", "train.dense_indexer_steps=1", "optim.warmup_steps=1",
          "train.progress_bar=false"]


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
    r = subprocess.run([sys.executable, "-m", "dsv4train.cli", "data", "prepare", "--input", str(REPO / "data" / "sample"),
                        "--vocab-size", "512", "--name", "sample", "--out", str(out)], capture_output=True, text=True,
                       env=_env(), cwd=REPO)
    assert r.returncode == 0, r.stderr
    return out


def _one_process(run_dir, data_dir, rows):
    return subprocess.run([sys.executable, "-m", "dsv4train.cli", "pretrain", *COMMON, f"data.dir={data_dir}",
                           f"train.micro_batch_size={rows}", f"run.dir={run_dir}"],
                          capture_output=True, text=True, env=_env(), cwd=REPO, timeout=600)


def _torchrun(nproc: int, run_dir, data_dir, *overrides):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    return subprocess.run([torchrun, "--standalone", f"--nproc_per_node={nproc}", "-m", "dsv4train.cli", "pretrain",
                           *COMMON, *overrides, f"data.dir={data_dir}", f"run.dir={run_dir}"], capture_output=True,
                          text=True, env=_env(), cwd=REPO, timeout=900)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, data_dir):
    """The one-process reference run (4 rows per step), shared by the tests; they copy it before changing it."""
    run_dir = tmp_path_factory.mktemp("one") / "run"
    r = _one_process(run_dir, data_dir, rows=4)
    assert r.returncode == 0, r.stderr
    return run_dir


def test_torchrun_dp2_ep2_matches_one_process_and_resumes_on_one(tmp_path, data_dir, one_process):
    multi = _torchrun(4, tmp_path / "four", data_dir, "parallel.dp=2", "parallel.ep=2", "train.micro_batch_size=1")
    assert multi.returncode == 0, multi.stderr[-4000:]
    assert "4 processes (dp2 × ep2)" in multi.stdout

    want, got = _losses(one_process), _losses(tmp_path / "four")
    assert sorted(got) == [1, 2, 3, 4]
    for step in got:
        assert got[step]["loss"] == pytest.approx(want[step]["loss"], rel=1e-5), step
    assert got[4]["val_loss"] == pytest.approx(want[4]["val_loss"], rel=1e-5)
    shards = sorted(p.name for p in (tmp_path / "four" / "checkpoints" / "step_2").glob("*.distcp"))
    assert len(shards) == 4, shards

    # The 4-process checkpoint of step 2 resumes on one process (another layout) and goes on with the same losses.
    shutil.rmtree(tmp_path / "four" / "checkpoints" / "step_4")
    resumed = _one_process(tmp_path / "four", data_dir, rows=4)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout and "step_2" in resumed.stdout
    got = _losses(tmp_path / "four")
    for step in (3, 4):
        assert got[step]["loss"] == pytest.approx(want[step]["loss"], rel=1e-5), step


def test_torchrun_pp2_matches_one_process_and_resumes_on_one(tmp_path, data_dir, one_process):
    """`torchrun --nproc_per_node=2 ... parallel.pp=2` (1F1B, each micro-batch of 4 rows in 2 pipeline chunks): the
    losses of one process, a checkpoint with one shard per stage, and that checkpoint resumes on one process."""
    multi = _torchrun(2, tmp_path / "pp", data_dir, "parallel.pp=2", "train.micro_batch_size=4")
    assert multi.returncode == 0, multi.stderr[-4000:]
    assert "2 processes (pp2)" in multi.stdout

    want, got = _losses(one_process), _losses(tmp_path / "pp")
    assert sorted(got) == [1, 2, 3, 4]
    for step in got:
        assert got[step]["loss"] == pytest.approx(want[step]["loss"], rel=1e-5), step
        assert got[step]["grad_norm"] == pytest.approx(want[step]["grad_norm"], rel=1e-4), step
    assert got[4]["val_loss"] == pytest.approx(want[4]["val_loss"], rel=1e-5)
    shards = sorted(p.name for p in (tmp_path / "pp" / "checkpoints" / "step_2").glob("*.distcp"))
    assert len(shards) == 2, shards

    shutil.rmtree(tmp_path / "pp" / "checkpoints" / "step_4")
    resumed = _one_process(tmp_path / "pp", data_dir, rows=4)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout and "step_2" in resumed.stdout
    got = _losses(tmp_path / "pp")
    for step in (3, 4):
        assert got[step]["loss"] == pytest.approx(want[step]["loss"], rel=1e-5), step

    # And the other way: the one-process checkpoint of step 2 resumes on the two pipeline stages.
    shutil.copytree(one_process, tmp_path / "one_to_pp")
    shutil.rmtree(tmp_path / "one_to_pp" / "checkpoints" / "step_4")
    (tmp_path / "one_to_pp" / "metrics.jsonl").write_text("")
    back = _torchrun(2, tmp_path / "one_to_pp", data_dir, "parallel.pp=2", "train.micro_batch_size=4")
    assert back.returncode == 0, back.stderr[-4000:]
    assert "resuming from" in back.stdout and "step_2" in back.stdout
    got = _losses(tmp_path / "one_to_pp")
    assert sorted(got) == [3, 4]
    for step in (3, 4):
        assert got[step]["loss"] == pytest.approx(want[step]["loss"], rel=1e-5), step
