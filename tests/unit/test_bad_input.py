"""Bad input ends in one paragraph naming the problem, never a traceback: every numeric config field is range
checked, `dsv4 demo`'s bad arguments and overrides, a damaged manifest for `data prepare --append`, damaged
checkpoints (cut short, missing files, garbage meta), and a resume with another optimizer. A bug still raises."""

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from dsv4train.cli.data import data_main
from dsv4train.cli.main import COMMANDS, main
from dsv4train.config.errors import ConfigError
from dsv4train.config.model import ModelConfig
from dsv4train.config.optim import OptimConfig
from dsv4train.config.pretrain import TrainConfig
from dsv4train.models.flavors import flavor_names, get_flavor
from dsv4train.models.model import DSV4Model
from dsv4train.optim.groups import build_optimizers
from dsv4train.testing.toy_configs import tiny_config
from dsv4train.train import checkpoint
from dsv4train.train.checkpoint import CheckpointError

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "sample"


# ---- every numeric config field is range checked ---------------------------------------------------------------


def _valid(cls):
    """A valid instance's fields (the toy flavor for the model, the defaults otherwise)."""
    return dataclasses.asdict(get_flavor("toy")) if cls is ModelConfig else dataclasses.asdict(cls())


def _numeric_fields(cls):
    return [f for f in dataclasses.fields(cls) if f.type in ("int", "float", int, float)]


@pytest.mark.parametrize("cls, section", [(ModelConfig, "model"), (TrainConfig, "train"), (OptimConfig, "optim")])
def test_every_numeric_field_refuses_negative_and_non_finite_values(cls, section):
    """No field of these three has a meaning for -1, NaN or infinity; each must be refused with its own key named
    (the list of fields comes from the dataclass, so a new field without a range check fails here)."""
    fields = _numeric_fields(cls)
    assert len(fields) >= 10, [f.name for f in fields]
    for f in fields:
        bad_values = [-1] + ([float("nan"), float("inf"), -float("inf")] if f.type in ("float", float) else [])
        for bad in bad_values:
            with pytest.raises(ConfigError, match=rf"^{section}\.{f.name}: ") as info:
                cls(**{**_valid(cls), f.name: bad})
            assert repr(bad) in str(info.value) or str(bad) in str(info.value), str(info.value)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("init_std", -1.0, "model.init_std: must be in (0, 1], got -1.0"),
        ("init_std", 0.0, "model.init_std: must be in (0, 1], got 0.0"),
        ("rope_theta", 1.0, "model.rope_theta: must be > 1, got 1.0"),  # log(1) = 0: YaRN's range divides by it
        ("compress_rope_theta", 0.5, "model.compress_rope_theta: must be > 1, got 0.5"),
        ("norm_eps", 0.0, "model.norm_eps: must be in (0, 1), got 0.0"),
        ("hc_eps", 1.0, "model.hc_eps: must be in (0, 1), got 1.0"),
        ("rope_factor", 0.5, "model.rope_factor: must be >= 1, got 0.5"),
        ("beta_fast", 1, "model.beta_fast: (1) must exceed beta_slow (1): YaRN blends between the two"),
        ("route_scale", 0.0, "model.route_scale: must be > 0, got 0.0"),
        ("n_shared_experts", 2, "model.n_shared_experts: must be in [0, 1], got 2"),
    ],
)
def test_model_ranges_name_the_key_and_the_range(key, value, message):
    with pytest.raises(ConfigError) as info:
        get_flavor("toy", **{key: value})
    assert str(info.value) == message


def test_edge_values_that_mean_something_are_accepted():
    get_flavor(
        "toy",
        swiglu_limit=0.0,
        original_seq_len=0,
        n_shared_experts=0,
        hc_init_std=0.0,
        n_mtp_layers=0,
        n_hash_layers=0,
        init_std=1.0,
        rope_factor=1.0,
    )
    TrainConfig(checkpoint_every=0, dense_indexer_steps=0, max_nan_skips=0, mtp_weight=0.0, bias_update_speed=0.0)
    OptimConfig(min_lr=0.0, weight_decay=0.0, warmup_steps=0, decay_fraction=0.0, adam_beta1=0.0, lr=1e30)
    for name in flavor_names():
        get_flavor(name)
    tiny_config()


def test_optim_cross_check_still_names_min_lr():
    with pytest.raises(ConfigError, match=r"^optim\.min_lr: must be in \[0, lr=0.001\], got 0.01"):
        OptimConfig(lr=1e-3, min_lr=1e-2)


# ---- the CLI: one paragraph and status 2 for the user's mistakes, a traceback for bugs ---------------------------


def test_demo_steps_zero_is_an_argument_error(capsys, tmp_path):
    with pytest.raises(SystemExit) as info:
        main(["demo", "--steps", "0", "--run-dir", str(tmp_path / "r"), "--data-dir", str(tmp_path / "d")])
    assert info.value.code == 2
    assert "argument --steps: must be >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "r").exists() and not (tmp_path / "d").exists()


