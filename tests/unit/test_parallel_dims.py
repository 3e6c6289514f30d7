"""Layouts that cannot work are refused before any process-group work, with the key named."""

import pytest

from dsv4train.config.errors import ConfigError
from dsv4train.parallel.dims import ParallelDims
from dsv4train.testing.toy_configs import tiny_config


def _check(world, seq=32, **layout):
    ParallelDims(**layout).validate(world, tiny_config(), seq, 2)


def test_world_size_and_axes():
    d = ParallelDims(pp=2, dp=2, ep=2)
    assert d.world_size == 8 and d.data_ranks == 4 and d.shape == (2, 2, 1, 2, 1)
    assert ParallelDims().describe() == "one process"


@pytest.mark.parametrize("world,layout,needle", [
    (4, {"dp": 2}, r"parallel\.dp=2 needs pp·dp·cp·ep·tp = 2 processes but 4 were started"),
    (1, {"tp": 2}, r"parallel\.tp=2 needs .* = 2 processes but 1 was started; launch with torchrun --nproc_per_node=2"),
    (3, {"ep": 3}, r"parallel\.ep: = 3 does not divide model\.n_routed_experts \(4\)"),
    (8, {"pp": 8}, r"parallel\.pp: = 8 pipeline stages for 4 layers"),
    (8, {"tp": 8}, r"parallel\.tp: = 8 does not divide model\.n_heads \(4\)"),
    (3, {"cp": 3}, r"parallel\.cp: = 3 does not divide train\.seq_len \(32\)"),
])
def test_bad_layouts_name_the_key(world, layout, needle):
    with pytest.raises(ConfigError, match=needle):
        _check(world, **layout)


def test_good_layouts_pass():
    _check(1)
    _check(4, dp=2, ep=2)
    _check(2, tp=2)



@pytest.mark.parametrize("axis", ["pp", "cp"])
def test_axes_not_built_yet_are_refused(axis):
    with pytest.raises(ConfigError, match=rf"parallel\.{axis}: .* is not built yet"):
        _check(2, **{axis: 2})
