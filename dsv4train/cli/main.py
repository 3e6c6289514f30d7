"""`dsv4 <command>`: each command is a short entry point."""

from __future__ import annotations

import sys

PENDING = {
    "pretrain": "the Hydra-configured pre-training engine lands with issue 3 (use `dsv4 demo` for now)",
    "data": "`dsv4 data prepare` lands with issue 3",
    "convert": "`dsv4 convert from-hf/to-hf` lands with issue 2 (HF interop)",
    "bench": "`dsv4 bench` lands with issue 2 (efficiency accounting)",
    "report": "`dsv4 report` lands with issue 3",
    "sft": "post-training is not built yet", "grpo": "post-training is not built yet",
    "distill": "post-training is not built yet", "pipeline": "post-training is not built yet",
    "eval": "evaluation is not built yet",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: dsv4 <command> [args]\n\ncommands:\n  demo      toy-scale pipeline on CPU")
        for name, why in PENDING.items():
            print(f"  {name:<9} (not available yet: {why})")
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "demo":
        from dsv4train.cli.demo import demo_main

        return demo_main(rest)
    if cmd in PENDING:
        print(f"dsv4 {cmd}: not available yet: {PENDING[cmd]}", file=sys.stderr)
        return 2
    print(f"dsv4: unknown command {cmd!r}; run `dsv4 --help`", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
