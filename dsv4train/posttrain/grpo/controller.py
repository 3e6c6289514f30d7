"""`dsv4 grpo`: GRPO of a domain expert from its SFT checkpoint. `grpo(cfg)` reads like the algorithm:

set up (the SFT expert and its tokenizer, the train-split prompts of the domains, the Learner, a frozen reference
when some β > 0, the rollout worker) -> resume from the newest checkpoint if any -> held-out evaluation ->
for each step:
    sync the policy's weights to the rollout worker (version = step)
    -> sample prompts -> G rollouts each -> rewards (the domain's verifier, sandboxed for code)
    -> drop the groups without signal and refill them (dynamic sampling, at most grpo.max_refills rounds)
    -> advantages (group-relative) -> policy update through the Learner (keep-routing, keep-sampling, clip, KL)
    -> metrics, evaluation every train.eval_every steps, checkpoint
-> summary.

The run directory is a training run's (config.resolved.yaml, metrics.jsonl, checkpoints/, summary.json) plus the
tokenizer.json and samples.jsonl (each step's first group: prompt, completions, rewards and the verifier's
reasons), so `dsv4 eval`, `dsv4 convert to-hf` and `dsv4 report` take it. A checkpoint holds the policy, the
optimizer and the controller state (step, the prompt pool's position, RNG, the first and last evaluation): running
the same command again resumes, and draws the prompts and samples the uninterrupted run would (every sampling seed
is a function of the run seed, the step and the sample's place, rollout.py).

Rollouts and rewards run in Ray actors (`grpo.ray=true`, ray_actors.py: a local Ray by default, restarts with
bounded retries) or in this process (`grpo.ray=false`); the policy update runs in this process, or in every process
of a torchrun layout (`parallel.dp`, `ep`, `tp`; not `cp` or `pp`):

- every rank runs this loop; rank 0, the driver, alone owns the rollout workers, the rewards, the prompt pool's draws,
  the evaluation, samples.jsonl and the tracker and progress output (the other ranks create no workers);
- each step the driver's scored samples (none: skip the update) and its rollout metrics are broadcast, so every rank
  returns the same metrics;
- every rank builds the step's micro-batches from them and trains its data rank's share, padded with micro-batches
  without targets to as many as the others (batch.py `data_rank_share`); the aggregation weights are the whole
  step's and the Learner divides by the whole step's target count, so the update is the one-process update;
- the weight sync and the evaluation gather the whole state dict to the driver (`ParallelRuntime.full_state_dict`;
  every rank takes part), the rollout workers load it with the version as on one process, and the evaluation runs
  on an unsharded copy of the policy on the driver;
- with a reference (β > 0) every rank keeps its own frozen unsharded copy of `grpo.init` and computes the reference
  log-probs of the micro-batches it trains: the reference forwards are spread over the ranks like the update, and
  nothing more is broadcast (every rank loaded the whole init anyway, before sharding it);
- checkpoints are the Learner's (DCP shards of every rank) with the driver's controller state (its prompt pool
  position and RNG), so a resumed run draws what the uninterrupted one would, in any layout."""

from __future__ import annotations

