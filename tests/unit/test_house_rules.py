"""DESIGN.md's rules that a grep can check: device-specific calls live in utils/device.py (and GPU backends),
model code never touches torch.distributed or Ray, and only parallel/ (plus the test harness and process-group
set-up) uses DeviceMesh/DTensor/FSDP/pipelining."""

import re
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "dsv4train"
DEVICE_OK = {"utils/device.py", "quant/te_backend.py"}
DIST_OK_DIRS = ("parallel/", "testing/")
DIST_OK = {"utils/dist.py", "train/checkpoint.py"}  # process-group set-up; DCP


def _sources():
    for path in sorted(PKG.rglob("*.py")):
        yield path.relative_to(PKG).as_posix(), path.read_text()


def test_device_specific_calls_only_in_utils_device():
    pattern = re.compile(r"\.cuda\(|[\"']nccl[\"']|torch\.cuda\.")
    bad = [f"{rel}:{i}" for rel, text in _sources() if rel not in DEVICE_OK
           for i, line in enumerate(text.splitlines(), 1) if pattern.search(line)]
    assert not bad, f"device-specific calls outside utils/device.py: {bad}"


def test_models_import_no_distributed_or_ray():
    pattern = re.compile(r"^\s*(from|import)\s+(torch\.distributed|ray)\b")
    bad = [f"{rel}:{i}" for rel, text in _sources() if rel.startswith("models/")
           for i, line in enumerate(text.splitlines(), 1) if pattern.search(line)]
    assert not bad, f"models/ must stay plain PyTorch: {bad}"


def test_mesh_and_dtensor_only_in_parallel():
    pattern = re.compile(r"DeviceMesh|DTensor|fully_shard|torch\.distributed\.pipelining|init_device_mesh")
    bad = [f"{rel}:{i}" for rel, text in _sources()
           if not rel.startswith(DIST_OK_DIRS) and rel not in DIST_OK
           for i, line in enumerate(text.splitlines(), 1) if pattern.search(line)]
    assert not bad, f"parallelism belongs in dsv4train/parallel/: {bad}"


def test_the_test_command_collects_every_test_file():
    """`make test` runs `pytest tests`; a folder pytest skips by default (its norecursedirs: dist, build, venv, …)
    would drop its tests silently, as tests/dist once did."""
    tests = PKG.parent / "tests"
    files = {p.relative_to(tests.parent).as_posix() for p in tests.rglob("test_*.py")}
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests"],
                         cwd=tests.parent, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    collected = {line.split("::", 1)[0] for line in out.stdout.splitlines() if "::" in line}
    assert files - collected == set(), f"test files pytest does not collect: {sorted(files - collected)}"
