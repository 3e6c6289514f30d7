"""The pre-training config: one dataclass per Hydra group (dsv4train/conf/<group>/*.yaml) and `PretrainConfig`
holding them.

Hydra validates unknown keys and types against these schemas; `__post_init__` checks values and cross-field
rules and raises ConfigError naming the key. Below the entry point only these dataclasses are used.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dsv4train.config.data import DataConfig
from dsv4train.config.errors import require, require_positive, require_ranges
from dsv4train.config.model import ModelConfig
from dsv4train.config.optim import OptimConfig

# The allowed range of every numeric TrainConfig field (finite numbers only); tests/unit/test_bad_input.py checks
# that none is missing.
TRAIN_RANGES = {
    "steps": "(0, inf)",
    "micro_batch_size": "(0, inf)",
    "grad_accum": "(0, inf)",
    "seq_len": "(0, inf)",
    "grad_clip": "(0, inf)",
    "mtp_weight": "[0, inf)",
    "mtp_weight_decay": "[0, inf)",
    "balance_loss_weight": "[0, inf)",
    "indexer_loss_weight": "[0, inf)",
    "bias_update_speed": "[0, inf)",
    "dense_indexer_steps": "[0, inf)",
    "eval_every": "(0, inf)",
    "eval_batches": "(0, inf)",
    "log_every": "(0, inf)",
    "checkpoint_every": "[0, inf)",
    "keep_checkpoints": "(0, inf)",
    "max_nan_skips": "[0, inf)",
}


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 300
    micro_batch_size: int = 8
    grad_accum: int = 1
    seq_len: int = 256
    grad_clip: float = 1.0
    mtp_weight: float = 0.3  # until the LR decays, then mtp_weight_decay (arch ref §8.2)
    mtp_weight_decay: float = 0.1
    balance_loss_weight: float = 1e-4
    indexer_loss_weight: float = 1.0
    bias_update_speed: float = 1e-3
    dense_indexer_steps: int = 0  # CSA attends densely (indexer learns by KL) for this many steps, then top-k
    eval_every: int = 100
    eval_batches: int = 8
    log_every: int = 1
    checkpoint_every: int = 100  # 0: only at the end
    keep_checkpoints: int = 2
    nan_policy: str = "skip"  # skip: drop the step's update and go on (up to max_nan_skips in a row); stop
    max_nan_skips: int = 5
    device: str = "auto"  # auto | cpu | cuda
    progress_bar: bool = True
    # A resume from a checkpoint of another optimizer (optim.name, optim.muon_split_wo_a): false refuses it; true
    # loads the weights, data position and RNG and starts the optimizer state fresh (with a warning in the log).
    allow_optimizer_change: bool = False

    def __post_init__(self) -> None:
        require_ranges(self, "train", TRAIN_RANGES)
        require(
            self.nan_policy in ("skip", "stop"), "train.nan_policy", f"must be skip or stop, got {self.nan_policy!r}"
        )
        require(
            self.device in ("auto", "cpu", "cuda"), "train.device", f"must be auto, cpu or cuda, got {self.device!r}"
        )


@dataclass(frozen=True)
class PrecisionConfig:
    """Numerics of the step (docs/precision.md). `fp8`: FP8 (E4M3) GEMMs with block scales for the linears the
    reference quantises; `fp4_experts`: FP4 (E2M1) QAT of the routed expert weights, dequantised to FP8.
    Applied to a built model by `dsv4train.quant.apply_precision(model, cfg.precision)`."""

    name: str = "fp32"  # fp32 | bf16 (autocast) | fp8 | fp8_fp4
    compute_dtype: str = "float32"
    fp8: bool = False
    fp4_experts: bool = False
    backend: str = "emulated"  # emulated (exact fake-quant in torch, any device) | te (transformer-engine, CUDA)
    fp8_block: int = 128  # FP8 activation tile 1xB and weight block BxB (128 in V3/V4; toy models need 32 or 16)
    fp4_block: int = 32  # FP4 scale block 1xb along the input dim (32 in V4); must divide fp8_block

    def __post_init__(self) -> None:
        require(
            self.compute_dtype in ("float32", "bfloat16"),
            "precision.compute_dtype",
            f"must be float32 or bfloat16, got {self.compute_dtype!r}",
        )
        require(
            self.backend in ("emulated", "te"), "precision.backend", f"must be emulated or te, got {self.backend!r}"
        )
        for key in ("fp8_block", "fp4_block"):
            value = getattr(self, key)
            require(
                value > 0 and value & (value - 1) == 0,
                f"precision.{key}",
                f"must be a positive power of two, got {value}",
            )
        require(
            self.fp8_block % self.fp4_block == 0,
            "precision.fp4_block",
            f"({self.fp4_block}) must divide precision.fp8_block ({self.fp8_block}) so FP4 sub-blocks tile the "
            "FP8 blocks",
        )
        require(
            self.fp8 or not self.fp4_experts,
            "precision.fp4_experts",
            "FP4 expert weights are dequantised to FP8 for the GEMM; set precision.fp8=true as well "
            "(precision=fp8_fp4)",
        )
        require(
            self.backend != "te" or self.fp8_block == 128,
            "precision.fp8_block",
            f"= {self.fp8_block}: the te backend uses transformer-engine's fixed 128 blocks; use 128 or "
            "precision.backend=emulated",
        )


# parallel.pp_schedule -> pipeline stages each pp rank holds; the one list of schedule names (parallel/pp.py maps
# each name to its schedule class, parallel/dims.py counts stages with it)
PP_SCHEDULES = {"1f1b": 1, "interleaved_1f1b": 2, "dualpipev": 2}


@dataclass(frozen=True)
class ParallelConfig:
    """world = pp·dp·cp·ep·tp processes (torchrun). dp·ep ranks read different batches; dense weights are
    FSDP-sharded over dp·cp·ep, experts split over ep and sharded over dp·cp. See docs/parallelism.md.
    The one declaration of the layout's fields: `dsv4train.parallel.dims.ParallelDims` extends this class with the
    layout arithmetic and the checks against the world size and the model."""

    dp: int = 1
    tp: int = 1
    pp: int = 1
    ep: int = 1
    cp: int = 1
    dp_replicate: int = 1  # HSDP: the dp ranks form this many full replicas, each FSDP-sharded over dp/dp_replicate
    pp_schedule: str = "1f1b"  # a key of PP_SCHEDULES (2 stages per pp rank for interleaved_1f1b and dualpipev)
    pp_microbatches: int = 0  # chunks each micro-batch is split into for the pipeline; 0: pp · stages per rank
    timeout_s: int = 600  # a collective that does not finish in this time fails the run instead of hanging

    def __post_init__(self) -> None:
        require_positive(self, "parallel", ("dp", "tp", "pp", "ep", "cp", "dp_replicate", "timeout_s"))
        require_positive(self, "parallel", ("pp_microbatches",), allow_zero=True)
        require(
            self.pp_schedule in PP_SCHEDULES,
            "parallel.pp_schedule",
            f"must be one of {', '.join(PP_SCHEDULES)}, got {self.pp_schedule!r}",
        )


@dataclass(frozen=True)
class TrackerConfig:
    name: str = "jsonl"  # jsonl | wandb | tensorboard (jsonl is always written as well)
    project: str = "dsv4train"
    mode: str = "offline"  # wandb: offline unless set to online

    def __post_init__(self) -> None:
        require(
            self.name in ("jsonl", "wandb", "tensorboard"),
            "tracker.name",
            f"must be jsonl, wandb or tensorboard, got {self.name!r}",
        )
        require(
            self.mode in ("offline", "online", "disabled"),
            "tracker.mode",
            f"must be offline, online or disabled, got {self.mode!r}",
        )


@dataclass(frozen=True)
class RunConfig:
    dir: str = "runs/default"  # re-running with the same dir resumes from its newest complete checkpoint


@dataclass(frozen=True)
class TrainingRunConfig:
    """The sections every training command shares (pre-training, SFT): the steps, optimizer, precision, layout,
    tracker, run directory and seed. Each command adds what it trains and on what."""

    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    tracker: TrackerConfig = field(default_factory=TrackerConfig)
    run: RunConfig = field(default_factory=RunConfig)
    seed: int = 0


@dataclass(frozen=True)
class PretrainConfig(TrainingRunConfig):
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def __post_init__(self) -> None:
        require(
            not (self.data.document_mask and self.parallel.cp > 1),
            "data.document_mask",
            "is not supported with context parallelism yet (parallel.cp > 1): set one of them back",
        )
        require(
            self.train.seq_len <= self.model.max_seq_len,
            "train.seq_len",
            f"({self.train.seq_len}) exceeds model.max_seq_len ({self.model.max_seq_len})",
        )
