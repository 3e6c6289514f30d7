"""The one error type a bad configuration raises; its message names the key."""


class ConfigError(ValueError):
    """A configuration value is invalid. The message starts with the dotted key, e.g. `model.o_groups: ...`."""
