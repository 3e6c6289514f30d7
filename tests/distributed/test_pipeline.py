"""Pipeline parallelism trains like one process: 1F1B, Interleaved 1F1B and DualPipeV on 2 pp ranks, and pp
composed with dp, tp and dp×ep, against the one-process reference and its noise floor (tests/distributed/
test_layouts.py's pattern; tolerances in dsv4train/testing/equivalence.py). Each pp rank holds only its stages'
parameters, so gradients are compared per rank for the parameters it holds, under their global names."""

from functools import partial

import pytest
import torch.distributed as dist

from dsv4train.config.optim import OptimConfig
from dsv4train.config.pretrain import TrainConfig
from dsv4train.optim.groups import build_optimizers
from dsv4train.parallel.dims import ParallelDims
from dsv4train.parallel.runtime import ParallelRuntime
from dsv4train.testing.distributed import run_distributed_test
from dsv4train.testing.equivalence import (
    assert_matches_one_process,
    build_tiny,
    fixed_batches,
    one_process_reference,
    run_steps,
)
from dsv4train.testing.toy_configs import TINY_FP8, TINY_FP8_FP4, tiny_config

pytestmark = pytest.mark.dist

ROWS, SEQ, STEPS = 4, 24, 3


def _check_pipeline(
    rank,
    world_size,
    layout: dict,
    optim: str,
    grad_accum: int = 1,
    rows: int = ROWS,
    seq: int = SEQ,
    precisions: tuple = (None,),
    steps: int = STEPS,
):
    cfg = tiny_config(n_hash_layers=1)
    train_cfg = TrainConfig(grad_clip=0.5, bias_update_speed=1e-2)
    make_optimizer = partial(build_optimizers, cfg=OptimConfig(name=optim, lr=3e-3, muon_ns_dtype="float32"))
    batches = fixed_batches(cfg.vocab_size, rows, seq, steps)
    dims = ParallelDims(**layout)
    dims.validate(world_size, cfg, seq, rows // dims.data_ranks // grad_accum)

    for precision in precisions:
        build = partial(build_tiny, precision)
        ref, floor = one_process_reference(
            build,
            make_optimizer,
            batches,
            train_cfg,
            grad_accum,
            validate=True,
            unquantised=build_tiny if precision else None,
        )
        rt = ParallelRuntime(ParallelDims(**layout))
        model = rt.parallelize(build())
        got = run_steps(
            model, rt.distribute_optimizer(make_optimizer(model)), batches, rt, train_cfg, grad_accum, validate=True
        )
        # Every parameter is held by some pp rank, once; names are the global ones.
        held = [None] * world_size
        dist.all_gather_object(held, sorted(got.grads[0]))
        assert set().union(*map(set, held)) == set(ref.grads[0]), "the stages together do not hold the whole model"
        # losses, validation loss, expert counts (global on every rank, all MoE layers) and gradients
        assert_matches_one_process(got, ref, floor, precision.name if precision else "fp32")


@pytest.mark.parametrize(
    "layout,optim,grad_accum",
    [
        ({"pp": 2}, "muon", 1),
        ({"pp": 2, "pp_schedule": "interleaved_1f1b"}, "muon", 1),
        ({"pp": 2, "pp_schedule": "dualpipev"}, "adamw", 1),
        ({"pp": 2, "pp_microbatches": 2}, "adamw", 2),
    ],
    ids=["pp2-1f1b-muon", "pp2-interleaved-muon", "pp2-dualpipev-adamw", "pp2-1f1b-accum2-adamw"],
)
def test_pipeline_matches_one_process(layout, optim, grad_accum):
    run_distributed_test(_check_pipeline, world_size=2, args=(layout, optim, grad_accum))


@pytest.mark.parametrize(
    "layout",
    [
        {"pp": 2, "dp": 2},
        {"pp": 2, "tp": 2},
    ],
    ids=["pp2xdp2-muon", "pp2xtp2-muon"],
)
def test_pipeline_composes_with_other_axes(layout):
    run_distributed_test(_check_pipeline, world_size=4, args=(layout, "muon"))


def test_pipeline_composes_with_dp_and_ep():
    """pp2×dp2×ep2: 4 data ranks × 2 chunks need 8 rows per step."""
    run_distributed_test(_check_pipeline, world_size=8, args=({"pp": 2, "dp": 2, "ep": 2}, "muon", 1, 8))


@pytest.mark.parametrize(
    "layout",
    [
        {"pp": 2, "cp": 2},
        {"pp": 2, "cp": 2, "pp_schedule": "interleaved_1f1b"},
    ],
    ids=["pp2xcp2-1f1b", "pp2xcp2-interleaved"],
)
def test_pipeline_composes_with_context_parallelism(layout):
    """pp2×cp2: each stage runs half of every row's 32 tokens, exchanging windows and compressed entries with the
    other cp rank of its stage while the schedule moves chunks between stages."""
    run_distributed_test(_check_pipeline, world_size=4, args=(layout, "muon", 1, ROWS, 32))


def test_dualpipev_composes_with_fsdp():
    """pp2×dp2 with DualPipeV: its split backward (input gradients first, weight gradients later) runs with the
    blocks kept gathered and FSDP's gradient reduction deferred to the end of the step. DualPipeV needs 2·pp = 4
    chunks per micro-batch, so 2 data ranks take 8 rows per step."""
    run_distributed_test(
        _check_pipeline,
        world_size=4,
        args=({"pp": 2, "dp": 2, "pp_schedule": "dualpipev", "pp_microbatches": 4}, "muon", 1, 8),
    )


def test_fp8_and_fp8_fp4_pipeline_matches_one_process():
    """pp2 (1F1B) with FP8 and FP8+FP4, both in one process group, 2 steps of 16-token rows (test_layouts.py's
    precision x layout tests)."""
    run_distributed_test(
        _check_pipeline, world_size=2, args=({"pp": 2}, "muon", 1, ROWS, 16, (TINY_FP8, TINY_FP8_FP4), 2)
    )
