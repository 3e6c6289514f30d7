"""utils/host_memory.py: with `keep_freed_memory()` a large tensor allocated again after a free reuses mapped pages
instead of faulting fresh ones in; with glibc's defaults (or DSV4_HOST_MALLOC=system) it faults every page.

Expected counts come from the page size, not from our code: a 256 MiB buffer is 65,536 pages of 4 KiB (128 of
2 MiB where transparent huge pages are always on), and glibc maps any request above its 32 MiB mmap-threshold
ceiling afresh, so without the setting the refill faults at least 128 times."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from dsv4train.config.errors import ConfigError
from dsv4train.utils.host_memory import ENV, keep_freed_memory

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's")

MIB = 2**20
PROBE = f"""
import json, resource, sys
import torch
from dsv4train.utils.host_memory import keep_freed_memory
changed = keep_freed_memory() if sys.argv[1] == "call" else False
torch.empty({256 * MIB // 4}).fill_(1.0)  # allocated, touched and freed: what a training step does with its logits
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
x = torch.empty({256 * MIB // 4}).fill_(2.0)  # the next step's tensor of the same size
after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
print(json.dumps({{"changed": changed, "faults": after - before}}))
"""


def _probe(call: bool, env_value: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != ENV}
    if env_value is not None:
        env[ENV] = env_value
    out = subprocess.run(
        [sys.executable, "-c", PROBE, "call" if call else "skip"], capture_output=True, text=True, env=env, check=True
    )
    import json

    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_freed_large_tensor_is_reused_without_page_faults():
    default = _probe(call=False)
    kept = _probe(call=True)
    assert kept["changed"] is True
    assert default["faults"] >= 128, default  # every page of a fresh mmap faults (module docstring)
    # Reused pages fault no more: the few left are Python's and torch's own small allocations in between.
    # A tenth of the smallest possible default count leaves room for those and still fails without the setting.
    assert kept["faults"] <= max(12, default["faults"] // 10), (kept, default)


def test_system_leaves_glibc_defaults():
    system = _probe(call=True, env_value="system")
    assert system["changed"] is False
    assert system["faults"] >= 128, system


def test_an_unknown_choice_names_both(monkeypatch):
    monkeypatch.setenv(ENV, "jemalloc")
    with pytest.raises(ConfigError, match=r"DSV4_HOST_MALLOC='jemalloc': use 'keep' .* or 'system'"):
        keep_freed_memory()


def test_the_cli_refuses_an_unknown_choice_before_any_work():
    env = {**os.environ, ENV: "jemalloc"}
    done = subprocess.run(
        [sys.executable, "-m", "dsv4train.cli", "plan", "--help"], capture_output=True, text=True, env=env
    )
    assert done.returncode == 2
    assert "DSV4_HOST_MALLOC='jemalloc'" in done.stderr
