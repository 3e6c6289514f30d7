"""Keep-routing: how far the training forward's logprobs of a rollout's tokens are from the rollout's own, at the same
weights, with the rollout's expert routes replayed and without (issue 16). Prints a markdown section;
`--write-docs` puts it into docs/posttraining.md.

    .venv/bin/python -m bench.keep_routing_gap MODEL [--tasks math,code --n 16 --samples 4 --max-new-tokens 96
        --cache-dtypes model,fp8 --threads 2] [--write-docs]

MODEL: a run directory or checkpoint `dsv4 eval` reads (posttrain/evaluation.py `load_for_eval`: fp32, sparse
indexer). Prompts: the first `n` test problems of each task (difficulty 1, chat mode), as `dsv4 eval` renders them.
Rollout: `Engine(model, max_batch=16, cache_dtype=...)`, `samples` completions per prompt at temperature 1 (no
truncation), seeds fixed; each completion's `raw_logprobs` (the model's distribution at the sampled token) and
`routes`. Training forward: one ordinary forward (no cache) over prompt + completion[:-1] per completion, right-padded
rows, `log_softmax` at each generated token; once with `routes=` the rollout's (keep-routing) and once without.
Reported per cache dtype: the mean and largest |rollout logprob − training logprob| over all generated tokens, and
the share of generated tokens whose experts in some learned-routing layer differ between the rollout and the
training forward's own router (without replay; with replay they are equal by construction, tests/unit/
test_keep_routing.py). With the fp32 cache the two forwards compute the same function up to fp32 summation order;
with V4's FP8/FP4 cache (models/kv_store.py) the rollout's attention reads rounded entries, so its hidden states,
and at near-ties its routes, drift from the training forward's.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

SECTION = "## Keep-routing: rollout vs training logprobs"
DOCS_PATH = "docs/posttraining.md"


def rollout(model, tokenizer, prompts: list[list[int]], samples: int, max_new_tokens: int, cache_dtype: str):
    from dsv4train.data.chat import EOS
    from dsv4train.inference.engine import Engine
    from dsv4train.inference.sampling import SamplingParams

    eos = tokenizer.token_to_id(EOS)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0, stop_token_ids=(eos,))
    requests = [p for p in prompts for _ in range(samples)]
    engine = Engine(model, max_batch=16, cache_dtype=cache_dtype)
    return requests, engine.generate(requests, params, seeds=list(range(len(requests))), progress=True)


def training_logprobs(model, prompts: list[list[int]], completions, replay: bool) -> tuple[list, list]:
    """(per completion: logprobs of its generated tokens, the experts [row tokens, k] of each learned layer) of one
    ordinary forward over right-padded rows, with or without the rollout's routes."""
    import torch

    rows = [p + c.token_ids[:-1] for p, c in zip(prompts, completions)]
    L = max(len(r) for r in rows)
    ids_BL = torch.zeros(len(rows), L, dtype=torch.long)
    for b, r in enumerate(rows):
        ids_BL[b, : len(r)] = torch.tensor(r)
    routes = None
    learned = sorted(completions[0].routes)
    if replay:
        k = model.cfg.n_activated_experts
        routes = {i: torch.full((len(rows), L, k), -1, dtype=torch.long) for i in learned}
        for b, c in enumerate(completions):
            for i in learned:
                routes[i][b, : c.routes[i].shape[0]] = c.routes[i]
    per_layer = None if routes is None else [routes.get(i) for i in range(len(model.layers))]
    with torch.no_grad():
        x, auxes = model.run_layers(model.embed_streams(ids_BL), ids_BL, model.layers, None, per_layer)
        logprobs_BLV = model.final(x).float().log_softmax(-1)
    out_lp, out_routes = [], []
    for b, (p, c) in enumerate(zip(prompts, completions)):
        at = torch.arange(len(p) - 1, len(p) - 1 + len(c.token_ids))
        out_lp.append(logprobs_BLV[b, at, torch.tensor(c.token_ids)].tolist())
        out_routes.append({i: auxes[i].moe.routes_BSK[b, : len(rows[b])] for i in learned})
    return out_lp, out_routes


def gap_stats(completions, logprobs: list[list[float]]) -> tuple[float, float]:
    gaps = [abs(a - b) for c, lp in zip(completions, logprobs) for a, b in zip(c.raw_logprobs, lp)]
    return sum(gaps) / len(gaps), max(gaps)


