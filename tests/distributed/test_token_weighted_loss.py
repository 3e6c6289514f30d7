"""The token-weighted loss convention under layouts (train/learner.py): a step's loss is Σ over target tokens / N
with N counted over the whole global batch, so masked rows spread unevenly over data ranks, context shards, pipeline
chunks and accumulated micro-batches give the one-process loss and gradient of the whole batch. The reference is
written by hand (dsv4train/testing/masked_batches.py), not through the Learner. Each rank gets rows with other target
counts (32 and 8 on data rank 0, 16 and 3 on rank 1), and the cp shards of a row hold different counts (the 'prompt'
row has none in its first shard)."""

import pytest
import torch

from dsv4train.config.pretrain import TrainConfig
from dsv4train.parallel.dims import ParallelDims
from dsv4train.parallel.runtime import ParallelRuntime
from dsv4train.testing.distributed import run_distributed_test
from dsv4train.testing.equivalence import build_tiny, full_grads
from dsv4train.testing.masked_batches import MTP_WEIGHT, masked_rows, reference_loss_and_grads, relative_l2
from dsv4train.train.learner import Learner
from dsv4train.train.losses import NextTokenLoss

pytestmark = pytest.mark.dist

ROWS, SEQ = 4, 32  # 32 tokens: whole windows and compression blocks on each of 2 cp shards (as test_layouts)
NO_EXTRAS = TrainConfig(grad_clip=1e9, balance_loss_weight=0.0, indexer_loss_weight=0.0, bias_update_speed=0.0)


def _check(rank, world_size, layout: dict, accum: int, packed: bool = False):
    batch = masked_rows(build_tiny().cfg.vocab_size, ROWS, SEQ, packed=packed)
    want_losses, want_grads = reference_loss_and_grads(build_tiny(), batch)

    rt = ParallelRuntime(ParallelDims(**layout))
    model = rt.parallelize(build_tiny())
    learner = Learner(model, torch.optim.SGD(model.parameters(), lr=0.0), NO_EXTRAS, rt)
    b = ROWS // rt.data_ranks
    mine = {k: v[rt.data_rank * b : (rt.data_rank + 1) * b] for k, v in batch.items()}
    micro = [dict(zip(mine, vs)) for vs in zip(*(v.chunk(accum) for v in mine.values()))]
    res = learner.step(micro, NextTokenLoss(mtp_weight=MTP_WEIGHT))

    # fp32, only the order of the sums differs (all-reduces, shards, chunks): measured relative L2 ~1e-7; a wrong
    # normaliser (per rank, per shard or per micro-batch) moves the gradient by tens of percent.
    assert res.n_targets == 59
    for k in ("lm_loss", "mtp_loss"):
        assert res.metrics[k] == pytest.approx(want_losses[k], rel=1e-6), k
    got = full_grads(model)
    extra = [k for k in got if k not in want_grads]  # FSDP gives a unit's unused parameters (indexer) zero grads
    assert all(float(got[k].abs().max()) == 0 for k in extra), extra
    assert relative_l2(got, {k: want_grads[k] for k in got if k in want_grads}) < 1e-5


@pytest.mark.parametrize(
    "layout,accum",
    [
        ({"dp": 2}, 1),
        ({"dp": 2}, 2),
        ({"cp": 2}, 2),
        ({"pp": 2}, 2),
    ],
    ids=["dp2", "dp2-accum2", "cp2-accum2", "pp2-accum2"],
)
def test_masked_batches_match_one_process(layout, accum):
    run_distributed_test(_check, world_size=ParallelDims(**layout).world_size, args=(layout, accum))


@pytest.mark.parametrize(
    "layout,accum",
    [({"dp": 2, "ep": 2}, 1), ({"pp": 2}, 2)],
    ids=["dp2xep2", "pp2-accum2"],
)
def test_packed_documents_match_one_process(layout, accum):
    """SFT's rows: several documents per row (`positions`), under the data x expert layout SFT runs in and under the
    pipeline (whose stages each get their chunk's positions)."""
    run_distributed_test(_check, world_size=ParallelDims(**layout).world_size, args=(layout, accum, True))
