"""The one error type a bad configuration raises; its message names the key."""

import math


class ConfigError(ValueError):
    """A configuration value (or the data or checkpoint it names) is invalid. The message starts with the dotted key,
    e.g. `model.o_groups: ...`, or names the file and what is wrong with it."""


def require(ok: bool, key: str, msg: str) -> None:
    """Raise ConfigError(`key: msg`) unless ok."""
    if not ok:
        raise ConfigError(f"{key}: {msg}")


def require_positive(cfg, section: str, keys: tuple[str, ...], allow_zero: bool = False) -> None:
    """Every `cfg.<key>` must be > 0 (>= 0 with allow_zero); the error names `section.key`."""
    for key in keys:
        value = getattr(cfg, key)
        ok = value >= 0 if allow_zero else value > 0
        require(ok, f"{section}.{key}", f"must be {'>=' if allow_zero else '>'} 0, got {value}")


def _bounds(interval: str) -> tuple[float, float, bool, bool]:
    """ "(0, 1]" -> (0.0, 1.0, low open, high closed); "inf" is allowed as a bound."""
    low, high = (float(x) for x in interval[1:-1].split(","))
    return low, high, interval[0] == "(", interval[-1] == ")"


def in_interval(value, interval: str) -> bool:
    """Whether `value` is a finite number in `interval`, written as in maths: "(0, 1]", "[0, inf)", "(1, inf)"."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    low, high, low_open, high_open = _bounds(interval)
    return (value > low if low_open else value >= low) and (value < high if high_open else value <= high)


def describe_interval(interval: str) -> str:
    """ "(0, inf)" -> "> 0", "[0, inf)" -> ">= 0", "(0, 1]" -> "in (0, 1]"."""
    low, high, low_open, _ = _bounds(interval)
    if math.isinf(high):
        return f"{'>' if low_open else '>='} {low:g}"
    return f"in {interval}"


def require_ranges(cfg, section: str, ranges: dict[str, str]) -> None:
    """Every `cfg.<key>` must be a finite number in its interval (see `in_interval`); the error names
    `section.key`, the allowed range and the value, e.g. `model.init_std: must be in (0, 1], got -1`."""
    for key, interval in ranges.items():
        value = getattr(cfg, key)
        require(
            in_interval(value, interval),
            f"{section}.{key}",
            f"must be {describe_interval(interval)}"
            f"{' (a finite number)' if isinstance(value, float) and not math.isfinite(value) else ''}, "
            f"got {value!r}",
        )
