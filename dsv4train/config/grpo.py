"""The GRPO config (`dsv4 grpo`, dsv4train/conf/grpo.yaml and the presets dsv4train/conf/grpo/*.yaml). The model is
not configured: it is the SFT expert `grpo.init` names, with its own ModelConfig. Training, optimizer, precision,
layout, tracker and run sections are the pre-training dataclasses; `train.steps` counts GRPO steps (one rollout
batch each), `train.micro_batch_size` the sequences of one training forward, `train.eval_every` the steps between
held-out evaluations."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from omegaconf import MISSING

from dsv4train.config.errors import require
from dsv4train.config.pretrain import TrainingRunConfig
from dsv4train.posttrain.grpo.kl import KL_KINDS
from dsv4train.posttrain.grpo.policy_loss import AGGREGATIONS

GRPO_TASKS = ("math", "code")  # the offline domains of dsv4train/data/tasks/, each with its verifier as reward
GRPO_MODES = ("chat", "think")


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass(frozen=True)
class GRPOOptions:
    init: str = MISSING  # required: the SFT expert (a run directory, a dsv4 folder or an HF export)
    tokenizer: str = ""  # a tokenizer.json or a folder holding one; empty: the one that came with `init`
    tasks: list[str] = field(default_factory=lambda: ["math"])  # the domains this expert trains on
    mode: str = "think"  # the chat mode of the prompts (the SFT records' mode): think | chat
    train_problems: int = 2000  # train-split problems per task in the prompt pool (never a test problem)
    problems_seed: int = 0  # the `dsv4 data tasks --seed` / `dsv4 eval --seed` of the problems
    math_difficulty: int = 2  # data/tasks/math.py DIFFICULTIES; the one the SFT records were written with
    code_difficulty: int = 2  # data/tasks/code.py DIFFICULTIES; likewise
    # where rollouts and rewards run: Ray actors (a local Ray bound to 127.0.0.1, dashboard off, unless
    # ray_address names a cluster's head, host:port), or this process (ray=false: no Ray start-up, for small runs)
    ray: bool = True
    ray_address: str = ""
    rollout_actors: int = 1  # each holds a policy copy and an Engine, one CPU (the prompts are split between them)
    rollout_gpus: float = 0.0  # GPUs per rollout actor (Ray's num_gpus; its engine then runs on cuda); 0: CPU
    reward_actors: int = 1  # each scores its share in reward_workers threads
    actor_retries: int = 2  # restarts of a dead actor (its call retried) before the run stops naming it
    # the rollout WAL (inference/wal.py): every sampled token logged under <run.dir>/rollout_wal/ before the next
    # decode step, so a rollout killed part-way resumes from its logged tokens; wal_fsync also survives the host
    rollout_wal: bool = True
    wal_fsync: bool = False
    # rollout
    prompts_per_step: int = 8  # groups per step (after dynamic sampling)
    group_size: int = 8  # G completions per prompt
    max_new_tokens: int = 128
    temperature: float = 1.0  # > 0: GRPO learns from samples
    top_p: float = 1.0  # < 1 or top_k > 0: the training log-probs use the same support (keep-sampling)
    top_k: int = 0
    rollout_batch: int = 64  # cache slots of the rollout engine (sequences generated at once)
    compile_decode: bool = False  # the engine's compiled decode step (about a minute to compile on 2 CPU cores)
    # rewards
    reward_timeout_s: float = 30.0  # a reward function slower than this gives 0 and a logged reason
    reward_workers: int = 4  # threads scoring in parallel (the code judge's sandbox is a subprocess)
    overlong_buffer: int = 0  # DAPO's soft overlong penalty over the last N tokens before max_new_tokens; 0: off
    overlong_factor: float = 1.0  # the penalty at max_new_tokens is -overlong_factor
    overlong_filter: bool = False  # DAPO's overlong filtering: completions cut at max_new_tokens get no loss
    # advantages and dynamic sampling
    normalize_std: bool = True  # False: Dr. GRPO (no division by the group's std)
    dynamic_sampling: bool = True  # drop groups whose rewards are all equal and sample more prompts
    max_refills: int = 3  # extra rollout rounds per step to refill the dropped groups (then train on what there is)
    # loss
    aggregation: str = "token-mean"  # AGGREGATIONS
    eps_low: float = 0.2
    eps_high: float = 0.28  # DAPO's clip-higher
    dual_clip: float | None = None  # e.g. 3.0; None: off
    beta: float = 0.0  # KL penalty weight against the frozen `init` (0: no reference model is kept)
    # per-task beta, overriding `beta` (arch ref §9.3): +grpo.domain_beta.math=0.01 on the command line
    domain_beta: dict[str, float] = field(default_factory=dict)
    kl_kind: str = "k3"  # KL_KINDS
    delta: float | None = None  # V3.2's off-policy sequence mask threshold; None: off
    updates_per_step: int = 1  # optimizer steps per rollout batch (its sequences split in this many mini-batches)
    # held-out evaluation (the test split), at the start, every train.eval_every steps and at the end: greedy,
    # and with eval_samples > 0 also pass@1 over that many samples per problem at `temperature` (dsv4 eval --samples)
    eval_n: int = 50  # test problems per task; 0: no evaluation
    eval_samples: int = 0
    eval_max_new_tokens: int = 256  # dsv4 eval's default; 0: max_new_tokens

    def __post_init__(self) -> None:
        object.__setattr__(self, "tasks", list(self.tasks))
        object.__setattr__(self, "domain_beta", dict(self.domain_beta))
        unknown = [t for t in self.tasks if t not in GRPO_TASKS]
        require(bool(self.tasks) and not unknown, "grpo.tasks", f"unknown {unknown}; choose from {GRPO_TASKS}")
        require(len(set(self.tasks)) == len(self.tasks), "grpo.tasks", f"{self.tasks} names a task twice")
        require(self.mode in GRPO_MODES, "grpo.mode", f"must be one of {GRPO_MODES}, got {self.mode!r}")
        for key in (
            "train_problems",
            "prompts_per_step",
            "max_new_tokens",
            "rollout_batch",
            "reward_workers",
            "updates_per_step",
            "rollout_actors",
            "reward_actors",
        ):
            value = getattr(self, key)
            require(_positive_int(value), f"grpo.{key}", f"must be a positive integer, got {value!r}")
        require(
            math.isfinite(self.rollout_gpus) and self.rollout_gpus >= 0,
            "grpo.rollout_gpus",
            f"must be a number >= 0 (GPUs per rollout actor; 0: CPU), got {self.rollout_gpus!r}",
        )
        require(
            self.rollout_gpus == 0 or self.ray,
            "grpo.rollout_gpus",
            "places Ray rollout actors on GPUs: it needs grpo.ray=true (in one process the rollout uses the trainer's "
            "device)",
        )
        require(
            _positive_int(self.group_size) and self.group_size >= 2,
            "grpo.group_size",
            f"must be an integer >= 2 (a group of one has no baseline to compare against), got {self.group_size!r}",
        )
        require(
            self.temperature > 0 and math.isfinite(self.temperature),
            "grpo.temperature",
            f"must be a finite number > 0 (GRPO learns from sampled completions; 0 is greedy), got {self.temperature}",
        )
        require(0 < self.top_p <= 1, "grpo.top_p", f"must be in (0, 1] (1 = off), got {self.top_p}")
        require(self.top_k >= 0, "grpo.top_k", f"must be >= 0 (0 = off), got {self.top_k}")
        require(self.reward_timeout_s > 0, "grpo.reward_timeout_s", f"must be > 0, got {self.reward_timeout_s}")
        require(
            0 <= self.overlong_buffer <= self.max_new_tokens,
            "grpo.overlong_buffer",
            f"must be in [0, max_new_tokens={self.max_new_tokens}] (0 = off), got {self.overlong_buffer}",
        )
        require(self.overlong_factor >= 0, "grpo.overlong_factor", f"must be >= 0, got {self.overlong_factor}")
        require(self.actor_retries >= 0, "grpo.actor_retries", f"must be >= 0, got {self.actor_retries}")
        require(self.max_refills >= 0, "grpo.max_refills", f"must be >= 0, got {self.max_refills}")
        require(
            self.aggregation in AGGREGATIONS,
            "grpo.aggregation",
            f"must be one of {AGGREGATIONS}, got {self.aggregation!r}",
        )
        require(0 < self.eps_low < 1, "grpo.eps_low", f"must be in (0, 1), got {self.eps_low}")
        require(self.eps_high > 0, "grpo.eps_high", f"must be > 0, got {self.eps_high}")
        require(
            self.dual_clip is None or self.dual_clip > 1,
            "grpo.dual_clip",
            f"must be > 1 (verl uses 3.0) or null (off), got {self.dual_clip}",
        )
        require(self.kl_kind in KL_KINDS, "grpo.kl_kind", f"must be one of {KL_KINDS}, got {self.kl_kind!r}")
        betas = {"grpo.beta": self.beta, **{f"grpo.domain_beta.{k}": v for k, v in self.domain_beta.items()}}
        for key, value in betas.items():
            require(value >= 0 and math.isfinite(value), key, f"must be a finite number >= 0, got {value}")
        stray = [k for k in self.domain_beta if k not in self.tasks]
        require(not stray, "grpo.domain_beta", f"names {stray}, which are not in grpo.tasks={self.tasks}")
        require(self.delta is None or self.delta >= 0, "grpo.delta", f"must be >= 0 or null (off), got {self.delta}")
        require(self.eval_n >= 0, "grpo.eval_n", f"must be >= 0 (0: no evaluation), got {self.eval_n}")
        require(
            isinstance(self.eval_samples, int) and self.eval_samples >= 0,
            "grpo.eval_samples",
            f"must be an integer >= 0 (0: greedy only), got {self.eval_samples!r}",
        )
        require(self.eval_max_new_tokens >= 0, "grpo.eval_max_new_tokens", "must be >= 0 (0: max_new_tokens)")

    def beta_of(self, task: str) -> float:
        return float(self.domain_beta.get(task, self.beta))

    @property
    def uses_reference(self) -> bool:
        return any(self.beta_of(t) > 0 for t in self.tasks)

    @property
    def truncated_sampling(self) -> bool:
        return self.top_k > 0 or self.top_p < 1.0


@dataclass(frozen=True)
class GRPOConfig(TrainingRunConfig):
    grpo: GRPOOptions = field(default_factory=GRPOOptions)

    def __post_init__(self) -> None:
        require(
            self.parallel.cp == 1 and self.parallel.pp == 1,
            "parallel",
            "GRPO runs without context or pipeline parallelism for now: set parallel.cp=1 and parallel.pp=1 "
            "(parallel.dp, ep and tp run under torchrun)",
        )
        require(
            self.train.grad_accum == 1,
            "train.grad_accum",
            "is not used by GRPO (a step's micro-batches are its rollout batch cut in train.micro_batch_size "
            "sequences); leave it at 1",
        )
