"""The formulas of bench/comm_volume.py: wire bytes per rank per training step for each term of a layout, derived
from the code (dsv4train/parallel/*, dsv4train/train/learner.py), and the text that explains them in
docs/benchmarks.md. bench/comm_volume.py measures the same terms and tests/distributed/test_comm_volume.py holds every
exact one to its measurement.

`formulas(cfg, layout, seq, rows, optim)` covers FSDP/HSDP, EP and CP and their combinations, and TP and PP alone.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict

import torch

from dsv4train.config.model import ModelConfig
from dsv4train.config.optim import OptimConfig
from dsv4train.models.flavors import get_flavor
from dsv4train.models.model import DSV4Model
from dsv4train.optim.groups import describe_groups
from dsv4train.parallel.dims import ParallelDims
from dsv4train.parallel.pp import rank_stages

_EXPERT = re.compile(r"(^|\.)experts\.w[123]$")


def _padded(shape, n: int) -> int:
    """Elements FSDP2 moves for one parameter sharded on dim 0 over n ranks: dim 0 padded to a multiple of n."""
    if len(shape) == 0:
        return n
    d0, rest = shape[0], math.prod(shape[1:])
    return -(-d0 // n) * n * rest


def _blocks(d0: int, n: int) -> list[tuple[int, int]]:
    """(offset, rows) of each rank's FSDP2 block of dim 0 (torch.chunk sizes, empty blocks at the end)."""
    chunk = -(-d0 // n)
    return [(min(r * chunk, d0), max(0, min(chunk, d0 - r * chunk))) for r in range(n)]


def _whole_units(d0: int, unit: int, n: int) -> bool:
    """Whether every rank's dim-0 block of a [d0, ...] matrix split over n ranks is a run of whole `unit`-row
    matrices (then DistributedMuon orthogonalises it locally)."""
    return all(rows == 0 or (off % unit == 0 and rows % unit == 0) for off, rows in _blocks(d0, n))


def param_split(cfg: ModelConfig, ep: int) -> dict:
    """Shapes of the FSDP units: "root", "blocks" (one list per layer) and, with EP, "experts" (one local stack
    per MoE layer incl. MTP, shapes as each rank holds them before efsdp)."""
    with torch.device("meta"):
        model = DSV4Model(cfg)
    units = {"root": [], "blocks": [[] for _ in cfg.layer_types], "experts": defaultdict(list), "names": {}}
    for name, p in model.named_parameters():
        shape = tuple(p.shape)
        if ep > 1 and _EXPERT.search(name):
            shape = (shape[0] // ep,) + shape[1:]
            units["experts"][name.rsplit(".", 1)[0]].append(shape)
        elif name.startswith("layers."):
            units["blocks"][int(name.split(".")[1])].append(shape)
        else:
            units["root"].append(shape)
        units["names"][name] = (shape, "experts" if ep > 1 and _EXPERT.search(name) else "dense")
    units["experts"] = list(units["experts"].values())
    units["model"] = model
    return units


def muon_owner_elements(model, cfg: ModelConfig, optim: OptimConfig, n: int, ep: int) -> tuple[int, int]:
    """(elements, matrices) of Muon parameters that DistributedMuon owner-computes when FSDP2 shards them on
    dim 0 over n ranks: every 2-D matrix whose blocks are not runs of whole matrices (`wo_a` blocks holding whole
    output groups and 3-D expert stacks, sharded on the expert dim, are local). With EP the expert stacks are
    local too."""
    if n == 1 or optim.name != "muon":
        return 0, 0
    total = mats = 0
    for name, label in describe_groups(model, optim).items():
        if not label.startswith("muon"):
            continue
        p = dict(model.named_parameters())[name]
        if p.ndim == 3:
            continue  # expert stacks: whole experts per FSDP / EP block
        unit = p.shape[0] // cfg.o_groups if label == "muon:row_blocks" else p.shape[0]
        if _whole_units(p.shape[0], unit, n):
            continue
        total += p.numel()
        mats += 1
    return total, mats


def formulas(cfg: ModelConfig, layout: dict, seq: int, rows: int, optim: str = "muon") -> dict:
    """term -> {"phase", "calls", "formula", "bytes", "exact": bytes incl. FSDP2 padding or None, "vars"}.
    Bytes are wire bytes sent per rank per step (see the module docstring), fp32 parameters and activations."""
    d = ParallelDims(**layout)
    nf, ne, ep, W = d.dp * d.cp * d.ep, d.dp * d.cp, d.ep, d.world_size
    # HSDP (dp_replicate = r > 1): FSDP2 shards over n_s = n_f/r (n_es = n_e/r) ranks of a replica and all-reduces
    # the sharded gradients across the r replicas; the data (loss, metrics) is still averaged over all n_f ranks
    r, ns, nes = d.dp_replicate, d.fsdp_shards, d.expert_fsdp_shards
    sn, se = ("n_f", "n_e") if r == 1 else ("n_s", "n_es")  # symbol of the shard count in the formula text
    units = param_split(cfg, ep)
    B = 4
    L = len(cfg.layer_types) + cfg.n_mtp_layers  # MoE layers: every block is MoE, MTP too
    E, K, D, N = cfg.n_routed_experts, cfg.n_activated_experts, cfg.dim, rows * seq // d.cp

    def numel(shapes):
        return sum(math.prod(s) for s in shapes)

    def padded(unit_list, n):
        return sum(_padded(s, n) for u in unit_list for s in u)

    dense_units = [units["root"]] + units["blocks"]
    P_dense, P_root = sum(numel(u) for u in dense_units), numel(units["root"])
    P_dense_pad, P_root_pad = padded(dense_units, ns), padded([units["root"]], ns)
    P_exp_local = sum(numel(u) for u in units["experts"])
    P_exp_pad = padded(units["experts"], nes)
    out = {}

    def term(name, phase, calls, formula, value, exact=None):
        out[name] = {"phase": phase, "calls": calls, "formula": formula, "bytes": value, "exact": exact}

    fs = 1 - 1 / ns
    if d.tp > 1:  # tensor parallelism alone: no FSDP (a 1-rank mesh issues nothing), TP and its Muon terms
        return _tp_formulas(cfg, d, seq, rows, optim, units, term, out)
    if d.pp > 1:  # pipeline parallelism alone: the stages' point-to-point and the sums over the stages
        return _pp_formulas(cfg, d, seq, rows, optim, term, out)
    term(
        "FSDP all-gather, dense (forward)",
        "forward",
        len(dense_units),
        f"(1-1/{sn})·P_dense·4",
        fs * P_dense * B,
        (ns - 1) * P_dense_pad // ns * B,
    )
    term(
        "FSDP all-gather, dense (backward)",
        "backward",
        len(units["blocks"]),
        f"(1-1/{sn})·(P_dense-P_root)·4",
        fs * (P_dense - P_root) * B,
        (ns - 1) * (P_dense_pad - P_root_pad) // ns * B,
    )
    term(
        "FSDP reduce-scatter, dense",
        "backward",
        len(dense_units),
        f"(1-1/{sn})·P_dense·4",
        fs * P_dense * B,
        (ns - 1) * P_dense_pad // ns * B,
    )
    if r > 1:  # each unit's sharded gradient (padded, P_padded/n_s elements) all-reduced over the replicate group
        term(
            "FSDP all-reduce across replicas, dense",
            "backward",
            len(dense_units),
            "2·(1-1/r)·P_dense·4/n_s",
            2 * (1 - 1 / r) * P_dense * B / ns,
            2 * (r - 1) * (P_dense_pad // ns * B) / r,
        )
    if ep > 1:
        fe = 1 - 1 / nes
        ce = len(units["experts"]) if nes > 1 else 0  # FSDP2 issues nothing on a 1-rank mesh
        for phase in ("forward", "backward"):
            term(
                f"FSDP all-gather, experts ({phase})",
                phase,
                ce,
                f"(1-1/{se})·(P_exp/ep)·4",
                fe * P_exp_local * B,
                (nes - 1) * P_exp_pad // nes * B,
            )
        term(
            "FSDP reduce-scatter, experts",
            "backward",
            ce,
            f"(1-1/{se})·(P_exp/ep)·4",
            fe * P_exp_local * B,
            (nes - 1) * P_exp_pad // nes * B,
        )
        if r > 1:  # measured by tests/distributed/test_comm_volume.py (dp2×ep2 as 2 replicas), not among LAYOUTS
            term(
                "FSDP all-reduce across replicas, experts",
                "backward",
                len(units["experts"]),
                "2·(1-1/r)·(P_exp/ep)·4/n_es",
                2 * (1 - 1 / r) * P_exp_local * B / nes,
                2 * (r - 1) * (P_exp_pad // nes * B) / r,
            )
        term(
            "EP counts all-to-all",
            "forward",
            L,
            "L·(ep-1)·(E/ep)·8",
            L * (ep - 1) * (E // ep) * 8,
            L * (ep - 1) * (E // ep) * 8,
        )
        a2a = L * 2 * N * K * (1 - 1 / ep) * D * B
        term("EP dispatch+combine (forward)", "forward", 2 * L, "L·2·N·K·(1-1/ep)·D·4 (uniform routing)", a2a)
        term("EP dispatch+combine (backward)", "backward", 2 * L, "same as forward", a2a)
    cp_list, cp_vars = cp_terms(cfg, d.cp, seq, rows) if d.cp > 1 else ([], {})
    for t in cp_list:
        term(*t)
    _metric_term(term, cfg, nf)
    # squared norms are summed over the gradients' sharded mesh dims only: the shard group under HSDP
    gn = 2 * fs * 4 + ((2 * (1 - 1 / nes) * 4 + 2 * (1 - 1 / ep) * 4) if ep > 1 else 0)
    term(
        "grad-norm all-reduce",
        "grad_norm",
        1 + (2 if ep > 1 else 0),
        f"2·(1-1/{sn})·4" + (f" + 2·(1-1/{se})·4 + 2·(1-1/ep)·4" if ep > 1 else ""),
        gn,
        gn,
    )
    if optim == "muon":  # owner-compute within each parameter's shard group (its sharded mesh dims)
        P_own, mats = muon_owner_elements(units["model"], cfg, OptimConfig(name=optim), ns, ep)
        term(
            "Muon owner-compute all-to-all",
            "optimizer",
            2 if P_own else 0,
            f"2·(1-1/{sn})·P_own·4/{sn}",
            2 * fs * P_own * B / ns,
        )
        _muon_rms_term(term, W)
    else:
        P_own, mats = 0, 0
    pads = defaultdict(int)  # padding elements by parameter kind (name without the layer index)
    for name, (shape, where) in units["names"].items():
        extra = _padded(shape, nes if where == "experts" else ns) - math.prod(shape)
        if extra:
            pads[re.sub(r"^(layers|mtp)\.\d+\.", r"\1.*.", name)] += extra
    out["_vars"] = dict(
        padding=dict(sorted(pads.items(), key=lambda kv: -kv[1])),
        n_f=nf,
        n_e=ne,
        ep=ep,
        W=W,
        r=r,
        n_s=ns,
        n_es=nes,
        P_dense=P_dense,
        P_dense_padded=P_dense_pad,
        P_root=P_root,
        P_root_padded=P_root_pad,
        P_exp=P_exp_local * ep,
        P_exp_local_padded=P_exp_pad,
        L=L,
        E=E,
        K=K,
        D=D,
        N=N,
        P_own=P_own,
        muon_owner_matrices=mats,
        units=len(dense_units),
        cp=cp_vars,
    )
    return out


# The Muon matrices that tensor parallelism splits (parallel/tp.py), by the dim their DTensor is sharded on: a
# dim-1 split never holds whole rows; a dim-0 split is local only when each rank's rows are whole output groups
# (`wo_a`, "muon:row_blocks"), like an FSDP block.
_TP_SPLIT = {
    "attn.wq_b.weight": 0,
    "attn.wo_a.weight": 0,
    "attn.wo_b.weight": 1,
    "ffn.shared_experts.w1.weight": 0,
    "ffn.shared_experts.w3.weight": 0,
    "ffn.shared_experts.w2.weight": 1,
}


def _metric_term(term, cfg: ModelConfig, data_ranks: int) -> None:
    """The Learner's all-reduces over the data ranks (`sum_over_data`), in every layout: the step's target count N
    before the forward (1 float64), then the sums [loss, lm_loss, mtp_loss, balance, indexer] (5 float64) and the
    [L, E] int64 expert counts."""
    metric = 2 * (1 - 1 / data_ranks) * (6 * 8 + (len(cfg.layer_types) + cfg.n_mtp_layers) * cfg.n_routed_experts * 8)
    term("loss/metric all-reduce", "metrics", 3, "2·(1-1/n_f)·(6·8 + L·E·8)", metric, metric)


def _muon_rms_term(term, world: int) -> None:
    """DistributedMuon's all-reduce of the two numbers behind its global update RMS (float64) over the world."""
    rms = 2 * (1 - 1 / world) * 16
    term("Muon RMS all-reduce", "optimizer", 1, "2·(1-1/W)·16", rms, rms)


def _tp_split_dim(name: str) -> int | None:
    return next((dim for suffix, dim in _TP_SPLIT.items() if name.endswith(suffix)), None)


def tp_muon_owner_elements(model, cfg: ModelConfig, optim: OptimConfig, tp: int) -> tuple[int, int]:
    """(elements, matrices) of the Muon matrices that DistributedMuon owner-computes over the tp group."""
    total = mats = 0
    params = dict(model.named_parameters())
    for name, label in describe_groups(model, optim).items():
        dim = _tp_split_dim(name)
        if not label.startswith("muon") or dim is None:
            continue
        p = params[name]
        unit = p.shape[0] // cfg.o_groups if label == "muon:row_blocks" else p.shape[0]
        if dim == 0 and _whole_units(p.shape[0], unit, tp):
            continue
        total += p.numel()
        mats += 1
    return total, mats


def tp_terms(cfg: ModelConfig, tp: int, seq: int, rows: int) -> tuple[list[tuple], dict]:
    """`formulas()` terms of tensor parallelism (parallel/tp.py), training with the indexer KL on, and their
    symbols. Every one is a fixed shape: the all-reduces of DTensor's Colwise/Rowwise plans and of tp.py's hooks,
    and the head's logits gather."""
    kinds = list(cfg.layer_types) + ["swa"] * cfg.n_mtp_layers  # the MTP block is a sliding-window layer
    n_att, n_csa, n_hca = len(kinds), kinds.count("csa"), kinds.count("hca")
    n_sh = len(kinds) if cfg.n_shared_experts else 0  # MoE layers with a shared expert (every block, MTP too)
    heads = 1 + cfg.n_mtp_layers  # the embedding and the output head run once more for each MTP block
    N, D, V = rows * seq, cfg.dim, cfg.vocab_size
    entries = seq // cfg.csa_ratio
    k_i = min(cfg.index_topk, entries) if cfg.indexer_mode == "sparse" else entries  # KL teacher entries
    ar = 2 * (1 - 1 / tp) * 4  # all-reduce wire bytes per element
    fwd = (n_att + n_sh + heads) * N * D + n_csa * N * k_i
    bwd = (
        n_att * N * (cfg.q_lora_rank + cfg.head_dim)
        + rows * cfg.head_dim * (n_csa * (seq // cfg.csa_ratio) + n_hca * (seq // cfg.hca_ratio))
        + (2 * n_sh + heads) * N * D
    )
    gather = heads * (tp - 1) * N * V // tp * 4
    terms = [
        (
            "TP all-reduce (forward)",
            "forward",
            n_att + n_sh + heads + n_csa,
            "2·(1-1/tp)·((L_att + L_sh + H_out)·N·D + L_csa·N·k_I)·4",
            ar * fwd,
            ar * fwd,
        ),
        ("TP all-gather (forward)", "forward", heads, "H_out·(1-1/tp)·N·V·4", gather, gather),
        (
            "TP all-reduce (backward)",
            "backward",
            2 * n_att + n_csa + n_hca + 2 * n_sh + heads,
            "2·(1-1/tp)·(L_att·N·(r_q+c) + R·c·(L_csa·S/m + L_hca·S/m') + (2·L_sh + H_out)·N·D)·4",
            ar * bwd,
            ar * bwd,
        ),
    ]
    symbols = {
        "tp": tp,
        "R": rows,
        "S": seq,
        "N": N,
        "D": D,
        "V": V,
        "r_q": cfg.q_lora_rank,
        "c": cfg.head_dim,
        "k_I": k_i,
        "m": cfg.csa_ratio,
        "m'": cfg.hca_ratio,
        "L_att": n_att,
        "L_csa": n_csa,
        "L_hca": n_hca,
        "L_sh": n_sh,
        "H_out": heads,
    }
    return terms, symbols


def _tp_formulas(
    cfg: ModelConfig, d: ParallelDims, seq: int, rows: int, optim: str, units: dict, term, out: dict
) -> dict:
    """`formulas()` for tensor parallelism alone (every other dim 1)."""
    tp = d.tp
    tp_list, tp_vars = tp_terms(cfg, tp, seq, rows)
    for t in tp_list:
        term(*t)
    _metric_term(term, cfg, 1)  # the data group is this one rank: 0 bytes
    # one squared norm per (mesh, placements) group: TP shards on dim 0 (Colwise, embed, wo_a) and dim 1 (Rowwise)
    norm = 2 * 2 * (1 - 1 / tp) * 4
    term("grad-norm all-reduce", "grad_norm", 2, "2·2·(1-1/tp)·4", norm, norm)
    P_own, mats = 0, 0
    if optim == "muon":
        P_own, mats = tp_muon_owner_elements(units["model"], cfg, OptimConfig(name=optim), tp)
        own = 2 * (1 - 1 / tp) * P_own * 4 / tp
        term("Muon owner-compute all-to-all", "optimizer", 2 if P_own else 0, "2·(1-1/tp)·P_own·4/tp", own, own)
        _muon_rms_term(term, tp)
    out["_vars"] = {"tp": tp_vars, "P_own": P_own, "muon_owner_matrices": mats}
    return out


def pp_terms(cfg: ModelConfig, d: ParallelDims, seq: int, rows: int) -> tuple[list[tuple], dict]:
    """`formulas()` terms of pipeline parallelism (parallel/pp.py) and their symbols. Each boundary between
    consecutive stages held by different ranks carries, per chunk, the streams [R/M, S, N_hc, D] (and with MTP the
    next-token embedding [R/M, S, D]) forward and their gradients back, one send and one receive per tensor; a
    boundary inside one rank (DualPipeV's turn of the V) is a local hand-over."""
    owner = {s: r for r in range(d.pp) for s in rank_stages(d, r)}
    cross = [s for s in range(d.n_stages - 1) if owner[s] != owner[s + 1]]
    m, tensors = d.microbatches, 1 + (cfg.n_mtp_layers > 0)
    width = cfg.hc_mult * cfg.dim + (cfg.dim if cfg.n_mtp_layers else 0)
    calls = max(sum(2 * m * tensors for s in cross if r in (owner[s], owner[s + 1])) for r in range(d.pp))
    p2p = 2 * len(cross) * rows * seq * width * 4 / d.pp
    L, E = len(cfg.layer_types) + cfg.n_mtp_layers, cfg.n_routed_experts
    sums = 2 * (1 - 1 / d.pp) * (5 * 8 + L * E * 8)
    mtp = " + D" if cfg.n_mtp_layers else ""
    terms = [
        ("PP point-to-point", "pipeline", calls, f"2·X·R·S·(N_hc·D{mtp})·4/pp (mean)", p2p, p2p),
        ("PP stage-sum all-reduce", "metrics", 2, "2·(1-1/pp)·(5·8 + L·E·8)", sums, sums),
    ]
    symbols = {
        "pp": d.pp,
        "schedule": d.pp_schedule,
        "stages": d.n_stages,
        "X": len(cross),
        "M": m,
        "R": rows,
        "S": seq,
        "N_hc": cfg.hc_mult,
        "D": cfg.dim,
        "L": L,
        "E": E,
    }
    return terms, symbols


def _pp_formulas(cfg: ModelConfig, d: ParallelDims, seq: int, rows: int, optim: str, term, out: dict) -> dict:
    """`formulas()` for pipeline parallelism alone (every other dim 1): no FSDP, nothing for Muon to gather."""
    pp_list, pp_vars = pp_terms(cfg, d, seq, rows)
    for t in pp_list:
        term(*t)
    _metric_term(term, cfg, 1)
    # no DTensor gradients: the stages' squared norms are only added up over pp
    term("grad-norm all-reduce", "grad_norm", 1, "2·(1-1/pp)·4", 2 * (1 - 1 / d.pp) * 4, 2 * (1 - 1 / d.pp) * 4)
    if optim == "muon":
        _muon_rms_term(term, d.world_size)
    out["_vars"] = {"pp": pp_vars}
    return out


def cp_layer_elements(cfg: ModelConfig, kind: str, seq: int, cp: int) -> tuple[int, int]:
    """Elements per row that one rank sends in forward for one attention layer under cp: (point-to-point: the last
    w keys, and for CSA the previous compression block of the compressor and of the indexer's compressor, all
    2·width wide; all-gather: this rank's compressed entries, for CSA with the indexer keys)."""
    c, ci, s = cfg.head_dim, cfg.index_head_dim, seq // cp
    if kind == "csa":
        m = cfg.csa_ratio
        return cfg.window_size * c + m * 2 * (c + ci), (cp - 1) * s // m * (c + ci)
    if kind == "hca":
        return cfg.window_size * c, (cp - 1) * s // cfg.hca_ratio * c
    return cfg.window_size * c, 0


def cp_terms(cfg: ModelConfig, cp: int, seq: int, rows: int) -> tuple[list[tuple], dict]:
    """`formulas()` terms of context parallelism (parallel/cp.py), training with the indexer KL on (the default),
    and the symbols they use."""
    kinds = list(cfg.layer_types) + ["swa"] * cfg.n_mtp_layers  # the MTP block is a sliding-window layer
    n_csa, n_hca = kinds.count("csa"), kinds.count("hca")
    p2p, gather = (sum(x) * rows * 4 for x in zip(*(cp_layer_elements(cfg, k, seq, cp) for k in kinds)))
    n_bal = len(cfg.layer_types) - cfg.n_hash_layers + cfg.n_mtp_layers  # MoE layers with a balance loss
    # the indexer KL's query count per CSA layer (int64) and the balance loss's [R, E] fp32 counts; the CE and MTP
    # counts are no longer summed over cp: the Learner's one target count covers them (token-weighted convention)
    counts = n_csa * 8 + n_bal * rows * cfg.n_routed_experts * 4
    # one shift per layer (window keys) and two more per CSA layer (compressor and indexer-compressor block);
    # the first and last rank take part in a shift once, a middle rank twice (it sends and receives)
    p2p_calls = (len(kinds) + 2 * n_csa) * min(2, cp - 1)
    mean = (cp - 1) / cp
    terms = [
        (
            "CP point-to-point (forward)",
            "forward",
            p2p_calls,
            "(1-1/cp)·R·(L_att·w·c + L_csa·m·2·(c+c_I))·4 (mean)",
            mean * p2p,
            mean * p2p,
        ),
        (
            "CP all-gather, compressed entries (forward)",
            "forward",
            2 * n_csa + n_hca,
            "(cp-1)·R·S/cp·(L_csa·(c+c_I)/m + L_hca·c/m')·4",
            gather,
            gather,
        ),
        (
            "CP count all-reduce (forward)",
            "forward",
            n_csa + n_bal,
            "2·(1-1/cp)·(L_csa·8 + L_bal·R·E·4)",
            2 * mean * counts,
            2 * mean * counts,
        ),
        ("CP point-to-point (backward)", "backward", p2p_calls, "same as forward", mean * p2p, mean * p2p),
        (
            "CP reduce-scatter, compressed entries (backward)",
            "backward",
            2 * n_csa + n_hca,
            "same as the all-gather",
            gather,
            gather,
        ),
    ]
    symbols = {
        "cp": cp,
        "R": rows,
        "S": seq,
        "w": cfg.window_size,
        "c": cfg.head_dim,
        "c_I": cfg.index_head_dim,
        "m": cfg.csa_ratio,
        "m'": cfg.hca_ratio,
        "L_att": len(kinds),
        "L_csa": n_csa,
        "L_hca": n_hca,
        "L_mtp": cfg.n_mtp_layers,
        "L_bal": n_bal,
    }
    return terms, symbols


def cp_vs_ring(flavor: str, seq: int, cps: tuple[int, ...], elem_bytes: int = 2) -> list[str]:
    """Markdown paragraph and table, computed from the formulas: bytes one rank sends per row in forward under CP,
    for one layer of each kind and for all layers, next to ring attention passing V4's single K=V head."""
    cfg = get_flavor(flavor)
    kinds = list(cfg.layer_types) + ["swa"] * cfg.n_mtp_layers
    lines = [
        f"CP next to ring attention, computed from the formulas above (not measured): flavor `{flavor}` (c = "
        f"{cfg.head_dim}, w = {cfg.window_size}, m = {cfg.csa_ratio} with c_I = {cfg.index_head_dim}, m' = "
        f"{cfg.hca_ratio}), one row of seq {seq}, bf16 ({elem_bytes} bytes; the ratios do not depend on it): "
        "bytes one rank sends in forward. CP point-to-point is a sending rank's (every rank but the last); "
        "the backward sends the same back, and its reduce-scatter equals the all-gather. Ring attention "
        "passes every other rank's keys and values around the ring, (cp-1)/cp·S·(K+V width) per layer; V4 has "
        "one shared K=V head of width c, so the ring is taken to pass that one tensor, (cp-1)/cp·S·c (passing K "
        "and V separately doubles it; the compressed entries that CSA/HCA layers also need are left out of "
        "it). A ring's backward usually passes the keys again with their gradients, about twice its forward.",
        "",
        "| layers | cp | CP point-to-point (sender) | CP all-gather | CP total | ring (K=V) | CP / ring |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, layers in [(k, [k]) for k in ("swa", "csa", "hca")] + [(f"all {len(kinds)} (incl. MTP)", kinds)]:
        for cp in cps:
            p2p, gather = (sum(x) * elem_bytes for x in zip(*(cp_layer_elements(cfg, k, seq, cp) for k in layers)))
            ring = len(layers) * (cp - 1) * seq // cp * cfg.head_dim * elem_bytes
            lines.append(
                f"| {label} | {cp} | {fmt_bytes(p2p)} | {fmt_bytes(gather)} | {fmt_bytes(p2p + gather)} "
                f"| {fmt_bytes(ring)} | {(p2p + gather) / ring:.3f} |"
            )
    return lines


def fmt_bytes(b: float) -> str:
    if b == 0:
        return "0"
    for unit, div in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(b) >= div:
            return f"{b / div:.2f} {unit}"
    return f"{b:.0f} B"


EXPLANATIONS = """\
TP and PP are modelled alone (tp2, pp2); layouts that mix them with other dims are measured only.

Symbols: n_f = dp·cp·ep (the "fsdp" mesh, dense weights), n_e = dp·cp ("efsdp", routed experts under EP),
W = world size, P_dense = elements in the dense FSDP units (root + blocks; with ep = 1 the routed experts are
inside the blocks and counted here), P_root = those of the root unit, P_exp = routed-expert elements (all MoE
layers incl. MTP; each EP rank holds P_exp/ep), L = MoE layers incl. the MTP block, E experts, K = top-k,
D = dim, N = rows·seq/cp tokens per rank, P_own = elements of the Muon matrices that DistributedMuon
owner-computes. CP terms: R = rows per data rank, S = seq, w = window, c = head_dim, c_I = index_head_dim, m / m' =
CSA / HCA ratio, L_att / L_csa / L_hca = attention / CSA / HCA layers (L_att counts the MTP block), L_mtp = MTP
blocks, L_bal = MoE layers with a balance loss (not hash-routed; MTP included). HSDP (`parallel.dp_replicate` = r):
n_s = n_f/r and n_es = n_e/r, the FSDP shard group of one replica. All weights, gradients and activations are fp32
(4 bytes); metric buffers are float64/int64.

Where the formulas come from, and why measured differs where it does:

- **FSDP all-gather twice per block, once for the root.** `apply_fsdp` passes `reshard_after_forward=True` to
  the blocks and experts, so each is all-gathered in forward and again in backward. The root call keeps
  torch's default (`None`: `_fsdp_state.py` `_auto_reshard_after_forward`), so the root unit (embedding, head,
  final norm, hc_head and the whole MTP block) stays unsharded from forward into backward, where it is needed
  first: it is gathered once per step, and the backward all-gather is (1-1/n_f)·(P_dense-P_root)·4, one call
  per block. The root is the largest unit (embed + head are 2·V·D), so this saves the biggest all-gather.
- **FSDP2 padding.** Each parameter's dim 0 is padded to a multiple of the shard count before the all-gather /
  reduce-scatter, so the measured bytes are (1-1/n)·P_padded·4, where P_padded = Σ ceil(d0/n)·n·(numel/d0);
  the bench checks measured == that exactly (the "exact" value in `formulas()`), and the ratio to the unpadded
  formula is the padding overhead; each layout lists the padded parameters: the mHC gains `hc_*_scale` ([3],
  [1]) at every n, and from n = 4 on any tensor whose dim 0 is not a multiple of n, such as the indexer's
  `weights_proj` [index_n_heads = 2, D] (padded to 4 rows: half of it is zeros on the wire).
- **Reduce-scatter = all-gather volume** because every parameter receives a gradient in this step (hash-routed
  gates too: their weights still produce the routing weights; the embedding gets its gradient as a dense
  [V, D] tensor, not sparse); a unit whose parameters had no gradient would skip its reduce-scatter.
- **Experts under EP** are their own FSDP units on efsdp; with dp = cp = 1 (ep2) that mesh has one rank and
  FSDP2 issues no collective for them at all (0 calls, 0 bytes), but `clip_grad_norm_` still all-reduces their
  squared norm over the 1-rank efsdp group (1 call, 0 bytes) and over ep.
- **EP all-to-all.** Per MoE layer (hash layers and the MTP block included) `AllToAllDispatch` (parallel/ep.py)
  makes one
  `dist.all_to_all_single` of the [ep, E/ep] int64 counts (forward only, no autograd) and two functional
  all-to-alls of rows (dispatch, combine), each of which runs again reversed in backward. A rank sends the rows
  routed to other ranks' experts (dispatch) and returns the rows it received (combine); under uniform routing
  each is N·K·(1-1/ep) rows of D fp32. The measured/formula ratio is the routing's deviation from uniform (hash
  layers follow the token ids, learned layers the router at init); the routing-exact prediction, built from
  the counts each rank exchanged, matches the measured bytes exactly.
- **Muon owner-compute** (docs/parallelism.md "Distributed Muon"): per owner-computed matrix 2·(1-1/n)·|W|
  elements across the shard group, so 2·(1-1/n_f)·P_own/n_f per rank on average; ranks differ (an owner sends
  n-1 blocks, a non-owner one), hence the [max]. Uneven FSDP2 blocks (dim 0 not divisible by n_f) move
  |W| − |owner's block| rather than (1-1/n)|W|, which is where the mean departs from the formula. Expert stacks
  (3-D, sharded on the expert dim) and `wo_a` when each FSDP block holds whole output groups are local. The
  first step adds the plan's `all_gather_object` (two `allgather_` calls: sizes, pickled plan).
- **Metrics and grad norm** are all-reduces of a few scalars over the data ranks (the step's target count, 1
  float64, before the forward: the token-weighted loss divides by it; the sums of loss, lm_loss, mtp_loss, balance
  and indexer: 5 float64; expert counts: [L, E] int64) and one fp32 squared norm per (mesh, placements) group
  per sharded mesh dim.
- **HSDP** (dp4 as r = 2 replicas; mesh.py `fsdp_meshes` unflattens "fsdp" into ("fsdp_replicate",
  "fsdp_shard"), new process groups that the bench names from the parameters' DTensor meshes). FSDP2 all-gathers
  and reduce-scatters inside a replica, so every FSDP term above has n_s = n_f/r for n_f (and pads dim 0 to a
  multiple of n_s); after each unit's reduce-scatter it issues one `dist.all_reduce` of that unit's sharded,
  padded gradient (P_padded/n_s elements) over the replicate group, 2·(1-1/r)·P_dense·4/n_s per step (one call
  per unit, root included). The loss/metric all-reduce still spans all n_f data ranks (`sum_over_data` uses the
  flattened "fsdp" group); the grad norm reduces over the gradients' sharded mesh dim only (the shard group:
  `grad.py` skips the Replicate dim); DistributedMuon's owner-compute gathers each matrix within its shard group
  (the DTensor's sharded mesh dims), so each replica runs its own plan: P_own is counted for n_s ranks and the
  all-to-all, though issued over the world group, sends only inside the replica; its RMS all-reduce spans the
  world. All of these are exact. Per rank per step the FSDP bytes go from (1-1/n_f)·(3·P_dense-P_root)·4 to
  (1-1/n_s)·(3·P_dense-P_root)·4 + 2·(1-1/r)·P_dense·4/n_s, i.e. for dp4 from 0.75·(3P-P_root) to
  0.5·(3P-P_root) + 0.5·P: HSDP sends slightly fewer bytes per rank (8/9 of plain FSDP's when P_root is small),
  only the all-reduce (a quarter of them when P_root is small) crosses replicas, and each rank holds twice the
  shard.
  <HSDP_MEASURED>
- **Context parallelism** (dsv4train/parallel/cp.py; each rank holds S/cp tokens of every row; the dense weights
  are sharded over n_f = dp·cp·ep, so cp adds to the FSDP terms as dp does). Every CP term is a fixed shape, so
  measured equals the formula exactly:
  - point-to-point (`dist.batch_isend_irecv`): per attention layer the previous rank's last w keys [R, w, c] come
    forward and their gradient goes back; per CSA layer also the previous compression block of the compressor
    [R, m, 2c] and of the indexer's compressor [R, m, 2c_I] (the first halves of kv and gate). The first rank
    has no previous rank and the last no next one, so ranks differ: in forward every rank but the last sends
    R·(L_att·w·c + L_csa·m·2·(c+c_I))·4 (the [max]) and the last sends nothing; in backward the gradients go
    back, every rank but the first sending. The table gives the mean, (1-1/cp) of that; over a step each rank
    of cp2 sends the same (rank 0 in forward, rank 1 in backward), while with cp > 2 a middle rank sends in both.
    A receive counts as a call with 0 bytes.
  - all-gather of the compressed entries in forward, each rank's [R, S/cp/m, c] plus the indexer keys
    [R, S/cp/m, c_I] per CSA layer and [R, S/cp/m', c] per HCA layer; backward reduce-scatters their gradient
    to the rank that pooled them, the same bytes. The indexer keys (and their compressor's block, m·2·c_I per
    CSA layer of the backward send) get a gradient only because the step trains the indexer through its KL loss
    (`Attention.indexer_kl`, on by default in training; the indexer's inputs are detached, so without the KL
    nothing flows back to it): with it off those backward terms go. Dense or sparse indexer: same volume.
  - count all-reduces in forward (`SequenceShard.total`, no gradient): the KL's queries with an entry per CSA
    layer (int64) and the [R, E] fp32 expert counts per MoE layer with a balance loss. (The labelled tokens of CE
    and MTP are no longer summed here: the Learner's one target count over the data ranks, which include cp,
    replaces them.)
  - under cp2 alone the cp, fsdp and efsdp meshes are one process group; CP's collectives are told apart by
    coming from cp.py (the module docstring).
- **Tensor parallelism** (dsv4train/parallel/tp.py; tp ranks see the same N = R·S tokens; symbols in each tp
  layout's note). Every term is a fixed shape, so measured equals the formula exactly:
  - forward all-reduces of [N, D]: the output of `wo_b` (RowwiseParallel) per attention layer (L_att, MTP
    included), of the shared expert's `w2` per MoE layer (L_sh), and of the vocabulary-split embedding per call
    (H_out = 1 + MTP blocks: the MTP block embeds the next tokens); plus, per CSA layer, the indexer KL's
    teacher summed over the heads of all tp ranks, [R, S, k_I] (k_I = min(index_topk, S/m) sparse, S/m dense).
  - forward all-gather of the vocabulary-split logits, (1-1/tp)·N·V·4 per output-head call: the largest TP term
    at small D (4 MiB of toy's 6 MiB step), the price of a replicated loss over a split head.
  - backward all-reduces of the input gradients of the ColwiseParallel modules (`wq_b` [N, r_q], the shared
    expert's `w1` and `w3` [N, D] each, the head [N, D] per call) and of the tensors every head shares (tp.py's
    hooks): the K=V head after `kv_norm` [N, c] per attention layer and the compressed entries [R, S/m, c] or
    [R, S/m', c] per CSA / HCA layer. The embedding's input is token ids: no gradient to reduce.
  - the grad norm all-reduces one squared norm per placement group (Shard(0) and Shard(1)); Muon owner-computes
    the TP-split matrices (`wq_b`, `wo_b`, shared `w1`/`w2`/`w3`; `wo_a` holds whole output groups per rank, so
    it stays local) over the tp group, 2·(1-1/tp)·P_own·4/tp.
- **Pipeline parallelism** (dsv4train/parallel/pp.py, torch.distributed.pipelining). Per chunk (M per
  micro-batch) every stage boundary between two ranks carries the mHC streams [R/M, S, N_hc, D] and, with MTP,
  the next-token embedding [R/M, S, D] forward, and their gradients back: one send and one receive per tensor,
  in the "pipeline" phase (the schedule sends outside autograd, so forward and backward sends are not told
  apart). X counts those boundaries: pp-1 for 1F1B, pp·v-1 for interleaved 1F1B (v = 2 stages per rank, which
  alternate ranks), and 2·(pp-1) for DualPipeV, whose turn of the V (stages pp-1 and pp on the last rank) is a
  local hand-over. So the bytes do not depend on M, and interleaving multiplies them by (pp·v-1)/(pp-1): the
  price of its smaller bubble. The sums (loss, lm_loss, mtp_loss, balance, indexer: 5 float64) and the [L, E]
  expert counts are summed over the
  stages (`sum_over_stages`), and the grad norm adds the stages' squared norms. The first step also opens each
  link with a 4-byte message per neighbour and direction (pipelining's handshake).
"""
