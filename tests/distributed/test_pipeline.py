"""Pipeline parallelism trains like one process: 1F1B, Interleaved 1F1B and DualPipeV on 2 pp ranks, and pp
composed with dp, tp and dp×ep, against the one-process reference each rank also runs
(tests/distributed/test_layouts.py's pattern). Each pp rank holds only its stages' parameters, so gradients are compared per rank for the parameters it
holds, under their global names."""

import pytest
import torch
import torch.distributed as dist

from dsv4train.config.optim import OptimConfig
from dsv4train.config.pretrain import TrainConfig
from dsv4train.data.loader import rank_rows
from dsv4train.models.model import DSV4Model
from dsv4train.optim.groups import build_optimizers
from dsv4train.parallel.dims import ParallelDims
from dsv4train.parallel.runtime import ParallelRuntime
from dsv4train.testing.distributed import run_distributed_test
from dsv4train.testing.equivalence import assert_grads_match, assert_losses_close, fixed_batches, run_steps
from dsv4train.testing.toy_configs import tiny_config
from dsv4train.train.step import evaluate

pytestmark = pytest.mark.dist

ROWS, SEQ, STEPS = 4, 24, 3


def _check_pipeline(rank, world_size, layout: dict, optim: str, grad_accum: int = 1, rows: int = ROWS,
                    seq: int = SEQ):
    cfg = tiny_config(n_hash_layers=1)
    train_cfg = TrainConfig(grad_clip=0.5, bias_update_speed=1e-2)
    optim_cfg = OptimConfig(name=optim, lr=3e-3, muon_ns_dtype="float32")
    batches = fixed_batches(cfg.vocab_size, rows, seq, STEPS)

    ref = DSV4Model(cfg)
    ref.init_weights(0)
    ref_losses, ref_grads, ref_counts = run_steps(ref, build_optimizers(ref, optim_cfg), batches, ParallelRuntime(),
                                             train_cfg, grad_accum)
    ref_val = evaluate(ref, batches[:1], torch.device("cpu"), torch.float32)

    dims = ParallelDims(**layout)
    dims.validate(world_size, cfg, seq, rows // dims.data_ranks // grad_accum)
    rt = ParallelRuntime(dims)
    model = DSV4Model(cfg)
    model.init_weights(0)
    model = rt.parallelize(model)
    losses, grads, counts = run_steps(model, rt.distribute_optimizer(build_optimizers(model, optim_cfg)), batches, rt,
                                 train_cfg, grad_accum)
    val = evaluate(model, [rank_rows(batches[0], rt.data_rank, rt.data_ranks)], torch.device("cpu"),
                   torch.float32, rt)

    assert_losses_close(losses, ref_losses, 1e-5)
    assert abs(val - ref_val) <= 1e-5 * abs(ref_val), f"val loss {val} vs one process {ref_val}"
    for step, (a, b) in enumerate(zip(counts, ref_counts)):  # global counts on every rank, all MoE layers
        assert torch.equal(a.cpu(), b.cpu()), f"step {step + 1}: expert counts differ"

    # Every parameter is held by some pp rank, once; names are the global ones.
    held = [None] * world_size
    dist.all_gather_object(held, sorted(grads[0]))
    assert set().union(*map(set, held)) == set(ref_grads[0]), "the stages together do not hold the whole model"
    assert_grads_match(grads, ref_grads)  # tolerances explained in dsv4train/testing/equivalence.py


@pytest.mark.parametrize("layout,optim,grad_accum", [
    ({"pp": 2}, "muon", 1),
    ({"pp": 2, "pp_schedule": "interleaved_1f1b"}, "muon", 1),
    ({"pp": 2, "pp_schedule": "dualpipev"}, "adamw", 1),
    ({"pp": 2, "pp_microbatches": 2}, "adamw", 2),
], ids=["pp2-1f1b-muon", "pp2-interleaved-muon", "pp2-dualpipev-adamw", "pp2-1f1b-accum2-adamw"])
def test_pipeline_matches_one_process(layout, optim, grad_accum):
    run_distributed_test(_check_pipeline, world_size=2, args=(layout, optim, grad_accum))


@pytest.mark.parametrize("layout", [
    {"pp": 2, "dp": 2},
    {"pp": 2, "tp": 2},
], ids=["pp2xdp2-muon", "pp2xtp2-muon"])
def test_pipeline_composes_with_other_axes(layout):
    run_distributed_test(_check_pipeline, world_size=4, args=(layout, "muon"))


def test_pipeline_composes_with_dp_and_ep():
    """pp2×dp2×ep2: 4 data ranks × 2 chunks need 8 rows per step."""
    run_distributed_test(_check_pipeline, world_size=8, args=({"pp": 2, "dp": 2, "ep": 2}, "muon", 1, 8))


@pytest.mark.parametrize("layout", [
    {"pp": 2, "cp": 2},
    {"pp": 2, "cp": 2, "pp_schedule": "interleaved_1f1b"},
], ids=["pp2xcp2-1f1b", "pp2xcp2-interleaved"])
def test_pipeline_composes_with_context_parallelism(layout):
    """pp2×cp2: each stage runs half of every row's 32 tokens, exchanging windows and compressed entries with the
    other cp rank of its stage while the schedule moves chunks between stages."""
    run_distributed_test(_check_pipeline, world_size=4, args=(layout, "muon", 1, ROWS, 32))


def test_dualpipev_composes_with_fsdp():
    """pp2×dp2 with DualPipeV: its split backward (input gradients first, weight gradients later) runs with the
    blocks kept gathered and FSDP's gradient reduction deferred to the end of the step. DualPipeV needs 2·pp = 4
    chunks per micro-batch, so 2 data ranks take 8 rows per step."""
    run_distributed_test(_check_pipeline, world_size=4,
                         args=({"pp": 2, "dp": 2, "pp_schedule": "dualpipev", "pp_microbatches": 4}, "muon", 1, 8))
