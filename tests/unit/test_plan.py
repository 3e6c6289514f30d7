"""`dsv4 plan`: a 64-rank layout planned on CPU with the real DeviceMesh on a fake process group; placement is
consistent, the memory estimate scales with the layout, bad layouts name the key, no process group is left."""

import json

import pytest
import torch
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


@pytest.mark.parametrize(
    "layout,needle",
    [
        (["parallel.ep=3"], r"parallel\.ep: = 3 does not divide model\.n_routed_experts \(16\)"),
        (["parallel.pp=13"], r"parallel\.pp: = 13 pipeline stages for 12 layers"),
        (["parallel.tp=16"], r"parallel\.tp: = 16 does not divide model\.n_heads \(8\)"),
        (["parallel.cp=3"], r"parallel\.cp: = 3 does not divide train\.seq_len \(1024\)"),
        (
            ["parallel.dp=4", "parallel.dp_replicate=3"],
            r"parallel\.dp_replicate: = 3 does not divide parallel\.dp \(4\)",
        ),
    ],
)
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


# ---------------------------------------------------------------------------------------------- activations
def test_meter_counts_storages_once_and_skips_parameters():
    """The meter on a hand-countable graph: y = relu(x @ W^T) · x2 with x also saved through a view; the
    parameter W is skipped; bf16 autocast adds a cast of W, flagged as a weight copy."""
    from torch import nn

    from dsv4train.testing.activation_memory import ActivationMeter

    lin = nn.Linear(8, 16, bias=False)
    x = torch.randn(4, 8, requires_grad=True)
    with ActivationMeter(lin) as meter:
        h = torch.relu(lin(x))  # mm saves x (4·8) and W (a parameter: skipped); relu its output
        y = (h * h.sum()).sum() + (x.t() * 2).sum() * x.view(-1).sum()  # x.t(), x.view(): x's storage again
        y.backward()
    # x: 32 fp32; relu out: 64 fp32; h.sum(): 1 fp32; the product saves h and h.sum() (same storages); (x.t()*2)
    # sum and x.view(-1).sum(): two 1-element results saved by the last product
    assert meter.peak.total_bytes == 4 * (32 + 64 + 1 + 1 + 1)
    assert meter.peak.weight_copy_bytes == 0
    with ActivationMeter(lin) as meter, torch.autocast("cpu", dtype=torch.bfloat16):
        lin(x).sum().backward()
    assert meter.peak.weight_copy_bytes == 2 * 16 * 8 and meter.peak.total_bytes == 2 * 16 * 8 + 2 * 32


# Points that run in about a second each on the 2-core CPU box. Expected values are MEASURED on a real
# Learner step by the meter above, never taken from the formula. Every group of the formula must match to the byte,
# up to the Python numbers autograd saves as 8-byte 0-dim tensors (loss weights, scales) and a few int64 counts,
# which the formula does not model: 64 B per group is above what they add at these sizes (16 B measured) and
# below every modelled term (the smallest, a bool mask per row, is >= 128 B here).
ACTIVATION_POINTS = [
    ("toy", 128, 1, "fp32", "sparse"),
    ("toy", 128, 2, "fp32", "dense"),
    ("toy", 128, 2, "bf16", "sparse"),
    ("toy", 256, 1, "bf16", "dense"),
    ("toy", 128, 1, "fp8", "sparse"),
    ("tiny", 256, 1, "fp32", "sparse"),
]


@pytest.mark.parametrize(
    "flavor,seq,rows,precision,indexer", ACTIVATION_POINTS, ids=["-".join(map(str, p)) for p in ACTIVATION_POINTS]
)
def test_activation_formula_matches_measurement(flavor, seq, rows, precision, indexer):
    from dsv4train.models.flavors import get_flavor
    from dsv4train.parallel.plan import GROUPS, ActivationCase, activation_bytes
    from dsv4train.testing.activation_memory import measure_step

    cfg = get_flavor(flavor, max_seq_len=256)
    got = measure_step(cfg, seq, rows, precision, indexer).groups()
    want = activation_bytes(
        cfg,
        ActivationCase(
            rows=rows, seq=seq, compute_bytes=4 if precision == "fp32" else 2, indexer=indexer, fp8=precision == "fp8"
        ),
    )
    assert set(got) <= set(GROUPS)
    for group in GROUPS:
        assert abs(want[group] - got.get(group, 0)) <= 64, (group, want[group], got.get(group, 0))