import contextlib
import copy
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from dsv4train.config.errors import ConfigError
from dsv4train.config.grpo import GRPOConfig, GRPOOptions
from dsv4train.config.pretrain import TrainConfig
from dsv4train.data.chat import EOS
from dsv4train.inference.sampling import SamplingParams
from dsv4train.models.model import DSV4Model
from dsv4train.models.pretrained import build_empty
from dsv4train.observability.run_dir import open_run_dir, write_snapshot
from dsv4train.observability.trackers import build_trackers
from dsv4train.optim.schedule import lr_at
from dsv4train.parallel.dims import ParallelDims
from dsv4train.parallel.runtime import ParallelRuntime
from dsv4train.posttrain.evaluation import EvalSettings, completion_text, evaluate
from dsv4train.posttrain.grpo.advantages import constant_groups, group_advantages, overlong_penalty
from dsv4train.posttrain.grpo.batch import ScoredRollout, aggregation_weights, data_rank_share, micro_batches
from dsv4train.posttrain.grpo.loss import GRPOLoss, sampling_logprobs
from dsv4train.posttrain.grpo.prompts import Prompt, PromptPool, task_prompts
from dsv4train.posttrain.grpo.ray_actors import RayRewards, RayRollouts, ray_session
from dsv4train.posttrain.grpo.rollout import Rollout, RolloutWorker, rollout_seed
from dsv4train.posttrain.rewards.scoring import score_completions
from dsv4train.posttrain.sft import load_init
from dsv4train.quant import apply_precision
from dsv4train.train import checkpoint
from dsv4train.train.callbacks import Callback, CheckpointCallback, Loop, PreemptionCallback, TrackerCallback
from dsv4train.train.learner import Learner
from dsv4train.train.trainer import placement, print_summary, resumed_loop, same_run_dir, steps_summary, summarise_run
from dsv4train.utils.device import pick_device, seed_everything
from dsv4train.utils.dist import env_world_size, init_distributed
from dsv4train.utils.signals import PreemptionFlag, catch_preemption


def grpo(cfg: GRPOConfig, resolved_yaml: str | None = None, prompts: list[Prompt] | None = None) -> dict:
    """The run (module docstring); its summary. `prompts`: your own prompts and reward functions (each `Prompt`
    holds its token ids, a task name and `score(text) -> reward or (reward, reason)`) instead of the train split
    of `grpo.tasks`; the held-out evaluation still runs on `grpo.tasks`."""
    with catch_preemption() as preemption:  # before anything else, so set-up is covered too
        return _grpo(cfg, resolved_yaml, preemption, prompts)


@dataclass
class GRPOContext:
    """What a GRPO step uses besides the Loop (model, optimizer, step, prompt pool)."""

    cfg: GRPOConfig
    tokenizer: object
    rollouts: RolloutWorker | RayRollouts | None  # load_weights(state_dict, version), generate(...); the driver's
    score: Callable[[list], list[tuple[float, str]]] | None  # [(reward function, text)] -> [(reward, reason)]
    reference: DSV4Model | None  # every rank's own frozen copy of grpo.init (β > 0)
    eos_id: int
    learned_layers: list[int]

    @property
    def g(self) -> GRPOOptions:
        return self.cfg.grpo


def _grpo(cfg: GRPOConfig, resolved_yaml: str | None, preemption: PreemptionFlag, prompts: list[Prompt] | None) -> dict:
    g, t = cfg.grpo, cfg.train
    tokenizer, model, vocab_note = load_init(g.init, g.tokenizer, cfg.seed, key="grpo.init")
    max_prompt_len = model.cfg.max_seq_len - g.max_new_tokens
    if max_prompt_len < 1:
        raise ConfigError(
            f"grpo.max_new_tokens={g.max_new_tokens} leaves no room for a prompt in the model's max_seq_len "
            f"{model.cfg.max_seq_len}; lower it"
        )
    dims = ParallelDims.from_config(cfg.parallel)  # cp and pp were refused with the config (config/grpo.py)
    dims.validate(env_world_size(), model.cfg, model.cfg.max_seq_len, t.micro_batch_size)  # before any collective
    device = init_distributed(pick_device(t.device), cfg.parallel.timeout_s)
    rt = ParallelRuntime(dims, device)
    run_dir = open_run_dir(same_run_dir(cfg, rt))
    dtype = torch.bfloat16 if cfg.precision.compute_dtype == "bfloat16" else torch.float32
    seed_everything(cfg.seed)

    if prompts is None:
        prompts, too_long = task_prompts(
            tokenizer, g.tasks, g.train_problems, g.mode, g.problems_seed, max_prompt_len, g.math_difficulty,
            g.code_difficulty,
        )  # fmt: skip
    else:
        prompts, too_long = _fitting(prompts, max_prompt_len)
    pool = PromptPool(prompts, cfg.seed)  # on every rank (its position is checkpointed); only the driver draws
    reference = frozen_copy(model, device) if g.uses_reference else None
    prepare_policy(model, t)
    loop, resume_from, removed, fresh = resumed_loop(cfg, model.to(device), rt, dtype, run_dir, pool, preemption)
    driver = rt.is_main
    with ray_session(g.ray_address) if g.ray and driver else contextlib.nullcontext():
        wal_dir = run_dir / ROLLOUT_WAL_DIR if g.rollout_wal else None
        rollouts, score = _workers(g, model, tokenizer, device, wal_dir) if driver else (None, None)
        eos_id = tokenizer.token_to_id(EOS)
        ctx = GRPOContext(cfg, tokenizer, rollouts, score, reference, eos_id, model.learned_routing_layers)
        return _run(cfg, ctx, loop, resolved_yaml, prompts, too_long, vocab_note, resume_from, removed, fresh)


