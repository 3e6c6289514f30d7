"""Reading a JSON object a user's folder holds (a manifest, a config.json, an index): a damaged file is named with
where it breaks and what to do, instead of a bare JSONDecodeError."""

from __future__ import annotations

import json
from pathlib import Path

from dsv4train.config.errors import ConfigError


def read_json_object(path: Path, fix: str) -> dict:
    """The JSON object in `path`. A file that is not valid JSON (or not UTF-8), or holds something other than an
    object, raises a ConfigError naming the file, ending in `fix` (what the user can do)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        where = f" ({e.msg} at line {e.lineno}, column {e.colno})" if isinstance(e, json.JSONDecodeError) else ""
        raise ConfigError(f"{path} is not valid JSON{where}; {fix}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} holds a JSON {type(data).__name__}, not an object; {fix}")
    return data
