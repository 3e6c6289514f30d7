"""The toy pipeline end to end, shortened: corpus -> tokenizer -> packing -> training; loss must fall."""

import json

import pytest
import torch

from dsv4train.cli.main import main
from dsv4train.data.packing import pack_documents
from dsv4train.train.losses import IGNORE, mtp_targets
from dsv4train.train.trainer import TrainConfig

pytestmark = pytest.mark.e2e


def test_demo_trains_and_validation_loss_falls(tmp_path):
    run_dir = tmp_path / "demo"
    rc = main(["demo", "--run-dir", str(run_dir), "--steps", "40", "--max-docs", "120", "--seq-len", "128"])
    assert rc == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["val_loss_after"] < summary["val_loss_before"] - 1.0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows and all({"step", "loss", "lr", "tokens_per_sec"} <= r.keys() for r in rows)
    assert (run_dir / "data" / "tokenizer.json").is_file()


def test_pending_commands_fail_with_a_message(capsys):
    assert main(["grpo"]) == 2
    assert "not available yet" in capsys.readouterr().err
    assert main(["nonsense"]) == 2


def test_packing_and_mtp_targets():
    rows = pack_documents([[5, 6, 7], [8, 9]], eos_id=1, seq_len=3)
    assert rows.tolist() == [[5, 6, 7, 1], ]  # 7 tokens -> one row of 4, the tail is dropped
    labels = torch.tensor([[1, 2, 3]])
    assert mtp_targets(labels).tolist() == [[2, 3, IGNORE]]
    with pytest.raises(ValueError, match="not enough"):
        pack_documents([[1]], eos_id=1, seq_len=8)


def test_bad_train_config_names_the_key():
    from dsv4train.config.errors import ConfigError

    with pytest.raises(ConfigError, match="train.warmup_steps"):
        TrainConfig(steps=10, warmup_steps=10)
