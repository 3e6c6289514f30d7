"""The multi-process test harness (dsv4train/testing/distributed.py): a rank killed by a signal once is run again
with a warning; a crash that repeats, or a failing assertion, still fails the test."""

from __future__ import annotations

import os
import signal

import pytest
import torch.multiprocessing as mp

from dsv4train.testing.distributed import run_distributed_test


def _crash_first_run(rank: int, world_size: int, marker: str) -> None:
    if rank == 0 and not os.path.exists(marker):
        open(marker, "w").close()
        os.kill(os.getpid(), signal.SIGSEGV)


def _always_crash(rank: int, world_size: int) -> None:
    if rank == 0:
        os.kill(os.getpid(), signal.SIGSEGV)


def _fail(rank: int, world_size: int) -> None:
    assert rank == 1, "rank 0 fails"


def test_a_rank_that_crashes_once_is_run_again_with_a_warning(tmp_path):
    marker = tmp_path / "crashed"
    with pytest.warns(UserWarning, match="SIGSEGV"):
        run_distributed_test(_crash_first_run, world_size=2, args=(str(marker),))
    assert marker.exists()


def test_a_crash_that_repeats_fails():
    with pytest.warns(UserWarning, match="SIGSEGV"), pytest.raises(mp.ProcessExitedException, match="SIGSEGV"):
        run_distributed_test(_always_crash, world_size=2, attempts=2)


def test_a_failing_assertion_fails_the_test():
    with pytest.raises(AssertionError, match="rank 0 fails"):
        run_distributed_test(_fail, world_size=2)
