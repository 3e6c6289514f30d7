"""`dsv4 bench efficiency [--flavor NAME ...] [--seq-len N] [--json PATH]`: analytic parameter counts, training
FLOPs per token, KV-cache bytes per token and the decode comparison with DeepSeek-V3.2 at 128K and 1M context.
Nothing is built or run; every number comes from dsv4train.models.flops (formulas in docs/efficiency.md)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from dsv4train.models import flops
from dsv4train.models.flavors import flavor_names, get_flavor

CONTEXTS = (128 * 1024, 1024 * 1024)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dsv4 bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="{efficiency}")
    eff = sub.add_parser("efficiency", help="params, FLOPs and KV cache of model flavors vs DeepSeek-V3.2")
    eff.add_argument(
        "--flavor",
        nargs="+",
        default=["flash", "pro"],
        metavar="NAME",
        help=f"flavors to report (default: flash pro; known: {' '.join(flavor_names())})",
    )
    eff.add_argument("--seq-len", type=int, default=4096, help="training sequence length for FLOPs/token")
    eff.add_argument("--json", type=Path, metavar="PATH", help="also write every number to this JSON file")
    return p


def _context_label(n: int) -> str:
    return f"{n // (1 << 20)}M" if n % (1 << 20) == 0 else f"{n // 1024}K"


def _si(x: float, big: str) -> str:
    """4 significant digits and a suffix; `big` names 1e9 (B for params, G for FLOPs): _si(284.3e9, 'B') -> 284.3B."""
    for scale, suffix in ((1e9, big), (1e6, "M"), (1e3, "K")):
        if abs(x) >= scale:
            return f"{x / scale:.4g}{suffix}"
    return f"{x:.4g}"


def _bytes(x: float) -> str:
    for scale, suffix in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if x >= scale:
            return f"{x / scale:.2f} {suffix}"
    return f"{x:.0f} B"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _report(name: str, seq_len: int) -> dict:
    cfg = get_flavor(name)
    params = flops.param_counts(cfg)
    return {
        "params": {**asdict(params), "total_with_mtp": params.total_with_mtp},
        "train_flops_per_token": {"seq_len": seq_len, "flops": flops.train_flops_per_token(cfg, seq_len)},
        "kv_bytes_per_token": {
            **asdict(flops.kv_cache_bytes_per_token(cfg)),
            "entry_bytes": flops.kv_entry_bytes(cfg),
            "index_key_bytes": flops.index_key_bytes(cfg),
        },
        "vs_v32": [
            {**asdict(c), "flops_ratio": c.flops_ratio, "kv_ratio": c.kv_ratio}
            for c in (flops.compare_with_v32(cfg, n) for n in CONTEXTS)
        ],
    }


def _table(reports: dict[str, dict], seq_len: int) -> str:
    lines = [
        "Parameters (total: main model incl. router buffers, excl. MTP; active: per token, excl. input embedding)",
        f"{'flavor':<8}{'total':>10}{'active':>10}{'with MTP':>10}   train FLOP/token at seq {seq_len} "
        "(fwd+bwd, incl. MTP)",
    ]
    for name, r in reports.items():
        p = r["params"]
        lines.append(
            f"{name:<8}{_si(p['total'], 'B'):>10}{_si(p['active'], 'B'):>10}"
            f"{_si(p['total_with_mtp'], 'B'):>10}   {_si(r['train_flops_per_token']['flops'], 'G')}"
        )
    lines += [
        "",
        "KV cache bytes per context token, one layer of each type and all layers (entry: FP8+BF16 main "
        "entry; key: FP4 indexer key)",
        f"{'flavor':<8}{'entry':>7}{'key':>5}{'swa':>7}{'csa':>9}{'hca':>9}{'all layers':>12}{'windows':>13}",
    ]
    for name, r in reports.items():
        kv = r["kv_bytes_per_token"]
        t = kv["per_layer_type"]
        lines.append(
            f"{name:<8}{kv['entry_bytes']:>7}{kv['index_key_bytes']:>5}{t['swa']:>7.1f}{t['csa']:>9.1f}"
            f"{t['hca']:>9.3f}{kv['total']:>12.1f}{_bytes(kv['window']):>13}"
        )
    lines += [
        "",
        "Decode one token vs DeepSeek-V3.2 (FLOP/token = linear + attention + indexer)",
        f"{'context':<9}{'model':<8}{'FLOP/token':>34}{'vs V3.2':>9}{'KV cache':>12}{'vs V3.2':>9}",
    ]
    for i, n in enumerate(CONTEXTS):
        first = next(iter(reports.values()))["vs_v32"][i]
        rows = [("V3.2", first["flops_v32"], first["kv_bytes_v32"], None, None)]
        for name, r in reports.items():
            c = r["vs_v32"][i]
            rows.append((name, c["flops"], c["kv_bytes"], c["flops_ratio"], c["kv_ratio"]))
        for model, f, kv, flops_ratio, kv_ratio in rows:
            parts = [f["linear"], f["attention"], f["indexer"]]
            split = f"{_si(sum(parts), 'G')} = " + " + ".join(_si(x, "G") for x in parts)
            lines.append(
                f"{_context_label(n):<9}{model:<8}{split:>34}{_pct(flops_ratio):>9}{_bytes(kv):>12}{_pct(kv_ratio):>9}"
            )
    return "\n".join(lines)


def bench_main(argv: list[str]) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # argparse already printed the error (or the help)
        return 0 if e.code in (0, None) else 2
    unknown = [f for f in args.flavor if f not in flavor_names()]
    if unknown:
        print(
            f"dsv4 bench efficiency: unknown flavor(s) {', '.join(map(repr, unknown))}; "
            f"choose from {', '.join(flavor_names())}",
            file=sys.stderr,
        )
        return 2
    if args.seq_len < 1:
        print(f"dsv4 bench efficiency: --seq-len must be >= 1, got {args.seq_len}", file=sys.stderr)
        return 2
    reports = {name: _report(name, args.seq_len) for name in dict.fromkeys(args.flavor)}
    print(_table(reports, args.seq_len))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"seq_len": args.seq_len, "flavors": reports}, indent=2))
        print(f"\nwrote {args.json}")
    return 0
