"""The wheel is enough: built from the package's sources (pyproject.toml, README.md, dsv4train/, and bench/,
which must stay out of it), installed into a folder of its own, and run from a working directory outside the
checkout, `dsv4` composes its configs, prepares a small corpus and trains two toy steps.

The wheel goes in with `pip install --target`, and the commands run with the venv's interpreter and
PYTHONPATH=<that folder>: PYTHONPATH is searched before site-packages, and the venv's editable install of the
checkout is a finder that setuptools appends to the end of sys.meta_path, so `import dsv4train` finds the wheel's
copy (a test checks it does). `dsv4` is the console script that pip writes into <target>/bin, the file a user
runs.

The sources are copied before the build: pip builds in the source folder, and a build there would leave build/
and egg-info behind in the checkout. The copy also proves the wheel needs nothing else from the repository; bench/
is in it so that the wheel's contents show what packages.find picks (dsv4train* only)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dsv4train.testing.toy_configs import FAST_PRETRAIN_OVERRIDES

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]
FAST = [*FAST_PRETRAIN_OVERRIDES[:1], "train=toy", *FAST_PRETRAIN_OVERRIDES[1:]]


def _run(cmd: list[str], timeout: int = 300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


def _must(r: subprocess.CompletedProcess, what: str) -> subprocess.CompletedProcess:
    assert r.returncode == 0, f"{what} exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def _package_sources(dst: Path) -> Path:
    """pyproject.toml, README.md (its readme), the dsv4train/ tree and bench/ (a package that must not ship), without
    caches."""
    dst.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, dst / name)
    for tree in ("dsv4train", "bench"):
        shutil.copytree(REPO / tree, dst / tree, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dst


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """A folder holding the installed wheel (package, dist-info, bin/dsv4) and nothing from the checkout."""
    root = tmp_path_factory.mktemp("wheel")
    src = _package_sources(root / "src")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    # offline: no build isolation (it would download setuptools), no index, no dependencies (the venv has them)
    _must(
        _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(root / "dist"), str(src)]),
        "pip wheel",
    )
    wheels = sorted((root / "dist").glob("dsv4train-*.whl"))
    assert len(wheels) == 1, wheels
    target = root / "site"
    _must(
        _run([*pip, "install", "--no-deps", "--no-index", "--no-compile", "--target", str(target), str(wheels[0])]),
        "pip install --target",
    )
    return target


@pytest.fixture(scope="module")
def elsewhere(tmp_path_factory) -> Path:
    """The working directory of every command: a fresh folder outside the checkout."""
    cwd = tmp_path_factory.mktemp("user")
    assert REPO not in cwd.parents and cwd != REPO
    return cwd


def _env(site: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}


def _dsv4(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return _run([str(site / "bin" / "dsv4"), *args], cwd=cwd, env=_env(site))


def test_the_wheel_holds_the_package_and_its_configs_only(site):
    assert sorted(p.name for p in site.iterdir() if not p.name.endswith(".dist-info")) == ["bin", "dsv4train"]
    conf = site / "dsv4train" / "conf"
    shipped = sorted(p.relative_to(conf).as_posix() for p in conf.rglob("*.yaml"))
    in_repo = sorted(
        p.relative_to(REPO / "dsv4train" / "conf").as_posix() for p in (REPO / "dsv4train" / "conf").rglob("*.yaml")
    )
    assert shipped == in_repo and "pretrain.yaml" in shipped


def test_the_commands_import_the_installed_copy(site, elsewhere):
    r = _must(
        _run(
            [
                sys.executable,
                "-c",
                "import dsv4train; from dsv4train.config.hydra_entry import CONF_DIR; "
                "print(dsv4train.__file__); print(CONF_DIR)",
            ],
            cwd=elsewhere,
            env=_env(site),
        ),
        "import",
    )
    package_file, conf_dir = (Path(line).resolve() for line in r.stdout.split())
    assert site.resolve() in package_file.parents, f"imported {package_file}, not the wheel in {site}"
    assert conf_dir == (site / "dsv4train" / "conf").resolve(), r.stdout


def test_pretrain_cfg_job_composes_the_shipped_configs(site, elsewhere):
    r = _must(_dsv4(site, elsewhere, "pretrain", "--cfg", "job", "model=toy"), "dsv4 pretrain --cfg job")
    assert "name: toy" in r.stdout and "optim:" in r.stdout and "train:" in r.stdout, r.stdout


def test_prepare_a_corpus_and_train_two_steps(site, elsewhere):
    corpus = elsewhere / "corpus"
    corpus.mkdir()
    for text in sorted((REPO / "data" / "sample").glob("*.txt")):  # four short documents, ~35 kB
        shutil.copy2(text, corpus / text.name)
    _must(
        _dsv4(site, elsewhere, "data", "prepare", "--input", "corpus", "--vocab-size", "512", "--out", "prepared"),
        "dsv4 data prepare",
    )
    assert (elsewhere / "prepared" / "tokenizer.json").is_file()

    _must(
        _dsv4(site, elsewhere, "pretrain", *FAST, "train.steps=2", "data.dir=prepared", "run.dir=run"), "dsv4 pretrain"
    )
    run = elsewhere / "run"
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert steps == [1, 2]
    assert json.loads((run / "summary.json").read_text())["steps_done"] == 2
    assert "name: toy" in (run / "config.resolved.yaml").read_text()
