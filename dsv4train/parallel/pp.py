"""Pipeline parallelism over the "pp" mesh dim with `torch.distributed.pipelining` (1F1B, Interleaved 1F1B,
DualPipeV).

**Stages.** The layers are split into pp·v contiguous runs (`plan.stage_layers`: an even split, extra layers to the
middle stages first), v = 1 for `1f1b` and 2 for `interleaved_1f1b` and `dualpipev`. Stage s lives on pp rank
s mod pp (interleaved: ranks hold stages r and r+pp) or, for the V shape of DualPipeV, rank r holds stages r and
2pp-1-r (rank 0 holds the first and the last). Stage 0 also holds `embed`; the last stage holds the final hc
head (`hc_head_fn/base/scale`), `norm`, `head` and the MTP block.

**One module per rank, global names.** `split_stages` removes from the full model the parts other ranks hold (it
stays a `DSV4Model`; `embed`, `norm`, `head`, the hc head and MTP are None where not held): `layers` becomes a
`StageLayers` dict keyed by the global layer index, so every parameter keeps its one-process name
(`layers.2.attn.wq_a.weight`). Its state dict is this rank's slice of
the model's; DCP merges the slices of all ranks, so a checkpoint written with pp loads in any layout and vice
versa, and the optimizer groups (chosen by name) are the same. TP, EP and FSDP are applied to it afterwards as to
the whole model (FSDP: one unit per block, the root holds the rest). Each pipeline stage runs a `_StageChunk`, a
thin module (not a child, so it adds no names) that calls the model with its slice (`model(ids, part=...)`,
models/model.py `forward_part`), so FSDP's root hooks see every stage's forward; its `parameters()` are the
chunk's own (used by the split backward of DualPipeV).

**What flows between stages.** The mHC streams x [b, S, hc_mult, d] (fp32, with gradient) and, when the model has
MTP, the embedding of the next tokens [b, S, d], computed by stage 0 (whose embedding then gets the MTP part of
its gradient back through the pipeline, so no tied-weight synchronisation is needed). The token ids are not sent:
every rank reads the same rows, and the schedule splits `step(..., input_ids=ids)` keyword arguments into the same
chunks as the inputs and hands each stage's forward its chunk. This is the schedule's own mechanism, independent of
the order in which a schedule runs its forwards (no side queue to keep in step). Stage metadata is given statically
(the shapes are known), so the schedule never runs a forward or backward of its own to infer shapes.

**Losses.** The schedule's loss on the last stage is the Learner's `loss_fn` (train/learner.py) on the chunk's
outputs and the chunk's rows of the micro-batch: the schedule's `target` is the row indices `arange(B)`, which it
splits into the same chunks as the inputs, so the loss reads its rows of every key of the batch whatever their dtype.
It returns loss_sum · scale, scale = R / N of the token-weighted convention (learner.py). The balance and indexer-KL
losses of each stage's blocks, weighted by the chunk's target count n (as the Learner weights them without a
pipeline), are attached to the stage's first output by `_AddAuxGrad` (identity forward; its backward gives the
weighted aux loss the gradient `1`), so they get their gradient on the rank where they were computed. Gradients are
not rescaled by the schedule (`scale_grads=False`). Loss sums, aux sums and expert counts are recorded per chunk and
summed over the pp and data ranks by the Learner.

**DualPipeV with FSDP.** Its split backward (input gradients, later weight gradients, each its own autograd pass)
needs the FSDP units gathered from forward to weight pass and FSDP's gradient reduction held back until the weight
gradients exist; torch does this only for stages whose module is an FSDP module, so `Pipeline` does it for the whole
rank around the schedule step (fsdp_split_backward.py, the one file that calls private FSDP state).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import Schedule1F1B, ScheduleDualPipeV, ScheduleInterleaved1F1B

from dsv4train.config.pretrain import PP_SCHEDULES
from dsv4train.models.model import DSV4Model, LayerSlice, ModelOutput, aux_losses
from dsv4train.parallel.dims import ParallelDims
from dsv4train.parallel.fsdp_split_backward import split_backward_gradient_sync
from dsv4train.parallel.plan import stage_layers


@dataclass(frozen=True)
class StageSpec:
    index: int  # global stage index, 0 .. pp·v-1
    part: LayerSlice  # its layers (global indices), and whether it embeds / applies the head


def rank_stages(dims: ParallelDims, pp_rank: int) -> list[int]:
    """Global indices of the stages pp rank `pp_rank` holds, in the order the schedule expects."""
    n = dims.n_stages
    if dims.pp_schedule == "dualpipev":
        return [pp_rank, n - 1 - pp_rank]
    return list(range(pp_rank, n, dims.pp))


def stage_specs(dims: ParallelDims, n_layers: int, pp_rank: int) -> list[StageSpec]:
    runs = stage_layers(n_layers, dims.n_stages)
    return [StageSpec(s, LayerSlice(runs[s], s == 0, s == dims.n_stages - 1)) for s in rank_stages(dims, pp_rank)]


class StageLayers(nn.ModuleDict):
    """The blocks of this rank's stages keyed by their global index (names stay `layers.<i>.…`); iterating gives
    the blocks in layer order and `[i]` takes the global index, like the ModuleList it stands for."""

    def __iter__(self):
        return iter(self.values())

    def __getitem__(self, i):
        return super().__getitem__(str(i))


class _AddAuxGrad(torch.autograd.Function):
    """Identity on `out`; in the backward the scalar `aux` (an auxiliary loss of the stage, already weighted and
    scaled) receives gradient 1, as if it had been added to the loss. The output is a copy, not a view: the split
    backward of DualPipeV detaches stage outputs in place, which views do not allow."""

    @staticmethod
    def forward(ctx, out, aux):
        ctx.aux_dtype = aux.dtype
        return out.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad, torch.ones((), dtype=ctx.aux_dtype, device=grad.device)


def split_stages(model: DSV4Model, specs: list[StageSpec]) -> DSV4Model:
    """Keep in `model` (built and initialised identically everywhere) only what `specs` hold, in place: the other
    layers are dropped, and embed / the head parts / MTP are set to None where no stage of this rank needs them."""
    first, last = any(s.part.first for s in specs), any(s.part.last for s in specs)
    model.layers = StageLayers({str(i): model.layers[i] for i in sorted(i for s in specs for i in s.part.layers)})
    if not first:
        model.embed = None
    if not last:
        model.norm = model.head = None
        model.hc_head_fn = model.hc_head_base = model.hc_head_scale = None
        model.mtp = nn.ModuleList()
    return model


def chunk_parameters(model: DSV4Model, part: LayerSlice):
    """(name, parameter) of one stage: its blocks, embed on the first, everything outside the blocks on the last.
    Read on every call: FSDP swaps the parameter objects between sharded and gathered."""
    prefixes = tuple(f"layers.{i}." for i in part.layers)
    for name, p in model.named_parameters():
        if (
            name.startswith(prefixes)
            or (part.first and name.startswith("embed."))
            or (part.last and not name.startswith(("layers.", "embed.")))
        ):
            yield name, p


class _StageChunk(nn.Module):
    """What a PipelineStage runs: one stage of this rank's model. It holds no modules (the model's names stay
    global): `run` calls the model on the stage's slice, `params` lists the stage's parameters (the split backward of
    DualPipeV computes weight grads for exactly those)."""

    def __init__(self, run, params):
        super().__init__()
        self.run, self.params = run, params

    def forward(self, *acts, input_ids: torch.Tensor, rows: torch.Tensor):
        return self.run(*acts, input_ids=input_ids, rows=rows)

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        return ((prefix + n, p) for n, p in self.params())

    def parameters(self, recurse: bool = True):
        return (p for _, p in self.named_parameters())


@dataclass
class MicroBatchRecord:
    """What one micro-batch left on this rank: the float64 sums [loss, metrics..., n·balance, n·indexer] (the loss
    and metrics from the last stage's chunks, zeros elsewhere; the aux losses of this rank's stages), the targets
    the loss saw, and the expert counts of its stages (zeros in the rows of other ranks' layers)."""

    sums: torch.Tensor
    counts: torch.Tensor
    n_targets: int = 0


def _last_stage_output(outs: tuple) -> ModelOutput:
    """The last stage's (logits[, MTP logits]) as the ModelOutput a loss function takes; its aux losses are the
    stages' own (attached by `_AddAuxGrad`), so they are zero here."""
    zero = outs[0].new_zeros(())
    return ModelOutput(outs[0], outs[1] if len(outs) > 1 else None, zero, zero, zero)


_SCHEDULES = {"1f1b": Schedule1F1B, "interleaved_1f1b": ScheduleInterleaved1F1B, "dualpipev": ScheduleDualPipeV}
assert _SCHEDULES.keys() == PP_SCHEDULES.keys(), "a schedule of config.pretrain.PP_SCHEDULES has no class here"


class Pipeline:
    """The schedule of one rank and the bookkeeping around it. `train` / `evaluate` run one micro-batch (split into
    `dims.microbatches` chunks) through all stages; every rank of the pp group calls them with the same rows."""

    def __init__(
        self,
        model: DSV4Model,
        specs: list[StageSpec],
        dims: ParallelDims,
        group: dist.ProcessGroup,
        device: torch.device,
    ):
        self.model, self.specs, self.dims, self.group, self.device = model, specs, dims, group, device
        self.schedule = None
        self._shape: tuple[int, int] | None = None
        # per micro-batch, set by train(): its rows, loss function, gradient scale and aux weights, what it records
        self._batch: dict[str, torch.Tensor] = {}
        self._row_targets = torch.zeros(0, dtype=torch.long)
        self._loss_fn = None
        self._scale, self._aux_weights = 1.0, (0.0, 0.0)
        self._record: MicroBatchRecord | None = None

    @property
    def holds_last_stage(self) -> bool:
        return any(s.part.last for s in self.specs)

    def _part_moe_rows(self, part: LayerSlice) -> list[int]:
        """Rows of the model's expert-count tensor ([n_layers + n_mtp, E]) of one stage's MoE layers (MTP last)."""
        cfg = self.model.cfg
        return list(part.layers) + ([cfg.n_layers] if part.last and cfg.n_mtp_layers else [])

    @property
    def moe_rows(self) -> list[int]:
        """The rows of all this rank's stages, in order."""
        return sorted(i for s in self.specs for i in self._part_moe_rows(s.part))

    # ------------------------------------------------------------------ what the schedule calls
    def _stage_forward(self, chunk: int, *acts, input_ids: torch.Tensor, rows: torch.Tensor):
        """Stage `specs[chunk]` on one pipeline chunk (its `rows` of the micro-batch): through the model's root
        call, so FSDP's hooks run; in training its aux losses are recorded and attached for their gradient."""
        part = self.specs[chunk].part
        positions = self._batch.get("positions")  # packed documents: each token's position in its document
        outs, auxes = self.model(
            input_ids,
            part=part,
            acts=acts[1:] if part.first else acts,
            positions=None if positions is None else positions[rows],
        )
        if not (self.model.training and torch.is_grad_enabled()):
            return outs
        balance, indexer = aux_losses(auxes, outs[0])
        n = self._row_targets[rows].sum()
        rec = self._record
        rec.sums[-2:] += torch.stack([n * balance.detach(), n * indexer.detach()]).double().cpu()
        rec.counts[self._part_moe_rows(part)] += torch.stack([a.moe.counts_E for a in auxes]).to(
            rec.counts.device, rec.counts.dtype
        )
        aux = self._scale * n * (self._aux_weights[0] * balance + self._aux_weights[1] * indexer)
        if aux.requires_grad:
            outs = (_AddAuxGrad.apply(outs[0], aux), *outs[1:])
        return outs

    def _loss(self, outputs: tuple, rows: torch.Tensor) -> torch.Tensor:
        """The schedule's loss on the last stage: the Learner's loss function on this chunk's rows."""
        chunk = {k: v[rows] for k, v in self._batch.items()}
        lo = self._loss_fn(_last_stage_output(outputs), chunk)
        rec = self._record
        rec.n_targets += int(lo.n_targets)
        rec.sums[:-2] += lo.sums(self._loss_fn.metric_names)
        return lo.loss_sum * self._scale

    # ------------------------------------------------------------------ building the schedule
    def _metas(self, part: LayerSlice, b: int, s: int) -> tuple[tuple, tuple]:
        cfg, with_mtp = self.model.cfg, self.model.cfg.n_mtp_layers > 0
        meta = dict(device="meta", requires_grad=True)  # what the stages send carries gradient back
        ids = (torch.empty(b, s, dtype=torch.long, device="meta"),) * (2 if with_mtp else 1)
        acts = (torch.empty(b, s, cfg.hc_mult, cfg.dim, **meta),) + (
            (torch.empty(b, s, cfg.dim, **meta),) if with_mtp else ()
        )
        logits = (torch.empty(b, s, cfg.vocab_size, **meta),) * (2 if with_mtp else 1)
        return (ids if part.first else acts), (logits if part.last else acts)

    def _build(self, rows: int, seq: int) -> None:
        m = self.dims.microbatches
        if rows % m:
            raise ValueError(f"parallel.pp_microbatches: {m} chunks do not divide a micro-batch of {rows} rows")
        stages = []
        for k, spec in enumerate(self.specs):
            inputs, outputs = self._metas(spec.part, rows // m, seq)
            chunk = _StageChunk(partial(self._stage_forward, k), partial(chunk_parameters, self.model, spec.part))
            stages.append(
                PipelineStage(
                    chunk,
                    spec.index,
                    self.dims.n_stages,
                    self.device,
                    input_args=inputs,
                    output_args=outputs,
                    group=self.group,
                )
            )
        cls = _SCHEDULES[self.dims.pp_schedule]
        self.schedule = cls(stages[0] if len(stages) == 1 else stages, m, loss_fn=self._loss, scale_grads=False)
        self._shape = (rows, seq)

    def _first_stage_args(self, batch: dict[str, torch.Tensor]) -> tuple:
        """Stage 0 takes the token ids and, with MTP, the next tokens to embed for the MTP block."""
        ids = batch["input_ids"]
        return (ids, batch["next_ids"]) if self.model.cfg.n_mtp_layers else (ids,)

    # ------------------------------------------------------------------ one micro-batch
    def train(
        self,
        batch: dict[str, torch.Tensor],
        row_targets_B: torch.Tensor,
        loss_fn,
        scale: float,
        aux_weights: tuple[float, float],
    ) -> MicroBatchRecord:
        """Forward and backward of one micro-batch (this rank's shard of its rows, every key [B, S]; `row_targets_B`
        the target tokens of each row, which weigh the stages' aux losses); gradients accumulate, scaled by `scale`
        (R / N). Returns what this rank recorded (see MicroBatchRecord)."""
        ids = batch["input_ids"]
        if self._shape != tuple(ids.shape):
            self._build(*ids.shape)
        cfg = self.model.cfg
        self._batch, self._loss_fn, self._scale, self._aux_weights = batch, loss_fn, scale, aux_weights
        self._row_targets = row_targets_B
        self._record = MicroBatchRecord(
            sums=torch.zeros(3 + len(loss_fn.metric_names), dtype=torch.float64),
            counts=torch.zeros(
                cfg.n_layers + cfg.n_mtp_layers, cfg.n_routed_experts, dtype=torch.long, device=ids.device
            ),
        )
        rows = torch.arange(ids.shape[0], device=ids.device)
        args = self._first_stage_args(batch) if any(s.part.first for s in self.specs) else ()
        with split_backward_gradient_sync(self.model, enabled=self.dims.pp_schedule == "dualpipev"):
            self.schedule.step(
                *args, target=rows if self.holds_last_stage else None, input_ids=ids, rows=rows, return_outputs=False
            )
        record, self._batch, self._loss_fn = self._record, {}, None
        return record

    @torch.no_grad()
    def evaluate(self, batch: dict[str, torch.Tensor], loss_fn) -> dict[str, torch.Tensor]:
        """Forward only, the whole micro-batch at once, stage after stage with plain send/recv (the schedules run
        backward actions even in their eval mode, DualPipeV fails there). Returns [n targets, loss sum, the loss
        function's metric sums] (float64) where the last stage is held, zeros elsewhere: sum it over the pp group."""
        owner = {s: r for r in range(self.dims.pp) for s in rank_stages(self.dims, r)}
        me = dist.get_rank(self.group)
        ids, acts = batch["input_ids"], None
        self._batch = batch
        result = torch.zeros(2 + len(loss_fn.metric_names), dtype=torch.float64)
        for k, spec in sorted(enumerate(self.specs), key=lambda ks: ks[1].index):
            part = spec.part
            if part.first:
                acts = self._first_stage_args(batch)
            elif owner[spec.index - 1] != me:
                acts = tuple(
                    torch.empty(m.shape, dtype=m.dtype, device=ids.device) for m in self._metas(part, *ids.shape)[0]
                )
                for t in acts:
                    dist.recv(t, group_src=owner[spec.index - 1], group=self.group)
            outs = self._stage_forward(k, *acts, input_ids=ids, rows=torch.arange(ids.shape[0]))
            if part.last:
                lo = loss_fn(_last_stage_output(outs), batch)
                result = lo.counted_sums(loss_fn.metric_names)
            elif owner[spec.index + 1] != me:
                for t in outs:
                    dist.send(t.contiguous(), group_dst=owner[spec.index + 1], group=self.group)
            acts = outs
        self._batch = {}
        return result
