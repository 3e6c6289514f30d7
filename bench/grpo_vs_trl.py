"""GRPO: `dsv4 grpo`'s controller vs TRL's `GRPOTrainer` on the same model, prompts, rewards and settings, each side
in a fresh subprocess on the same machine in the same run. Prints one JSON line per side, then a markdown section
with the ratios; `--write-docs` puts it into docs/benchmarks.md.

    .venv/bin/python -m bench.grpo_vs_trl MODEL [--task math --steps 6 --prompts 8 --group 8 --max-new-tokens 96
        --threads 2 --lr 1e-5] [--compile] [--write-docs]

MODEL: an SFT run directory (or any folder `dsv4 grpo` takes as grpo.init). TRL gets the same weights exported to
transformers' `DeepseekV4ForCausalLM` (`save_hf`, MTP dropped) with the same tokenizer (`write_hf_tokenizer`).

The same work on both sides:
- prompts: the first steps · prompts of the task's train split in our prompt pool's order (rendered as `dsv4 eval`
  renders them, difficulty 1, think mode), given to TRL in that order (`shuffle_dataset=False`), so step s of both
  sides samples the same prompts;
- G = `--group` completions per prompt at temperature 1 (no top-k / top-p), at most `--max-new-tokens` tokens,
  stopping at EOS;
- reward: the task's verifier on the completion text with the special tokens kept (TRL passes `completion_ids`,
  decoded with our tokenizer exactly as ours decodes);
- loss: token-mean (TRL's "dapo"), ε_low 0.2 / ε_high 0.28, β = 0 (no reference model), one optimizer step per
  rollout batch (TRL: `per_device_train_batch_size` = prompts · G, `num_iterations=1`, `steps_per_generation=1`),
  no load-balancing loss (`router_aux_loss_coef=0`); AdamW at `--lr` on both sides, fp32, `--threads` threads;
- ours without dynamic sampling (TRL has none, so both train on every group), without evaluation, and in one
  process (`grpo.ray=false`, like TRL without vLLM: rollout, reward and update share the same threads).

Measured: the seconds of each step (ours: the controller's `step_s`, split into rollout / reward / train / weight
sync; TRL: its logged `step_time`, which covers generation, reward, the forward and backward and the optimizer step),
excluding each side's set-up; end-to-end samples/s = completions / the sum of the step times. The first step is
reported apart (our compiled decode, with `--compile`, compiles there) and left out of the steady-state ratio.
Tokens differ between the sides (HF's sampler is not ours), so the mean response length is reported next to the
times: a side that writes longer answers does more work per sample.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

SECTION = "## GRPO vs TRL"
DOCS_PATH = "docs/benchmarks.md"
DIFFICULTY = 1
MODE = "think"


def _prompts(model_path: str, task: str, n: int, seed: int):
    """(tokenizer, the first n prompts of our pool's order)."""
    from dsv4train.posttrain.grpo.prompts import PromptPool, task_prompts
    from dsv4train.posttrain.sft import load_init

    tokenizer, model, _ = load_init(model_path, "", seed)
    prompts, _ = task_prompts(
        tokenizer, [task], 2000, MODE, 0, model.cfg.max_seq_len - 96, DIFFICULTY, DIFFICULTY
    )  # fmt: skip
    return tokenizer, model, PromptPool(prompts, seed).take(n)


def run_ours(a) -> dict:
    import torch

    from dsv4train.config.hydra_entry import compose_config
    from dsv4train.posttrain.grpo.controller import grpo

    torch.set_num_threads(a.threads)
    _, _, prompts = _prompts(a.model, a.task, a.steps * a.prompts, a.seed)
    run_dir = Path(a.workdir) / "ours"
    overrides = [
        f"grpo.init={a.model}",
        f"run.dir={run_dir}",
        f"grpo.tasks=[{a.task}]",
        f"grpo.mode={MODE}",
        f"grpo.prompts_per_step={a.prompts}",
        f"grpo.group_size={a.group}",
        f"grpo.max_new_tokens={a.max_new_tokens}",
        f"grpo.rollout_batch={a.prompts * a.group}",
        f"grpo.compile_decode={str(a.compile).lower()}",
        "grpo.ray=false",
        "grpo.dynamic_sampling=false",
        "grpo.eval_n=0",
        "grpo.eps_low=0.2",
        "grpo.eps_high=0.28",
        "grpo.beta=0",
        "grpo.aggregation=token-mean",
        f"train.steps={a.steps}",
        f"train.micro_batch_size={a.prompts * a.group}",
        "train.checkpoint_every=0",
        "train.progress_bar=false",
        "optim=adamw",
        f"optim.lr={a.lr}",
        f"optim.min_lr={a.lr}",
        "optim.warmup_steps=0",
        f"seed={a.seed}",
    ]
    cfg, resolved = compose_config("grpo", overrides)
    grpo(cfg, resolved, prompts=prompts)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "step_s" in r]
    return {
        "side": "ours",
        "step_s": [r["step_s"] for r in steps],
        "rollout_s": [r["rollout_s"] for r in steps],
        "reward_s": [r["reward_s"] for r in steps],
        "train_s": [r["train_s"] for r in steps],
        "sync_s": [r["sync_s"] for r in steps],
        "samples": [r["samples"] for r in steps],
        "response_length": [r["response_length"] for r in steps],
        "reward_mean": [r["reward_mean"] for r in steps],
    }


