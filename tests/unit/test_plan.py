"""`dsv4 plan`: a 64-rank layout planned on CPU with the real DeviceMesh on a fake process group; placement is
consistent, the memory estimate scales with the layout, bad layouts name the key, no process group is left."""

import json

import pytest
import torch.distributed as dist

from dsv4train.cli.plan import plan_main, span
from dsv4train.config.errors import ConfigError
from dsv4train.config.hydra_entry import compose_pretrain
from dsv4train.parallel.dims import ParallelDims
from dsv4train.parallel.plan import coords_of, groups_of, make_plan, stage_layers

BASE = ["model=small", "train.seq_len=1024", "train.micro_batch_size=2", "precision=bf16"]
L64 = ["parallel.pp=4", "parallel.dp=2", "parallel.cp=2", "parallel.ep=2", "parallel.tp=2"]  # 64 ranks, all 5 axes


def _plan(*overrides, **kw):
    cfg, _ = compose_pretrain([*BASE, *overrides])
    return make_plan(cfg, **kw)


@pytest.fixture(autouse=True)
def no_process_group_left():
    assert not dist.is_initialized()
    yield
    assert not dist.is_initialized(), "a test left a process group initialised"


def test_64_ranks_placement_is_consistent():
    plan = _plan(*L64, check_ranks=[0, 21, 63])
    d = plan.dims
    assert d.world_size == 64 and sorted(plan.mesh_checked) == [0, 21, 63]
    # every layer on exactly one stage, in order
    layers = [i for s in plan.stages for i in s.layers]
    assert layers == list(range(12))
    assert "embedding" in plan.stages[0].holds and {"head", "MTP"} <= set(plan.stages[-1].holds)
    # rows: every rank exactly once; every expert on exactly one ep rank of each (pp, tp); FSDP groups right
    ranks = sorted(r for row in plan.rows for r in row["ranks"])
    assert ranks == list(range(64))
    for p in range(d.pp):
        for t in range(d.tp):
            rows = [r for r in plan.rows if r["pp"] == p and r["tp"] == t]
            assert sorted(e for r in rows for e in r["experts"]) == list(range(16))
    for row in plan.rows:
        assert len(row["efsdp_group"]) == d.dp * d.cp and len(row["fsdp_group"]) == d.dp * d.cp * d.ep
        assert set(row["efsdp_group"]) <= set(row["fsdp_group"])
        for r in row["ranks"]:
            c = coords_of(d, r)
            assert (c["pp"], c["ep"], c["tp"]) == (row["pp"], row["ep"], row["tp"])
            assert groups_of(d, r)["fsdp"] == row["fsdp_group"]


def test_stage_split_is_even_and_complete():
    for n, pp in [(12, 1), (12, 4), (43, 4), (43, 8), (7, 7), (5, 2)]:
        stages = stage_layers(n, pp)
        sizes = [len(s) for s in stages]
        assert [i for s in stages for i in s] == list(range(n)) and max(sizes) - min(sizes) <= 1
    assert [len(s) for s in stage_layers(43, 4)] == [11, 11, 11, 10]  # the extra layers avoid the head stage first


def test_doubling_dp_halves_the_sharded_state():
    a, b = _plan("parallel.dp=2", "parallel.ep=2"), _plan("parallel.dp=4", "parallel.ep=2")
    for term in ("params (fp32 master)", "grads (fp32)", "optimizer state"):
        assert b.stages[0].terms[term] == pytest.approx(a.stages[0].terms[term] / 2, rel=1e-9), term
    assert b.stages[0].terms["activations"] == a.stages[0].terms["activations"]  # per micro-batch: unchanged
    # ep shards experts only; tp leaves experts alone; pp splits layers
    e = _plan("parallel.dp=2", "parallel.ep=4")
    assert e.stages[0].elements["local"] < a.stages[0].elements["local"]
    p = _plan("parallel.dp=2", "parallel.ep=2", "parallel.pp=2")
    assert p.stages[0].elements["local"] < a.stages[0].elements["local"]
    assert sum(s.elements["experts"] for s in p.stages) == a.stages[0].elements["experts"]

    # HSDP: 2 replicas of dp2 shard like dp2 (twice the state of dp4) and read as many batches as dp4
    h = _plan("parallel.dp=4", "parallel.ep=2", "parallel.dp_replicate=2")
    for term in ("params (fp32 master)", "grads (fp32)", "optimizer state"):
        assert h.stages[0].terms[term] == pytest.approx(a.stages[0].terms[term], rel=1e-9), term
    assert h.dims.data_ranks == b.dims.data_ranks == 8


