"""Every recipe under recipes/ composes into a valid PretrainConfig (as `dsv4 pretrain --config-dir RECIPE
--config-name config` composes it), its layout passes the same checks as a launch of that many processes, its
launch script runs the config, and the memory its README quotes from `dsv4 plan` still holds."""

import os
import subprocess
from pathlib import Path

import pytest

from dsv4train.cli.plan import compose
from dsv4train.parallel.dims import ParallelDims

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted(p for p in (REPO / "recipes").iterdir() if p.is_dir())


def test_there_are_recipes():
    assert [p.name for p in RECIPES] and all((p / "README.md").is_file() for p in RECIPES)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_recipe_yaml_composes_and_its_layout_is_valid(recipe):
    configs = sorted(recipe.glob("*.yaml"))
    assert configs, f"{recipe} has no YAML config"
    for yaml_file in configs:
        cfg = compose([], str(recipe), yaml_file.stem)
        dims = ParallelDims.from_config(cfg.parallel)
        dims.validate(dims.world_size, cfg.model, cfg.train.seq_len, cfg.train.micro_batch_size)
        assert "${now" not in cfg.run.dir, "a recipe needs a fixed run.dir so a re-run resumes"
        # overrides still apply on top of the recipe
        assert compose(["train.steps=3"], str(recipe), yaml_file.stem).train.steps == 3


def test_pretrain_1b_8gpu():
    recipe = REPO / "recipes" / "pretrain-1b-8gpu"
    cfg = compose([], str(recipe))
    dims = ParallelDims.from_config(cfg.parallel)
    assert cfg.model.name == "1b" and dims.world_size == 8 and cfg.precision.compute_dtype == "bfloat16"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM", "NNODES", "NPROC"))}
    r = subprocess.run(
        ["bash", str(recipe / "launch.sh"), "train.steps=5"],
        capture_output=True,
        text=True,
        env={**env, "DSV4_DRY_RUN": "1", "TORCHRUN": "torchrun"},
        cwd=REPO,
    )
    assert r.returncode == 0, r.stderr
    assert "--nproc_per_node 8 --standalone" in r.stdout
    assert f"pretrain --config-dir {recipe} --config-name config train.steps=5" in r.stdout

    from dsv4train.parallel.plan import make_plan

    plan = make_plan(cfg, gpu_memory_gb=80)
    assert plan.to_json()["fits"] and plan.peak.total / 1e9 < 0.9 * 80
    assert f"{plan.peak.total / 1e9:.2f} GB" in (recipe / "README.md").read_text(), (
        "README quotes an outdated `dsv4 plan` number: re-run it and paste"
    )
