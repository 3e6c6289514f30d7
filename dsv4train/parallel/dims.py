"""The parallel layout: `parallel.{pp,dp,ep,cp,tp}`, checked against the world size and the model before any
process-group work. A pure value: the DeviceMesh for it is built once by `mesh.build_mesh` (ParallelRuntime holds
it).

world = pp × dp × cp × ep × tp. Every rank outside `pp` and `tp` holds different data except across `cp`
(which splits one sequence), so:

- data-parallel ranks (different batches): dp × ep
- dense weights are FSDP-sharded over dp × cp × ep (mesh dim "fsdp") and averaged over it; with
  `dp_replicate` = r > 1 (HSDP) the dp ranks form r replicas and the weights are sharded over only
  dp/r × cp × ep and all-reduced across the r replicas (mesh.py `fsdp_meshes`)
- routed experts are split over `ep` (whole experts per rank) and FSDP-sharded over dp × cp ("efsdp")
- `tp` splits heads and shared-expert channels; `pp` splits layers.

Mesh dims, outermost first: ("pp", "dp", "cp", "ep", "tp"); "fsdp" = dp·cp·ep and "efsdp" = dp·cp are
flattened views, so neighbouring ranks share the fastest links in the order tp, ep, cp, dp, pp.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from dsv4train.config.errors import require
from dsv4train.config.model import ModelConfig
from dsv4train.config.pretrain import PP_SCHEDULES, ParallelConfig

AXES = ("pp", "dp", "cp", "ep", "tp")


@dataclass(frozen=True)
class ParallelDims(ParallelConfig):
    """`ParallelConfig`'s fields (declared there, once, and checked one by one when built: `ParallelDims(pp=2,
    dp=2)` refuses a bad value as the config does) with what the layout implies: stage and chunk counts, shard
    counts, and `validate` against the world size and the model."""

    @classmethod
    def from_config(cls, cfg: ParallelConfig) -> ParallelDims:
        return cls(**{f.name: getattr(cfg, f.name) for f in fields(ParallelConfig)})

    @property
    def virtual_stages(self) -> int:
        """Pipeline stages per pp rank: 2 for the interleaved and V schedules."""
        return PP_SCHEDULES[self.pp_schedule]

    @property
    def n_stages(self) -> int:
        return self.pp * self.virtual_stages

    @property
    def microbatches(self) -> int:
        """How many chunks the pipeline splits each micro-batch into (along the batch dim)."""
        return self.pp_microbatches or self.n_stages

    @property
    def world_size(self) -> int:
        return self.pp * self.dp * self.cp * self.ep * self.tp

    @property
    def data_ranks(self) -> int:
        """How many different batches one step sees."""
        return self.dp * self.ep

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(getattr(self, a) for a in AXES)

    @property
    def fsdp_shards(self) -> int:
        """Ranks one dense weight is sharded over: dp·cp·ep, or dp/dp_replicate·cp·ep under HSDP."""
        return self.dp // self.dp_replicate * self.cp * self.ep

    @property
    def expert_fsdp_shards(self) -> int:
        """Ranks one EP rank's experts are sharded over: dp·cp, or dp/dp_replicate·cp under HSDP."""
        return self.dp // self.dp_replicate * self.cp

    def describe(self) -> str:
        text = " × ".join(f"{a}{getattr(self, a)}" for a in AXES if getattr(self, a) > 1) or "one process"
        return text + (f", HSDP with {self.dp_replicate} replicas" if self.dp_replicate > 1 else "")

    def overrides(self) -> str:
        text = " ".join(f"parallel.{a}={getattr(self, a)}" for a in AXES if getattr(self, a) > 1) or "parallel.*=1"
        return text + (f" parallel.dp_replicate={self.dp_replicate}" if self.dp_replicate > 1 else "")

    def validate(
        self, world_size: int, model: ModelConfig, seq_len: int, micro_batch_size: int, check_chunks: bool = True
    ) -> None:
        """Raise ConfigError naming the key for a layout that cannot work; runs before any collective.
        `check_chunks=False` (`dsv4 plan`) skips the split of micro-batches into pipeline chunks (plan assumes its
        own in-flight micro-batches)."""
        require(
            self.dp % self.dp_replicate == 0,
            "parallel.dp_replicate",
            f"= {self.dp_replicate} does not divide parallel.dp ({self.dp}); HSDP splits the dp ranks into "
            "that many replicas of equal size",
        )
        require(
            self.world_size == world_size,
            "parallel",
            f"{self.overrides()} needs pp·dp·cp·ep·tp = {self.world_size} processes but {world_size} "
            f"{'was' if world_size == 1 else 'were'} started; launch with torchrun --nproc_per_node="
            f"{self.world_size} (or change the layout)",
        )
        require(
            model.n_routed_experts % self.ep == 0,
            "parallel.ep",
            f"= {self.ep} does not divide model.n_routed_experts ({model.n_routed_experts})",
        )
        require(
            self.pp <= model.n_layers,
            "parallel.pp",
            f"= {self.pp} pipeline stages for {model.n_layers} layers; use at most one stage per layer",
        )
        self._validate_pipeline(model, micro_batch_size, check_chunks)
        require(
            model.n_heads % self.tp == 0, "parallel.tp", f"= {self.tp} does not divide model.n_heads ({model.n_heads})"
        )
        require(
            model.o_groups % self.tp == 0,
            "parallel.tp",
            f"= {self.tp} does not divide model.o_groups ({model.o_groups}); the grouped output projection "
            "is split by groups",
        )
        self._validate_context(model, seq_len)

    def _validate_context(self, model: ModelConfig, seq_len: int) -> None:
        """Each cp rank holds seq_len/cp tokens; it needs a whole window before it from one neighbour (so at least
        window_size tokens per rank) and must pool whole compression blocks (a multiple of every ratio in use)."""
        require(seq_len % self.cp == 0, "parallel.cp", f"= {self.cp} does not divide train.seq_len ({seq_len})")
        if self.cp == 1:
            return
        shard = seq_len // self.cp
        require(
            shard >= model.window_size,
            "parallel.cp",
            f"= {self.cp} leaves {shard} tokens per rank (train.seq_len {seq_len} / cp), fewer than "
            f"model.window_size ({model.window_size}); each rank must hold at least one window",
        )
        for kind in sorted({t for t in model.layer_types if t != "swa"}):
            ratio = model.compress_ratio(kind)
            require(
                shard % ratio == 0,
                "parallel.cp",
                f"= {self.cp} leaves {shard} tokens per rank (train.seq_len {seq_len} / cp), not a multiple of "
                f"the {kind} compression ratio ({ratio}); each rank pools whole blocks",
            )

    def _validate_pipeline(self, model: ModelConfig, micro_batch_size: int, check_chunks: bool) -> None:
        """Stages per layer and (for training; `dsv4 plan` makes its own micro-batch assumptions) how each
        micro-batch is split into pipeline chunks. The schedule name and the counts' signs were checked when built."""
        if self.pp == 1:
            return
        v, m = self.virtual_stages, self.microbatches
        require(
            self.n_stages <= model.n_layers,
            "parallel.pp",
            f"= {self.pp} with parallel.pp_schedule={self.pp_schedule} needs pp·{v} = {self.n_stages} stages "
            f"but the model has {model.n_layers} layers; use at most one stage per layer",
        )
        if not check_chunks:
            return
        require(
            micro_batch_size % m == 0,
            "parallel.pp_microbatches",
            f"= {m}{' (pp · virtual stages)' if not self.pp_microbatches else ''} does not divide "
            f"train.micro_batch_size ({micro_batch_size}); each micro-batch is split into that many pipeline "
            "chunks along the batch",
        )
        least = self.n_stages if self.pp_schedule == "dualpipev" else self.pp
        require(
            m >= least,
            "parallel.pp_microbatches",
            f"= {m}: the {self.pp_schedule} schedule needs at least {least} chunks per micro-batch",
        )
        rounds = max(1, m // self.pp)
        require(
            self.pp_schedule != "interleaved_1f1b" or m % rounds == 0,
            "parallel.pp_microbatches",
            f"= {m}: interleaved_1f1b needs a multiple of its {rounds} rounds (pp_microbatches // pp)",
        )
