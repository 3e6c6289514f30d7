"""`dsv4 plan`'s activation formula against the measurement under tensor and context parallelism: 2 gloo processes
run a real Learner step of the toy model split over tp2 (heads, shared expert) and then cp2 (each rank half of
every row's sequence, the compressed entries of both), and each rank's saved tensors match the formula for its
share. Expected values are MEASURED (dsv4train/testing/activation_memory.py), never taken from the formula."""

import pytest

from dsv4train.models.flavors import get_flavor
from dsv4train.parallel.dims import ParallelDims
from dsv4train.parallel.plan import GROUPS, ActivationCase, activation_bytes
from dsv4train.testing.activation_memory import measure_step
from dsv4train.testing.distributed import run_distributed_test

pytestmark = pytest.mark.dist

# (layout, seq, rows, precision, indexer): bf16 dense over tp2 (casts of the head-split weights, S×T scores);
# fp32 sparse over cp2 (rows of 128 local tokens, top-k over the entries of both shards); bf16 dense over cp2.
POINTS = [
    ({"tp": 2}, 256, 2, "bf16", "dense"),
    ({"cp": 2}, 256, 1, "fp32", "sparse"),
    ({"cp": 2}, 256, 2, "bf16", "dense"),
]


def _check(rank, world_size):
    cfg = get_flavor("toy")
    for layout, seq, rows, precision, indexer in POINTS:
        dims = ParallelDims(**layout)
        got = measure_step(cfg, seq, rows, precision, indexer, dims).groups()
        want = activation_bytes(
            cfg,
            ActivationCase(
                rows=rows,
                seq=seq // dims.cp,
                indexer=indexer,
                cp=dims.cp,
                tp=dims.tp,
                compute_bytes=4 if precision == "fp32" else 2,
            ),
        )
        # 64 B per group: the 8-byte Python-number operands autograd saves (not modelled), as in test_plan.py
        for group in GROUPS:
            assert abs(want[group] - got.get(group, 0)) <= 64, (rank, layout, group, want[group], got.get(group))


def test_activation_formula_matches_measurement_tp2_cp2():
    run_distributed_test(_check, world_size=2)
