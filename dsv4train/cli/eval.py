"""`dsv4 eval MODEL [--tasks math,code] [--split test] [--mode chat|think] [--n N] [--samples K] [--temperature T]
[--max-new-tokens M] [--batch-size B] [--seed S] [--tokenizer PATH] [--device auto|cpu|cuda] [--out FILE]`:
accuracy of MODEL on the offline domains (dsv4train/data/tasks/), with the prompts of their SFT records.

MODEL: a dsv4 folder, a training run directory (its newest checkpoint), one `checkpoints/step_<N>/` folder or an HF
export; its tokenizer comes with it (or --tokenizer). Greedy by default; `--samples K` (K > 1) samples K answers per
problem at --temperature (default 1.0) and reports pass@1 averaged over them. `--seed` picks the problems (the same
as `dsv4 data tasks --seed`) and the sampling seeds. Prints a table and writes JSON `{task: {"accuracy", "n", ...}}`
to --out, or to eval.json in MODEL (`checkpoints/step_<N>.eval.json` for a step folder); each run replaces that
file, so give --out to keep the results of several modes. Details: dsv4train/posttrain/evaluation.py.
Exit status: 0 done, 2 a mistake in the arguments or MODEL (the message says which)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dsv4train.inference.full_forward import DEFAULT_BATCH_SIZE

PROG = "dsv4 eval"


def _parser() -> argparse.ArgumentParser:
    from dsv4train.posttrain.evaluation import MODES, SPLITS, TASKS

    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "model", type=Path, help="a dsv4 folder, a run directory, a checkpoints/step_<N> folder, an HF export"
    )
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, some of {','.join(TASKS)} (default all)")
    p.add_argument("--split", choices=SPLITS, default="test")
    p.add_argument("--mode", choices=MODES, default="chat", help="reasoning mode of the prompt (default chat)")
    p.add_argument("--n", type=int, default=50, help="problems per task (default 50)")
    p.add_argument("--samples", type=int, default=1, help="answers per problem; K > 1 gives pass@1 averaged over K")
    p.add_argument(
        "--temperature", type=float, default=None, help="0 = greedy (default for one sample; 1.0 for several)"
    )
    p.add_argument("--max-new-tokens", type=int, default=256, help="per answer, also capped by the model's max_seq_len")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="prompts per forward")
    p.add_argument("--seed", type=int, default=0, help="picks the problems and the sampling seeds (default 0)")
    p.add_argument(
        "--math-difficulty", type=int, default=2, help="math problems' difficulty (1-3), as `dsv4 data tasks` wrote"
    )
    p.add_argument(
        "--code-difficulty", type=int, default=2, help="code problems' difficulty (1-2), as `dsv4 data tasks` wrote"
    )
    p.add_argument("--tokenizer", default="", help="a tokenizer.json or a folder holding one (default: MODEL's)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--out", type=Path, default=None, help="the JSON file (default: eval.json in MODEL)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def eval_main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    from dsv4train.cli.model_args import checked_model_and_device
    from dsv4train.config.errors import ConfigError
    from dsv4train.posttrain.evaluation import EvalSettings, format_table, run_eval

    try:
        settings = EvalSettings(
            tasks=tuple(t.strip() for t in args.tasks.split(",") if t.strip()),
            split=args.split,
            mode=args.mode,
            n=args.n,
            samples=args.samples,
            temperature=args.temperature,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            seed=args.seed,
            math_difficulty=args.math_difficulty,
            code_difficulty=args.code_difficulty,
            progress=not args.no_progress,
        )
        if args.out is not None and args.out.is_dir():
            raise ConfigError(f"--out {args.out} is a folder; give a file name, e.g. {args.out / 'eval.json'}")
        device = checked_model_and_device(args.model, args.device)
        payload, where = run_eval(args.model, settings, args.tokenizer, args.out, device)
    except (ConfigError, FileNotFoundError) as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    print(format_table(payload))
    print(f"wrote {where} ({payload['seconds']:.1f} s)")
    return 0
