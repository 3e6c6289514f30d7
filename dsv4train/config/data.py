"""Pre-training data: which prepared folder (`dsv4 data prepare`), which of its datasets, blended how."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from dsv4train.config.errors import require


@dataclass(frozen=True)
class DataConfig:
    dir: str = "data/prepared/stdlib"  # made by `dsv4 data prepare`: tokenizer.json, <name>.bin/.idx, manifest.json
    sources: list[str] = field(default_factory=list)  # dataset names in dir to blend; empty = all of them
    weights: list[float] = field(default_factory=list)  # blend weights for `sources`; empty = by token count
    val_fraction: float = 0.02  # share of each dataset's documents held out for validation (a fixed pick)
    seed: int = 1234  # document order (independent of the model seed and of the validation pick)
    document_mask: bool = False  # attention and targets stay inside each document of a packed row (positions restart)

    def __post_init__(self) -> None:
        # tuples and ints from Python callers, normalised once while constructing (the dataclass is frozen)
        object.__setattr__(self, "sources", list(self.sources))
        object.__setattr__(self, "weights", [float(w) for w in self.weights])
        require(bool(self.dir), "data.dir", "must name a folder made by `dsv4 data prepare`")
        require(
            len(set(self.sources)) == len(self.sources), "data.sources", f"names must be unique, got {self.sources}"
        )
        require(
            not self.weights or len(self.weights) == len(self.sources),
            "data.weights",
            f"needs one weight per entry of data.sources ({len(self.sources)}), got {len(self.weights)}",
        )
        require(
            all(w > 0 and math.isfinite(w) for w in self.weights),
            "data.weights",
            f"must all be finite and > 0, got {self.weights}",
        )
        require(0 < self.val_fraction < 1, "data.val_fraction", f"must be in (0, 1), got {self.val_fraction}")
        require(self.seed >= 0, "data.seed", f"must be >= 0, got {self.seed}")
