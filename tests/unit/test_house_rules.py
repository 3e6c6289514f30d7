"""DESIGN.md's rules that a grep can check: device-specific calls live in utils/device.py (and GPU backends),
model code never touches torch.distributed or Ray, only parallel/ (plus the test harness and process-group
set-up) uses DeviceMesh/DTensor/FSDP/pipelining, and parallelism enters modules through named seams, never by
replacing their methods."""

import ast
import dataclasses
import importlib
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "dsv4train"
DEVICE_OK = {"utils/device.py", "quant/te_backend.py"}
DIST_OK_DIRS = ("parallel/", "testing/")
DIST_OK = {"utils/dist.py", "train/checkpoint.py"}  # process-group set-up; DCP


def _sources():
    for path in sorted(PKG.rglob("*.py")):
        yield path.relative_to(PKG).as_posix(), path.read_text()


def test_device_specific_calls_only_in_utils_device():
    pattern = re.compile(r"\.cuda\(|[\"']nccl[\"']|torch\.cuda\.")
    bad = [
        f"{rel}:{i}"
        for rel, text in _sources()
        if rel not in DEVICE_OK
        for i, line in enumerate(text.splitlines(), 1)
        if pattern.search(line)
    ]
    assert not bad, f"device-specific calls outside utils/device.py: {bad}"


def test_models_import_no_distributed_or_ray():
    pattern = re.compile(r"^\s*(from|import)\s+(torch\.distributed|ray)\b")
    bad = [
        f"{rel}:{i}"
        for rel, text in _sources()
        if rel.startswith("models/")
        for i, line in enumerate(text.splitlines(), 1)
        if pattern.search(line)
    ]
    assert not bad, f"models/ must stay plain PyTorch: {bad}"


def test_mesh_and_dtensor_only_in_parallel():
    pattern = re.compile(r"DeviceMesh|DTensor|fully_shard|torch\.distributed\.pipelining|init_device_mesh")
    bad = [
        f"{rel}:{i}"
        for rel, text in _sources()
        if not rel.startswith(DIST_OK_DIRS) and rel not in DIST_OK
        for i, line in enumerate(text.splitlines(), 1)
        if pattern.search(line)
    ]
    assert not bad, f"parallelism belongs in dsv4train/parallel/: {bad}"


def test_no_method_replacement():
    """Parallelism and precision change a module through named seams (`Experts.dispatch`, `Experts.mlp`, `seq`,
    `sum_over_head_shards`), not by binding a new `forward` to an instance: a patched method hides what the module
    does from its class, and a reader of the class finds code that does not run."""
    pattern = re.compile(r"\bMethodType\b|\.forward\s*=(?!=)")
    bad = [
        f"{rel}:{i}: {line.strip()}"
        for rel, text in _sources()
        for i, line in enumerate(text.splitlines(), 1)
        if pattern.search(line)
    ]
    assert not bad, f"method replacement in dsv4train/ (give the module a seam instead): {bad}"


def test_the_test_command_collects_every_test_file():
    """`make test` runs `pytest tests`; a folder pytest skips by default (its norecursedirs: dist, build, venv, …)
    would drop its tests silently, as tests/dist once did."""
    tests = PKG.parent / "tests"
    files = {p.relative_to(tests.parent).as_posix() for p in tests.rglob("test_*.py")}
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests"],
        cwd=tests.parent,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    collected = {line.split("::", 1)[0] for line in out.stdout.splitlines() if "::" in line}
    assert files - collected == set(), f"test files pytest does not collect: {sorted(files - collected)}"


# ---- layering: models/ imports nothing above it ----------------------------------------------------------------
# DESIGN.md: `cli -> posttrain -> inference, train -> parallel -> models -> config`; model code is plain PyTorch.
MODELS_MUST_NOT_IMPORT = ("dsv4train.train", "dsv4train.parallel", "dsv4train.cli", "torch.distributed", "ray")