@pytest.mark.parametrize(
    "override, expected",
    [
        (
            "train.stepz=3",
            "dsv4 demo: Could not override 'train.stepz'. Key 'stepz' not in 'TrainConfig'. To append "
            "to your config use +train.stepz=3.\n",
        ),
        (
            "train.steps=many",
            "dsv4 demo: Error merging override train.steps=many. Value 'many' of type 'str' could not "
            "be converted to Integer.\n",
        ),
        ("model.init_std=-1", "dsv4 demo: model.init_std: must be in (0, 1], got -1.0\n"),
        (
            "model=nope",
            "dsv4 demo: In 'pretrain': Could not find 'model/nope'. Available options in 'model': 1b, "
            "flash, pro, small, tiny, toy.\n",
        ),
    ],
)
def test_demo_bad_override_is_one_paragraph_before_any_work(capsys, tmp_path, override, expected):
    rc = main(["demo", "--run-dir", str(tmp_path / "r"), "--data-dir", str(tmp_path / "d"), override])
    out = capsys.readouterr()
    assert rc == 2 and out.err == expected, out.err
    assert "[1/3]" not in out.out  # refused before the data step
    assert not (tmp_path / "r").exists() and not (tmp_path / "d").exists()


def test_a_bug_keeps_its_traceback(monkeypatch):
    monkeypatch.setitem(COMMANDS, "boom", ("math", "sqrt", "a command whose code is wrong"))
    with pytest.raises(TypeError):
        main(["boom"])  # math.sqrt(list): a TypeError is a bug, not a user error; it is not turned into a message


# ---- `data prepare --append` on a damaged manifest ---------------------------------------------------------------


@pytest.fixture
def prepared(tmp_path):
    out = tmp_path / "prepared"
    assert data_main(["prepare", "--input", str(SAMPLE), "--vocab-size", "300", "--name", "a", "--out", str(out)]) == 0
    return out