def run_trl(a) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from dsv4train.data.hf_tokenizer import write_hf_tokenizer
    from dsv4train.models.pretrained import save_hf
    from dsv4train.posttrain.evaluation import completion_text

    torch.set_num_threads(a.threads)
    from dsv4train.posttrain.grpo.prompts import PromptPool

    tokenizer, model, prompts = _prompts(a.model, a.task, a.steps * a.prompts, a.seed)
    prompts = PromptPool(prompts, a.seed).take(len(prompts))  # the order our controller's pool draws them in
    hf_dir = save_hf(model, Path(a.workdir) / "hf")
    write_hf_tokenizer(tokenizer, hf_dir, model_max_length=model.cfg.max_seq_len)
    texts = [tokenizer.decode(p.ids, skip_special_tokens=False) for p in prompts]
    assert all(tokenizer.encode(t, add_special_tokens=False).ids == p.ids for t, p in zip(texts, prompts))
    dataset = Dataset.from_list([{"prompt": t, "index": i} for i, t in enumerate(texts)])

    def reward(completion_ids, index, **_):  # TRL passes prompts, completions and the dataset columns by keyword
        return [prompts[i].score(completion_text(tokenizer, ids))[0] for i, ids in zip(index, completion_ids)]

    logged: list[dict] = []

    class Record(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "step_time" in logs:
                logged.append(dict(logs))

    args = GRPOConfig(
        output_dir=str(Path(a.workdir) / "trl"),
        num_generations=a.group,
        per_device_train_batch_size=a.prompts * a.group,
        steps_per_generation=1,
        num_iterations=1,
        max_completion_length=a.max_new_tokens,
        max_steps=a.steps,
        learning_rate=a.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        temperature=1.0,
        beta=0.0,
        loss_type="dapo",
        epsilon=0.2,
        epsilon_high=0.28,
        router_aux_loss_coef=0.0,
        use_cpu=True,
        bf16=False,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        shuffle_dataset=False,
        seed=a.seed,
        disable_tqdm=True,
    )
    hf_model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    trainer = GRPOTrainer(
        model=hf_model,
        reward_funcs=[reward],
        args=args,
        train_dataset=dataset,
        processing_class=AutoTokenizer.from_pretrained(hf_dir),
        callbacks=[Record()],
    )
    trainer.train()
    return {
        "side": "trl",
        "step_s": [float(r["step_time"]) for r in logged],
        "samples": [a.prompts * a.group] * len(logged),
        "response_length": [float(r["completions/mean_length"]) for r in logged],
        "reward_mean": [float(r["reward"]) for r in logged],
    }


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def render(ours: dict, trl: dict, a, argv: list[str]) -> str:
    import torch
    import transformers
    import trl as trl_pkg

    from bench.docs_section import cpu_name

    def rate(side: dict, first: int) -> float:
        return sum(side["samples"][first:]) / sum(side["step_s"][first:])

    steady = rate(ours, 1) / rate(trl, 1)
    lines = [
        SECTION,
        "",
        f"Command ({datetime.date.today()}, {cpu_name()}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}, trl {trl_pkg.__version__}):",
        "",
        "    .venv/bin/python " + shlex.join(argv),
        "",
        f"{a.steps} GRPO steps of {a.prompts} prompts × {a.group} completions (task {a.task}, {MODE} mode, difficulty "
        f"{DIFFICULTY}, at most {a.max_new_tokens} new tokens, temperature 1), token-mean loss, β = 0, AdamW lr "
        f"{a.lr}, fp32, {a.threads} thread(s); ours {'with' if a.compile else 'without'} the compiled decode step. "
        "bench/grpo_vs_trl.py's docstring says what each side runs and how each number is taken.",
        "",
        "| side | first step s | later steps s (mean) | rollout s | reward s | train s | sync s | samples/s "
        "(later steps) | samples/s (all steps) | mean response tokens | mean reward |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for side in (ours, trl):
        split = [
            f"{_mean(side[k][1:]):.2f}" if k in side else "—" for k in ("rollout_s", "reward_s", "train_s", "sync_s")
        ]
        lines.append(
            f"| {'dsv4train' if side['side'] == 'ours' else 'TRL GRPOTrainer'} | {side['step_s'][0]:.2f} | "
            f"{_mean(side['step_s'][1:]):.2f} | {' | '.join(split)} | {rate(side, 1):.2f} | {rate(side, 0):.2f} | "
            f"{_mean(side['response_length']):.1f} | {_mean(side['reward_mean']):.3f} |"
        )
    lines += [
        "",
        f"Samples/s ratio ours / TRL: **{steady:.2f}×** over the later steps, {rate(ours, 0) / rate(trl, 0):.2f}× over "
        "all steps (the first includes the compile with --compile). Rollout, reward, train and sync are our "
        "step's parts, means over the later steps; TRL logs one time per step.",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="an SFT run directory (grpo.init)")
    ap.add_argument("--task", default="math", choices=("math", "code"))
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compile", action="store_true", help="ours with the compiled decode step")
    ap.add_argument("--write-docs", action="store_true", help=f"replace the section of {DOCS_PATH}")
    ap.add_argument("--side", choices=("ours", "trl"), help=argparse.SUPPRESS)  # one side, in this process
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.steps < 2:
        ap.error("--steps must be >= 2 (the first step is reported apart)")
    if a.side is not None:
        print(json.dumps(run_ours(a) if a.side == "ours" else run_trl(a)))
        return 0
    results = {}
    with tempfile.TemporaryDirectory() as work:
        for side in ("ours", "trl"):
            env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
            cmd = [sys.executable, "-m", "bench.grpo_vs_trl", *sys.argv[1:], "--side", side, "--workdir", work]
            done = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if done.returncode != 0:
                print(done.stdout[-3000:], done.stderr[-6000:], file=sys.stderr)
                return 1
            results[side] = json.loads(done.stdout.strip().splitlines()[-1])
            print(json.dumps(results[side]))
    section = render(results["ours"], results["trl"], a, ["-m", "bench.grpo_vs_trl", *sys.argv[1:]])
    print(section)
    if a.write_docs:
        from bench.docs_section import replace_section

        replace_section(SECTION, section, DOCS_PATH)
    return 0


if __name__ == "__main__":
    sys.exit(main())
