"""`dsv4 pretrain` end to end, in subprocesses as a user runs it: configs, a short run and its run directory,
bitwise resume after kill -9, preemption signals, refusals that name the problem, multirun, trackers, report."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dsv4train.config.hydra_entry import CONF_DIR, compose_pretrain
from dsv4train.testing.toy_configs import FAST_PRETRAIN_OVERRIDES

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]
FAST = list(FAST_PRETRAIN_OVERRIDES)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "sample"
    r = _dsv4(
        [
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
        ]
    )
    assert r.returncode == 0, r.stderr
    return out


def _dsv4(args, **kw):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}
    return subprocess.run(
        [sys.executable, "-m", "dsv4train.cli", *args],
        capture_output=True,
        text=True,
        cwd=kw.pop("cwd", REPO),
        env=env,
        timeout=kw.pop("timeout", 600),
        **kw,
    )


def _pretrain(run_dir, data_dir, *overrides, **kw):
    return _dsv4(["pretrain", *FAST, f"run.dir={run_dir}", f"data.dir={data_dir}", *overrides], **kw)


def _metrics(run_dir):
    from dsv4train.observability.trackers import read_metrics

    return read_metrics(run_dir)


def _weights(step_dir):
    import dsv4train

    return dsv4train.load_pretrained(step_dir).state_dict()


# presets of dsv4train/conf/sft.yaml and grpo.yaml; every other group is pre-training's (and SFT's, GRPO's)
POSTTRAIN_ONLY_GROUPS = ("sft", "grpo")


def test_every_yaml_composes():
    for group_dir in sorted(p for p in CONF_DIR.iterdir() if p.is_dir() and p.name not in POSTTRAIN_ONLY_GROUPS):
        for option in sorted(group_dir.glob("*.yaml")):
            override = f"{group_dir.name}={option.stem}"
            extra = ["model=small"] if override == "train=default" else []  # seq 2048 needs a longer model
            cfg, resolved = compose_pretrain([override, *extra])
            assert getattr(cfg, group_dir.name) is not None and "run:" in resolved, override


def test_every_sft_preset_composes():
    from dsv4train.config.hydra_entry import compose_config

    for option in sorted((CONF_DIR / "sft").glob("*.yaml")):
        cfg, resolved = compose_config("sft", [f"sft={option.stem}", "sft.init=runs/base"])
        assert cfg.sft.init == "runs/base" and cfg.data.train and "run:" in resolved, option.stem


def test_every_grpo_preset_composes():
    from dsv4train.config.hydra_entry import compose_config

    for option in sorted((CONF_DIR / "grpo").glob("*.yaml")):
        cfg, resolved = compose_config("grpo", [f"grpo={option.stem}", "grpo.init=runs/sft"])
        assert cfg.grpo.init == "runs/sft" and cfg.grpo.tasks and "run:" in resolved, option.stem


def test_model_yamls_match_the_flavor_registry():
    from dataclasses import asdict

    import yaml

    from dsv4train.models.flavors import flavor_names, get_flavor

    for name in flavor_names():
        on_disk = yaml.safe_load((CONF_DIR / "model" / f"{name}.yaml").read_text())
        assert on_disk == asdict(get_flavor(name)), (
            "regenerate: python -m dsv4train.models.flavors dsv4train/conf/model"
        )


def test_bad_overrides_name_the_key(tmp_path):
    r = _dsv4(["pretrain", "train.stepz=3", f"run.dir={tmp_path / 'r'}"])
    assert r.returncode != 0 and "stepz" in r.stderr
    r = _dsv4(["pretrain", "train.steps=many", f"run.dir={tmp_path / 'r'}"])
    assert r.returncode != 0 and "train.steps" in r.stderr
    r = _dsv4(["pretrain", "train.seq_len=100000", f"run.dir={tmp_path / 'r'}"])
    assert r.returncode == 2 and "train.seq_len" in r.stderr
    r = _dsv4(["pretrain", "parallel.tp=2", f"run.dir={tmp_path / 'r'}"])
    assert r.returncode == 2 and "parallel.tp" in r.stderr
    assert not (tmp_path / "r" / "checkpoints").exists() and not (tmp_path / "r" / "metrics.jsonl").exists()


def test_cfg_job_prints_the_resolved_config(tmp_path):
    r = _dsv4(["pretrain", "--cfg", "job", "model=tiny", "train.steps=7", f"run.dir={tmp_path / 'r'}"])
    assert r.returncode == 0, r.stderr
    assert "name: tiny" in r.stdout and "steps: 7" in r.stdout and "dim: 128" in r.stdout


def test_run_dir_contents_and_load_pretrained(tmp_path, data_dir):
    run = tmp_path / "run"
    r = _pretrain(run, data_dir, "train.steps=6", "train.checkpoint_every=3")
    assert r.returncode == 0, r.stderr
    records = _metrics(run)
    assert [m["step"] for m in records] == [1, 2, 3, 4, 5, 6]
    for m in records:
        assert {"step", "loss", "lr", "tokens_per_sec", "grad_norm", "mfu", "expert_load_max_over_mean"} <= set(m)
    assert "val_loss" in records[3] and "val_loss" in records[5]
    assert all(0.1 < m["muon_update_rms"] < 0.2 for m in records), [m["muon_update_rms"] for m in records]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_3", "step_6"]
    assert "name: toy" in (run / "config.resolved.yaml").read_text()
    env = json.loads((run / "env.jsonl").read_text().splitlines()[0])
    assert env["torch"] == torch.__version__ and "git" in env
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps_done"] == 6 and summary["val_loss_last"] is not None
    import dsv4train

    model = dsv4train.load_pretrained(run)
    assert model(torch.randint(0, 512, (1, 9))).shape == (1, 9, model.cfg.vocab_size)
    assert _dsv4(["report", str(run)]).returncode == 0
    assert {"loss.png", "lr.png", "throughput.png", "expert_load.png"} <= {p.name for p in (run / "plots").iterdir()}


def test_resume_after_kill_9_is_bitwise(tmp_path, data_dir):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = ["train.steps=8", "train.checkpoint_every=4", "train.keep_checkpoints=3"]
    assert _pretrain(straight, data_dir, *common).returncode == 0

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dsv4train.cli",
            "pretrain",
            *FAST,
            *common,
            f"run.dir={resumed}",
            f"data.dir={data_dir}",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while not (resumed / "checkpoints" / "step_4").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (resumed / "checkpoints" / "step_8").exists(), "the run finished before it could be killed"

    r = _pretrain(resumed, data_dir, *common)
    assert r.returncode == 0 and "resuming from" in r.stdout, r.stdout + r.stderr
    a, b = _metrics(straight), _metrics(resumed)
    assert [m["loss"] for m in a] == [m["loss"] for m in b]
    assert [m.get("val_loss") for m in a] == [m.get("val_loss") for m in b]
    wa, wb = _weights(straight / "checkpoints" / "step_8"), _weights(resumed / "checkpoints" / "step_8")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_sigterm_writes_a_checkpoint_and_exits_0(tmp_path, data_dir):
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dsv4train.cli",
            "pretrain",
            *FAST,
            "train.steps=100000",
            "train.checkpoint_every=0",
            f"run.dir={run}",
            f"data.dir={data_dir}",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    while not (run / "metrics.jsonl").exists() or not (run / "metrics.jsonl").read_text():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "preempted_by" in out and "SIGTERM" in out
    steps = [int(p.name[5:]) for p in (run / "checkpoints").iterdir() if p.name.startswith("step_")]
    assert len(steps) == 1 and steps[0] >= 1


def test_resume_with_another_model_config_is_refused(tmp_path, data_dir):
    run = tmp_path / "run"
    assert _pretrain(run, data_dir, "train.steps=2").returncode == 0
    before = {p.name: p.stat().st_mtime for p in (run / "checkpoints" / "step_2").iterdir()}
    r = _pretrain(run, data_dir, "train.steps=4", "model.dim=32")
    assert r.returncode == 2 and "model.dim" in r.stderr and "new run.dir" in r.stderr
    assert {p.name: p.stat().st_mtime for p in (run / "checkpoints" / "step_2").iterdir()} == before


def test_unwritable_run_dir_and_missing_data_are_named(tmp_path, data_dir):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    r = _pretrain(blocker / "run", data_dir, "train.steps=1")
    assert r.returncode == 2 and "run.dir: cannot write" in r.stderr
    assert blocker.read_text() == "not a folder"
    r = _pretrain(tmp_path / "run", tmp_path / "no_such_data", "train.steps=1")
    assert r.returncode == 2 and "no_such_data" in r.stderr


def test_nan_stop_policy_stops_with_a_message(tmp_path, data_dir):
    r = _pretrain(
        tmp_path / "run",
        data_dir,
        "train.steps=5",
        "train.nan_policy=stop",
        "optim.lr=1e30",
        "optim.min_lr=0",
        "optim.name=adamw",
    )
    assert r.returncode == 1 and "non-finite" in r.stderr


def test_multirun_makes_one_run_dir_per_job(tmp_path, data_dir):
    sweep = tmp_path / "sweep"
    r = _dsv4(["pretrain", "-m", *FAST, "train.steps=2", "seed=1,2", f"run.dir={sweep}", f"data.dir={data_dir}"])
    assert r.returncode == 0, r.stderr
    for job in ("0", "1"):
        assert (sweep / job / "checkpoints" / "step_2").exists()
    seeds = {json.loads((sweep / j / "summary.json").read_text())["run_dir"] for j in ("0", "1")}
    assert len(seeds) == 2


def _flat_scalars(record: dict) -> dict[str, float]:
    """A metrics.jsonl record as a tracker should log it: numbers, and lists as `name/i` (written here from the
    documented rule, not by calling the tracker's own flattening)."""
    out = {}
    for k, v in record.items():
        if k == "step" or isinstance(v, bool) or v is None:
            continue
        if isinstance(v, list):
            out.update({f"{k}/{i}": float(x) for i, x in enumerate(v)})
        elif isinstance(v, (int, float)):
            out[k] = float(v)
    return out


def _tensorboard_scalars(log_dir) -> dict[int, dict[str, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    by_step: dict[int, dict[str, float]] = {}
    for tag in acc.Tags()["scalars"]:
        for event in acc.Scalars(tag):
            by_step.setdefault(event.step, {})[tag] = event.value
    return by_step


def _wandb_history(wandb_dir) -> dict[int, dict[str, float]]:
    """The history rows of a wandb offline run, read from its `.wandb` file: a LevelDB-style log (a 7-byte
    ':W&B' header, then records of crc32 u32, length u16, type u8 in 32 KiB blocks; type 1 whole, 2/3/4 first/
    middle/last piece) of wandb's protobuf `Record`s. wandb 0.31 ships no Python reader, so this is our own."""
    import struct

    from wandb.proto import wandb_internal_pb2

    (path,) = Path(wandb_dir).glob("offline-run-*/run-*.wandb")
    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B", path
    pos, pieces, records = 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block tail too short for a header is padding
            pos += block - pos % block
            continue
        _, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        body, pos = data[pos + 7 : pos + 7 + n], pos + 7 + n
        if kind == 1:
            records.append(body)
        elif kind in (2, 3):
            pieces = body if kind == 2 else pieces + body
        elif kind == 4:
            records.append(pieces + body)
    by_step: dict[int, dict[str, float]] = {}
    for body in records:
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(body)
        if rec.WhichOneof("record_type") == "history":
            row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item}
            by_step[int(row["_step"])] = {k: v for k, v in row.items() if not k.startswith("_")}
    return by_step


@pytest.mark.parametrize("tracker", ["tensorboard", "wandb"])
def test_other_trackers_log_the_same_scalars_as_metrics_jsonl(tmp_path, data_dir, tracker):
    """Every number of every metrics.jsonl line is read back from the tracker's own files at the same step (not
    only that the tracker made its start-up files)."""
    pytest.importorskip(tracker if tracker == "wandb" else "tensorboard")
    run = tmp_path / "run"
    r = _pretrain(run, data_dir, "train.steps=2", f"tracker={tracker}")
    assert r.returncode == 0, r.stderr
    logged = _tensorboard_scalars(run / "tensorboard") if tracker == "tensorboard" else _wandb_history(run / "wandb")
    records = _metrics(run)
    assert [rec["step"] for rec in records] == [1, 2] and sorted(logged) == [1, 2], (sorted(logged), r.stderr)
    for rec in records:
        want, got = _flat_scalars(rec), logged[rec["step"]]
        assert "loss" in want and "expert_load_max_over_mean/0" in want
        assert set(got) == set(want), (rec["step"], sorted(set(got) ^ set(want)))
        for key, value in want.items():
            # TensorBoard stores scalars as float32 (relative rounding 2^-24 < 1e-7); wandb keeps the JSON float.
            tol = 1e-7 * abs(value) if tracker == "tensorboard" else 0.0
            assert abs(got[key] - value) <= tol, (rec["step"], key, got[key], value)
    assert "val_loss" in _flat_scalars(records[-1])  # the last step evaluates, so the check above covered it


def test_precision_modes_train_and_a_bad_fp8_block_names_the_layer(tmp_path, data_dir):
    r = _pretrain(tmp_path / "bad", data_dir, "train.steps=2", "precision=fp8")
    assert r.returncode == 2 and "layers.0.attn.wq_a" in r.stderr and "precision.fp8_block=32" in r.stderr, r.stderr
    assert not (tmp_path / "bad" / "checkpoints").exists()
    for mode in ("precision=bf16", "precision=fp8_fp4"):
        run = tmp_path / mode.split("=")[1]
        r = _pretrain(run, data_dir, "train.steps=2", mode, "precision.fp8_block=32")
        assert r.returncode == 0, r.stderr
        summary = json.loads((run / "summary.json").read_text())
        assert summary["steps_done"] == 2 and summary["val_loss_last"] < summary["val_loss_at_start"] + 0.5
