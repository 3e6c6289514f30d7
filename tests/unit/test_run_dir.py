"""The run directory check must hold when every rank of a launch runs it on the same folder at once."""

import multiprocessing as mp

import pytest

from dsv4train.config.errors import ConfigError
from dsv4train.observability.run_dir import open_run_dir


def _open_many(path, times):
    for _ in range(times):
        open_run_dir(path)


def test_ranks_opening_one_run_dir_at_once_do_not_fail(tmp_path):
    run_dir = tmp_path / "run"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_open_many, args=(run_dir, 300)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * 4
    assert list(run_dir.iterdir()) == []  # no probe file is left behind


def test_unwritable_run_dir_is_named(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError, match="run.dir: cannot write to .*file/run"):
        open_run_dir(blocker / "run")
    assert blocker.read_text() == "not a folder"
