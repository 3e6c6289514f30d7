"""How this process's host (CPU) memory allocator hands memory back: kept for reuse, so that a training step's large
tensors do not page-fault their memory in again on every step.

glibc's malloc serves a request above its mmap threshold (at most 32 MiB) with a fresh `mmap` and gives the pages
back to the kernel on free. A CPU training step allocates tensors far larger than that every step (the logits and
their log-softmax: rows × positions × vocabulary floats, 100+ MB at toy scale), so each step faults in every page
of them again (one fault and a zeroed page per 4 KiB). Measured on the 2-core CPU machine (docs/benchmarks.md,
"Host allocator"): that is a fifth to a third of a toy GRPO-sized forward and backward.

`keep_freed_memory()` tells glibc to serve every request from its heap (`M_MMAP_MAX` 0) and never to trim the heap
(`M_TRIM_THRESHOLD` at its maximum), so a freed tensor's pages stay mapped and the next step reuses them. The cost:
the process keeps its high-water mark of host memory mapped until it exits (the peak itself does not grow; PyTorch's
CUDA caching allocator keeps device memory the same way). `DSV4_HOST_MALLOC=system` leaves glibc's defaults.
Where the C library is not glibc (macOS, musl) nothing is changed.

The `dsv4` commands call it once at start (cli/main.py); code that uses dsv4train as a library can call it too."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

from dsv4train.config.errors import ConfigError

ENV = "DSV4_HOST_MALLOC"  # "keep" (the default) or "system"
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameter numbers (malloc.h)
_MAX_TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int


def keep_freed_memory() -> bool:
    """Keep freed host memory mapped for reuse (module docstring). True when the allocator was changed; False with
    `DSV4_HOST_MALLOC=system` or without glibc. An unknown value of the variable is a ConfigError naming the two
    choices."""
    choice = os.environ.get(ENV, "keep")
    if choice not in ("keep", "system"):
        raise ConfigError(f"{ENV}={choice!r}: use 'keep' (reuse freed host memory, the default) or 'system'")
    if choice == "system" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    # mallopt returns 1 on success; both calls are plain settings and cannot fail on glibc for these values
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _MAX_TRIM_THRESHOLD))