ROLLOUT_WAL_DIR = "rollout_wal"  # <run.dir>/rollout_wal/<call>.wal while a rollout call runs (inference/wal.py)


def _workers(g: GRPOOptions, model: DSV4Model, tokenizer, device: torch.device, wal_dir: Path | None):
    """(the rollout workers, the scoring function jobs -> [(reward, reason)]): Ray actors or this process."""
    if g.ray:
        rollouts = RayRollouts(
            g.rollout_actors, g.actor_retries, model.cfg, g.rollout_batch, model.cfg.max_seq_len, tokenizer,
            g.compile_decode, wal_dir, g.wal_fsync, g.rollout_gpus,
        )  # fmt: skip
        rewards = RayRewards(g.reward_actors, g.actor_retries, g.reward_workers)
        return rollouts, lambda jobs: rewards.score(jobs, g.reward_timeout_s)
    worker = RolloutWorker(
        model.cfg, g.rollout_batch, model.cfg.max_seq_len, device, tokenizer, g.compile_decode, wal_dir, g.wal_fsync
    )
    return worker, lambda jobs: score_completions(jobs, g.reward_timeout_s, g.reward_workers)


def _run(cfg, ctx, loop, resolved_yaml, prompts, too_long, vocab_note, resume_from, removed, fresh) -> dict:
    g, t, run_dir, model = cfg.grpo, cfg.train, loop.run_dir, loop.model
    config_dict, driver = asdict(cfg), loop.rt.is_main
    if driver:
        write_snapshot(run_dir, resolved_yaml or OmegaConf.to_yaml(config_dict), loop.start_step)
        ctx.tokenizer.save(str(run_dir / "tokenizer.json"))
        _print_start(cfg, model, loop, len(prompts), too_long, vocab_note, resume_from, removed, fresh)

    driver_only, trackers = [], None
    if driver:
        trackers = build_trackers(cfg.tracker, run_dir, config_dict)
        driver_only = [TrackerCallback(trackers, t.log_every), GRPOProgressCallback(t.progress_bar)]
    callbacks = [  # evaluation (its weight gather), preemption and checkpoints are collective: every rank runs them
        *([GRPOEvalCallback(ctx, t.eval_every, trackers)] if g.eval_n > 0 else []),
        *driver_only,
        PreemptionCallback(),
        CheckpointCallback(t.checkpoint_every, t.keep_checkpoints),
    ]
    prompt_report = {"train": len(prompts), "too_long": too_long, "tasks": g.tasks, "mode": g.mode}
    summary = summarise_run(loop, callbacks, lambda: run_grpo_steps(loop, ctx, callbacks), {"prompts": prompt_report})
    if driver:
        print_summary(summary, "grpo")
    return summary


