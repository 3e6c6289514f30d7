"""The FP8/FP4 quantisers see DTensors under tensor parallelism (a TP-sharded weight, a replicated activation) and
must give exactly what they give a plain tensor: every placement (Replicate, Shard(0), Shard(1)) on a 2-rank gloo
mesh, compared bit for bit with the same call on the whole tensor. A DTensor op that differs from its tensor op
breaks FP8 under TP silently (torch 2.13's DTensor returns `t << 23` unshifted: every block scale became ~1e-43
and the indexer loss 0), so the whole chain is checked: scales, dequantised values, the FP4 QAT weight, and
fp8_linear's forward and both backward GEMMs in the TP placements (column-, row-parallel, sequence-split)."""

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from dsv4train.quant.formats import quant_e2m1, quant_e4m3_blocks, quant_e4m3_rows
from dsv4train.quant.linear import fp4_fake_quant, fp8_linear
from dsv4train.testing.distributed import run_distributed_test

pytestmark = pytest.mark.dist

B = 16  # FP8 tile / block; every sharded dim below holds whole tiles on each of the 2 ranks
FP4_B = 8  # FP4 sub-block (divides B)
PLACEMENTS = {"R": Replicate(), "S0": Shard(0), "S1": Shard(1)}


def _wide(shape, g: torch.Generator) -> torch.Tensor:
    """Values over ~2^±40 (a different scale exponent in every tile) and one all-zero tile (the floor scale)."""
    rows = torch.randn(shape, generator=g) * 2.0 ** torch.randint(-40, 40, (shape[0], 1), generator=g).float()
    rows = rows * 2.0 ** torch.randint(-4, 4, shape, generator=g).float()
    rows[0, :B] = 0.0
    return rows


def _narrow(shape, g: torch.Generator) -> torch.Tensor:
    """±U[1, 2)·2^{-1, 0, 1}: quantised to E4M3 they have 4-bit significands over a 2^3 range, so the GEMMs' fp32
    sums (8-bit products over 2^6, at most 64 terms: 20 < 24 bits) are exact in any order. A row-parallel product
    sums its two halves after the GEMM; with these operands that order cannot change a bit, so `equal` is fair."""
    sign = torch.randint(0, 2, shape, generator=g).float() * 2 - 1
    return sign * (1 + torch.rand(shape, generator=g)) * 2.0 ** torch.randint(-1, 2, shape, generator=g).float()


def _full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def _compare(mismatches: list, what: str, got, want) -> None:
    got = _full(got)
    if got.shape != want.shape:
        mismatches.append(f"{what}: shape {tuple(got.shape)}, want {tuple(want.shape)}")
    elif not torch.equal(got.isnan(), want.isnan()) or not torch.equal(got.nan_to_num(), want.nan_to_num()):
        bad = (got.nan_to_num() != want.nan_to_num()) | (got.isnan() != want.isnan())
        i = int(bad.flatten().nonzero()[0])
        mismatches.append(
            f"{what}: {int(bad.sum())} entries differ, e.g. {got.flatten()[i].item():.6g} vs "
            f"{want.flatten()[i].item():.6g}"
        )


def _quantisers(mesh, mismatches: list) -> None:
    g = torch.Generator().manual_seed(0)
    x = _wide((4 * B, 4 * B), g)
    x[1, 3] = float("nan")  # a non-finite block dequantises to NaN, on a DTensor too
    calls = {
        "quant_e4m3_rows": lambda t: quant_e4m3_rows(t, B),
        "quant_e4m3_blocks": lambda t: quant_e4m3_blocks(t, B),
        "quant_e2m1": lambda t: quant_e2m1(t, FP4_B),
        "fp4_fake_quant": lambda t: (fp4_fake_quant(t, FP4_B, B),),
    }
    for fname, fn in calls.items():
        want = fn(x)
        for pname, placement in PLACEMENTS.items():
            got = fn(distribute_tensor(x, mesh, [placement]))
            for i, (a, b) in enumerate(zip(got, want)):
                _compare(mismatches, f"{fname}[{i}] on {pname}", a, b)


# (x placement, w placement): the TP plans' layouts. x [M, K], w [N, K].
LINEAR_CASES = {
    "replicated x, replicated w": ("R", "R"),
    "column-parallel (x R, w S0)": ("R", "S0"),
    "row-parallel (x S1, w S1)": ("S1", "S1"),
    "sequence-split x S0, w R": ("S0", "R"),
}


def _fp8_linear(mesh, mismatches: list) -> None:
    g = torch.Generator().manual_seed(1)
    M, K, N = 2 * B, 4 * B, 2 * B
    x, w, dy = _narrow((M, K), g), _narrow((N, K), g), _narrow((M, N), g)
    x_ref, w_ref = x.clone().requires_grad_(), w.clone().requires_grad_()
    y_ref = fp8_linear(x_ref, w_ref, B)
    y_ref.backward(dy)
    for cname, (px, pw) in LINEAR_CASES.items():
        xd = distribute_tensor(x, mesh, [PLACEMENTS[px]]).requires_grad_()
        wd = distribute_tensor(w, mesh, [PLACEMENTS[pw]]).requires_grad_()
        y = fp8_linear(xd, wd, B)
        y_full = y.full_tensor()  # differentiable: reduces a row-parallel partial sum
        y_full.backward(dy)
        _compare(mismatches, f"fp8_linear y, {cname}", y_full, y_ref.detach())
        _compare(mismatches, f"fp8_linear dx, {cname}", xd.grad, x_ref.grad)
        _compare(mismatches, f"fp8_linear dw, {cname}", wd.grad, w_ref.grad)


def _check_dtensor_quantisation(rank, world_size):
    mesh = init_device_mesh("cpu", (world_size,))
    mismatches: list[str] = []
    _quantisers(mesh, mismatches)
    _fp8_linear(mesh, mismatches)
    assert not mismatches, "DTensor results differ from the plain tensor's:\n" + "\n".join(mismatches)


def test_quantisers_on_dtensors_equal_the_plain_tensor_results():
    run_distributed_test(_check_dtensor_quantisation, world_size=2)
