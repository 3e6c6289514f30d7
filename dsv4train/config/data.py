"""Pre-training data: which prepared folder (`dsv4 data prepare`), which of its datasets, blended how."""

from __future__ import annotations

from dataclasses import dataclass, field

from dsv4train.config.errors import ConfigError


@dataclass
class DataConfig:
    dir: str = "data/prepared/stdlib"  # made by `dsv4 data prepare`: tokenizer.json, <name>.bin/.idx, manifest.json
    sources: list[str] = field(default_factory=list)  # dataset names in dir to blend; empty = all of them
    weights: list[float] = field(default_factory=list)  # blend weights for `sources`; empty = by token count
    val_fraction: float = 0.05  # share of each dataset's documents held out (fixed random pick) for validation
    seed: int = 1234  # document order (independent of the model seed)

    def __post_init__(self) -> None:
        def need(ok: bool, key: str, msg: str) -> None:
            if not ok:
                raise ConfigError(f"data.{key}: {msg}")

        need(bool(self.dir), "dir", "must name a prepared data folder")
        need(0 < self.val_fraction < 1, "val_fraction", f"must be in (0, 1), got {self.val_fraction}")
        need(not self.weights or len(self.weights) == len(self.sources), "weights",
             f"needs one weight per entry of data.sources ({len(self.sources)}), got {len(self.weights)}")
        need(all(w > 0 for w in self.weights), "weights", f"must all be > 0, got {list(self.weights)}")