def _fitting(prompts: list[Prompt], max_prompt_len: int) -> tuple[list[Prompt], int]:
    """The given prompts that fit (an empty set is refused: nothing to sample)."""
    if not prompts:
        raise ConfigError("an empty prompt set: GRPO needs at least one prompt to sample completions of")
    fitting = [p for p in prompts if 1 <= len(p.ids) <= max_prompt_len]
    if not fitting:
        raise ConfigError(
            f"none of the {len(prompts)} prompts has 1 to {max_prompt_len} tokens (the model's max_seq_len minus "
            "grpo.max_new_tokens); shorten them or lower grpo.max_new_tokens"
        )
    return fitting, len(prompts) - len(fitting)


def prepare_policy(model: DSV4Model, t: TrainConfig) -> None:
    """The SFT expert as GRPO trains it: the sparse indexer, and out of the optimizer what no
    GRPO loss reaches. GRPO has no MTP loss: the MTP block stays as SFT left it. Likewise the indexer when its KL has
    no weight (the toy preset): its top-k is not differentiable, so the KL is all it learns from; the KL is not
    computed then, and a parameter without a gradient would have no optimizer state to checkpoint."""
    model.set_indexer_mode("sparse")  # the SFT expert left the dense warm-up long ago
    frozen = list(model.mtp.parameters())
    if t.indexer_loss_weight == 0:
        model.set_indexer_kl(False)
        frozen += [p for name, p in model.named_parameters() if ".indexer." in name]
    for p in frozen:
        p.requires_grad_(False)


def frozen_copy(model: DSV4Model, device: torch.device) -> DSV4Model:
    """The reference: a frozen copy of the (unsharded) init, in eval mode with the sparse indexer."""
    reference = copy.deepcopy(model).to(device).eval()
    reference.set_indexer_mode("sparse")
    for p in reference.parameters():
        p.requires_grad_(False)
    return reference


# ---------------------------------------------------------------------------------------------------- the steps
def run_grpo_steps(loop: Loop, ctx: GRPOContext, callbacks: list[Callback]) -> dict:
    t = ctx.cfg.train
    loop.check_preemption()  # a signal during set-up: no step, no evaluation, just the summary
    for cb in callbacks:
        cb.on_train_start(loop)
    t_start, samples = time.perf_counter(), 0
    last: dict = {}
    while loop.step < t.steps and loop.stop_reason is None:
        last = grpo_step(loop, ctx)
        samples += last["samples"]
        loop.step += 1
        for cb in callbacks:
            cb.on_step_end(loop, last)
    elapsed = time.perf_counter() - t_start
    summary = {
        **steps_summary(loop, elapsed),
        "samples": samples,
        "samples_per_sec": round(samples / max(elapsed, 1e-9), 3),
        "eval_at_start": loop.val_first,
        "eval_last": loop.val_last,
        "preempted_by": loop.stop_reason,
        "checkpoint": str(checkpoint.latest(loop.ckpt_root)),
    }
    for cb in callbacks:
        cb.on_train_end(loop, summary)
    return summary


def grpo_step(loop: Loop, ctx: GRPOContext) -> dict:
    """One GRPO step at `loop.step` (not advanced here): its metrics, the same on every rank. The driver draws and
    scores the samples; every rank trains on them (its data rank's share)."""
    step = loop.step
    started = time.perf_counter()
    _sync_weights(loop, ctx, version=step)
    sync_s = time.perf_counter() - started
    drawn = loop.rt.from_main(_draw_samples(loop, ctx) if loop.rt.is_main else None)  # one broadcast
    t0 = time.perf_counter()
    lr = lr_at(step, ctx.cfg.optim, ctx.cfg.train.steps)
    loop.optimizer.set_lr(lr)
    metrics = dict(drawn.metrics)
    if drawn.trained:
        metrics.update(update_policy(loop.learner, ctx, drawn.trained, step))
    else:
        metrics["skipped"] = True  # every group had equal rewards even after the refills: nothing to learn from
    train_s = time.perf_counter() - t0
    step_s = time.perf_counter() - started
    metrics.update(
        {
            "sync_s": sync_s,
            "train_s": train_s,
            "lr": lr,
            "trained_samples": len(drawn.trained),
            "step_s": step_s,
            "samples_per_sec": metrics["samples"] / step_s,
        }
    )
    return metrics