def _imported_modules(tree: ast.Module, package: str):
    """(line, dotted name) of every module an import statement anywhere in `tree` (functions included) names;
    `from a import b` yields both `a` and `a.b` (b may be a submodule), relative imports are made absolute."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            yield node.lineno, base
            for alias in node.names:
                yield node.lineno, f"{base}.{alias.name}"


def _forbidden(module: str) -> bool:
    return any(module == name or module.startswith(name + ".") for name in MODELS_MUST_NOT_IMPORT)


def test_models_import_nothing_above_them():
    """models/ never imports train/, parallel/, cli/, torch.distributed or Ray, not even inside a function (a lazy
    import is still a dependency: `load_pretrained`'s dispatch once reached up into train/checkpoint.py from here,
    and now lives in train/pretrained.py)."""
    models = sorted((PKG / "models").rglob("*.py"))
    assert len(models) >= 10, models  # the walk found the model code
    bad = []
    for path in models:
        rel = path.relative_to(PKG.parent)
        package = ".".join(rel.with_suffix("").parts[:-1])  # dsv4train.models[.sub]
        for line, module in _imported_modules(ast.parse(path.read_text(), str(path)), package):
            if _forbidden(module):
                bad.append(f"{rel}:{line}: {module}")
    assert not bad, f"models/ must import nothing from {', '.join(MODELS_MUST_NOT_IMPORT)}: {sorted(set(bad))}"


def test_the_import_walk_sees_every_kind_of_import():
    """The rule above can fail: top-level, in-function, `from` and relative imports of a forbidden module are all
    found, and a sibling whose name merely starts the same (`dsv4train.trainer`) is not."""
    source = (
        "import ray\n"
        "def f():\n    from dsv4train.train.checkpoint import load\n"
        "from .. import parallel\n"
        "from ..cli.main import main\n"
        "import torch.distributed as dist\n"
        "from dsv4train import trainer, config\n"
    )
    found = {(line, m) for line, m in _imported_modules(ast.parse(source), "dsv4train.models") if _forbidden(m)}
    assert found == {
        (1, "ray"),
        (3, "dsv4train.train.checkpoint"),
        (3, "dsv4train.train.checkpoint.load"),
        (4, "dsv4train.parallel"),
        (5, "dsv4train.cli.main"),
        (5, "dsv4train.cli.main.main"),
        (6, "torch.distributed"),
    }, found


# ---- configs are read, never written after load ----------------------------------------------------------------


def _config_dataclasses() -> list[type]:
    """Every dataclass defined in a module of dsv4train.config (imported ones are counted where they are defined)."""
    import dsv4train.config as package

    found = []
    for info in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
        module = importlib.import_module(info.name)
        found += [
            obj
            for obj in vars(module).values()
            if isinstance(obj, type) and dataclasses.is_dataclass(obj) and obj.__module__ == module.__name__
        ]
    return found


def test_every_config_dataclass_is_frozen():
    """A config is read, never written after load: runtime state (the indexer mode, the resolved run dir) lives on
    the objects that own it, and a new schema cannot forget `frozen=True`. Each dataclass is built with its
    defaults and every field assigned (frozen dataclasses refuse even an assignment of the same value)."""
    classes = _config_dataclasses()
    names = {cls.__name__ for cls in classes}
    assert {
        "ModelConfig",
        "DataConfig",
        "OptimConfig",
        "TrainConfig",
        "PrecisionConfig",
        "ParallelConfig",
        "TrackerConfig",
        "RunConfig",
        "PretrainConfig",
    } <= names, names
    writable = []
    for cls in classes:
        config = cls()
        for f in dataclasses.fields(cls):
            try:
                setattr(config, f.name, getattr(config, f.name))
                writable.append(f"{cls.__module__}.{cls.__name__}.{f.name}")
            except dataclasses.FrozenInstanceError:
                pass
    assert not writable, (
        f"config fields that can be assigned after construction (use @dataclass(frozen=True)): {writable}"
    )


@pytest.mark.parametrize(
    "section, key, value",
    [
        (None, "seed", 1),
        ("train", "steps", 1),
        ("run", "dir", "elsewhere"),
        ("model", "indexer_mode", "dense"),
        ("parallel", "dp", 2),
        ("data", "dir", "other"),
    ],
)
def test_a_composed_config_refuses_assignment(section, key, value):
    """What `dsv4 pretrain` runs (Hydra composes YAML onto the schemas, OmegaConf.to_object builds the dataclasses)
    is frozen all the way down; a changed copy is made with dataclasses.replace."""
    from dsv4train.config.hydra_entry import compose_pretrain

    cfg, _ = compose_pretrain(["train.steps=7"])
    assert cfg.train.steps == 7  # the override reached the frozen schema
    target = cfg if section is None else getattr(cfg, section)
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(target, key, value)
    changed = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=8))
    assert (changed.train.steps, cfg.train.steps) == (8, 7)


PARALLEL_MUST_NOT_IMPORT = ("dsv4train.train", "dsv4train.cli", "dsv4train.posttrain", "dsv4train.inference", "ray")


def test_parallel_imports_nothing_above_it():
    """parallel/ sits below the Learner (DESIGN.md: cli -> posttrain -> inference, train -> parallel -> models): it
    may not import train/, cli/, posttrain/, inference/ or Ray, not even lazily (the pipeline once counted targets
    with train/losses.py; the Learner now hands it the counts)."""
    files = sorted((PKG / "parallel").rglob("*.py"))
    assert len(files) >= 10, files
    bad = []
    for path in files:
        rel = path.relative_to(PKG.parent)
        package = ".".join(rel.with_suffix("").parts[:-1])
        for line, module in _imported_modules(ast.parse(path.read_text(), str(path)), package):
            if any(module == n or module.startswith(n + ".") for n in PARALLEL_MUST_NOT_IMPORT):
                bad.append(f"{rel}:{line}: {module}")
    assert not bad, f"parallel/ must import nothing from {', '.join(PARALLEL_MUST_NOT_IMPORT)}: {sorted(set(bad))}"