def test_hsdp_meshes_match_the_plan():
    """The 2-D (replicate, shard) meshes FSDP2 gets under HSDP, built on a fake process group, are the plan's."""
    plan = _plan("parallel.dp=4", "parallel.ep=2", "parallel.tp=2", "parallel.dp_replicate=2", check_ranks=[0, 5, 15])
    g = plan.mesh_checked[5]["groups"]
    assert g["fsdp"] == [1, 3, 5, 7, 9, 11, 13, 15]  # tp innermost: the other tp rank's weights are elsewhere
    assert g["fsdp_shard"] == [1, 3, 5, 7] and g["fsdp_replicate"] == [5, 13]
    assert g["efsdp_shard"] == [1, 5] and g["efsdp_replicate"] == [5, 13]


def test_dualpipev_keeps_the_stage_gathered():
    """DualPipeV with FSDP holds every unit of its stages gathered, with its gradient, for the whole step."""
    one = _plan("parallel.pp=2", "parallel.dp=2").stages[0].terms["FSDP gathered units"]
    vee = _plan("parallel.pp=2", "parallel.dp=2", "parallel.pp_schedule=dualpipev").stages[0].terms
    assert vee["FSDP gathered units"] > 2 * one


def test_optimizer_state_muon_one_buffer_adamw_two():
    muon, adamw = _plan("parallel.dp=2"), _plan("parallel.dp=2", "optim=adamw")
    p = muon.stages[0].terms["params (fp32 master)"]
    assert p < muon.stages[0].terms["optimizer state"] < 1.5 * p  # mostly Muon: ~1 buffer, AdamW embed/head 2
    assert adamw.stages[0].terms["optimizer state"] == pytest.approx(2 * p)


@pytest.mark.parametrize("layout,needle", [
    (["parallel.ep=3"], r"parallel\.ep: = 3 does not divide model\.n_routed_experts \(16\)"),
    (["parallel.pp=13"], r"parallel\.pp: = 13 pipeline stages for 12 layers"),
    (["parallel.tp=16"], r"parallel\.tp: = 16 does not divide model\.n_heads \(8\)"),
    (["parallel.cp=3"], r"parallel\.cp: = 3 does not divide train\.seq_len \(1024\)"),
    (["parallel.dp=4", "parallel.dp_replicate=3"], r"parallel\.dp_replicate: = 3 does not divide parallel\.dp \(4\)"),
])
def test_bad_layout_names_the_key(layout, needle):
    with pytest.raises(ConfigError, match=needle):
        _plan(*layout)


def test_plan_skips_only_the_chunk_split_check():
    cfg, _ = compose_pretrain(BASE)
    dims = ParallelDims(cp=2, pp=2, pp_microbatches=4)
    with pytest.raises(ConfigError, match="parallel.pp_microbatches: = 4 does not divide train.micro_batch_size"):
        dims.validate(4, cfg.model, 1024, 2)
    dims.validate(4, cfg.model, 1024, 2, check_chunks=False)
    with pytest.raises(ConfigError, match="needs pp·dp·cp·ep·tp = 4 processes but 2 were started"):
        dims.validate(2, cfg.model, 1024, 2, check_chunks=False)


def test_cli_text_and_json(capsys):
    assert plan_main([*BASE, *L64, "--gpu-memory-gb", "80"]) == 0
    out = capsys.readouterr().out
    assert "64 ranks (pp4 × dp2 × cp2 × ep2 × tp2)" in out and "peak: stage" in out and "fits" in out
    assert "more rows (--all prints them)" not in out  # 16 rows: shown whole
    assert plan_main([*BASE, *L64, "--json", "--gpu-memory-gb", "0.001"]) == 0
    j = json.loads(capsys.readouterr().out)
    assert j["world_size"] == 64 and j["fits"] is False and len(j["placement"]) == 16
    assert j["peak"]["biggest"] in j["stages"][0]["memory_gb"]
    assert plan_main([*BASE, "parallel.ep=3"]) == 2
    assert "parallel.ep" in capsys.readouterr().err
    assert plan_main([*BASE, "parallel.epp=3"]) == 2


def test_span():
    assert span([0, 1, 2, 3]) == "0-3" and span([0, 4, 8]) == "0,4,8" and span([0, 4, 8, 12, 16]) == "0..16 step 4"
    assert span([]) == "-" and span([7]) == "7"
