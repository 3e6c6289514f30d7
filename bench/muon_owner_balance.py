"""Distributed Muon's owner balance: busiest rank's Newton-Schulz work / mean work (docs/parallelism.md, "Owners").

Rows "every matrix owner-computed" run `assign_owners` on every Muon matrix of a flavor (the worst case: no
matrix is whole on any rank). The FSDP row runs the real `DistributedMuon` on the toy flavor sharded by FSDP2
(`Shard(0)`, dp = world) on gloo and reads its plan's per-rank loads (local NS work plus owned matrices) after one
step. Also prints the largest single matrix's cost over the mean load per rank, which bounds how well any
assignment can balance.

    python -m bench.muon_owner_balance --flavors toy,small,1b --worlds 2,4,8,16 --fsdp-worlds 2,4,8
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch

from dsv4train.config.optim import OptimConfig
from dsv4train.models.flavors import get_flavor
from dsv4train.models.model import DSV4Model
from dsv4train.optim.groups import build_optimizers
from dsv4train.parallel.muon import DistributedMuon, assign_owners, model_ns_costs


def muon_matrix_costs(flavor: str) -> list[float]:
    """NS cost of every logically independent Muon matrix set of a flavor (built on the meta device)."""
    with torch.device("meta"):
        model = DSV4Model(get_flavor(flavor))
    return model_ns_costs(model, OptimConfig())


def owner_balance(costs: list[float], world: int) -> tuple[float, float]:
    """(busiest / mean load, largest matrix / mean load) with every matrix owner-computed over `world` ranks."""
    loads = [0.0] * world
    assign_owners([(i, c, tuple(range(world))) for i, c in enumerate(costs)], loads)
    mean = sum(loads) / world
    return max(loads) / mean, max(costs) / mean


def _fsdp_worker(rank: int, world: int, out_path: str) -> None:
    from dsv4train.parallel.dims import ParallelDims
    from dsv4train.parallel.runtime import ParallelRuntime

    rt = ParallelRuntime(ParallelDims(dp=world))
    model = DSV4Model(get_flavor("toy"))
    model.init_weights(0)
    rt.parallelize(model)
    optimizer = rt.distribute_optimizer(build_optimizers(model, OptimConfig()))
    for p in model.parameters():
        p.grad = torch.ones_like(p)  # any gradient: the plan depends on shapes and placements only
    for opt in optimizer:
        opt.step()
    muon = next(opt for opt in optimizer if isinstance(opt, DistributedMuon))
    loads = muon.plan_summary()["loads"]
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(loads, f)


def fsdp_balance(world: int) -> float:
    from dsv4train.testing.distributed import run_distributed_test

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "loads.json")
        run_distributed_test(_fsdp_worker, world_size=world, args=(path,), timeout_s=600.0)
        with open(path) as f:
            loads = json.load(f)
    return max(loads) / (sum(loads) / len(loads))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flavors", default="toy,small,1b")
    ap.add_argument("--worlds", default="2,4,8,16")
    ap.add_argument("--fsdp-worlds", default="2,4,8")
    args = ap.parse_args(argv)
    worlds = [int(w) for w in args.worlds.split(",")]
    print("| flavor (Muon matrices) | " + " | ".join(f"{w} ranks" for w in worlds) + " |")
    print("|---|" + "---|" * len(worlds))
    largest = {}
    for flavor in args.flavors.split(","):
        costs = muon_matrix_costs(flavor)
        cells = []
        for w in worlds:
            busiest, largest[(flavor, w)] = owner_balance(costs, w)
            cells.append(f"{busiest:.4f}")
        print(f"| {flavor} ({len(costs)}), every matrix owner-computed | " + " | ".join(cells) + " |", flush=True)
    if args.fsdp_worlds:
        fsdp = {int(w): fsdp_balance(int(w)) for w in args.fsdp_worlds.split(",")}
        cells = [f"{fsdp[w]:.4f}" if w in fsdp else "" for w in worlds]
        print(
            "| toy, FSDP `Shard(0)` (expert stacks and aligned `wo_a` local, rest owner) | " + " | ".join(cells) + " |"
        )
    print(
        "\nlargest matrix / mean load per rank: " + ", ".join(f"{f} at {w}: {v:.2f}" for (f, w), v in largest.items())
    )


if __name__ == "__main__":
    main()
