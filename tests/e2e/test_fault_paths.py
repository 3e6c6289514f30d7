"""The fault paths of `dsv4 pretrain`, each made to happen: SIGTERM during set-up, SIGUSR1 mid-run, a signal on
one of two ranks, kill -9 in the middle of a checkpoint write, a checkpoint cut short, a resume with another
optimizer, an injected NaN under nan_policy=skip, pruning to keep_checkpoints, and `dsv4 demo` re-run on a finished
run. Faults are injected by a few lines of Python run before the CLI in the same process (a signal sent from
inside a step, a SIGKILL right after DCP wrote the shards), so they land at the same point on every machine."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from dsv4train.cli.data import data_main
from dsv4train.cli.main import main
from dsv4train.config.errors import ConfigError
from dsv4train.config.hydra_entry import compose_pretrain
from dsv4train.observability.trackers import read_metrics
from dsv4train.testing.distributed import run_distributed_test
from dsv4train.train.trainer import pretrain

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]
FAST = [
    "model=toy",
    "train.seq_len=32",
    "train.micro_batch_size=2",
    "train.eval_every=4",
    "train.eval_batches=1",
    "train.dense_indexer_steps=1",
    "optim.warmup_steps=1",
    "train.progress_bar=false",
]
# Runs `dsv4 <args>` after a fault-injection hook, in one Python process (argv[1:] are the dsv4 arguments).
WITH_HOOK = "import os, signal, sys\n{hook}\nfrom dsv4train.cli.main import main\nsys.exit(main(sys.argv[1:]))\n"
SIGTERM_IN_SET_UP = """
import dsv4train.models.model as m
_init = m.DSV4Model.init_weights
def init_weights(self, *args, **kwargs):  # set-up: the model is built, the data is open, no step has run
    _init(self, *args, **kwargs)
    os.kill(os.getpid(), signal.SIGTERM)
m.DSV4Model.init_weights = init_weights
"""
SIGUSR1_IN_STEP_2 = """
from dsv4train.train.learner import Learner
_step, calls = Learner.step, []
def step(*args, **kwargs):
    out = _step(*args, **kwargs)
    calls.append(1)
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGUSR1)
    return out
Learner.step = step
"""
SIGKILL_IN_WRITE_OF_STEP_2 = """
import torch.distributed.checkpoint as dcp
_save = dcp.save
def save(state, *, checkpoint_id, **kwargs):  # the shards of step 2 are on disk; meta.json and the rename are not
    _save(state, checkpoint_id=checkpoint_id, **kwargs)
    if str(checkpoint_id).endswith(".tmp_step_2"):
        os.kill(os.getpid(), signal.SIGKILL)
