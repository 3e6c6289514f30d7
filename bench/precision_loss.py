"""How far FP8 / FP8+FP4 training moves the loss, against bf16 and fp32, over several seeds (docs/precision.md).

For each seed the toy flavor is initialised with that seed and trained for `--steps` steps of the real
Learner step (Muon + AdamW, lr 3e-3) on two random batches drawn with that seed, once per precision:
fp32, bf16 autocast, and fp8 / fp8_fp4 under bf16 autocast (as `precision=fp8|fp8_fp4` run). Per seed it records
max over the steps of |loss - reference loss| and the same at the last step; it prints each seed and the
spread (mean, min, max) as a markdown table.

    python -m bench.precision_loss --seeds 0,1,2,3,4 --steps 20
"""

from __future__ import annotations

import argparse
import statistics

import torch

from dsv4train.config.optim import OptimConfig
from dsv4train.config.pretrain import PrecisionConfig, TrainConfig
from dsv4train.models.flavors import get_flavor
from dsv4train.models.model import DSV4Model
from dsv4train.optim.groups import build_optimizers
from dsv4train.quant import apply_precision
from dsv4train.train.learner import Learner
from dsv4train.train.losses import NextTokenLoss, lm_batch

PRECISIONS = {
    "fp32": (None, torch.float32),
    "bf16": (None, torch.bfloat16),
    "fp8": (PrecisionConfig(name="fp8", compute_dtype="bfloat16", fp8=True, fp8_block=32), torch.bfloat16),
    "fp8_fp4": (
        PrecisionConfig(name="fp8_fp4", compute_dtype="bfloat16", fp8=True, fp4_experts=True, fp8_block=32),
        torch.bfloat16,
    ),
}
PAIRS = (("bf16", "fp32"), ("fp8", "bf16"), ("fp8_fp4", "bf16"), ("fp8", "fp32"), ("fp8_fp4", "fp32"))


def train_losses(precision: str, seed: int, steps: int, seq: int = 32, batch: int = 2) -> list[float]:
    quant, dtype = PRECISIONS[precision]
    torch.manual_seed(seed)
    model = DSV4Model(get_flavor("toy", max_seq_len=seq + 1))
    model.init_weights(seed)
    if quant is not None:
        apply_precision(model, quant)
    opt = build_optimizers(model, OptimConfig(lr=3e-3))
    gen = torch.Generator().manual_seed(1000 + seed)
    data = [torch.randint(0, 512, (batch, seq + 1), generator=gen) for _ in range(2)]
    train_cfg = TrainConfig(seq_len=seq, micro_batch_size=batch)
    learner = Learner(model, opt, train_cfg, dtype=dtype)
    return [learner.step([lm_batch(data[i % 2])], NextTokenLoss(mtp_weight=0.3)).loss for i in range(steps)]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    gaps: dict[tuple[str, str], list[tuple[float, float]]] = {pair: [] for pair in PAIRS}
    for seed in seeds:
        losses = {name: train_losses(name, seed, args.steps) for name in PRECISIONS}
        line = [f"seed {seed}: fp32 loss {losses['fp32'][0]:.3f} -> {losses['fp32'][-1]:.3f}"]
        for run, ref in PAIRS:
            d = [abs(a - b) for a, b in zip(losses[run], losses[ref])]
            gaps[(run, ref)].append((max(d), d[-1]))
            line.append(f"{run}-{ref} max {max(d):.4f} last {d[-1]:.4f}")
        print("; ".join(line), flush=True)
    print(
        f"\n| run vs reference | max over {args.steps} steps of \\|Δloss\\|: mean (min – max) "
        f"| at step {args.steps}: mean (min – max) |\n|---|---|---|"
    )
    for run, ref in PAIRS:
        worst, last = zip(*gaps[(run, ref)])
        cells = [f"{statistics.mean(v):.4f} ({min(v):.4f} – {max(v):.4f})" for v in (worst, last)]
        print(f"| {run} vs {ref} | {cells[0]} | {cells[1]} |")
    print(f"\n{len(seeds)} seeds ({args.seeds}), toy flavor, seq 32, batch 2, fp8_block 32, fp4_block 32")


if __name__ == "__main__":
    main()
