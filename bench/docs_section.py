"""What the benches that write docs/benchmarks.md share: replacing their section there, and the machine's CPU name."""

from __future__ import annotations

import platform


def replace_section(heading: str, section: str, path: str = "docs/benchmarks.md") -> None:
    """Replace the section that starts with the line `heading` (up to the next '## ' heading) in `path` with
    `section`, or append it at the end when the file has no such heading."""
    with open(path) as f:
        text = f.read()
    start = text.find(heading + "\n")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n"
    else:
        nxt = text.find("\n## ", start + len(heading))
        rest = text[nxt + 1 :] if nxt >= 0 else ""
        text = text[:start] + section.rstrip("\n") + "\n" + ("\n" + rest if rest else "")
    with open(path, "w") as f:
        f.write(text)


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo, or what `platform` says where there is none."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return cpu
