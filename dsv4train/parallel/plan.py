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
- activations (`activation_bytes`): what one forward saves for its backward on the rank, each distinct storage
  once, plus the logits the step holds; MEASURED by dsv4train/testing/activation_memory.py on a real Learner step
  and matched to the byte up to a few 8-byte scalars (tests/unit/test_plan.py, tests/distributed/
  test_activation_memory.py, docs/benchmarks.md). Per block, with N = rows·S tokens (S = seq_len / cp), a = the
  compute dtype's bytes (4 fp32, 2 bf16), f = 4, H and I_s the tp-local heads and shared-expert width:

      mHC, per site (2 per block), per token: the stream n·d in fp32 (+ a bf16 copy for hc_expand's matmul),
        the normalised streams n·d·a (the mix linear's input), mix (2+n)·n·a, 4n, the Sinkhorn iterations
        f·(2·iters·n² + (2·iters−1)·n) (every division saves its input and denominator: ~40 n² per site),
        comb n²·a; plus the attention output d·a and the FFN output d·f.
      norms: 2·f·width + f per normalised row (input or its fp32 copy, normalised, rsqrt).
      attention: input d (fp32: one tensor; bf16: each autocast linear casts its own copy), q_norm, wq_b's
        output H·c (+ fp32 copy), q after RoPE, the queries and keys in window blocks, the fp32 softmax over
        [2W window | compressed | sink] (+ its bf16 cast) and the padded window probabilities H·2W, the
        gathered top-k keys k·c (sparse) or all S/m compressed keys per row and an [S, T] mask (dense), the
        de-rotated output and the grouped low-rank output; cos/sin per position.
      compressor (csa, hca): the gate softmax and kv over S·(2 or 1)·c per row (+ casts), the pooled norm.
      indexer (csa, while the KL loss is computed, dense and sparse alike): ReLU(q·K) and its scaled copy
        2·I_h·T per token (T = S/4 entries), the keys (I_d·T per row), the KL's log-softmax and teacher over T
        (dense) or k.
      MoE: router 2·E + k (+ balance loss), per routed row (N·k; under ep assumed balanced) 3·d + 6·I in the
        row dtype (fp32 even under bf16 autocast: the rows come from the fp32 norm output and the grouped GEMM
        has no autocast rule), shared expert 6·I_s·a.
    The head: final collapse, norm, head input, the held logits V·a and the fp32 log-softmax V·f, for the main
    and the MTP head; the MTP fusion and MTP block (whose streams are in the compute dtype: hc_collapse then
    keeps fp32 copies, and its routed experts run in a); token ids.
  Weight copies (`weight_copy_bytes`, own term): bf16 autocast saves one cast of every weight a matmul uses
  (tp/ep-local, unsharded: FSDP's gathered fp32 weights are freed, their casts are not) except the indexer's,
  whose inputs are detached. FP8 (emulated backend, dsv4train/quant): the FP8 linears and experts save their
  input as it comes (no cast) and a dequantised fp32 weight each; the te backend is not modelled.
  The trainer runs the CSA layers dense for train.dense_indexer_steps, then sparse: the plan takes the larger.
  With pp > 1 a micro-batch is split into `parallel.pp_microbatches` chunks; a rank's peak is the largest sum
  of the chunks alive in its schedule (`schedule_actions`: 1F1B holds min(chunks, pp − rank); the interleaved
  and V schedules from torch's own action lists), each chunk holding its stage's activations and the stage
  outputs the schedule keeps (fp32 logits on the last stage). No activation checkpointing exists.

Left out: the CUDA context and allocator fragmentation (leave ~10% headroom), communication buffers (EP
all-to-all, NCCL), the data loader, and the transient tensors of the backward itself (gradients of
activations, freed as it goes). CUDA autocast computes softplus and sums in fp32 where CPU keeps bf16 (the
router scores, the pooled compressor entries): a few bytes per token more than the CPU-measured formula.
FP8 keeps weights in fp32 master precision here too.
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
            groups[f"{name}_shard"] = ranks[i // per * per : (i // per + 1) * per]
            groups[f"{name}_replicate"] = ranks[i % per :: per]
    return groups


@contextlib.contextmanager
def fake_world(rank: int, world_size: int):
    """A process group of `world_size` ranks seen from `rank`, with no communication (torch's "fake" backend);
    destroyed on exit."""
    from torch.testing._internal.distributed.fake_pg import FakeStore  # registers the "fake" backend

    if dist.is_initialized():
        raise RuntimeError("dsv4 plan needs no process group of its own; run it as a plain process, not under torchrun")
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
            got = {
                "coords": dict(zip(AXES, mesh.get_coordinate())),
                "groups": {name: mesh[name].mesh.flatten().tolist() for name in (*AXES, "fsdp", "efsdp")},
            }
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
    elements: dict[str, float]  # local parameter elements by kind (dense_tp, dense, experts, adamw)
    terms: dict[str, float]  # bytes per rank
    in_flight: int = 1  # pipeline chunks whose activations are alive at the rank's peak
    activations: RankActivations | None = None

    @property
    def total(self) -> float:
        return sum(self.terms.values())

    @property
    def biggest(self) -> str:
        return max(self.terms, key=self.terms.get)


def _layer_params(cfg, layer_type: str, hashed: bool) -> dict[str, float]:
    p = _block(cfg, layer_type, hashed)
    n = cfg.hc_mult
    mhc_static = 2 * ((2 + n) * n + 3)  # hc_*_base / hc_*_scale: AdamW vectors
    attn_tp = _attention_tp_split(cfg)
    return {
        "dense_tp": sum(p[k] for k in TP_SPLIT) + attn_tp,
        "dense": sum(v for k, v in p.items() if k not in TP_SPLIT + ("routed_experts", "router_buffers")) - attn_tp,
        "experts": p["routed_experts"],
        "adamw": p["norms"] + mhc_static,
        "adamw_tp": 0,
        "buffer_bytes": 8 * p["router_buffers"] if hashed else 4 * p["router_buffers"],
    }


def _attention_tp_split(cfg) -> int:
    """Attention weights tp.py splits over tp: wq_b, wo_a, wo_b and attn_sink (wq_a, q_norm, wkv, kv_norm stay
    whole); flops.py counts the same matrices."""
    H, c = cfg.n_heads, cfg.head_dim
    return cfg.q_lora_rank * H * c + H * c * cfg.o_lora_rank + cfg.o_groups * cfg.o_lora_rank * cfg.dim + H


# ---------------------------------------------------------------------------------------------- activations
F32, I64, BOOL = 4, 8, 1
GROUPS = ("layers.mhc", "layers.norms", "layers.attention", "layers.moe", "mtp", "head", "weight copies")


@dataclass(frozen=True)
class ActivationCase:
    """One forward on one rank, as the activation formula sees it."""

    rows: float  # B: rows of this forward (a micro-batch, or one pipeline chunk of it)
    seq: int  # S: tokens of each row on this rank (train.seq_len / cp)
    compute_bytes: int = 4  # a: 4 for fp32, 2 under bf16 autocast (precision=bf16, fp8, fp8_fp4)
    indexer: str = "sparse"  # dense | sparse: how the CSA layers attend (the trainer runs dense first)
    fp8: bool = False  # the emulated FP8 linears and experts (dsv4train/quant) replace autocast's
    cp: int = 1
    tp: int = 1
    ep: int = 1
    kl: bool = True  # the indexer KL loss is computed (training mode): its graph is saved
    pipelined: bool = False  # a pipeline stage: the last stage hands fp32 logit copies to the schedule


def _norm(width: float) -> float:
    """RMSNorm over `width` channels, per row it normalises: the input (or its fp32 copy), the normalised
    fp32 tensor and the fp32 rsqrt. Its output is saved by its consumer."""
    return 2 * F32 * width + F32


def _mhc_site(cfg, a: int, s_b: int) -> float:
    """Bytes per token of one mHC site (hc_weights + hc_collapse + hc_expand) on streams of dtype s_b."""
    n, nd, it = cfg.hc_mult, cfg.hc_mult * cfg.dim, cfg.hc_sinkhorn_iters
    return (
        F32 * nd * (1 + (s_b != F32))  # the stream in fp32 (itself, or rms_normalize's copy) and
        # hc_collapse's own .float() copy of a low-precision stream
        + (a != F32 or s_b != F32) * a * nd  # hc_expand's matmul operand in the compute dtype
        + F32
        + a * nd  # flat rms: rsqrt, the normalised streams as linear input
        + a * (2 + n) * n  # mix = fn(flat): pre, post, res logits
        + 3 * F32 * n
        + s_b * n  # sigmoid(pre), pre, sigmoid(post), post (in s_b)
        + F32 * (2 * it * n * n + (2 * it - 1) * n)  # Sinkhorn: softmax, each division's input + denominator
        + a * n * n
    )  # comb in the compute dtype (hc_expand's matmul)


def _compressor(cfg, c: ActivationCase, width: int, ratio: int, overlap: bool, s_b: int) -> float:
    """Bytes (per rank) of one Compressor: pooled tokens P = (S // ratio)·ratio per row."""
    a, B = c.compute_bytes, c.rows
    T_loc = c.seq // ratio
    P, w = T_loc * ratio, (2 if overlap else 1) * width
    per_row = (
        (s_b != a) * 2 * a * cfg.dim * P  # wkv / wgate each cast the fp32 input under autocast
        + F32 * w * P  # softmax of the gates (fp32)
        + (a != F32) * a * w * P  # the weights cast to the kv dtype
        + a * w * P  # kv (csa: with the previous block's half), saved by the product
        + _norm(width) * T_loc
    )  # norm of the pooled entries
    return B * per_row + F32 * cfg.rope_head_dim * T_loc  # cos, sin of the entry positions (no batch dim)


def _attention(cfg, layer_type: str, c: ActivationCase, s_b: int) -> float:
    """Bytes (per rank) of Attention.forward: projections, sliding window, compressed keys, compressor, indexer
    and its KL loss. The output (wo_b) is counted by mHC, which saves it."""
    a, B, S, tp = c.compute_bytes, c.rows, c.seq, c.tp
    d, c_h, H, W = cfg.dim, cfg.head_dim, cfg.n_heads // tp, cfg.window_size
    Sw = -(-S // W) * W  # queries padded to whole window blocks
    m = cfg.compress_ratio(layer_type)
    T = c.cp * (S // m) if m else 0  # compressed entries visible to this rank (all shards')
    comp = T > 0
    K = (T if c.indexer == "dense" else min(cfg.index_topk, T)) if layer_type == "csa" else T
    L = 2 * W + (K if comp else 0) + 1  # softmax columns: window, compressed, sink
    per_token = (
        (s_b if c.fp8 or s_b == a else 2 * a) * d  # input: shared (FP8 saves it as it is), or wq_a's and
        # wkv's own autocast copies
        + _norm(cfg.q_lora_rank)
        + a * cfg.q_lora_rank  # q_norm and its output (wq_b's input)
        + a * H * c_h
        + (a != F32) * F32 * H * c_h  # wq_b out (+ its fp32 copy for the head norm)
        + F32 * H
        + (a != F32) * a * H  # head-norm rsqrt (+ its cast)
        + comp * a * H * c_h  # q after RoPE, used against the compressed keys
        + _norm(c_h)  # kv_norm
        + F32 * H * L
        + (comp and a != F32) * a * H * L  # fp32 probabilities (+ their cast, p_comp's storage)
        + a * H * c_h  # output after inverse RoPE (grouped o-projection input)
        + a * (cfg.o_groups // tp) * cfg.o_lora_rank
    )  # grouped low-rank output, wo_b's input
    per_row = (
        per_token * S
        + (
            a * H * c_h  # queries padded into window blocks
            + a * 2 * c_h  # keys of blocks b-1, b
            + a * H * 2 * W
        )
        * Sw
    )  # window probabilities, padded
    shared = F32 * 1.5 * cfg.rope_head_dim * S  # cos, sin, -sin of the positions (no batch dim)
    if comp:
        if layer_type == "csa" and c.indexer == "sparse":
            per_row += (a * c_h + I64 + BOOL) * K * S  # gathered top-k keys, their flat index, the -1 mask
        else:
            per_row += a * c_h * T  # all compressed keys
            shared += BOOL * S * T  # the causal mask [S, 1, T]
        total = B * per_row + shared + _compressor(cfg, c, c_h, m, layer_type == "csa", s_b)
        if layer_type == "csa" and c.kl:
            total += _indexer(cfg, c, T, K, s_b)
        return total
    return B * per_row + shared


def _indexer(cfg, c: ActivationCase, T: int, K: int, s_b: int) -> float:
    """Lightning indexer scores over all T entries (its graph exists for the KL loss) and the KL loss."""
    a, B, S = c.compute_bytes, c.rows, c.seq
    Ih, Id = cfg.index_n_heads, cfg.index_head_dim
    per_token = (
        (s_b != a) * a * cfg.dim  # weights_proj's cast of the input
        + a * Ih * Id
        + a * Ih  # queries after RoPE, head weights (einsum operands)
        + 2 * a * Ih * T
    )  # ReLU(q·k) and its scaled copy [S, I_h, T]
    J = T if c.indexer == "dense" else K  # slots the KL compares
    per_token += (
        (F32 + F32 + 2 * BOOL) * J  # log-softmax, teacher p, invalid mask, p > 0
        + 2 * BOOL
    )  # rows with any entry (where, masked_fill)
    if c.indexer == "sparse":
        per_token += a * T + I64 * K  # gather of the picked scores: all scores, the index
    keys = a * Id * T  # the keys [T, I_d] (one batched GEMM with the queries)
    return B * (per_token * S + keys) + I64 + _compressor(cfg, c, Id, cfg.csa_ratio, True, s_b)  # + KL's count


def _moe(cfg, hashed: bool, c: ActivationCase, s_b: int) -> float:
    """Router, routed experts (N·k rows; each ep rank is assumed to receive as many rows as it sends) and the
    shared expert. The output is counted by mHC."""
    a, N = c.compute_bytes, c.rows * c.seq
    d, E, k, I = cfg.dim, cfg.n_routed_experts, cfg.n_activated_experts, cfg.moe_inter_dim
    shared = cfg.n_shared_experts
    if a == F32:
        inputs = F32 * d  # one input shared by the gate and the shared expert
    elif c.fp8:
        inputs = a * d + shared * s_b * d  # gate's cast; FP8 w1/w3 save their input as it is
    else:
        inputs = a * d + shared * (a if s_b == a else 2 * a) * d  # gate's cast; w1/w3 its own casts (or shared)
    router = 2 * a * E + I64 * k + a * k + a + (not hashed) * a  # softplus in/sqrt out, picks, weights, norm
    e = s_b  # expert rows come from the norm output: its dtype
    if c.fp8:  # FP8 GEMMs emit the compute dtype
        row = e * d + 6 * a * I + a * d + a + e * d
    else:
        row = e * (3 * d + 6 * I) + e  # rows in, SwiGLU (5) + w2 input, out, weighted out, weight
    row += 2 * I64 + (c.ep > 1) * 2 * I64  # token and sort order (+ the EP arrival sort and inverse)
    offsets = 0 if c.fp8 else 3 * 4 * E // c.ep  # int32 group offsets of the three grouped GEMMs
    return N * (inputs + router + k * row + shared * 6 * a * I / c.tp) + (not hashed) * F32 * E * c.rows + offsets


def block_activation_bytes(cfg, layer_type: str, hashed: bool, c: ActivationCase, s_b: int = F32) -> dict[str, float]:
    """Saved-for-backward bytes of one block by group. s_b: dtype of its streams (fp32, but the MTP block's
    streams are made by its compute-dtype projections)."""
    N, d, a = c.rows * c.seq, cfg.dim, c.compute_bytes
    return {
        "mhc": N * (2 * _mhc_site(cfg, a, s_b) + a * d + s_b * d),  # two sites, attention and FFN outputs
        "norms": N * 2 * _norm(d),
        "attention": _attention(cfg, layer_type, c, s_b),
        "moe": _moe(cfg, hashed, c, s_b),
    }


def _hc_head(cfg, a: int, s: int) -> float:
    """Per token: final collapse of streams of dtype s, the norm, the head's input."""
    n, nd = cfg.hc_mult, cfg.hc_mult * cfg.dim
    return F32 * nd * (1 + (s != F32)) + F32 + a * nd + a * n + 2 * F32 * n + _norm(cfg.dim) + a * cfg.dim


def head_activation_bytes(cfg, c: ActivationCase, first: bool = True, last: bool = True) -> dict[str, float]:
    """Token ids, final collapse, norm, head, logits and log-softmax of the main and MTP heads, the MTP fusion and
    the MTP block, and the stage outputs a pipeline keeps per chunk."""
    a, B, S, V = c.compute_bytes, c.rows, c.seq, cfg.vocab_size
    S_all, N, n, d = S * c.cp, B * c.seq, cfg.hc_mult, cfg.dim
    mtp = cfg.n_mtp_layers > 0
    out = {"head": 0.0, "mtp": 0.0}
    if first:
        out["head"] += I64 * B * (S_all + 1)  # the rows the ids and labels are views of
    if not last:
        if c.pipelined:  # the stage's outputs, held by the schedule for backward
            out["head"] += N * F32 * (n * d + mtp * d)
        return out
    logits = F32 if c.pipelined else a  # held by the step (a pipeline: the fp32 copies)
    out["head"] += N * (_hc_head(cfg, a, F32) + (logits + F32) * V)
    out["head"] += (B > 1) * I64 * N  # labels, a strided view of the rows: flattened by a copy
    if mtp:
        out["head"] += N * (_hc_head(cfg, a, a) + (logits + F32) * V)
        out["head"] += I64 * (N if B > 1 and c.cp > 1 else B * S_all)  # MTP targets (their piece, copied)
        proj = F32 if c.fp8 else a  # h_proj / e_proj inputs (FP8 saves them as they are)
        fusion = F32 * n * d + F32 * n + proj * n * d + _norm(d) + proj * d  # hnorm, enorm, projections
        block = block_activation_bytes(cfg, "swa", False, c, s_b=a)
        out["mtp"] += N * fusion + sum(block.values())
    return out


def _weight_numels(cfg, layer_type: str, hashed: bool, tp: int, ep: int) -> dict[str, float]:
    """Elements of the weights one block's matmuls use, as this rank holds them whole (tp/ep-local), by kind:
    'linear' (nn.Linear + mHC fn + gate), 'fp8' (the subset the FP8 path quantises), 'experts'."""
    d, H, c, q = cfg.dim, cfg.n_heads, cfg.head_dim, cfg.q_lora_rank
    n, I = cfg.hc_mult, cfg.moe_inter_dim
    wq_a, wq_b, wkv, wo_b = d * q, q * H * c / tp, d * c, cfg.o_groups * cfg.o_lora_rank * d / tp
    wo_a = H * c * cfg.o_lora_rank / tp
    shared = cfg.n_shared_experts * 3 * d * I / tp
    fp8 = wq_a + wq_b + wkv + wo_b + shared
    other = wo_a + 2 * (2 + n) * n * n * d + cfg.n_routed_experts * d  # wo_a (cast per use), hc fns, gate
    if layer_type != "swa":
        other += 2 * d * (2 if layer_type == "csa" else 1) * c  # compressor wkv, wgate
    # The indexer's inputs are detached, so its matmuls save no weight (no input gradient to compute), except
    # FP8's wq_b, whose autograd Function saves the dequantised weight anyway.
    indexer_fp8 = q * cfg.index_n_heads * cfg.index_head_dim if layer_type == "csa" else 0
    return {
        "fp8": fp8,
        "linear": fp8 + other,
        "experts": cfg.n_routed_experts // ep * 3 * d * I,
        "indexer_fp8": indexer_fp8,
    }


def weight_copy_bytes(cfg, c: ActivationCase, layers: list[int], first: bool, last: bool) -> float:
    """Copies of weights in another dtype that the forward saves (0 in fp32): bf16 autocast casts every weight
    a matmul uses once (its cache; wo_a, used through a view, is cast per use, once per layer); the routed experts
    run on fp32 rows (the norm output) and are not cast, except in the MTP block whose streams are bf16. FP8: the
    quantised linears and all experts save a dequantised fp32 weight instead (dsv4train/quant/linear.py)."""
    a = c.compute_bytes
    if a == F32 and not c.fp8:
        return 0.0
    total = 0.0
    blocks = [(cfg.layer_types[i], i < cfg.n_hash_layers, False) for i in layers]
    if last and cfg.n_mtp_layers:
        blocks.append(("swa", False, True))
    for layer_type, hashed, is_mtp in blocks:
        w = _weight_numels(cfg, layer_type, hashed, c.tp, c.ep)
        if c.fp8:
            total += F32 * (w["fp8"] + w["experts"] + w["indexer_fp8"]) + (a != F32) * a * (w["linear"] - w["fp8"])
        else:
            total += a * (w["linear"] + is_mtp * w["experts"])  # a != F32 here
    if last:
        n, d = cfg.hc_mult, cfg.dim
        hc = (1 + (cfg.n_mtp_layers > 0)) * n * n * d  # hc_head_fn of the model (and MTP)
        total += (a != F32) * a * (cfg.vocab_size * d / c.tp + hc)  # head (one copy for both heads)
        if cfg.n_mtp_layers:
            total += (F32 if c.fp8 else (a != F32) * a) * 2 * d * d  # e_proj, h_proj
    return total


def activation_bytes(
    cfg, c: ActivationCase, layers: list[int] | None = None, first: bool = True, last: bool = True
) -> dict[str, float]:
    """Bytes one forward keeps for its backward on one rank, by group (GROUPS; the names the measurement in
    dsv4train/testing/activation_memory.py groups by): the blocks `layers` (default: all), and the embedding
    side (`first`) and the head, losses and MTP (`last`) if this rank holds them."""
    layers = list(range(cfg.n_layers)) if layers is None else layers
    out = dict.fromkeys(GROUPS, 0.0)
    for i in layers:
        for key, value in block_activation_bytes(cfg, cfg.layer_types[i], i < cfg.n_hash_layers, c).items():
            out[f"layers.{key}"] += value
    for key, value in head_activation_bytes(cfg, c, first, last).items():
        out[key] += value
    out["weight copies"] = weight_copy_bytes(cfg, c, layers, first, last)
    return out


@dataclass
class RankActivations:
    bytes: float  # activations alive at the rank's peak (weight copies apart)
    weight_copies: float  # weight copies in the compute dtype / dequantised FP8 weights
    groups: dict[str, float]  # `bytes` by group, at the peak
    chunks_alive: int  # forwards (micro-batch, or pipeline chunks) alive at the peak
    indexer: str  # the CSA mode of the peak (dense during train.dense_indexer_steps)
    rows: float  # rows of one forward (micro_batch_size / pp chunks)


def _rank_stages(dims: ParallelDims, pp_rank: int, n_layers: int) -> list[tuple[int, list[int], bool, bool]]:
    """(global stage, layers, first, last) of the stages pp rank `pp_rank` runs, as pp.py lays them out."""
    if dims.pp == 1:
        return [(0, list(range(n_layers)), True, True)]
    n = dims.n_stages
    stages = [pp_rank, n - 1 - pp_rank] if dims.pp_schedule == "dualpipev" else list(range(pp_rank, n, dims.pp))
    runs = stage_layers(n_layers, n)
    return [(i, list(runs[i]), i == 0, i == n - 1) for i in stages]


def schedule_actions(dims: ParallelDims, pp_rank: int) -> list[tuple[int, str, int]]:
    """(stage, F | B | I | W, chunk) in the order pp rank `pp_rank` runs them in one step. 1F1B as torch's
    Schedule1F1B runs it (min(chunks, pp - rank) warm-up forwards, then backward-forward pairs); the interleaved
    and V schedules from torch's own action lists (their `_calculate_single_rank_operations`, given the few
    attributes it reads), with an overlapped F/B pair taken as its forward, then its backward."""
    m = dims.microbatches
    if dims.pp_schedule == "1f1b":
        warm = min(m, dims.pp - pp_rank)
        out = [(pp_rank, "F", i) for i in range(warm)]
        for b in range(m):
            out.append((pp_rank, "B", b))
            if warm + b < m:
                out.append((pp_rank, "F", warm + b))
        return out
    from torch.distributed.pipelining import schedules

    cls = {"interleaved_1f1b": schedules.ScheduleInterleaved1F1B, "dualpipev": schedules.ScheduleDualPipeV}
    sched = cls[dims.pp_schedule].__new__(cls[dims.pp_schedule])
    sched.pp_group_size, sched.n_local_stages, sched.rank, sched._n_microbatches = dims.pp, 2, pp_rank, m
    sched._num_stages = sched.num_stages = dims.n_stages
    sched.number_of_rounds = max(1, m // dims.pp)
    sched.microbatches_per_round = m // sched.number_of_rounds
    sched.stage_index_to_group_rank = schedules.generate_stage_to_rank_mapping(dims.pp, dims.n_stages, style="v")
    out = []

    def add(action):
        if action is None:
            return
        if action.sub_actions:
            for sub in action.sub_actions:
                add(sub)
        elif action.computation_type.value in "FBIW":
            out.append((action.stage_index, action.computation_type.value, action.microbatch_index))

    for action in sched._calculate_single_rank_operations(pp_rank):
        add(action)
    return out


def peak_in_flight(actions: list[tuple[int, str, int]], chunk_bytes: dict[int, float]) -> tuple[float, int]:
    """Largest sum of the activations of the chunks alive over `actions` (a forward adds its stage's chunk, a
    full backward B or a weight pass W frees it; an input pass I keeps what W needs), and how many were alive."""
    alive: dict[tuple[int, int], float] = {}
    peak, count = 0.0, 0
    for stage, kind, chunk in actions:
        if kind == "F":
            alive[(stage, chunk)] = chunk_bytes[stage]
            if sum(alive.values()) > peak:
                peak, count = sum(alive.values()), len(alive)
        elif kind in "BW":
            alive.pop((stage, chunk), None)
    return peak, count


def rank_activations(cfg: PretrainConfig, dims: ParallelDims, pp_rank: int = 0) -> RankActivations:
    """The activation memory of pp rank `pp_rank` at its peak: one micro-batch's forward (no activation
    checkpointing), or under pp its pipeline chunks alive at once in the schedule; the CSA mode that peaks
    among those the run uses (dense during train.dense_indexer_steps, then sparse)."""
    m, t, prec = cfg.model, cfg.train, cfg.precision
    a = 2 if prec.compute_dtype == "bfloat16" else 4
    modes = (["dense"] if t.dense_indexer_steps > 0 else []) + (["sparse"] if t.steps > t.dense_indexer_steps else [])
    stages = _rank_stages(dims, pp_rank, m.n_layers)
    chunks = dims.microbatches if dims.pp > 1 else 1
    best = None
    for mode in modes or ["sparse"]:
        case = ActivationCase(
            rows=t.micro_batch_size / chunks,
            seq=t.seq_len // dims.cp,
            compute_bytes=a,
            indexer=mode,
            fp8=prec.fp8,
            cp=dims.cp,
            tp=dims.tp,
            ep=dims.ep,
            pipelined=dims.pp > 1,
        )
        per_stage = {i: activation_bytes(m, case, layers, first, last) for i, layers, first, last in stages}
        copies = sum(g.pop("weight copies") for g in per_stage.values())
        bytes_of = {i: sum(g.values()) for i, g in per_stage.items()}
        if dims.pp > 1:
            peak, alive = peak_in_flight(schedule_actions(dims, pp_rank), bytes_of)
        else:
            peak, alive = bytes_of[0], 1
        if best is None or peak + copies > best.bytes + best.weight_copies:
            groups = dict.fromkeys(GROUPS[:-1], 0.0)
            for g in per_stage.values():  # one chunk of each stage, scaled to the peak's total
                for key, value in g.items():
                    groups[key] += value * peak / max(sum(bytes_of.values()), 1.0)
            best = RankActivations(peak, copies, groups, alive, mode, case.rows)
    return best


def stage_memory(cfg: PretrainConfig, dims: ParallelDims) -> list[StageMemory]:
    """Memory per rank of each pp stage (every rank of a stage needs the same, up to uneven FSDP shards)."""
    m = cfg.model
    fsdp, efsdp = dims.fsdp_shards, dims.expert_fsdp_shards  # dp·cp·ep and dp·cp, divided by dp_replicate
    counts = param_counts(m)
    n, d, V = m.hc_mult, m.dim, m.vocab_size
    hc_head = n * n * d + n + 1
    out = []
    for s, layers in enumerate(stage_layers(m.n_layers, dims.pp)):
        first, last = s == 0, s == dims.pp - 1
        el = {"dense_tp": 0.0, "dense": 0.0, "experts": 0.0, "adamw": 0.0, "adamw_tp": 0.0, "buffer_bytes": 0.0}
        blocks = []
        for i in layers:
            lp = _layer_params(m, m.layer_types[i], hashed=i < m.n_hash_layers)
            blocks.append(lp)
            for key in el:
                el[key] += lp[key]
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
        acts = rank_activations(cfg, dims, s)
        terms = {
            "params (fp32 master)": 4 * local,
            "grads (fp32)": 4 * local,
            "optimizer state": 4 * (muon_local + 2 * adamw_local),
            "router buffers": el["buffer_bytes"],
            "FSDP gathered units": 4 * gathered if fsdp > 1 else 0.0,
            "activations": acts.bytes,
            "weight copies (bf16/FP8)": acts.weight_copies,
        }
        sizes = {
            "dense_tp": el["dense_tp"],
            "dense": el["dense"],
            "experts": el["experts"],
            "local": local,
            "muon_local": muon_local,
            "adamw_local": adamw_local,
        }
        out.append(StageMemory(s, list(layers), holds, sizes, terms, acts.chunks_alive, acts))
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
    rows: list[dict]  # one per (pp, ep, tp): the dp·cp ranks that hold the same weights
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
            "describe": self.dims.describe(),
            "model": self.model,
            "params_total_with_mtp": self.params_total,
            "train": {
                "seq_len": self.seq_len,
                "micro_batch_size": self.micro_batch_size,
                "grad_accum": self.grad_accum,
                "compute_dtype": self.compute_dtype,
            },
            "optimizer": self.optimizer,
            "groups": {
                "fsdp": self.dims.dp * self.dims.cp * self.dims.ep,
                "efsdp": self.dims.dp * self.dims.cp,
                "fsdp_shards": self.dims.fsdp_shards,
                "efsdp_shards": self.dims.expert_fsdp_shards,
                "data_ranks": self.dims.data_ranks,
            },
            "stages": [
                {
                    "stage": s.stage,
                    "layers": s.layers,
                    "holds": s.holds,
                    "in_flight": s.in_flight,
                    "param_elements": s.elements,
                    "memory_gb": {k: v / GB for k, v in s.terms.items()},
                    "total_gb": s.total / GB,
                    "biggest": s.biggest,
                    "activations": None
                    if s.activations is None
                    else {
                        "indexer": s.activations.indexer,
                        "rows_per_forward": s.activations.rows,
                        "groups_gb": {k: v / GB for k, v in s.activations.groups.items()},
                    },
                }
                for s in self.stages
            ],
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
                rows.append(
                    {
                        "ranks": ranks,
                        "pp": p,
                        "ep": e,
                        "tp": t,
                        "layers": list(stages[p]),
                        "experts": list(expert_range(n_experts, dims.ep, e)),
                        "fsdp_group": g[p, :, :, :, t].flatten().tolist(),
                        "efsdp_group": ranks,
                    }
                )
    return rows


def make_plan(cfg: PretrainConfig, check_ranks: list[int] | None = None, gpu_memory_gb: float | None = None) -> Plan:
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
    return Plan(
        dims=dims,
        model=cfg.model.name,
        params_total=counts.total_with_mtp,
        seq_len=t.seq_len,
        micro_batch_size=t.micro_batch_size,
        grad_accum=t.grad_accum,
        compute_dtype=cfg.precision.compute_dtype,
        optimizer=cfg.optim.name,
        stages=stage_memory(cfg, dims),
        rows=placement_rows(dims, cfg.model.n_layers, cfg.model.n_routed_experts),
        mesh_checked=check_mesh(dims, ranks),
        gpu_memory_gb=gpu_memory_gb,
    )


__all__ = [
    "Plan",
    "StageMemory",
    "make_plan",
    "stage_layers",
    "expert_range",
    "coords_of",
    "groups_of",
    "fake_world",
    "check_mesh",
    "stage_memory",
    "placement_rows",
    "ActivationCase",
    "activation_bytes",
    "block_activation_bytes",
    "head_activation_bytes",
    "weight_copy_bytes",
    "rank_activations",
    "RankActivations",
    "schedule_actions",
    "peak_in_flight",
    "GROUPS",
]
