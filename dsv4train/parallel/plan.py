"""A dry run of a parallel layout at scale without GPUs (`dsv4 plan`): where every layer, expert and FSDP shard
lives, checked against the real DeviceMesh built on a fake process group, and an estimate of the memory each rank
needs.

Placement (the rules of dims.py, pp.py, ep.py, cp.py and fsdp.py):

- rank = ((((pp·DP + dp)·CP + cp)·EP + ep)·TP + tp), the row-major order of the mesh ("pp", "dp", "cp", "ep", "tp").
- pp stage s holds a contiguous run of layers (`stage_layers`): an even split; when the layers do not divide, the
  extra layers go to the middle stages first, then stage 0, then the last stage, because stage 0 also holds the
  embedding and the last stage the head, the final mHC collapse and the MTP block.
- ep rank e holds routed experts [e·E/ep, (e+1)·E/ep) of every MoE layer of its stage (ep.py).
- dense weights are FSDP-sharded over the ranks that share (pp, tp): dp·cp·ep ranks ("fsdp"); routed experts over
  the ranks that share (pp, ep, tp): dp·cp ranks ("efsdp"). With parallel.dp_replicate = r (HSDP) the same groups
  are split into r replicas, and each weight is sharded over only 1/r of the group (mesh.py `fsdp_meshes`).

Memory per rank (an ESTIMATE, in bytes; GB below means 1e9 bytes). Parameter counts are flops.py's analytic ones.

- parameters, fp32 master: 4 B × (dense_tp / (fsdp·tp) + dense / fsdp + experts / (ep·efsdp)) for the weights of
  the rank's stage. `dense_tp` (split over tp as well, tp.py's plan) = the head-split attention weights (wq_b,
  wo_a, wo_b, attn_sink), the shared expert, the embedding and the head; wq_a, wkv, the norms, compressor,
  indexer, router and mHC are replicated over tp. FSDP shards are taken as even.
- gradients: fp32, sharded like the parameters (FSDP reduce-scatters in fp32): the same 4 B per local element.
- optimizer state: Muon keeps 1 fp32 momentum buffer per Muon parameter, AdamW 2 (exp_avg, exp_avg_sq). AdamW
  holds the embedding, head, norms and mHC static vectors (optim/groups.py); with optim.name=adamw, everything.
- buffers: the router bias (fp32, E per layer) or the hash table tid2eid (int64, V·k per hash layer), whole on
  every rank of the stage.
- FSDP working copies (transient): one FSDP unit is gathered whole (fp32, param_dtype of parallelize) while it
  runs and the next one is prefetched, and its unsharded gradient exists until the reduce-scatter:
  4 B × (2 × root unit + 3 × largest block), where the root unit (embedding, head, final norm, MTP on the
  stages that hold them) stays gathered for the whole forward (fsdp.py). A block counts its tp/ep-local part.
  DualPipeV keeps every unit of the rank gathered, with its whole gradient, for the whole step (pp.py):
  4 B × 2 × (root unit + all blocks).
- activations of one micro-batch, no activation checkpointing, per layer per token, in elements of the compute
  dtype (a = 2 B for bf16, 4 B for fp32), with T = micro_batch_size × seq_len / cp tokens on the rank:

      2·n·d                                  mHC: the hc_mult(=n)·dim streams entering the attention and FFN sites
    + 5·d                                    norms, sublayer inputs/outputs
    + q_lora + c + (2·H·c + G·o_lora) / tp   attention: q latent, kv, q heads, attention output, grouped o proj
    + 2·w (csa/hca)                          compressor kv and gate per token (w = 2c for csa, c for hca)
    + I_h·I_d + 2·I_d + topk (csa)           lightning indexer: queries, keys, scores of the selected entries
    + 2·k·d + 3·k·I                          routed experts: k dispatched copies in and out, w1/w3 outputs, SwiGLU
    + 3·I / tp                               shared expert
    + E·(4/a)                                router logits (fp32)

  The attention scores are computed in blocks and not kept, so there is no S² (or S·window) term; a gather of the
  top-k compressed entries per query, if materialised, is not included. The last stage adds the logits of the
  head and the MTP head (T × V × (a + 4 B for the fp32 log-softmax) each; tp.py gathers the logits whole) and
  one MTP block. With pp > 1 stage
  s keeps min(pp − s, grad_accum) micro-batches in flight (1F1B).

Left out: the CUDA context and allocator fragmentation (leave ~10% headroom), communication buffers (EP
all-to-all, NCCL), FP8 scale tensors and the data loader. FP8 keeps weights in fp32 master precision here too.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from dsv4train.config.errors import ConfigError
from dsv4train.config.pretrain import PretrainConfig
from dsv4train.models.flops import _block, param_counts  # per-layer analytic counts
from dsv4train.parallel.dims import AXES, ParallelDims

GB = 1e9
TP_SPLIT = ("shared_expert",)  # whole components split over tp (channels); attention: _attention_tp_split


# ---------------------------------------------------------------------------------------------- placement
def stage_layers(n_layers: int, pp: int) -> list[range]:
    """Contiguous layer ranges of the pp stages: an even split, extra layers to the middle stages first, then
    stage 0, then the last stage (those two also hold the embedding and the head + MTP)."""
    if not 1 <= pp <= n_layers:
        raise ConfigError(f"parallel.pp: = {pp} pipeline stages for {n_layers} layers; use at most one stage per layer")
    base, extra = divmod(n_layers, pp)
    order = list(range(1, pp - 1)) + [0] + ([pp - 1] if pp > 1 else [])
    sizes = [base + (1 if s in order[:extra] else 0) for s in range(pp)]
    starts = [sum(sizes[:s]) for s in range(pp)]
    return [range(starts[s], starts[s] + sizes[s]) for s in range(pp)]


def expert_range(n_experts: int, ep: int, ep_rank: int) -> range:
    per = n_experts // ep
    return range(ep_rank * per, (ep_rank + 1) * per)


def rank_grid(dims: ParallelDims) -> torch.Tensor:
    """Rank ids laid out as the mesh: shape (pp, dp, cp, ep, tp)."""
    return torch.arange(dims.world_size).view(dims.shape)


def coords_of(dims: ParallelDims, rank: int) -> dict[str, int]:
    out, rest = {}, rank
    for a, size in reversed(list(zip(AXES, dims.shape))):
        rest, out[a] = divmod(rest, size)
    return {a: out[a] for a in AXES}


def groups_of(dims: ParallelDims, rank: int) -> dict[str, list[int]]:
    """Ranks of each process group `rank` belongs to, from the row-major mesh layout."""
    g, c = rank_grid(dims), coords_of(dims, rank)
    groups = {}
    for a in AXES:
        idx = [c[b] if b != a else slice(None) for b in AXES]
        groups[a] = g[tuple(idx)].flatten().tolist()
    groups["fsdp"] = g[c["pp"], :, :, :, c["tp"]].flatten().tolist()
    groups["efsdp"] = g[c["pp"], :, :, c["ep"], c["tp"]].flatten().tolist()
    if dims.dp_replicate > 1:  # HSDP: dp is the outermost factor, so a replica is a contiguous block of the group
        for name in ("fsdp", "efsdp"):
            ranks = groups[name]
            per = len(ranks) // dims.dp_replicate
            i = ranks.index(rank)
            groups[f"{name}_shard"] = ranks[i // per * per: (i // per + 1) * per]
            groups[f"{name}_replicate"] = ranks[i % per::per]
    return groups


@contextlib.contextmanager
def fake_world(rank: int, world_size: int):
    """A process group of `world_size` ranks seen from `rank`, with no communication (torch's "fake" backend);
    destroyed on exit."""
    from torch.testing._internal.distributed.fake_pg import FakeStore  # registers the "fake" backend

    if dist.is_initialized():
        raise RuntimeError("dsv4 plan needs no process group of its own; run it as a plain process, not under "
                           "torchrun")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def check_mesh(dims: ParallelDims, ranks: list[int]) -> dict[int, dict]:
    """Build the real world DeviceMesh (mesh.build_mesh) on a fake process group as each of `ranks` and compare
    its coordinates and groups with the plan's; raises AssertionError on a mismatch. Returns what it saw."""
    import warnings

    from dsv4train.parallel.mesh import build_mesh, fsdp_meshes

    seen = {}
    for r in ranks:
        with fake_world(r, dims.world_size), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # slicing flattened dims from the root mesh: a deprecation notice
            mesh = build_mesh(dims, "cpu")
            got = {"coords": dict(zip(AXES, mesh.get_coordinate())),
                   "groups": {name: mesh[name].mesh.flatten().tolist() for name in (*AXES, "fsdp", "efsdp")}}
            if dims.dp_replicate > 1:
                for hsdp in fsdp_meshes(dims, mesh):
                    for name in hsdp.mesh_dim_names:
                        got["groups"][name] = hsdp[name].mesh.flatten().tolist()
        want = {"coords": coords_of(dims, r), "groups": groups_of(dims, r)}
        if got != want:
            raise AssertionError(f"rank {r}: DeviceMesh gives {got}, the plan assumes {want}")
        seen[r] = got
    return seen


# ---------------------------------------------------------------------------------------------- memory
@dataclass
class StageMemory:
    stage: int
    layers: list[int]
    holds: list[str]
    elements: dict[str, float]         # local parameter elements by kind (dense_tp, dense, experts, adamw)
    terms: dict[str, float]            # bytes per rank
    in_flight: int = 1                 # micro-batches whose activations are alive (1F1B)

    @property
    def total(self) -> float:
        return sum(self.terms.values())

    @property
    def biggest(self) -> str:
        return max(self.terms, key=self.terms.get)


def _layer_params(cfg, layer_type: str, hashed: bool) -> dict[str, float]:
    p = _block(cfg, layer_type, hashed)
    n, d = cfg.hc_mult, cfg.dim
    mhc_static = 2 * ((2 + n) * n + 3)  # hc_*_base / hc_*_scale: AdamW vectors
    attn_tp = _attention_tp_split(cfg)
    return {"dense_tp": sum(p[k] for k in TP_SPLIT) + attn_tp,
            "dense": sum(v for k, v in p.items() if k not in TP_SPLIT + ("routed_experts", "router_buffers"))
            - attn_tp,
            "experts": p["routed_experts"],
            "adamw": p["norms"] + mhc_static, "adamw_tp": 0,
            "buffer_bytes": 8 * p["router_buffers"] if hashed else 4 * p["router_buffers"]}


def _attention_tp_split(cfg) -> int:
    """Attention weights tp.py splits over tp: wq_b, wo_a, wo_b and attn_sink (wq_a, q_norm, wkv, kv_norm stay
    whole); flops.py counts the same matrices."""
    H, c = cfg.n_heads, cfg.head_dim
    return cfg.q_lora_rank * H * c + H * c * cfg.o_lora_rank + cfg.o_groups * cfg.o_lora_rank * cfg.dim + H


def _activation_elems(cfg, layer_type: str, tp: int) -> float:
    """Per token, one layer, elements of the compute dtype (see the module docstring); router logits apart."""
    d, n, c, H = cfg.dim, cfg.hc_mult, cfg.head_dim, cfg.n_heads
    k, inter = cfg.n_activated_experts, cfg.moe_inter_dim
    x = 2 * n * d + 5 * d
    x += cfg.q_lora_rank + c + (2 * H * c + cfg.o_groups * cfg.o_lora_rank) / tp
    if layer_type != "swa":
        x += 2 * (2 * c if layer_type == "csa" else c)
    if layer_type == "csa":
        x += cfg.index_n_heads * cfg.index_head_dim + 2 * cfg.index_head_dim + cfg.index_topk
    x += 2 * k * d + 3 * k * inter + cfg.n_shared_experts * 3 * inter / tp
    return x


def stage_memory(cfg: PretrainConfig, dims: ParallelDims) -> list[StageMemory]:
    """Memory per rank of each pp stage (every rank of a stage needs the same, up to uneven FSDP shards)."""
    m, t = cfg.model, cfg.train
    a = 2 if cfg.precision.compute_dtype == "bfloat16" else 4
    fsdp, efsdp = dims.fsdp_shards, dims.expert_fsdp_shards  # dp·cp·ep and dp·cp, divided by dp_replicate
    tokens = t.micro_batch_size * t.seq_len / dims.cp
    counts = param_counts(m)
    n, d, V = m.hc_mult, m.dim, m.vocab_size
    hc_head = n * n * d + n + 1
    out = []
    for s, layers in enumerate(stage_layers(m.n_layers, dims.pp)):
        first, last = s == 0, s == dims.pp - 1
        el = {"dense_tp": 0.0, "dense": 0.0, "experts": 0.0, "adamw": 0.0, "adamw_tp": 0.0, "buffer_bytes": 0.0}
        blocks, act = [], 0.0
        for i in layers:
            lp = _layer_params(m, m.layer_types[i], hashed=i < m.n_hash_layers)
            blocks.append(lp)
            for key in el:
                el[key] += lp[key]
            act += _activation_elems(m, m.layer_types[i], dims.tp) * a + 4 * m.n_routed_experts
        root = {"dense_tp": 0.0, "dense": 0.0}
        holds = []
        if first:
            holds.append("embedding")
            root["dense_tp"] += V * d
            el["adamw_tp"] += V * d
        if last:
            holds += ["head", "final norm"]
            root["dense_tp"] += V * d
            root["dense"] += d + hc_head
            el["adamw_tp"] += V * d
            el["adamw"] += d + n + 1
            act += V * (a + 4)  # logits (gathered whole over tp) + fp32 log-softmax, per token
            if m.n_mtp_layers:
                holds.append("MTP")
                mtp = _layer_params(m, "swa", hashed=False)
                extra = 2 * d * d + 3 * d + hc_head  # e_proj, h_proj, norms, own final collapse
                root["dense_tp"] += mtp["dense_tp"]
                root["dense"] += mtp["dense"] + extra
                el["experts"] += mtp["experts"]  # the MTP experts are their own FSDP unit, not the root's
                blocks.append({**mtp, "dense_tp": 0, "dense": 0})
                el["adamw"] += mtp["adamw"] + 3 * d + n + 1
                el["buffer_bytes"] += mtp["buffer_bytes"]
                act += _activation_elems(m, "swa", dims.tp) * a + 4 * m.n_routed_experts + 2 * d * a
                act += V * (a + 4)
        for key in root:
            el[key] += root[key]
        local = el["dense_tp"] / (fsdp * dims.tp) + el["dense"] / fsdp + el["experts"] / (dims.ep * efsdp)
        adamw_local = el["adamw_tp"] / (fsdp * dims.tp) + el["adamw"] / fsdp
        if cfg.optim.name == "adamw":
            adamw_local = local
        muon_local = local - adamw_local

        def unit(p: dict) -> float:  # one FSDP unit gathered on this rank: its tp- and ep-local part, whole
            return p["dense_tp"] / dims.tp + p["dense"] + p.get("experts", 0) / dims.ep

        largest_block = max((unit(b) for b in blocks), default=0.0)
        gathered = 2 * unit(root) + 3 * largest_block
        if dims.pp_schedule == "dualpipev":  # every unit stays gathered, with a whole gradient, all step (pp.py)
            gathered = 2 * (unit(root) + sum(unit(b) for b in blocks))
        in_flight = min(dims.pp - s, t.grad_accum) if dims.pp > 1 else 1
        terms = {
            "params (fp32 master)": 4 * local,
            "grads (fp32)": 4 * local,
            "optimizer state": 4 * (muon_local + 2 * adamw_local),
            "router buffers": el["buffer_bytes"],
            "FSDP gathered units": 4 * gathered if fsdp > 1 else 0.0,
            "activations": act * tokens * in_flight,
        }
        sizes = {"dense_tp": el["dense_tp"], "dense": el["dense"], "experts": el["experts"], "local": local,
                 "muon_local": muon_local, "adamw_local": adamw_local}
        out.append(StageMemory(s, list(layers), holds, sizes, terms, in_flight))
    total = sum(x.elements["dense_tp"] + x.elements["dense"] + x.elements["experts"] for x in out)
    assert abs(total - counts.total_with_mtp + counts.router_buffers) < 1, "stage split lost parameters"
    return out


# ---------------------------------------------------------------------------------------------- the plan
@dataclass
class Plan:
    dims: ParallelDims
    model: str
    params_total: int
    seq_len: int
    micro_batch_size: int
    grad_accum: int
    compute_dtype: str
    optimizer: str
    stages: list[StageMemory]
    rows: list[dict]                    # one per (pp, ep, tp): the dp·cp ranks that hold the same weights
    mesh_checked: dict[int, dict] = field(default_factory=dict)
    gpu_memory_gb: float | None = None

    @property
    def peak(self) -> StageMemory:
        return max(self.stages, key=lambda s: s.total)

    def to_json(self) -> dict:
        peak = self.peak
        return {
            "layout": {**{a: getattr(self.dims, a) for a in AXES}, "dp_replicate": self.dims.dp_replicate},
            "world_size": self.dims.world_size,
            "describe": self.dims.describe(), "model": self.model, "params_total_with_mtp": self.params_total,
            "train": {"seq_len": self.seq_len, "micro_batch_size": self.micro_batch_size,
                      "grad_accum": self.grad_accum, "compute_dtype": self.compute_dtype},
            "optimizer": self.optimizer,
            "groups": {"fsdp": self.dims.dp * self.dims.cp * self.dims.ep, "efsdp": self.dims.dp * self.dims.cp,
                       "fsdp_shards": self.dims.fsdp_shards, "efsdp_shards": self.dims.expert_fsdp_shards,
                       "data_ranks": self.dims.data_ranks},
            "stages": [{"stage": s.stage, "layers": s.layers, "holds": s.holds, "in_flight": s.in_flight,
                        "param_elements": s.elements, "memory_gb": {k: v / GB for k, v in s.terms.items()},
                        "total_gb": s.total / GB, "biggest": s.biggest} for s in self.stages],
            "placement": self.rows,
            "mesh_checked_ranks": sorted(self.mesh_checked),
            "peak": {"stage": peak.stage, "total_gb": peak.total / GB, "biggest": peak.biggest},
            "gpu_memory_gb": self.gpu_memory_gb,
            "fits": None if self.gpu_memory_gb is None else peak.total / GB <= self.gpu_memory_gb,
        }


def placement_rows(dims: ParallelDims, n_layers: int, n_experts: int) -> list[dict]:
    stages = stage_layers(n_layers, dims.pp)
    g = rank_grid(dims)
    rows = []
    for p in range(dims.pp):
        for e in range(dims.ep):
            for t in range(dims.tp):
                ranks = g[p, :, :, e, t].flatten().tolist()
                rows.append({"ranks": ranks, "pp": p, "ep": e, "tp": t, "layers": list(stages[p]),
                             "experts": list(expert_range(n_experts, dims.ep, e)),
                             "fsdp_group": g[p, :, :, :, t].flatten().tolist(), "efsdp_group": ranks})
    return rows


def make_plan(cfg: PretrainConfig, check_ranks: list[int] | None = None,
              gpu_memory_gb: float | None = None) -> Plan:
    """Validate the layout for a world of exactly its own size, place everything, check the placement against the
    DeviceMesh built on a fake process group for `check_ranks` (default: the first and the last rank) and
    estimate the memory per rank."""
    dims = ParallelDims.from_config(cfg.parallel)
    t = cfg.train
    dims.validate(dims.world_size, cfg.model, t.seq_len, t.micro_batch_size, check_chunks=False)
    ranks = sorted({0, dims.world_size - 1} if check_ranks is None else set(check_ranks))
    bad = [r for r in ranks if not 0 <= r < dims.world_size]
    if bad:
        raise ConfigError(f"--check-ranks: {bad} outside 0..{dims.world_size - 1}")
    counts = param_counts(cfg.model)
    return Plan(dims=dims, model=cfg.model.name, params_total=counts.total_with_mtp, seq_len=t.seq_len,
                micro_batch_size=t.micro_batch_size, grad_accum=t.grad_accum,
                compute_dtype=cfg.precision.compute_dtype, optimizer=cfg.optim.name,
                stages=stage_memory(cfg, dims), rows=placement_rows(dims, cfg.model.n_layers,
                                                                    cfg.model.n_routed_experts),
                mesh_checked=check_mesh(dims, ranks), gpu_memory_gb=gpu_memory_gb)


__all__ = ["Plan", "StageMemory", "make_plan", "stage_layers", "expert_range", "coords_of", "groups_of",
           "fake_world", "check_mesh", "stage_memory", "placement_rows"]
