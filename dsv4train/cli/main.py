"""`dsv4 <command>`: each command is a short entry point."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {  # name -> (module, function taking argv, one-line help)
    "demo": ("dsv4train.cli.demo", "demo_main", "toy-scale pipeline on CPU"),
    "pretrain": ("dsv4train.cli.pretrain", "pretrain_main", "[overrides]: pre-train (Hydra; --cfg job, -m)"),
    "sft": ("dsv4train.cli.sft", "sft_main", "sft.init=MODEL data.train=[FILE] [overrides]: supervised fine-tuning"),
    "grpo": ("dsv4train.cli.grpo", "grpo_main", "grpo.init=SFT_EXPERT [overrides]: GRPO of a domain expert"),
    "eval": (
        "dsv4train.cli.eval",
        "eval_main",
        "MODEL [--tasks math,code] [--mode chat|think] [--n N] [--samples K]: accuracy",
    ),
    "generate": (
        "dsv4train.cli.generate",
        "generate_main",
        "MODEL --prompt TEXT [--chat] [--mode think] [--temperature T]: stream a completion",
    ),
    "bench": ("dsv4train.cli.bench", "bench_main", "efficiency [--flavor ...]: params, FLOPs, KV cache vs V3.2"),
    "report": ("dsv4train.cli.report", "report_main", "RUN_DIR: PNG plots of loss, lr, throughput, expert load"),
    "data": ("dsv4train.cli.data", "data_main", "prepare --out DIR [--stdlib] [--input ...]: tokenize a corpus"),
    "convert": (
        "dsv4train.cli.convert",
        "convert_main",
        "from-hf SRC DST | to-hf SRC DST: move weights to/from transformers",
    ),
    "plan": (
        "dsv4train.cli.plan",
        "plan_main",
        "[overrides] [--gpu-memory-gb 80] [--json]: dry run of a parallel layout",
    ),
}

PENDING = {
    "distill": "post-training is not built yet",
    "pipeline": "post-training is not built yet",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: dsv4 <command> [args]\n\ncommands:")
        for name, (_, _, about) in COMMANDS.items():
            print(f"  {name:<9} {about}")
        for name, why in PENDING.items():
            print(f"  {name:<9} (not available yet: {why})")
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd in COMMANDS:
        module, func, _ = COMMANDS[cmd]
        try:
            return getattr(importlib.import_module(module), func)(rest)
        except Exception as e:  # a user's mistake gets one paragraph and status 2; a bug keeps its traceback
            message = user_error_message(e)
            if message is None:
                raise
            print(f"dsv4 {cmd}: {message}", file=sys.stderr)
            return 2
    if cmd in PENDING:
        print(f"dsv4 {cmd}: not available yet: {PENDING[cmd]}", file=sys.stderr)
        return 2
    print(f"dsv4: unknown command {cmd!r}; run `dsv4 --help`", file=sys.stderr)
    return 2


def user_error_message(e: BaseException) -> str | None:
    """One paragraph for an error the user can fix (a bad config value or override, a damaged checkpoint), or
    None for anything else. Hydra's and OmegaConf's errors come from composing what the user typed."""
    from dsv4train.config.errors import ConfigError

    if isinstance(e, ConfigError):
        return str(e)
    if type(e).__module__.split(".")[0] in ("hydra", "omegaconf"):
        from dsv4train.config.hydra_entry import explain_composition_error

        return explain_composition_error(e)
    return None


if __name__ == "__main__":
    sys.exit(main())
