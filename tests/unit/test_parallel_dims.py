"""Layouts that cannot work are refused before any process-group work, with the key named."""

import pytest

from dsv4train.config.errors import ConfigError
from dsv4train.parallel.dims import ParallelDims
from dsv4train.testing.toy_configs import tiny_config


def _check(world, seq=32, micro_batch=2, layers=("swa", "csa", "hca", "csa"), **layout):
    ParallelDims(**layout).validate(world, tiny_config(layers), seq, micro_batch)


def test_world_size_and_axes():
    d = ParallelDims(pp=2, dp=2, ep=2)
    assert d.world_size == 8 and d.data_ranks == 4 and d.shape == (2, 2, 1, 2, 1)
    assert ParallelDims().describe() == "one process"


@pytest.mark.parametrize(
    "world,layout,needle",
    [
        (4, {"dp": 2}, r"parallel\.dp=2 needs pp·dp·cp·ep·tp = 2 processes but 4 were started"),
        (
            1,
            {"tp": 2},
            r"parallel\.tp=2 needs .* = 2 processes but 1 was started; launch with torchrun --nproc_per_node=2",
        ),
        (3, {"ep": 3}, r"parallel\.ep: = 3 does not divide model\.n_routed_experts \(4\)"),
        (8, {"pp": 8}, r"parallel\.pp: = 8 pipeline stages for 4 layers"),
        (8, {"tp": 8}, r"parallel\.tp: = 8 does not divide model\.n_heads \(4\)"),
        (3, {"cp": 3}, r"parallel\.cp: = 3 does not divide train\.seq_len \(32\)"),
        (8, {"cp": 8}, r"parallel\.cp: = 8 leaves 4 tokens per rank .* fewer than model\.window_size \(8\)"),
        (
            2,
            {"cp": 2, "seq": 24},
            r"parallel\.cp: = 2 leaves 12 tokens per rank .* not a multiple of the hca compression "
            r"ratio \(8\)",
        ),
        (
            4,
            {"pp": 4, "pp_schedule": "interleaved_1f1b"},
            r"parallel\.pp: = 4 with parallel\.pp_schedule=interleaved_1f1b needs pp·2 = 8 stages but the model has 4",
        ),
        (4, {"pp": 4, "pp_schedule": "dualpipev"}, r"parallel\.pp: .* needs pp·2 = 8 stages"),
        (
            2,
            {"pp": 2, "pp_schedule": "gpipe"},
            r"parallel\.pp_schedule: must be one of 1f1b, interleaved_1f1b, dualpipev",
        ),
        (
            2,
            {"pp": 2, "pp_microbatches": 3},
            r"parallel\.pp_microbatches: = 3 does not divide train\.micro_batch_size \(2\)",
        ),
        (
            2,
            {"pp": 2, "pp_schedule": "interleaved_1f1b"},
            r"parallel\.pp_microbatches: = 4 \(pp · virtual stages\) does not divide train\.micro_batch_size \(2\)",
        ),
        (2, {"pp": 2, "pp_microbatches": 1}, r"parallel\.pp_microbatches: = 1: the 1f1b schedule needs at least 2"),
        (2, {"pp": 2, "pp_microbatches": -1}, r"parallel\.pp_microbatches: must be >= 0"),
    ],
)
def test_bad_layouts_name_the_key(world, layout, needle):
    with pytest.raises(ConfigError, match=needle):
        _check(world, **layout)


def test_good_layouts_pass():
    _check(1)
    _check(4, dp=2, ep=2)
    _check(2, tp=2)
    _check(2, pp=2)
    _check(8, pp=2, dp=2, ep=2)
    _check(2, cp=2)
    _check(8, cp=2, dp=2, tp=2)
    _check(4, cp=2, pp=2)
    _check(4, micro_batch=4, pp=2, dp=2, pp_schedule="dualpipev")  # with FSDP (pp.py's _split_backward_fsdp)
    _check(2, micro_batch=4, pp=2, pp_schedule="interleaved_1f1b")
    _check(2, micro_batch=8, pp=2, pp_schedule="dualpipev", pp_microbatches=8)


def test_pipeline_counts():
    d = ParallelDims(pp=2, pp_schedule="dualpipev")
    assert (d.virtual_stages, d.n_stages, d.microbatches) == (2, 4, 4)
    assert ParallelDims(pp=3, pp_microbatches=6).microbatches == 6


def test_pipeline_config_keys_are_checked():
    from dsv4train.config.pretrain import ParallelConfig

    # the names come from config.pretrain.PP_SCHEDULES, the one list (ParallelDims is checked by the same code)
    with pytest.raises(
        ConfigError, match=r"parallel\.pp_schedule: must be one of 1f1b, interleaved_1f1b, dualpipev, got 'zbv'"
    ):
        ParallelConfig(pp_schedule="zbv")
    with pytest.raises(ConfigError, match=r"parallel\.pp_microbatches: must be >= 0"):
        ParallelConfig(pp_microbatches=-2)
    d = ParallelDims.from_config(ParallelConfig(pp=2, pp_schedule="interleaved_1f1b", pp_microbatches=4))
    assert (d.pp, d.pp_schedule, d.pp_microbatches) == (2, "interleaved_1f1b", 4)