def test_plan_activations_are_the_formula_of_the_run():
    """`dsv4 plan`'s activation term is `activation_bytes` of the run's micro-batch at the rank's tp/cp share, in
    the CSA mode that peaks among those the trainer uses: dense during train.dense_indexer_steps, then sparse."""
    from dsv4train.parallel.plan import ActivationCase, activation_bytes

    case = dict(rows=2, seq=512, compute_bytes=2, cp=2, tp=2)
    layout = [*BASE, "parallel.tp=2", "parallel.cp=2", "train.steps=20"]
    by_mode = {}
    for mode in ("dense", "sparse"):
        groups = activation_bytes(compose_pretrain(BASE)[0].model, ActivationCase(indexer=mode, **case))
        copies = groups.pop("weight copies")
        by_mode[mode] = (sum(groups.values()), copies)
    for steps, modes in ((0, ["sparse"]), (10, ["dense", "sparse"]), (20, ["dense"])):
        st = make_plan(compose_pretrain([*layout, f"train.dense_indexer_steps={steps}"])[0]).stages[0]
        mode = max(modes, key=lambda m: sum(by_mode[m]))
        assert st.activations.indexer == mode
        assert st.terms["activations"] == pytest.approx(by_mode[mode][0], rel=1e-12)
        assert st.terms["weight copies (bf16/FP8)"] == pytest.approx(by_mode[mode][1], rel=1e-12)
    assert by_mode["dense"][0] != by_mode["sparse"][0]


def test_1f1b_keeps_pp_minus_rank_chunks():
    """1F1B (Narayanan et al. 2021): pp rank r runs min(chunks, pp - r) warm-up forwards before its first
    backward, so that many chunks are alive at its peak; the plan's stages hold that many chunk activations."""
    from dsv4train.parallel.plan import peak_in_flight, schedule_actions

    dims = ParallelDims(pp=4, pp_microbatches=8)
    for r in range(4):
        actions = schedule_actions(dims, r)
        assert sorted(a for a in actions if a[1] == "F") == [(r, "F", i) for i in range(8)]
        assert peak_in_flight(actions, {r: 1.0}) == (4 - r, 4 - r)
    plan = _plan("parallel.pp=4", "parallel.dp=2", "train.micro_batch_size=4")  # 4 chunks of 1 row
    assert [s.in_flight for s in plan.stages] == [4, 3, 2, 1]
    one = _plan("parallel.dp=2", "train.micro_batch_size=4").stages[0].activations
    assert plan.stages[0].activations.rows == 1 and one.rows == 4
    # stage 0 holds 4 one-row chunks of its 3 layers; a block's activations are linear in the rows
    per_layer = one.groups["layers.mhc"] / 12
    assert plan.stages[0].activations.groups["layers.mhc"] == pytest.approx(per_layer * 3, rel=1e-9)


@pytest.mark.parametrize("schedule", ["interleaved_1f1b", "dualpipev"])
def test_two_stage_schedules_free_every_chunk(schedule):
    """torch's own action lists for the 2-stage-per-rank schedules: every chunk of each of the rank's stages is run
    forward once and freed once (by B, or W after I), so nothing is left alive at the end."""
    from dsv4train.parallel.plan import schedule_actions

    dims = ParallelDims(pp=2, pp_schedule=schedule, pp_microbatches=4)
    for r in range(2):
        actions = schedule_actions(dims, r)
        stages = {a[0] for a in actions}
        assert len(stages) == 2
        for kind in ("F",):
            assert sorted((s, c) for s, k, c in actions if k == kind) == [
                (s, c) for s in sorted(stages) for c in range(4)
            ]
        freed = sorted((s, c) for s, k, c in actions if k in "BW")
        assert freed == [(s, c) for s in sorted(stages) for c in range(4)]