def _sync_weights(loop: Loop, ctx: GRPOContext, version: int) -> None:
    """The policy's whole weights into the rollout workers, with their version (under torchrun gathered to the
    driver from every rank's shards: every rank takes part)."""
    weights = loop.rt.full_state_dict(loop.model)
    if ctx.rollouts is not None:
        ctx.rollouts.load_weights(weights, version=version)


@dataclass
class DrawnSamples:
    """What the driver's rollouts give a step (broadcast to every rank): the samples to train on (none: the update
    is skipped) and the rollout metrics."""

    trained: list[ScoredRollout]
    metrics: dict


def _draw_samples(loop: Loop, ctx: GRPOContext) -> DrawnSamples:
    """The driver's part of a step: prompts -> G rollouts each -> rewards -> dynamic sampling -> advantages."""
    g, step = ctx.g, loop.step
    times: dict[str, float] = {"rollout_s": 0.0, "reward_s": 0.0}
    kept: list[ScoredRollout] = []
    drawn: list[tuple[Prompt, Rollout, float, float]] = []  # every sample: prompt, rollout, shaped reward, score
    rounds = groups_drawn = groups_constant = 0
    while True:
        batch = loop.train_data.take(g.prompts_per_step - len(kept) // g.group_size)
        t0 = time.perf_counter()
        rollouts = ctx.rollouts.generate(
            [p.ids for p in batch],
            g.group_size,
            _sampling_params(g, ctx.eos_id),
            [rollout_seed(ctx.cfg.seed, step, rounds, i, k) for i in range(len(batch)) for k in range(g.group_size)],
            wal_key=f"step{step + 1:06d}-round{rounds}",
        )
        t1 = time.perf_counter()
        scores = ctx.score(
            [(batch[r.group].score, completion_text(ctx.tokenizer, r.completion.token_ids)) for r in rollouts]
        )
        times["rollout_s"] += t1 - t0
        times["reward_s"] += time.perf_counter() - t1
        if rounds == 0:
            _log_samples(loop.run_dir / SAMPLES_JSONL, step, ctx, batch[0], rollouts[: g.group_size], scores)
        shaped_B = _shaped_rewards(g, rollouts, [s for s, _ in scores])
        drawn += [(batch[r.group], r, float(shaped_B[i]), scores[i][0]) for i, r in enumerate(rollouts)]
        constant_N = constant_groups(shaped_B, g.group_size)
        advantages_B = group_advantages(shaped_B, g.group_size, normalize_std=g.normalize_std)
        groups_drawn += len(batch)
        groups_constant += int(constant_N.sum())
        for i, r in enumerate(rollouts):
            if g.dynamic_sampling and constant_N[r.group]:
                continue
            task = batch[r.group].task
            kept.append(ScoredRollout(r, task, float(shaped_B[i]), float(advantages_B[i]), g.beta_of(task)))
        rounds += 1
        if not g.dynamic_sampling or len(kept) >= g.prompts_per_step * g.group_size or rounds > g.max_refills:
            break

    generated = sum(len(r.completion.token_ids) for _, r, _, _ in drawn)
    metrics = {
        **_rollout_metrics(drawn),
        "groups_drawn": groups_drawn,
        "groups_trained": len(kept) // g.group_size,
        "frac_reward_zero_std": groups_constant / groups_drawn,
        "rollout_rounds": rounds,
        "rollout_resumed_tokens": sum(r.completion.resumed for _, r, _, _ in drawn),
        "policy_version": step,
        **times,
        "samples": len(drawn),
        "rollout_tokens_per_sec": generated / max(times["rollout_s"], 1e-9),
    }
    trained = [s for s in kept if not (g.overlong_filter and s.rollout.completion.finish_reason == "length")]
    return DrawnSamples(trained, metrics)


SAMPLES_JSONL = "samples.jsonl"  # one line per step: the first prompt's group, its completions and rewards


def _log_samples(path, step: int, ctx: GRPOContext, prompt: Prompt, group: list[Rollout], scores) -> None:
    """Append the step's first group to samples.jsonl: what the policy writes, and why it scored what it did."""
    record = {
        "step": step + 1,
        "task": prompt.task,
        "prompt": ctx.tokenizer.decode(prompt.ids, skip_special_tokens=False),
        "completions": [
            {
                "text": completion_text(ctx.tokenizer, r.completion.token_ids),
                "reward": reward,
                "reason": reason,
                "finish": r.completion.finish_reason,
            }
            for r, (reward, reason) in zip(group, scores)
        ],
    }
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")


def _sampling_params(g: GRPOOptions, eos_id: int) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=g.max_new_tokens,
        temperature=g.temperature,
        top_p=g.top_p,
        top_k=g.top_k,
        stop_token_ids=(eos_id,),
    )


