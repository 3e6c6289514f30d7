"""Every parallel layout trains like one process: same losses step by step (1e-5 relative, fp32) and the same
gradients after the first step, on gloo with several CPU processes. Each rank also runs the one-process
reference itself (the model is tiny), so nothing has to be shipped between processes."""

import pytest

from dsv4train.config.pretrain import PrecisionConfig, TrainConfig
from dsv4train.config.optim import OptimConfig
from dsv4train.models.model import DSV4Model
from dsv4train.optim.groups import build_optimizers
from dsv4train.parallel.dims import ParallelDims
from dsv4train.parallel.runtime import ParallelRuntime
from dsv4train.quant import apply_precision
from dsv4train.testing.distributed import run_distributed_test
from dsv4train.testing.equivalence import assert_grads_match, assert_losses_close, fixed_batches, run_steps
from dsv4train.testing.toy_configs import tiny_config

pytestmark = pytest.mark.dist

ROWS, SEQ, STEPS = 4, 24, 3


def _check_layout(rank, world_size, layout: dict, optim: str, precision: PrecisionConfig | None = None,
                  seq: int = SEQ):
    cfg = tiny_config(n_hash_layers=1)
    train_cfg = TrainConfig(grad_clip=0.5, bias_update_speed=1e-2)
    optim_cfg = OptimConfig(name=optim, lr=3e-3, muon_ns_dtype="float32")
    batches = fixed_batches(cfg.vocab_size, ROWS, seq, STEPS)
    ParallelDims(**layout).validate(world_size, cfg, seq, ROWS // ParallelDims(**layout).data_ranks)

    ref = DSV4Model(cfg)
    ref.init_weights(0)
    if precision is not None:
        apply_precision(ref, precision)
    ref_losses, ref_grads, _ = run_steps(ref, build_optimizers(ref, optim_cfg), batches, ParallelRuntime(),
                                         train_cfg)

    rt = ParallelRuntime(ParallelDims(**layout))
    model = DSV4Model(cfg)
    model.init_weights(0)
    if precision is not None:
        apply_precision(model, precision)
    rt.parallelize(model)
    if layout.get("dp_replicate", 1) > 1:  # HSDP: replicated over the first mesh dim, sharded over the second
        w = model.layers[0].attn.wq_a.weight
        assert w.device_mesh.ndim == 2 and w.placements[0].is_replicate() and not w.placements[1].is_replicate()
    losses, grads, _ = run_steps(model, rt.distribute_optimizer(build_optimizers(model, optim_cfg)), batches, rt,
                                 train_cfg)

    # fp32: 1e-5. FP8/FP4 round to a grid with steps of 2^-3 (e4m3) to 2^-1 (e2m1) relative, so once the
    # weights carry last-bit differences a value can move by one grid step (the first step is still tight).
    loss_tol, last_grad_tol = (1e-5, 1e-4) if precision is None else (1e-4, 1e-1)
    assert_losses_close(losses, ref_losses, loss_tol)
    assert grads[0].keys() == ref_grads[0].keys() and grads[1].keys() == ref_grads[1].keys()
    assert_grads_match(grads, ref_grads, last_grad_tol)  # tolerances explained in dsv4train/testing/equivalence.py


@pytest.mark.parametrize("layout,optim", [
    ({"dp": 2}, "muon"),
    ({"ep": 2}, "muon"),
    ({"dp": 2}, "adamw"),
    ({"dp": 2, "ep": 2}, "muon"),
    ({"tp": 2}, "muon"),
    ({"tp": 2}, "adamw"),
    ({"dp": 2, "tp": 2}, "muon"),
    ({"tp": 2, "ep": 2}, "muon"),
], ids=["dp2-muon", "ep2-muon", "dp2-adamw", "dp2xep2-muon", "tp2-muon", "tp2-adamw", "dp2xtp2-muon",
        "tp2xep2-muon"])
def test_layout_matches_one_process(layout, optim):
    run_distributed_test(_check_layout, world_size=ParallelDims(**layout).world_size, args=(layout, optim))


# HSDP: the dp ranks as 2 replicas, each FSDP-sharded over the rest (with ep2: dense weights sharded over ep,
# experts whole on their EP rank and only replicated).
@pytest.mark.parametrize("layout", [
    {"dp": 4, "dp_replicate": 2},
    {"dp": 2, "ep": 2, "dp_replicate": 2},
], ids=["dp4-hsdp2", "dp2xep2-hsdp2"])
def test_hsdp_layout_matches_one_process(layout):
    run_distributed_test(_check_layout, world_size=ParallelDims(**layout).world_size, args=(layout, "muon"))


# Context parallelism: 32 tokens per row, so each of 2 (or 4) ranks holds 16 (8): whole windows (8) and whole
# CSA/HCA blocks (4, 8); each rank then needs its neighbour's last window and compressor block, and the entries
# of every rank. Dense indexer on step 1, sparse top-k after (run_steps), both cross the shards.
@pytest.mark.parametrize("layout", [
    {"cp": 2},
    {"cp": 4},
    {"cp": 2, "dp": 2},
    {"cp": 2, "tp": 2},
    {"cp": 2, "ep": 2},
], ids=["cp2", "cp4", "cp2xdp2", "cp2xtp2", "cp2xep2"])
def test_context_parallel_layout_matches_one_process(layout):
    run_distributed_test(_check_layout, world_size=ParallelDims(**layout).world_size,
                         args=(layout, "muon", None, 32))


def test_fp8_fp4_experts_under_expert_parallelism():
    """FP8 GEMMs + FP4 expert QAT compose with the all-to-all dispatch (experts keep their quantised mlp)."""
    precision = PrecisionConfig(name="fp8_fp4", fp8=True, fp4_experts=True, fp8_block=16, fp4_block=16)
    run_distributed_test(_check_layout, world_size=2, args=({"ep": 2}, "adamw", precision))


def _check_cp_needs_mtp_ids(rank, world_size):
    cfg = tiny_config(n_hash_layers=1)
    rt = ParallelRuntime(ParallelDims(cp=2))
    model = DSV4Model(cfg)
    model.init_weights(0)
    rt.parallelize(model)
    ids_BS = rt.seq.shard(fixed_batches(cfg.vocab_size, 1, 32, 1)[0]["tokens"][:, :32])
    model(ids_BS)  # logits alone need no next token
    with pytest.raises(ValueError, match="under context parallelism pass mtp_input_ids"):
        model(ids_BS, with_aux=True)


def test_context_parallel_refuses_to_guess_the_mtp_input_at_the_shard_edge():
    run_distributed_test(_check_cp_needs_mtp_ids, world_size=2)
