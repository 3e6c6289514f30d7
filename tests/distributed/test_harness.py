"""The multi-process test harness itself: a failing rank's traceback reaches the test, and a rendezvous port
taken by someone else between picking and binding it costs a retry, not a failed test."""

import socket

import pytest
import torch
import torch.distributed as dist

from dsv4train.testing import distributed
from dsv4train.testing.distributed import run_distributed_test

pytestmark = pytest.mark.dist


def _sum_ranks(rank, world_size):
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    assert t.item() == sum(range(world_size))


def _fail_on_rank_1(rank, world_size):
    assert rank != 1, "rank 1 says no"


def test_a_taken_port_is_retried(monkeypatch):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    ports = [taken.getsockname()[1]]  # the first pick is already in use; then free ones
    real = distributed.free_port
    monkeypatch.setattr(distributed, "free_port", lambda: ports.pop() if ports else real())
    try:
        run_distributed_test(_sum_ranks, world_size=2)
    finally:
        taken.close()
    assert not ports


def test_a_failing_rank_is_reported_once_and_not_retried(monkeypatch):
    calls = []
    real = distributed.free_port
    monkeypatch.setattr(distributed, "free_port", lambda: calls.append(1) or real())
    with pytest.raises(AssertionError, match="rank 1 says no"):
        run_distributed_test(_fail_on_rank_1, world_size=2)
    assert len(calls) == 1
