"""The parallel layout: `parallel.{pp,dp,ep,cp,tp}`, checked against the world size and the model before any
process-group work, and the DeviceMesh built from it.

world = pp × dp × cp × ep × tp. Every rank outside `pp` and `tp` holds different data except across `cp`
(which splits one sequence), so:

- data-parallel ranks (different batches): dp × ep
- dense weights are FSDP-sharded over dp × cp × ep (mesh dim "fsdp") and averaged over it
- routed experts are split over `ep` (whole experts per rank) and FSDP-sharded over dp × cp ("efsdp")
- `tp` splits heads and shared-expert channels; `pp` splits layers.

Mesh dims, outermost first: ("pp", "dp", "cp", "ep", "tp"); "fsdp" = dp·cp·ep and "efsdp" = dp·cp are
flattened views, so neighbouring ranks share the fastest links in the order tp, ep, cp, dp, pp.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from dsv4train.config.errors import ConfigError, require
from dsv4train.config.model import ModelConfig

AXES = ("pp", "dp", "cp", "ep", "tp")


@dataclass(frozen=True)
class ParallelDims:
    pp: int = 1
    dp: int = 1
    cp: int = 1
    ep: int = 1
    tp: int = 1

    @classmethod
    def from_config(cls, cfg) -> "ParallelDims":
        return cls(**{a: getattr(cfg, a) for a in AXES})

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

    def describe(self) -> str:
        return " × ".join(f"{a}{getattr(self, a)}" for a in AXES if getattr(self, a) > 1) or "one process"

    def overrides(self) -> str:
        return " ".join(f"parallel.{a}={getattr(self, a)}" for a in AXES if getattr(self, a) > 1) or "parallel.*=1"

    def validate(self, world_size: int, model: ModelConfig, seq_len: int, micro_batch_size: int,
                 allow_unbuilt: bool = False) -> None:
        """Raise ConfigError naming the key for a layout that cannot work; runs before any collective.
        `allow_unbuilt=True` (`dsv4 plan`) keeps every check but the refusal of axes not built yet."""
        for a in AXES:
            require(getattr(self, a) >= 1, f"parallel.{a}", f"must be >= 1, got {getattr(self, a)}")
        require(self.world_size == world_size, "parallel",
                f"{self.overrides()} needs pp·dp·cp·ep·tp = {self.world_size} processes but {world_size} "
                f"{'was' if world_size == 1 else 'were'} started; launch with torchrun --nproc_per_node="
                f"{self.world_size} (or change the layout)")
        require(model.n_routed_experts % self.ep == 0, "parallel.ep",
                f"= {self.ep} does not divide model.n_routed_experts ({model.n_routed_experts})")
        require(self.pp <= model.n_layers, "parallel.pp",
                f"= {self.pp} pipeline stages for {model.n_layers} layers; use at most one stage per layer")
        require(model.n_heads % self.tp == 0, "parallel.tp",
                f"= {self.tp} does not divide model.n_heads ({model.n_heads})")
        require(model.o_groups % self.tp == 0, "parallel.tp",
                f"= {self.tp} does not divide model.o_groups ({model.o_groups}); the grouped output projection "
                "is split by groups")
        require(seq_len % self.cp == 0, "parallel.cp", f"= {self.cp} does not divide train.seq_len ({seq_len})")
        for a, why in (("pp", "pipeline parallelism"), ("cp", "context parallelism")):
            if getattr(self, a) > 1 and not allow_unbuilt:
                raise ConfigError(f"parallel.{a}: {why} is not built yet (issue 4 is in progress); "
                                  f"use dp, ep and tp for now")

    @cached_property
    def mesh(self):
        """The world DeviceMesh with named dims and the flattened "fsdp", "efsdp" and "data" views."""
        from dsv4train.parallel.mesh import build_mesh

        return build_mesh(self)