def _shaped_rewards(g: GRPOOptions, rollouts: list[Rollout], scores: list[float]) -> torch.Tensor:
    """[B] the verifier's reward plus DAPO's soft overlong penalty (when grpo.overlong_buffer > 0)."""
    rewards_B = torch.tensor(scores, dtype=torch.float32)
    if g.overlong_buffer > 0:
        lengths_B = torch.tensor([len(r.completion.token_ids) for r in rollouts])
        rewards_B = rewards_B + overlong_penalty(lengths_B, g.max_new_tokens, g.overlong_buffer, g.overlong_factor)
    return rewards_B


def _rollout_metrics(drawn: list[tuple[Prompt, Rollout, float, float]]) -> dict:
    """Per task: reward mean and std (shaped), accuracy (the verifier's score), response length, finished share."""
    metrics: dict[str, float] = {}
    for task in sorted({p.task for p, _, _, _ in drawn}):
        rows = [(r, shaped, score) for p, r, shaped, score in drawn if p.task == task]
        rewards = torch.tensor([shaped for _, shaped, _ in rows], dtype=torch.float64)
        lengths = torch.tensor([len(r.completion.token_ids) for r, _, _ in rows], dtype=torch.float64)
        metrics[f"{task}/reward_mean"] = float(rewards.mean())
        metrics[f"{task}/reward_std"] = float(rewards.std()) if len(rows) > 1 else 0.0
        metrics[f"{task}/accuracy"] = sum(score for _, _, score in rows) / len(rows)
        metrics[f"{task}/response_length"] = float(lengths.mean())
        metrics[f"{task}/finished"] = sum(r.completion.finish_reason == "stop" for r, _, _ in rows) / len(rows)
    all_rewards = torch.tensor([shaped for _, _, shaped, _ in drawn], dtype=torch.float64)
    metrics["reward_mean"] = float(all_rewards.mean())
    metrics["response_length"] = sum(len(r.completion.token_ids) for _, r, _, _ in drawn) / len(drawn)
    return metrics