def _folder_state(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize(
    "damage, expected",
    [
        (lambda text: text[: len(text) // 2], "is not valid JSON ("),
        (lambda text: "", "is not valid JSON (Expecting value at line 1, column 1)"),
        (lambda text: "[1, 2]", "holds a JSON list, not an object"),
        (
            lambda text: json.dumps({k: v for k, v in json.loads(text).items() if k != "datasets"}),
            "is missing or has a wrong type for 'datasets' (want dict)",
        ),
        (lambda text: json.dumps({**json.loads(text), "eos_id": "1"}), "'eos_id' (want int)"),
    ],
)
def test_append_to_a_damaged_manifest_names_it_and_writes_nothing(capsys, prepared, damage, expected):
    manifest = prepared / "manifest.json"
    manifest.write_text(damage(manifest.read_text()))
    before = _folder_state(prepared)
    rc = data_main(["prepare", "--input", str(SAMPLE), "--name", "b", "--append", "--out", str(prepared)])
    err = capsys.readouterr().err
    assert rc == 2 and str(manifest) in err and expected in err and "new --out" in err, err
    assert _folder_state(prepared) == before


# ---- damaged checkpoints ------------------------------------------------------------------------------------------


def _model_and_optimizer(name="muon", seed=0):
    model = DSV4Model(tiny_config())
    model.init_weights(seed)
    return model, build_optimizers(model, OptimConfig(name=name))


def _train_a_step(model, optimizer):
    out = model(torch.randint(0, 300, (1, 16)), mtp_input_ids=torch.randint(0, 300, (1, 16)), with_aux=True)
    loss = out.logits.float().square().mean() + out.mtp_logits.float().square().mean() + out.indexer_loss
    (loss + out.balance_loss).backward()  # every parameter gets a gradient, so the optimizer holds state for all
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@pytest.fixture
def two_checkpoints(tmp_path):
    """checkpoints/step_1 and step_2 of a tiny model trained with Muon + AdamW (a step before each save, so the
    optimizer holds state)."""
    root = tmp_path / "checkpoints"
    model, optimizer = _model_and_optimizer()
    for step in (1, 2):
        _train_a_step(model, optimizer)
        checkpoint.save(root, step, model, optimizer, {"step": step}, keep=5, optim=OptimConfig())
    return root, {k: v.clone() for k, v in model.state_dict().items()}


def _mtimes(folder: Path) -> dict:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()}


@pytest.mark.parametrize("keep_bytes", [0, 100, "half", "all but one"])
def test_a_cut_short_shard_names_the_folder_the_file_and_the_way_out(two_checkpoints, keep_bytes):
    root, _ = two_checkpoints
    shard = root / "step_2" / "__0_0.distcp"
    size = shard.stat().st_size
    keep = {"half": size // 2, "all but one": size - 1}.get(keep_bytes, keep_bytes)
    with open(shard, "r+b") as f:
        f.truncate(keep)
    before = _mtimes(root / "step_2")
    model, optimizer = _model_and_optimizer(seed=1)
    with pytest.raises(CheckpointError) as info:
        checkpoint.load(root / "step_2", model, optimizer)
    msg = str(info.value)
    assert f"checkpoint {root / 'step_2'} is damaged: __0_0.distcp is cut short: {keep:,} bytes" in msg, msg
    assert f"previous complete checkpoint, {root / 'step_1'}" in msg and f"mv {root / 'step_2'} " in msg
    assert _mtimes(root / "step_2") == before  # nothing changed


@pytest.mark.parametrize(
    "name, damage, expected",
    [
        ("__0_0.distcp", "delete", "__0_0.distcp is missing (the index .metadata names it)"),
        (".metadata", "half", ".metadata cannot be read"),
        (".metadata", "delete", ".metadata is missing"),
        ("meta.json", "garbage", "meta.json cannot be read"),
        ("trainer_state.pt", "half", "trainer_state.pt cannot be read"),
    ],
)
def test_other_damage_is_named_too(two_checkpoints, name, damage, expected):
    root, _ = two_checkpoints
    path = root / "step_2" / name
    if damage == "delete":
        path.unlink()
    elif damage == "garbage":
        path.write_text("{not json")
    else:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    model, optimizer = _model_and_optimizer(seed=1)
    with pytest.raises(CheckpointError, match="is damaged") as info:
        checkpoint.load(root / "step_2", model, optimizer)
        checkpoint.trainer_state(root / "step_2")
    assert expected in str(info.value) and str(root / "step_1") in str(info.value), str(info.value)


def test_the_first_checkpoint_damaged_says_there_is_no_earlier_one(two_checkpoints):
    root, _ = two_checkpoints
    shutil.rmtree(root / "step_1")
    (root / "step_2" / "__0_0.distcp").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"start again from step 0 \(there is no earlier checkpoint"):
        checkpoint.verify(root / "step_2")


def test_only_complete_step_folders_are_resumed_and_partial_writes_are_removed(two_checkpoints):
    root, _ = two_checkpoints
    tmp = root / ".tmp_step_9"
    shutil.copytree(root / "step_2", tmp)  # even a .tmp_ folder holding every file is never chosen
    (root / "step_7").mkdir()  # no meta.json: not complete
    (root / "damaged_step_8").mkdir()
    shutil.copy(root / "step_2" / "meta.json", root / "damaged_step_8")
    assert checkpoint.latest(root) == root / "step_2"
    assert checkpoint.remove_partial(root) == [".tmp_step_9"] and not tmp.exists()
    assert (root / "damaged_step_8").exists()


# ---- a resume with another optimizer -----------------------------------------------------------------------------


def test_another_optimizer_is_refused_with_the_way_out(two_checkpoints):
    root, _ = two_checkpoints
    with pytest.raises(ConfigError) as info:
        checkpoint.check_same_optimizer(root / "step_2", OptimConfig(name="adamw"), allow_change=False)
    msg = str(info.value)
    assert "optim.name: checkpoint 'muon' vs now 'adamw'" in msg and "train.allow_optimizer_change=true" in msg
    with pytest.raises(ConfigError, match="optim.muon_split_wo_a: checkpoint True vs now False"):
        checkpoint.check_same_optimizer(root / "step_2", OptimConfig(muon_split_wo_a=False), allow_change=False)
    assert checkpoint.check_same_optimizer(root / "step_2", OptimConfig(lr=1.0, weight_decay=0.0), False) is True
    assert checkpoint.check_same_optimizer(root / "step_2", OptimConfig(name="adamw"), allow_change=True) is False


def test_weights_only_resume_loads_the_weights_and_leaves_the_optimizer_fresh(two_checkpoints):
    root, saved = two_checkpoints
    model, optimizer = _model_and_optimizer("adamw", seed=1)
    assert checkpoint.load(root / "step_2", model, optimizer, optimizer_state=False) is False
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    assert not optimizer.state_dict()["adamw"]["state"]  # nothing loaded into the new optimizer


@pytest.mark.parametrize("optim", [OptimConfig(name="adamw"), OptimConfig(muon_split_wo_a=False)])
def test_a_checkpoint_without_the_optimizer_in_its_meta_still_gets_a_message(two_checkpoints, optim):
    """Checkpoints written before meta.json held the optimizer: DCP's 'Missing key' becomes a message, and with
    train.allow_optimizer_change (optimizer_state=None) the weights are loaded alone."""
    root, saved = two_checkpoints
    meta = root / "step_2" / "meta.json"
    meta.write_text(json.dumps({k: v for k, v in json.loads(meta.read_text()).items() if k != "optim"}))
    assert checkpoint.check_same_optimizer(root / "step_2", optim, allow_change=False) is None
    model = DSV4Model(tiny_config())
    model.init_weights(1)
    optimizer = build_optimizers(model, optim)
    with pytest.raises(CheckpointError, match="train.allow_optimizer_change=true"):
        checkpoint.load(root / "step_2", model, optimizer, optimizer_state=True)
    assert checkpoint.load(root / "step_2", model, optimizer, optimizer_state=None) is False
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