def route_disagreement(prompts, completions, own_routes) -> float:
    """Share of generated tokens fed back (all but each completion's last) whose experts differ, as sets, in some
    learned layer between the rollout and the training forward's own router."""
    differ = total = 0
    for p, c, own in zip(prompts, completions, own_routes):
        n = len(c.token_ids) - 1  # the last token was sampled, never routed
        if n <= 0:
            continue
        any_BN = None
        for i, own_NK in own.items():
            rolled = c.routes[i][len(p) : len(p) + n].sort(-1).values
            mine = own_NK[len(p) : len(p) + n].sort(-1).values
            d = (rolled != mine).any(-1)
            any_BN = d if any_BN is None else any_BN | d
        differ += int(any_BN.sum())
        total += n
    return differ / max(total, 1)


def measure(model_path: str, tasks: list[str], n: int, samples: int, max_new_tokens: int, cache_dtypes, threads):
    import torch

    from dsv4train.posttrain.evaluation import load_for_eval, prompt_text, task_problems

    torch.set_num_threads(threads)
    tokenizer, model, _ = load_for_eval(Path(model_path), "", torch.device("cpu"))
    prompts = []
    for task in tasks:
        for problem in task_problems(task, "test", n, 0, "chat", math_difficulty=1, code_difficulty=1):
            prompts.append(tokenizer.encode(prompt_text(problem.user_text, "chat"), add_special_tokens=False).ids)
    results = []
    for cache_dtype in cache_dtypes:
        requests, completions = rollout(model, tokenizer, prompts, samples, max_new_tokens, cache_dtype)
        with_lp, _ = training_logprobs(model, requests, completions, replay=True)
        without_lp, own = training_logprobs(model, requests, completions, replay=False)
        results.append(
            {
                "cache_dtype": cache_dtype,
                "completions": len(completions),
                "tokens": sum(len(c.token_ids) for c in completions),
                "with_replay": gap_stats(completions, with_lp),
                "without_replay": gap_stats(completions, without_lp),
                "routes_differ": route_disagreement(requests, completions, own),
            }
        )
    return results


def render(results: list[dict], argv: list[str]) -> str:
    from bench.docs_section import cpu_name

    out = [
        SECTION,
        "",
        f"Command ({cpu_name()}):",
        "",
        "    .venv/bin/python " + " ".join(shlex.quote(a) for a in argv),
        "",
        "The rollout's logprob of each sampled token (`Completion.raw_logprobs`, engine with the cache dtype named) "
        "against the training forward's (one ordinary fp32 forward over prompt + completion, the same weights), "
        "with the rollout's routes replayed (`model(ids, routes=...)`) and with the training forward's own router. "
        "Routes differ: generated tokens whose experts differ in some learned-routing layer between the rollout "
        "and the training forward's router. The model is the SFT expert of 'Measured at toy scale' above (its "
        "run directory). bench/keep_routing_gap.py's docstring says how each number is taken.",
        "",
        "| rollout cache | completions | tokens | routes differ | mean gap, replayed | max gap, replayed "
        "| mean gap, own routes | max gap, own routes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        out.append(
            f"| {r['cache_dtype']} | {r['completions']} | {r['tokens']} | {100 * r['routes_differ']:.2f}% | "
            f"{r['with_replay'][0]:.2e} | {r['with_replay'][1]:.2e} | {r['without_replay'][0]:.2e} | "
            f"{r['without_replay'][1]:.2e} |"
        )
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="a run directory or checkpoint")
    ap.add_argument("--tasks", default="math,code")
    ap.add_argument("--n", type=int, default=16, help="test problems per task")
    ap.add_argument("--samples", type=int, default=4, help="completions per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--cache-dtypes", default="model,fp8")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--write-docs", action="store_true", help=f"replace the section of {DOCS_PATH}")
    args = ap.parse_args()
    results = measure(
        args.model,
        args.tasks.split(","),
        args.n,
        args.samples,
        args.max_new_tokens,
        args.cache_dtypes.split(","),
        args.threads,
    )
    section = render(results, ["-m", "bench.keep_routing_gap", *sys.argv[1:]])
    print(section)
    if args.write_docs:
        from bench.docs_section import replace_section

        replace_section(SECTION, section, DOCS_PATH)
    return 0


if __name__ == "__main__":
    sys.exit(main())