def update_policy(learner: Learner, ctx: GRPOContext, samples: list[ScoredRollout], step: int) -> dict:
    """grpo.updates_per_step optimizer steps over contiguous mini-batches of the samples (the same on every rank);
    the metrics of the last one, and the tokens/s of all. A mini-batch's aggregation weights and micro-batches are
    the whole mini-batch's on every rank; each data rank trains its share of the micro-batches, padded to as many as
    the others (batch.py `data_rank_share`), and the Learner divides by the target count of all of them."""
    g, t, rt = ctx.g, ctx.cfg.train, learner.rt
    loss_fn = GRPOLoss(g.temperature, g.top_k, g.top_p, g.eps_low, g.eps_high, g.dual_clip, g.kl_kind, g.delta)
    n_mini = min(g.updates_per_step, len(samples))
    bounds = [round(i * len(samples) / n_mini) for i in range(n_mini + 1)]
    t0, tokens, result = time.perf_counter(), 0, None
    for u in range(n_mini):
        chunk = samples[bounds[u] : bounds[u + 1]]
        weights = aggregation_weights(
            [len(s.rollout.completion.token_ids) for s in chunk],
            g.aggregation,
            g.max_new_tokens if g.aggregation == "seq-mean-token-sum-norm" else None,
        )
        batches = micro_batches(chunk, weights, t.micro_batch_size, ctx.learned_layers, ctx.eos_id)
        mine, padding = data_rank_share(batches, rt.data_rank, rt.data_ranks)
        if ctx.reference is not None:
            for b in mine:
                b["ref_logprobs"] = _reference_logprobs(ctx, b, learner.device)
        tokens += sum(int(b["input_ids"].numel()) for b in batches)  # every rank's: the step's throughput
        result = learner.step(mine + padding, loss_fn, number=step + 1, padding=len(padding))
    metrics = result.log()
    metrics["train_tokens_per_sec"] = tokens / (time.perf_counter() - t0)
    return metrics


