"""The run directory: checked writable up front, then given the resolved config, the git revision and an
environment snapshot, so a run can be understood (and repeated) from its folder alone."""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from dsv4train.config.errors import ConfigError
from dsv4train.utils.device import accelerator_name


def open_run_dir(path) -> Path:
    """Create `path` if needed and prove it is writable; a clear error otherwise (nothing is deleted)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        # A probe file of this process's own: ranks sharing one run dir must not remove each other's.
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write_test_"):
            pass
    except OSError as e:
        raise ConfigError(f"run.dir: cannot write to {path} ({e.strerror or e}); pick a writable run.dir") from None
    return path


def git_revision() -> dict:
    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return {"sha": None, "dirty": None}
    if sha.returncode != 0:
        return {"sha": None, "dirty": None}
    return {"sha": sha.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


def environment() -> dict:
    return {
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "host": socket.gethostname(),
        "argv": sys.argv,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "accelerator": accelerator_name(),
        "git": git_revision(),
    }


def write_snapshot(run_dir: Path, resolved_yaml: str, resume_step: int) -> None:
    """config.resolved.yaml (a resume with a changed config keeps the first one and writes a second file),
    env.json (appended to env.jsonl on each start)."""
    first = run_dir / "config.resolved.yaml"
    if not first.exists():
        first.write_text(resolved_yaml)
    elif first.read_text() != resolved_yaml:
        (run_dir / f"config.resolved.resumed_at_step_{resume_step}.yaml").write_text(resolved_yaml)
    with open(run_dir / "env.jsonl", "a") as f:
        f.write(json.dumps({**environment(), "resume_step": resume_step}) + "\n")
