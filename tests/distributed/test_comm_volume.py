"""bench/comm_formulas.py's formulas against the collectives one training step really issues (bench/comm_volume.py;
gloo, tiny model).

Exact: FSDP2 all-gather / reduce-scatter bytes equal (1-1/n)·P_padded·4, where P_padded pads each parameter's
dim 0 to a multiple of n (FSDP2's sharding; the unpadded formula is smaller by exactly that padding), with every
unit all-gathered in forward and every block again in backward (blocks reshard after forward; the root keeps
torch's default and stays unsharded into backward, so it is gathered once); under HSDP (dp4 as 2 replicas) n is the
shard group n_s = 2 and each unit's sharded gradient (with dp2×ep2 as 2 replicas, the experts' too) is all-reduced
across the replicas once,
2·(1-1/r)·P_padded/n_s·4, while the loss/metric all-reduce still spans all n_f = 4 data ranks and the grad norm and
Muon's owner-compute only the shard group; EP's row all-to-alls equal the
routing-exact prediction from the counts each rank exchanged, and their count and the counts exchange follow the
layer count; CP's point-to-point sends (the last rank sends nothing forward, the first nothing backward),
compressed-entry all-gathers / reduce-scatters and count all-reduces equal their formulas, and every send has a
receive; under tp2 every TP all-reduce / all-gather, the grad norm and Muon's owner-compute over the tp group,
and under pp2 (each schedule) the stages' point-to-point and the sums over the stages, all equal their formulas.
Margin: the uniform-routing EP formula 2·N·K·(1-1/ep)·D·4 per layer is an expectation, and with 16
tokens per rank the routing deviates by a few percent (hash layers follow the token ids, the router is at init),
so it is held to 15%.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest

from bench import comm_volume as cv
from dsv4train.testing.toy_configs import tiny_config

pytestmark = pytest.mark.dist

SEQ, ROWS = 16, 1


def _measured(data, term: str, ep: int) -> tuple[int, float, float]:
    terms = cv.summarize(data, ep)
    t = terms.get(term, {"calls": 0, "mean": 0.0, "max": 0.0, "min": 0.0})
    return t["calls"], t["min"], t["max"]


@pytest.mark.parametrize(
    "layout",
    [{"dp": 2}, {"ep": 2}, {"cp": 2}, {"dp": 4, "dp_replicate": 2}, {"dp": 2, "ep": 2, "dp_replicate": 2}],
    ids=["dp2", "ep2", "cp2", "hsdp_dp4_r2", "hsdp_dp2xep2_r2"],
)
def test_measured_bytes_match_formulas(layout):
    cfg = tiny_config(n_hash_layers=1)
    data = cv.measure(layout, cfg, SEQ, ROWS, optim="muon", steps=1)
    ep = layout.get("ep", 1)
    form = cv.formulas(cfg, layout, SEQ, ROWS, "muon")
    v = form.pop("_vars")

    r = layout.get("dp_replicate", 1)
    fsdp = [k for k in form if k.startswith("FSDP")]
    assert fsdp
    # HSDP: one all-reduce of each unit's sharded gradient across the replicas; none without replicas
    replicas = [k for k in form if "across replicas" in k]
    assert replicas == (
        [f"FSDP all-reduce across replicas, {u}" for u in ("dense", "experts")[: 1 + (ep > 1)]] if r > 1 else []
    )
    assert sorted(replicas) == sorted(k for k in cv.summarize(data, ep) if "across replicas" in k)
    for name in fsdp:
        calls, lo, hi = _measured(data, name, ep)
        f = form[name]
        assert calls == f["calls"], f"{name}: {calls} calls, formula {f['calls']}"
        assert lo == hi == f["exact"], f"{name}: measured {lo}..{hi} B, padded formula {f['exact']} B"
        pad = f["exact"] - f["bytes"]  # exactly the padding, nothing else
        if "dense" in name:  # padded to a multiple of the shard group n_s (= n_f without HSDP)
            root = name == "FSDP all-gather, dense (backward)"  # the root is not gathered again
            padding = v["P_dense_padded"] - v["P_dense"] - root * (v["P_root_padded"] - v["P_root"])
            per_elem = 2 * (1 - 1 / r) / v["n_s"] if "across replicas" in name else 1 - 1 / v["n_s"]
            assert math.isclose(pad, per_elem * padding * 4)
    assert form["FSDP all-gather, dense (backward)"]["calls"] == v["units"] - 1 == len(cfg.layer_types)
    assert v["n_s"] * r == v["n_f"]

    # every rank-pair message counted, and the metric / grad-norm / Muon terms follow their formulas
    for name in ("loss/metric all-reduce", "grad-norm all-reduce", "Muon RMS all-reduce"):
        calls, lo, hi = _measured(data, name, ep)
        assert calls == form[name]["calls"] and math.isclose(lo, form[name]["exact"]) and lo == hi, name
    calls, lo, hi = _measured(data, "Muon owner-compute all-to-all", ep)
    muon_sent = [s[-1]["muon_last_comm"]["sent"] * 4 for s in data]
    assert calls == 2 and sorted([lo, hi]) == sorted([min(muon_sent), max(muon_sent)])
    # the toy matrices split evenly over 2 ranks (the shard group of each HSDP replica too), so the mean is the
    # formula exactly
    assert math.isclose(sum(muon_sent) / len(muon_sent), form["Muon owner-compute all-to-all"]["bytes"])

    if ep > 1:
        calls, lo, hi = _measured(data, "EP counts all-to-all", ep)
        assert calls == v["L"] and lo == hi == form["EP counts all-to-all"]["exact"]
        for m, p in cv.ep_routing_exact(data):
            assert m == p, f"EP all-to-all {m} B vs routing-exact {p} B"
        for phase in ("forward", "backward"):
            name = f"EP dispatch+combine ({phase})"
            calls, lo, hi = _measured(data, name, ep)
            assert calls == 2 * v["L"]
            mean = cv.summarize(data, ep)[name]["mean"]
            assert abs(mean / form[name]["bytes"] - 1) < 0.15, f"{name}: {mean} B vs uniform {form[name]['bytes']}"
        fwd, bwd = (cv.summarize(data, ep)[f"EP dispatch+combine ({p})"]["mean"] for p in ("forward", "backward"))
        assert fwd == bwd  # backward replays both all-to-alls reversed
    else:
        assert not any(k.startswith("EP") for k in cv.summarize(data, ep))

    cp = layout.get("cp", 1)
    cp_terms = [k for k in form if k.startswith("CP")]
    assert len(cp_terms) == (5 if cp > 1 else 0)
    assert sorted(cp_terms) == sorted(k for k in cv.summarize(data, ep) if k.startswith("CP"))
    for name in cp_terms:
        calls, lo, hi = _measured(data, name, ep)
        f = form[name]
        assert calls == f["calls"], f"{name}: {calls} calls, formula {f['calls']}"
        if "point-to-point" in name:  # one end rank sends nothing, the others all of it
            mean = cv.summarize(data, ep)[name]["mean"]
            assert (lo, hi, mean) == (0, f["exact"] * cp / (cp - 1), f["exact"]), f"{name}: {lo}..{hi}, {mean} B"
        else:
            assert lo == hi == f["exact"], f"{name}: measured {lo}..{hi} B, formula {f['exact']} B"
    p2p_mean = form["CP point-to-point (forward)"]["exact"] if cp > 1 else 0
    assert cv.p2p_totals(data) == (2 * cp * p2p_mean,) * 2  # sent == received over all ranks; none without CP
    unexplained = [k for k in cv.summarize(data, ep) if k.startswith("other")]
    assert not unexplained, unexplained


def test_tensor_parallel_bytes_match_formulas():
    """tp2: the DTensor plans' all-reduces, tp.py's gradient all-reduces and the head's logits gather, the grad
    norm per placement group and Muon's owner-compute over the tp group, all exact, with nothing unexplained."""
    cfg = tiny_config(n_hash_layers=1)
    data = cv.measure({"tp": 2}, cfg, SEQ, ROWS, optim="muon", steps=1)
    form = cv.formulas(cfg, {"tp": 2}, SEQ, ROWS, "muon")
    v = form.pop("_vars")
    measured = cv.summarize(data, 1)
    assert sorted(k for k in form if form[k]["calls"]) == sorted(
        k for k in measured if not k.endswith("(first step)") and measured[k]["calls"]
    )
    assert [k for k in form if k.startswith("TP")] == [
        "TP all-reduce (forward)",
        "TP all-gather (forward)",
        "TP all-reduce (backward)",
    ]
    for name, f in form.items():
        calls, lo, hi = _measured(data, name, 1)
        assert calls == f["calls"], f"{name}: {calls} calls, formula {f['calls']}"
        assert lo == hi and math.isclose(lo, f["exact"]), f"{name}: measured {lo}..{hi} B, formula {f['exact']} B"
    # every TP-split Muon matrix but wo_a (whole output groups per rank) is owner-computed: 5 per block
    assert v["muon_owner_matrices"] == 5 * v["tp"]["L_att"]
    muon_sent = [s[-1]["muon_last_comm"]["sent"] * 4 for s in data]
    assert math.isclose(sum(muon_sent) / len(muon_sent), form["Muon owner-compute all-to-all"]["bytes"])


