"""fwd+bwd tokens/s and peak activation memory: dsv4train vs transformers' DeepseekV4ForCausalLM, same config
and weights, each measurement in a fresh subprocess. Prints ratios (ours / HF).

    python -m bench.model_vs_hf --flavor tiny --seqs 512,2048 [--threads 2]
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time


def _rss_mib(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(key)).split()[1]) // 1024


def measure(impl: str, flavor: str, seq: int, threads: int, repeats: int) -> dict:
    import torch

    from dsv4train.models.flavors import get_flavor
    from dsv4train.models.hf import hf_config_kwargs, to_hf_state_dict
    from dsv4train.models.model import DSV4Model

    torch.set_num_threads(threads)
    cfg = get_flavor(flavor, n_mtp_layers=0, max_seq_len=seq)
    model = DSV4Model(cfg)
    model.init_weights(0)
    if impl == "hf":
        import transformers

        hf_cfg = transformers.DeepseekV4Config(**hf_config_kwargs(cfg))
        hf_cfg._attn_implementation = "eager"
        hf = transformers.DeepseekV4ForCausalLM(hf_cfg)
        hf.load_state_dict(to_hf_state_dict(model.state_dict()), strict=False)
        model = hf
    ids = torch.randint(0, cfg.vocab_size, (1, seq), generator=torch.Generator().manual_seed(0))

    def step():
        out = model(ids)
        logits = out.logits if hasattr(out, "logits") else out
        logits.float().logsumexp(-1).mean().backward()

    step()  # warm-up
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:  # reset the RSS high-water mark
        f.write("5")
    base = _rss_mib("VmRSS")
    t0 = time.perf_counter()
    for _ in range(repeats):
        step()
    dt = (time.perf_counter() - t0) / repeats
    return {"impl": impl, "seq": seq, "tokens_per_sec": seq / dt, "peak_mib": _rss_mib("VmHWM") - base}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flavor", default="tiny")
    ap.add_argument("--seqs", default="512,2048")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--one", nargs=2, metavar=("IMPL", "SEQ"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], args.flavor, int(args.one[1]), args.threads, args.repeats)))
        return 0
    print(f"flavor {args.flavor}, fp32, batch 1, {args.threads} threads, fwd+bwd\n")
    print("| seq | ours tok/s | HF tok/s | speed ratio | ours peak MiB | HF peak MiB | memory ratio |")
    print("|---|---|---|---|---|---|---|")
    for seq in (int(s) for s in args.seqs.split(",")):
        r = {}
        for impl in ("ours", "hf"):
            cmd = [
                sys.executable,
                "-m",
                "bench.model_vs_hf",
                "--flavor",
                args.flavor,
                "--threads",
                str(args.threads),
                "--repeats",
                str(args.repeats),
                "--one",
                impl,
                str(seq),
            ]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            r[impl] = json.loads(out.splitlines()[-1])
        o, h = r["ours"], r["hf"]
        print(
            f"| {seq} | {o['tokens_per_sec']:.0f} | {h['tokens_per_sec']:.0f} | "
            f"{o['tokens_per_sec'] / h['tokens_per_sec']:.2f}x | {o['peak_mib']} | {h['peak_mib']} | "
            f"{o['peak_mib'] / max(h['peak_mib'], 1):.2f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
