"""The one error type a bad configuration raises; its message names the key."""


class ConfigError(ValueError):
    """A configuration value is invalid. The message starts with the dotted key, e.g. `model.o_groups: ...`."""


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
