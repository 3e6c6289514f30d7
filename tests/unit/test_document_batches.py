"""Pre-training rows with `data.document_mask=true`: positions restart per document and no target crosses into the
next document. Expected tensors are written out by hand from the row below."""

import pytest
import torch

from dsv4train.config.errors import ConfigError
from dsv4train.train.losses import IGNORE, lm_batch, positions_from_starts

X = IGNORE
# seq+1 = 9 tokens: the row continues a document (10, 11), then document A (20 21 22), then B (30 31 32 33 ...)
ROW = torch.tensor([[10, 11, 20, 21, 22, 30, 31, 32, 33]])
STARTS = torch.tensor([[False, False, True, False, False, True, False, False, False]])


def test_positions_restart_at_each_document_and_at_the_row_start():
    batch = lm_batch(ROW, STARTS)
    assert batch["positions"].tolist() == [[0, 1, 0, 1, 2, 0, 1, 2]]
    assert batch["input_ids"].tolist() == [[10, 11, 20, 21, 22, 30, 31, 32]]


def test_no_target_crosses_a_document_boundary():
    batch = lm_batch(ROW, STARTS)
    # token t+1 of the same document; the last token of a document (11, 22) predicts nothing
    assert batch["labels"].tolist() == [[11, X, 21, 22, X, 31, 32, 33]]
    # token t+2 of the same document: none for the last two positions of each document, nor the row's last
    assert batch["mtp_labels"].tolist() == [[X, X, 22, X, X, 32, 33, X]]


def test_without_document_mask_every_position_has_a_target():
    batch = lm_batch(ROW)
    assert "positions" not in batch
    assert batch["labels"].tolist() == [[11, 20, 21, 22, 30, 31, 32, 33]]


def test_positions_from_starts_by_hand():
    starts = torch.tensor([[True, False, True, True, False, False], [True, False, False, False, False, True]])
    assert positions_from_starts(starts).tolist() == [[0, 1, 0, 0, 1, 2], [0, 1, 2, 3, 4, 0]]


def test_document_mask_with_context_parallelism_is_refused():
    from dsv4train.config.data import DataConfig
    from dsv4train.config.pretrain import ParallelConfig, PretrainConfig

    with pytest.raises(ConfigError, match="data.document_mask"):
        PretrainConfig(data=DataConfig(document_mask=True), parallel=ParallelConfig(cp=2))