dcp.save = save
"""


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "sample"
    assert (
        data_main(
            [
                "prepare",
                "--input",
                str(REPO / "data" / "sample"),
                "--vocab-size",
                "512",
                "--name",
                "sample",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    return out


def _overrides(run_dir, data_dir, *extra) -> list[str]:
    return [*FAST, f"run.dir={run_dir}", f"data.dir={data_dir}", *extra]


def _in_process(run_dir, data_dir, *extra) -> dict:
    cfg, resolved = compose_pretrain(_overrides(run_dir, data_dir, *extra))
    return pretrain(cfg, resolved)


def _dsv4_with_hook(hook: str, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-c", WITH_HOOK.format(hook=hook), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
    )


def _steps(run_dir: Path) -> list[str]:
    root = run_dir / "checkpoints"
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def _requeued_by_the_sbatch(summary: dict) -> bool:
    """launchers/slurm/pretrain.sbatch requeues when a fresh summary.json has preempted_by set and steps left."""
    return bool(summary.get("preempted_by")) and summary["steps_done"] < summary["steps_total"]


def test_pretrain_bad_override_exits_2(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "dsv4train.cli", "pretrain", "train.stepz=3", f"run.dir={tmp_path / 'r'}"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
    )
    assert r.returncode == 2 and "Key 'stepz' not in 'TrainConfig'" in r.stderr and "Traceback" not in r.stderr


def test_sigterm_during_set_up_ends_before_the_first_step_with_a_summary(tmp_path, data_dir):
    run = tmp_path / "run"
    r = _dsv4_with_hook(SIGTERM_IN_SET_UP, "pretrain", *_overrides(run, data_dir, "train.steps=5"))
    assert r.returncode == 0, r.stderr[-3000:]  # what torchrun.sh / the sbatch expect of a preempted worker
    summary = _summary(run)
    assert summary["preempted_by"] == "SIGTERM" and summary["steps_done"] == 0 and _requeued_by_the_sbatch(summary)
    assert summary["val_loss_at_start"] is None  # it stopped before the first evaluation, too
    assert _steps(run) == [] and not (run / "metrics.jsonl").read_text().strip()


def test_sigusr1_mid_run_checkpoints_that_step_exits_0_and_resumes(tmp_path, data_dir):
    run = tmp_path / "run"
    args = ("train.steps=4", "train.checkpoint_every=0")
    r = _dsv4_with_hook(SIGUSR1_IN_STEP_2, "pretrain", *_overrides(run, data_dir, *args))
    assert r.returncode == 0, r.stderr[-3000:]
    stopped = _summary(run)
    assert stopped["preempted_by"] == "SIGUSR1" and stopped["steps_done"] == 2 and _requeued_by_the_sbatch(stopped)
    assert _steps(run) == ["step_2"] and [m["step"] for m in read_metrics(run)] == [1, 2]

    finished = _in_process(run, data_dir, *args)  # the requeued job: the same command
    assert (finished["resumed_from"], finished["steps_done"], finished["preempted_by"]) == (2, 4, None)
    assert finished["val_loss_at_start"] == stopped["val_loss_at_start"] is not None  # kept in the checkpoint


def _one_rank_signalled(rank: int, world_size: int, run_dir: str, data_dir: str) -> None:
    """Rank 1 alone gets SIGUSR1 during step 2; both ranks must stop after step 2 with one complete checkpoint."""
    from dsv4train.train.learner import Learner

    real_step, calls = Learner.step, []

    def step(*args, **kwargs):
        out = real_step(*args, **kwargs)
        calls.append(1)
        if rank == 1 and len(calls) == 2:
            os.kill(os.getpid(), signal.SIGUSR1)
        return out

    Learner.step = step
    summary = _in_process(
        run_dir,
        data_dir,
        "parallel.dp=2",
        "train.micro_batch_size=1",
        "train.steps=5",
        "train.checkpoint_every=0",
        "parallel.timeout_s=60",
    )
    assert len(calls) == 2, f"rank {rank} took {len(calls)} steps"
    assert summary["steps_done"] == 2
    assert summary["preempted_by"] == ("SIGUSR1 on another rank" if rank == 0 else "SIGUSR1")


@pytest.mark.dist
def test_a_signal_on_one_rank_stops_both_after_the_same_step(tmp_path, data_dir):
    run = tmp_path / "run"
    run_distributed_test(_one_rank_signalled, world_size=2, args=(str(run), str(data_dir)), timeout_s=60)
    assert _steps(run) == ["step_2"]
    assert len(list((run / "checkpoints" / "step_2").glob("*.distcp"))) == 2  # both ranks wrote their shards
    assert json.loads((run / "checkpoints" / "step_2" / "meta.json").read_text())["step"] == 2
    assert _summary(run)["preempted_by"] == "SIGUSR1 on another rank"


def test_kill_9_during_a_checkpoint_write_is_cleaned_up_on_the_next_start(tmp_path, data_dir, capsys):
    run = tmp_path / "run"
    args = ("train.steps=3", "train.checkpoint_every=1", "train.keep_checkpoints=5")
    r = _dsv4_with_hook(SIGKILL_IN_WRITE_OF_STEP_2, "pretrain", *_overrides(run, data_dir, *args))
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    assert _steps(run) == [".tmp_step_2", "step_1"]
    assert list((run / "checkpoints" / ".tmp_step_2").glob("*.distcp"))  # half written: shards, no meta.json
    assert not (run / "checkpoints" / ".tmp_step_2" / "meta.json").exists()

    summary = _in_process(run, data_dir, *args)
    out = capsys.readouterr().out
    assert "removed incomplete checkpoint writes: .tmp_step_2" in out
    assert f"resuming from {run / 'checkpoints' / 'step_1'}" in out
    assert summary["resumed_from"] == 1 and summary["steps_done"] == 3
    assert _steps(run) == ["step_1", "step_2", "step_3"]


def test_keep_checkpoints_prunes_to_the_newest(tmp_path, data_dir):
    run = tmp_path / "run"
    _in_process(run, data_dir, "train.steps=4", "train.checkpoint_every=1", "train.keep_checkpoints=2")
    assert _steps(run) == ["step_3", "step_4"]


def test_a_cut_short_checkpoint_is_named_and_can_be_set_aside(tmp_path, data_dir):
    run = tmp_path / "run"
    args = ("train.steps=3", "train.checkpoint_every=1", "train.keep_checkpoints=5")
    _in_process(run, data_dir, "train.steps=2", *args[1:])
    root = run / "checkpoints"
    shard = root / "step_2" / "__0_0.distcp"
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 3)
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "dsv4train.cli", "pretrain", *_overrides(run, data_dir, *args)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert f"checkpoint {root / 'step_2'} is damaged: __0_0.distcp is cut short" in r.stderr
    assert f"previous complete checkpoint, {root / 'step_1'}" in r.stderr
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before  # nothing written, nothing removed

    (root / "step_2").rename(root / "damaged_step_2")  # what the message says to do
    summary = _in_process(run, data_dir, *args)
    assert summary["resumed_from"] == 1 and summary["steps_done"] == 3
    assert _steps(run) == ["damaged_step_2", "step_1", "step_2", "step_3"]  # the damaged copy is kept


def test_a_resume_with_another_optimizer_is_refused_unless_allowed(tmp_path, data_dir, capsys):
    run = tmp_path / "run"
    _in_process(run, data_dir, "train.steps=2")
    before = {p.name: p.stat().st_mtime_ns for p in (run / "checkpoints" / "step_2").iterdir()}
    with pytest.raises(ConfigError, match=r"optim\.name: checkpoint 'muon' vs now 'adamw'.*allow_optimizer_change"):
        _in_process(run, data_dir, "train.steps=3", "optim=adamw")
    assert _steps(run) == ["step_2"] and len(read_metrics(run)) == 2
    assert {p.name: p.stat().st_mtime_ns for p in (run / "checkpoints" / "step_2").iterdir()} == before

    capsys.readouterr()
    summary = _in_process(run, data_dir, "train.steps=3", "optim=adamw", "train.allow_optimizer_change=true")
    assert "WARNING: optimizer changed on resume (muon in step_2, optim.name=adamw now)" in capsys.readouterr().err
    assert summary["resumed_from"] == 2 and summary["steps_done"] == 3
    assert json.loads((run / "checkpoints" / "step_3" / "meta.json").read_text())["optim"]["name"] == "adamw"
    again = _in_process(run, data_dir, "train.steps=4", "optim=adamw", "train.allow_optimizer_change=true")
    assert again["resumed_from"] == 3 and "WARNING" not in capsys.readouterr().err  # same optimizer now


def _state(step_dir: Path, tmp_path: Path) -> dict:
    out = tmp_path / f"{step_dir.name}.pt"
    dcp_to_torch_save(step_dir, out)
    return torch.load(out, weights_only=False)


def test_nan_policy_skip_drops_the_step_and_training_goes_on(tmp_path, data_dir, monkeypatch, capsys):
    """A NaN in step 3's loss (a patched token_ce_sum, training calls only): the update is skipped (weights, buffers
    and optimizer state as after step 2), the step is logged as skipped, and steps 4 and 5 train normally."""
    import dsv4train.train.losses as losses_module
    from dsv4train.train.learner import Learner

    poisoned, calls = [False], []
    real_loss, real_step = losses_module.token_ce_sum, Learner.step

    def token_ce_sum(*args, **kwargs):
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if poisoned[0] and torch.is_grad_enabled() else loss

    def step(*args, **kwargs):
        calls.append(1)
        poisoned[0] = len(calls) == 3
        try:
            return real_step(*args, **kwargs)
        finally:
            poisoned[0] = False

    monkeypatch.setattr(losses_module, "token_ce_sum", token_ce_sum)
    monkeypatch.setattr(Learner, "step", step)
    run = tmp_path / "run"
    summary = _in_process(run, data_dir, "train.steps=5", "train.checkpoint_every=1", "train.keep_checkpoints=10")
    assert summary["steps_done"] == 5 and summary["preempted_by"] is None
    err = capsys.readouterr().err
    assert "step 3: non-finite loss or gradient (loss nan" in err
    assert "update skipped (1 in a row, at most train.max_nan_skips=5)" in err

    rows = read_metrics(run)
    assert [m["skipped"] for m in rows] == [False, False, True, False, False]
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in rows if not m["skipped"])

    root = run / "checkpoints"
    s2, s3, s4 = (_state(root / f"step_{n}", tmp_path) for n in (2, 3, 4))
    assert s2["model"].keys() == s3["model"].keys()
    assert all(torch.equal(s2["model"][k], s3["model"][k]) for k in s2["model"])  # weights and router biases
    assert all(torch.equal(a, b) for a, b in zip(_tensors(s2["optim"]["state"]), _tensors(s3["optim"]["state"])))
    assert not all(torch.equal(s3["model"][k], s4["model"][k]) for k in s3["model"])  # step 4 trained again
    assert [
        torch.load(root / f"step_{n}" / "trainer_state.pt", weights_only=False)["nan_skips"] for n in (2, 3, 4)
    ] == [0, 1, 0]


def _tensors(tree) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for k in sorted(tree, key=str) for t in _tensors(tree[k])]
    return []


def test_demo_run_again_on_a_finished_run(tmp_path, data_dir, capsys):
    args = [
        "demo",
        "--run-dir",
        str(tmp_path / "demo"),
        "--data-dir",
        str(data_dir),
        "--steps",
        "3",
        *[o for o in FAST if not o.startswith("model=")],
        "train.eval_every=3",
    ]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0  # was: a TypeError (no step-0 validation loss after a resume)
    again = capsys.readouterr().out
    assert "nothing to train: the run is already at step 3 of train.steps=3" in again
    line = [ln for ln in first.splitlines() if ln.startswith("validation loss")]
    assert line and line == [ln for ln in again.splitlines() if ln.startswith("validation loss")]