@pytest.mark.parametrize(
    "layout,rows",
    [
        ({"pp": 2, "pp_microbatches": 2}, 2),
        ({"pp": 2, "pp_schedule": "interleaved_1f1b", "pp_microbatches": 2}, 2),
        ({"pp": 2, "pp_schedule": "dualpipev"}, 4),
    ],
    ids=["1f1b", "interleaved_1f1b", "dualpipev"],
)
def test_pipeline_bytes_match_formulas(layout, rows):
    """pp2, each schedule: the streams (and MTP's next-token embedding) cross each boundary between ranks once per
    chunk each way, X = 1 (1F1B), 3 (interleaved: 4 stages alternate ranks), 2 (DualPipeV: its turn stays on the
    last rank); the loss parts and expert counts are summed over the stages; nothing else moves."""
    cfg = tiny_config(n_hash_layers=1)
    data = cv.measure(layout, cfg, SEQ, rows, optim="muon", steps=2)  # the first step also opens the P2P links
    form = cv.formulas(cfg, layout, SEQ, rows, "muon")
    v = form.pop("_vars")["pp"]
    assert v["X"] == {"1f1b": 1, "interleaved_1f1b": 3, "dualpipev": 2}[v["schedule"]]
    measured = cv.summarize(data, 1)
    assert sorted(form) == sorted(k for k in measured if not k.endswith("(first step)"))
    for name, f in form.items():
        calls, lo, hi = _measured(data, name, 1)
        assert calls == f["calls"], f"{name}: {calls} calls, formula {f['calls']}"
        if name == "PP point-to-point":  # 1F1B: rank 0 sends activations, rank 1 gradients (the same bytes)
            assert math.isclose(measured[name]["mean"], f["exact"]), f"{name}: {measured[name]} vs {f['exact']}"
        else:
            assert lo == hi and math.isclose(lo, f["exact"]), f"{name}: measured {lo}..{hi} B, formula {f['exact']}"
    assert cv.p2p_totals(data)[0] == cv.p2p_totals(data)[1] > 0  # every send has its receive
    for steps in data:  # the first step adds only pipelining's handshake: one 4-byte message per neighbour each way

        def key(r):
            return r["op"], r["in_bytes"]

        extra = Counter(map(key, steps[0]["records"])) - Counter(map(key, steps[1]["records"]))
        assert extra and {k for k in extra if not k[0].startswith("c10d.allgather")} <= {
            ("c10d.send", 4),
            ("c10d.recv_", 4),
        }, extra
