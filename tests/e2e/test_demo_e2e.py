"""The toy pipeline end to end, shortened: corpus -> tokenizer -> packing -> training; loss must fall."""

import json

import pytest
import torch

from dsv4train.cli.main import main
from dsv4train.config.pretrain import TrainConfig
from dsv4train.train.losses import IGNORE, mtp_targets

pytestmark = pytest.mark.e2e


def test_demo_trains_and_validation_loss_falls(tmp_path):
    run_dir = tmp_path / "demo"
    rc = main(
        [
            "demo",
            "--run-dir",
            str(run_dir),
            "--data-dir",
            str(tmp_path / "data"),
            "--steps",
            "40",
            "--max-docs",
            "120",
            "train.seq_len=128",
            "train.eval_every=20",
            "train.progress_bar=false",
        ]
    )
    assert rc == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["val_loss_last"] < summary["val_loss_at_start"] - 1.0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 40 and all({"step", "loss", "lr", "tokens_per_sec"} <= r.keys() for r in rows)
    assert (tmp_path / "data" / "tokenizer.json").is_file() and (tmp_path / "data" / "stdlib.idx").is_file()
    assert (run_dir / "plots" / "loss.png").is_file() and (run_dir / "checkpoints" / "step_40").is_dir()


def test_pending_commands_fail_with_a_message(capsys):
    assert main(["distill"]) == 2
    assert "not available yet" in capsys.readouterr().err
    assert main(["nonsense"]) == 2


def test_mtp_targets():
    labels = torch.tensor([[1, 2, 3]])
    assert mtp_targets(labels).tolist() == [[2, 3, IGNORE]]


def test_bad_train_config_names_the_key():
    from dsv4train.config.errors import ConfigError

    with pytest.raises(ConfigError, match="train.steps"):
        TrainConfig(steps=0)
    with pytest.raises(ConfigError, match="train.nan_policy"):
        TrainConfig(nan_policy="ignore")
