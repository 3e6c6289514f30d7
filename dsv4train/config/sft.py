"""The SFT config (`dsv4 sft`, dsv4train/conf/sft.yaml and the presets dsv4train/conf/sft/*.yaml). The model is not
configured: it is the one `sft.init` names (a dsv4 checkpoint, a run directory or an HF export), with its own
ModelConfig. Training, optimizer, precision, layout, tracker and run sections are the pre-training dataclasses."""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING

from dsv4train.config.errors import require
from dsv4train.config.pretrain import TrainingRunConfig

ON_BAD_RECORD = ("skip", "error")
TOO_LONG = ("drop", "truncate")


@dataclass(frozen=True)
class SFTDataConfig:
    train: list[str] = field(default_factory=lambda: ["data/sft/train.jsonl"])  # jsonl / parquet chat records
    val: list[str] = field(default_factory=list)  # held-out records; empty: `val_fraction` of the train records
    val_fraction: float = 0.05  # a fixed pick by a hash of each record, independent of `seed`
    tokenizer: str = ""  # a tokenizer.json or a folder holding one; empty: the one that came with `sft.init`
    seed: int = 1234  # sample order

    def __post_init__(self) -> None:
        object.__setattr__(self, "train", list(self.train))
        object.__setattr__(self, "val", list(self.val))
        require(bool(self.train), "data.train", "must list at least one jsonl or parquet file of chat records")
        require(0 < self.val_fraction < 1, "data.val_fraction", f"must be in (0, 1), got {self.val_fraction}")
        require(self.seed >= 0, "data.seed", f"must be >= 0, got {self.seed}")


@dataclass(frozen=True)
class SFTOptions:
    init: str = MISSING  # required: a dsv4 folder, a run directory (its newest checkpoint), an HF export
    on_bad_record: str = "skip"  # skip: count and report the first few; error: stop at the first, naming it
    too_long: str = "drop"  # samples longer than train.seq_len: drop, or truncate to seq_len (both counted)
    # 0: the model's own max_seq_len; larger: the fine-tuned model accepts sequences that long from now on (the bound
    # in its config is raised, RoPE and everything else unchanged): SFT on longer rows than pre-training saw
    max_seq_len: int = 0

    def __post_init__(self) -> None:
        require(self.max_seq_len >= 0, "sft.max_seq_len", f"must be >= 0 (0: the model's own), got {self.max_seq_len}")
        require(
            self.on_bad_record in ON_BAD_RECORD,
            "sft.on_bad_record",
            f"must be skip or error, got {self.on_bad_record!r}",
        )
        require(self.too_long in TOO_LONG, "sft.too_long", f"must be drop or truncate, got {self.too_long!r}")


@dataclass(frozen=True)
class SFTConfig(TrainingRunConfig):
    sft: SFTOptions = field(default_factory=SFTOptions)
    data: SFTDataConfig = field(default_factory=SFTDataConfig)

    def __post_init__(self) -> None:
        require(
            self.parallel.cp == 1,
            "parallel.cp",
            "must be 1 for SFT: packed documents are not supported under context parallelism yet",
        )
