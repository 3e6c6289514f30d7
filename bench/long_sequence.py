"""One long sequence through the model on the CPU: fwd+bwd time and peak RSS, dense vs sparse indexer
(docs/architecture.md, docs/benchmarks.md). Each mode runs in a fresh subprocess, so its peak RSS is its own.

    python -m bench.long_sequence --flavor toy --seq 16384 --threads 2
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def measure(flavor: str, seq: int, mode: str, threads: int) -> dict:
    import torch

    from dsv4train.models.flavors import get_flavor
    from dsv4train.models.model import DSV4Model

    torch.set_num_threads(threads)
    cfg = get_flavor(flavor, max_seq_len=seq + 1)
    model = DSV4Model(cfg)
    model.init_weights(0)
    model.set_indexer_mode(mode)
    ids = torch.randint(0, cfg.vocab_size, (1, seq), generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    out = model(ids, with_aux=True)
    loss = torch.nn.functional.cross_entropy(out.logits[0, :-1].float(), ids[0, 1:])
    if out.mtp_logits is not None:  # MTP predicts the token after next
        loss = loss + 0.3 * torch.nn.functional.cross_entropy(out.mtp_logits[0, :-2].float(), ids[0, 2:])
    loss = loss + out.balance_loss + out.indexer_loss
    loss.backward()
    seconds = time.perf_counter() - start
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux
    return {"mode": mode, "seconds": seconds, "peak_rss_gib": peak_gib}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flavor", default="toy")
    ap.add_argument("--seq", type=int, default=16384)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one mode in this process
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.flavor, args.seq, args.one, args.threads)))
        return
    print(f"flavor {args.flavor}, seq {args.seq}, batch 1, fp32, fwd+bwd, {args.threads} threads\n")
    print("| indexer | fwd+bwd s | peak RSS GiB |\n|---|---|---|")
    for mode in ("sparse", "dense"):
        cmd = [
            sys.executable,
            "-m",
            "bench.long_sequence",
            "--flavor",
            args.flavor,
            "--seq",
            str(args.seq),
            "--threads",
            str(args.threads),
            "--one",
            mode,
        ]
        r = subprocess.run(cmd, capture_output=True, text=True, check=True)
        m = json.loads(r.stdout.strip().splitlines()[-1])
        print(f"| {mode} | {m['seconds']:.1f} | {m['peak_rss_gib']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