@torch.no_grad()
def _reference_logprobs(ctx: GRPOContext, batch: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
    """The frozen reference's log-prob of each label at the rollout's temperature, over the whole vocabulary (its
    own routing; the reference need not contain the policy's top-k / top-p support)."""
    logits_BSV = ctx.reference(batch["input_ids"].to(device))
    logprob_BS, _ = sampling_logprobs(logits_BSV, batch["labels"].to(device), ctx.g.temperature, 0, 1.0)
    return logprob_BS.cpu()


# ---------------------------------------------------------------------------------------------------- callbacks
class GRPOEvalCallback(Callback):
    """Accuracy on the held-out test split of each task (`dsv4 eval`'s problems and scoring), of the policy (an
    Engine over the Learner's model, in this process): greedy, and with `grpo.eval_samples` K > 0 also pass@1 over
    K samples per problem at `grpo.temperature`; at the start of a fresh run, every `every` steps and at the last
    step. `loop.val_first` / `val_last` keep {task: greedy accuracy, "<task>_sampled": pass@1} (checkpointed).
    Under torchrun the driver evaluates an unsharded copy of the policy (`_policy`); the other ranks only take part
    in gathering its weights, and keep None."""

    def __init__(self, ctx: GRPOContext, every: int, trackers=None):
        self.ctx, self.every, self.trackers = ctx, every, trackers  # trackers: the driver's, to log the start at step 0
        self.copy: DSV4Model | None = None  # under torchrun: the driver's unsharded policy, built once

    def _policy(self, loop: Loop) -> DSV4Model | None:
        """The policy as one whole model on the driver, None on the other ranks: the Learner's model on one process;
        under torchrun a copy (same precision, no random init) loaded with the gathered weights (every rank calls)."""
        if not loop.rt.distributed:
            return loop.model
        weights = loop.rt.full_state_dict(loop.model)
        if weights is None:
            return None
        if self.copy is None:
            self.copy = apply_precision(build_empty(loop.model.cfg, loop.learner.device), loop.cfg.precision)
            self.copy.set_indexer_mode("sparse")
        self.copy.load_state_dict(weights)
        return self.copy

    def _evaluate(self, loop: Loop) -> dict[str, float] | None:
        model = self._policy(loop)
        if model is None:
            return None
        g = self.ctx.g
        common = dict(
            tasks=tuple(g.tasks),
            split="test",
            mode=g.mode,
            n=g.eval_n,
            max_new_tokens=g.eval_max_new_tokens or g.max_new_tokens,
            batch_size=g.rollout_batch,
            seed=g.problems_seed,
            math_difficulty=g.math_difficulty,
            code_difficulty=g.code_difficulty,
            progress=False,
        )
        results = evaluate(model, self.ctx.tokenizer, EvalSettings(**common))
        accuracies = {task: r["accuracy"] for task, r in results.items()}
        if g.eval_samples > 0:
            sampled = EvalSettings(**common, samples=g.eval_samples, temperature=g.temperature)
            results = evaluate(model, self.ctx.tokenizer, sampled)
            accuracies.update({f"{task}_sampled": r["accuracy"] for task, r in results.items()})
        return accuracies

    def on_train_start(self, loop: Loop) -> None:
        if loop.step == 0 and loop.stop_reason is None:
            loop.val_first = loop.val_last = self._evaluate(loop)
            if loop.val_first is not None:
                tqdm.write(f"grpo: held-out accuracy at the start: {_show(loop.val_first)}")
                if self.trackers is not None:  # step 0 in metrics.jsonl: the start of the held-out curves
                    self.trackers.log(_eval_metrics(loop.val_first), 0)

    def on_step_end(self, loop: Loop, metrics: dict) -> None:
        if loop.step % self.every == 0 or loop.is_last_step:
            loop.val_last = self._evaluate(loop)
            if loop.val_last is not None:
                metrics.update(_eval_metrics(loop.val_last))
                tqdm.write(f"grpo: step {loop.step}: held-out accuracy {_show(loop.val_last)}")


def _eval_metrics(accuracies: dict[str, float]) -> dict[str, float]:
    """{task: greedy, "<task>_sampled": pass@1} as the metric keys `eval/<task>_accuracy`,
    `eval/<task>_sampled_accuracy`."""
    return {f"eval/{task}_accuracy": acc for task, acc in accuracies.items()}


def _show(accuracies: dict[str, float]) -> str:
    """`code 0.275 greedy, 0.180 sampled`"""
    tasks = [t for t in accuracies if not t.endswith("_sampled")]
    return ", ".join(
        f"{t} {accuracies[t]:.3f} greedy"
        + (f", {accuracies[f'{t}_sampled']:.3f} sampled" if f"{t}_sampled" in accuracies else "")
        for t in tasks
    )


class GRPOProgressCallback(Callback):
    def __init__(self, enabled: bool):
        self.enabled, self.bar = enabled, None

    def on_train_start(self, loop: Loop) -> None:
        self.bar = tqdm(
            total=loop.cfg.train.steps, initial=loop.step, desc="grpo", unit="step", disable=not self.enabled
        )

    def on_step_end(self, loop: Loop, metrics: dict) -> None:
        self.bar.update(1)
        self.bar.set_postfix(
            reward=f"{metrics['reward_mean']:.3f}",
            len=f"{metrics['response_length']:.0f}",
            kept=f"{metrics['groups_trained']}/{metrics['groups_drawn']}",
            samples_s=f"{metrics['samples_per_sec']:.1f}",
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------------------------------------------- reporting
def _print_start(cfg, model, loop, n_prompts, too_long, vocab_note, resume_from, removed, fresh) -> None:
    g, t = cfg.grpo, cfg.train
    n = sum(p.numel() for p in model.parameters())
    print(
        f"dsv4 grpo: {g.init} ({n / 1e6:.2f}M params) on {placement(loop)}, {t.steps} steps of "
        f"{g.prompts_per_step} prompts x {g.group_size} samples (up to {g.max_new_tokens} new tokens, temperature "
        f"{g.temperature}), tasks {g.tasks} in {g.mode} mode, run dir {loop.run_dir}"
    )
    print(f"  {vocab_note}")
    print(f"  prompts: {n_prompts} train-split problems ({too_long} too long for the model, left out)")
    if removed:
        print(f"  removed incomplete checkpoint writes: {', '.join(removed)}")
    if resume_from is not None:
        print(f"  resuming from {resume_from}" + (" (optimizer state starts fresh)" if fresh else ""))
    sys.stdout.flush()
