"""An offline corpus: the Python standard library's own source files, one document per file."""

from __future__ import annotations

import sysconfig
from pathlib import Path


def stdlib_documents(max_docs: int | None = None, max_bytes: int = 200_000) -> list[str]:
    """Source files of the stdlib in sorted path order (deterministic); test packages and huge files skipped."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        if any(p in ("test", "tests", "idlelib", "site-packages", "lib2to3") for p in rel):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if 0 < len(text) <= max_bytes:
            docs.append(text)
        if max_docs is not None and len(docs) >= max_docs:
            break
    if not docs:
        raise FileNotFoundError(f"no Python source files found under {root}")
    return docs
