"""Pipeline parallelism over the "pp" mesh dim with `torch.distributed.pipelining` (1F1B, Interleaved 1F1B,
DualPipeV).

**Stages.** The layers are split into pp·v contiguous runs (`plan.stage_layers`: an even split, extra layers to the
middle stages first), v = 1 for `1f1b` and 2 for `interleaved_1f1b` and `dualpipev`. Stage s lives on pp rank
s mod pp (interleaved: ranks hold stages r and r+pp) or, for the V shape of DualPipeV, rank r holds stages r and
2pp-1-r (rank 0 holds the first and the last). Stage 0 also holds `embed`; the last stage holds the final hc
head (`hc_head_fn/base/scale`), `norm`, `head` and the MTP block.

**One module per rank, global names.** `split_stages` turns the full model into a `PipelineModel` (a `DSV4Model`
without the parts other ranks hold): `layers` becomes a `StageLayers` dict keyed by the global layer index, so
every parameter keeps its one-process name (`layers.2.attn.wq_a.weight`). Its state dict is this rank's slice of
the model's; DCP merges the slices of all ranks, so a checkpoint written with pp loads in any layout and vice
versa, and the optimizer groups (chosen by name) are the same. TP, EP and FSDP are applied to it afterwards as to
the whole model (FSDP: one unit per block, the root holds the rest). Each pipeline stage runs a `_StageChunk`, a
thin module (not a child, so it adds no names) that calls the `PipelineModel` with its chunk index, so FSDP's
root hooks see every stage's forward; its `parameters()` are the chunk's own (used by the split backward of
DualPipeV).

**What flows between stages.** The mHC streams x [b, S, hc_mult, d] (fp32, with gradient) and, when the model has
MTP, the embedding of the next tokens [b, S, d], computed by stage 0 (whose embedding then gets the MTP part of
its gradient back through the pipeline, so no tied-weight synchronisation is needed). The token ids are not sent:
every rank reads the same rows, and the schedule splits `step(..., input_ids=ids)` keyword arguments into the same
chunks as the inputs and hands each stage's forward its chunk. This is the schedule's own mechanism, independent of
the order in which a schedule runs its forwards (no side queue to keep in step). Stage metadata is given statically
(the shapes are known), so the schedule never runs a forward or backward of its own to infer shapes.

**Losses.** The last stage's `loss_fn` returns (CE + mtp_weight·MTP)·scale per chunk. The balance and indexer-KL
losses of each stage's blocks are attached to the stage's first output by `_AddAuxGrad` (identity forward; its
backward gives the weighted aux loss the gradient `1`), so they get their gradient on the rank where they were
computed. Gradients are not rescaled by the schedule (`scale_grads=False`): scale = 1/(chunks · micro-batches of the
step) is applied to both terms, which gives the one-process gradient of the mean over the step (chunks of one
micro-batch have equal token counts, so the mean of chunk means is the batch mean). Loss parts and expert counts
are recorded per chunk and summed over the pp ranks by the caller.

**DualPipeV with FSDP.** Its split backward (input gradients, later weight gradients, each its own autograd pass)
needs the FSDP units gathered from forward to weight pass and FSDP's gradient reduction held back until the weight
gradients exist; torch does this only for stages whose module is an FSDP module, so `Pipeline` does it for the whole
rank around the schedule step (`_split_backward_fsdp`).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import Schedule1F1B, ScheduleDualPipeV, ScheduleInterleaved1F1B

from dsv4train.models.model import DSV4Model, aux_losses
from dsv4train.parallel.dims import ParallelDims
from dsv4train.parallel.plan import stage_layers


@dataclass(frozen=True)
class StageSpec:
    index: int  # global stage index, 0 .. pp·v-1
    layers: range  # global layer indices
    first: bool
    last: bool


def rank_stages(dims: ParallelDims, pp_rank: int) -> list[int]:
    """Global indices of the stages pp rank `pp_rank` holds, in the order the schedule expects."""
    n = dims.n_stages
    if dims.pp_schedule == "dualpipev":
        return [pp_rank, n - 1 - pp_rank]
    return list(range(pp_rank, n, dims.pp))


def stage_specs(dims: ParallelDims, n_layers: int, pp_rank: int) -> list[StageSpec]:
    runs = stage_layers(n_layers, dims.n_stages)
    return [StageSpec(s, runs[s], s == 0, s == dims.n_stages - 1) for s in rank_stages(dims, pp_rank)]


class StageLayers(nn.ModuleDict):
    """The blocks of this rank's stages keyed by their global index (names stay `layers.<i>.…`); iterating gives
    the blocks in layer order, like the ModuleList it stands for."""

    def __iter__(self):
        return iter(self.values())


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


@dataclass
class StageRecord:
    """What one stage forward of one chunk reports (detached): its MoE rows, their expert counts, its aux losses."""

    rows: list[int]
    counts: torch.Tensor  # [len(rows), E]
    balance: torch.Tensor
    indexer: torch.Tensor


class PipelineModel(DSV4Model):
    """The parts of a DSV4Model that one pp rank holds, under their global names. `forward` runs one stage."""

    def __init__(self, model: DSV4Model, specs: list[StageSpec]):
        nn.Module.__init__(self)
        self.cfg = model.cfg
        self.specs = specs
        self.has_first = any(s.first for s in specs)
        self.has_last = any(s.last for s in specs)
        self.embed = model.embed if self.has_first else None
        self.layers = StageLayers({str(i): model.layers[i] for i in sorted(i for s in specs for i in s.layers)})
        self.norm = model.norm if self.has_last else None
        self.head = model.head if self.has_last else None
        if self.has_last:
            for name in ("hc_head_fn", "hc_head_base", "hc_head_scale"):
                setattr(self, name, getattr(model, name))
        self.mtp = model.mtp if self.has_last else nn.ModuleList()
        self.records: list[StageRecord] = []
        self.aux_weights = (0.0, 0.0)  # (balance, indexer) weight · scale, set by Pipeline before a step

    @property
    def moe_rows(self) -> list[int]:
        """Rows of the model's expert-count tensor ([n_layers + n_mtp, E]) that belong to this rank's MoE layers."""
        rows = [int(k) for k in self.layers.keys()]
        return rows + ([self.cfg.n_layers] if self.has_last and self.cfg.n_mtp_layers else [])

    def chunk_parameters(self, chunk: int):
        spec = self.specs[chunk]
        prefixes = tuple(f"layers.{i}." for i in spec.layers)
        for name, p in self.named_parameters():
            if name.startswith(prefixes) or (spec.first and name.startswith("embed.")) or \
                    (spec.last and not name.startswith(("layers.", "embed."))):
                yield name, p

    def forward(self, *acts, input_ids: torch.Tensor, chunk: int):
        """Stage `specs[chunk]` on one pipeline chunk. acts: (ids, next ids) at stage 0, else (streams, next
        embedding); the next-token parts only with MTP. Returns what the next stage (or the loss) takes."""
        spec, with_mtp = self.specs[chunk], self.cfg.n_mtp_layers > 0
        if spec.first:
            x_BSND = self.embed_streams(input_ids)
            next_BSD = self.embed(acts[1]) if with_mtp else None
        else:
            x_BSND, next_BSD = acts[0], (acts[1] if with_mtp else None)
        x_BSND, auxes = self.run_layers(x_BSND, input_ids, [self.layers[str(i)] for i in spec.layers])
        rows = list(spec.layers)
        if spec.last:
            outs = [self.final(x_BSND).float()]
            if with_mtp:
                mtp_logits, aux = self.mtp_logits(x_BSND, next_BSD)
                outs.append(mtp_logits.float())
                auxes.append(aux)
                rows.append(self.cfg.n_layers)
        else:
            outs = [x_BSND.float()] + ([next_BSD.float()] if with_mtp else [])
        if self.training and torch.is_grad_enabled():
            balance, indexer = aux_losses(auxes, outs[0])
            self.records.append(StageRecord(rows, torch.stack([a.moe.counts_E for a in auxes]).detach(),
                                            balance.detach(), indexer.detach()))
            aux = self.aux_weights[0] * balance + self.aux_weights[1] * indexer
            if aux.requires_grad:
                outs[0] = _AddAuxGrad.apply(outs[0], aux)
        return tuple(outs)


class _StageChunk(nn.Module):
    """What a PipelineStage runs: one chunk of a PipelineModel. Not registered as its child, so the model's names
    stay global; `parameters()` are the chunk's (the split backward of DualPipeV computes weight grads for them)."""

    def __init__(self, owner: PipelineModel, chunk: int):
        super().__init__()
        self.chunk = chunk
        self._owner = (owner,)

    def forward(self, *acts, input_ids: torch.Tensor):
        return self._owner[0](*acts, input_ids=input_ids, chunk=self.chunk)

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        return ((prefix + n, p) for n, p in self._owner[0].chunk_parameters(self.chunk))

    def parameters(self, recurse: bool = True):
        return (p for _, p in self.named_parameters())


def split_stages(model: DSV4Model, dims: ParallelDims, pp_rank: int) -> PipelineModel:
    """This pp rank's stages of `model` (built and initialised identically everywhere); other parts are dropped."""
    return PipelineModel(model, stage_specs(dims, model.cfg.n_layers, pp_rank))


_SCHEDULES = {"1f1b": Schedule1F1B, "interleaved_1f1b": ScheduleInterleaved1F1B, "dualpipev": ScheduleDualPipeV}


class Pipeline:
    """The schedule of one rank and the bookkeeping around it. `train` / `evaluate` run one micro-batch (split into
    `dims.microbatches` chunks) through all stages; every rank of the pp group calls them with the same rows."""

    def __init__(self, model: PipelineModel, dims: ParallelDims, group: dist.ProcessGroup, device: torch.device):
        self.model, self.dims, self.group, self.device = model, dims, group, device
        self.schedule = None
        self._shape: tuple[int, int] | None = None
        self._losses: list[torch.Tensor] = []
        self._loss_parts = None  # (outputs of the last stage, targets) -> (CE, MTP), given by the trainer
        self._mtp_weight, self._scale = 0.0, 1.0

    def _loss(self, outputs, targets_BS2: torch.Tensor) -> torch.Tensor:
        ce, mtp = self._loss_parts(outputs, targets_BS2)
        self._losses.append(torch.stack([ce.detach(), mtp.detach()]).double().cpu())
        return (ce + self._mtp_weight * mtp) * self._scale

    def _metas(self, spec: StageSpec, b: int, s: int) -> tuple[tuple, tuple]:
        cfg, with_mtp = self.model.cfg, self.model.cfg.n_mtp_layers > 0
        meta = dict(device="meta", requires_grad=True)  # what the stages send carries gradient back
        ids = (torch.empty(b, s, dtype=torch.long, device="meta"),) * (2 if with_mtp else 1)
        acts = (torch.empty(b, s, cfg.hc_mult, cfg.dim, **meta),) + \
            ((torch.empty(b, s, cfg.dim, **meta),) if with_mtp else ())
        logits = (torch.empty(b, s, cfg.vocab_size, **meta),) * (2 if with_mtp else 1)
        return (ids if spec.first else acts), (logits if spec.last else acts)

    def _build(self, rows: int, seq: int) -> None:
        m = self.dims.microbatches
        if rows % m:
            raise ValueError(f"parallel.pp_microbatches: {m} chunks do not divide a micro-batch of {rows} rows")
        stages = []
        for k, spec in enumerate(self.model.specs):
            inputs, outputs = self._metas(spec, rows // m, seq)
            stages.append(PipelineStage(_StageChunk(self.model, k), spec.index, self.dims.n_stages, self.device,
                                        input_args=inputs, output_args=outputs, group=self.group))
        cls = _SCHEDULES[self.dims.pp_schedule]
        self.schedule = cls(stages[0] if len(stages) == 1 else stages, m, loss_fn=self._loss, scale_grads=False)
        self._shape = (rows, seq)

    def _first_stage_args(self, inputs: torch.Tensor, targets_BS2: torch.Tensor) -> tuple:
        """Stage 0 takes the token ids and, with MTP, the next tokens (the labels) to embed for the MTP block."""
        return (inputs, targets_BS2[..., 0]) if self.model.cfg.n_mtp_layers else (inputs,)

    def _run(self, inputs: torch.Tensor, targets_BS2: torch.Tensor, train: bool) -> None:
        if self._shape != tuple(inputs.shape):
            self._build(*inputs.shape)
        args = self._first_stage_args(inputs, targets_BS2) if self.model.has_first else ()
        target = targets_BS2 if self.model.has_last else None
        self.model.records.clear()
        self._losses.clear()
        run = self.schedule.step if train else self.schedule.eval
        run(*args, target=target, input_ids=inputs, return_outputs=False)

    def train(self, inputs: torch.Tensor, targets_BS2: torch.Tensor, loss_parts, mtp_weight: float,
              balance_weight: float, indexer_weight: float, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and backward of one micro-batch: token ids [B, S] and targets [B, S, 2] (next-token labels, MTP
        targets); `loss_parts(outputs, targets)` gives the last stage's (CE, MTP) of a chunk. Gradients accumulate,
        scaled by `scale` / chunks. Returns this rank's (CE, MTP, balance, indexer) summed over its stages and
        averaged over the chunks (float64), and its expert counts [n_layers + n_mtp, E] (zeros in the rows of
        other ranks' layers): sum both over the pp group."""
        m = self.dims.microbatches
        self._loss_parts, self._mtp_weight, self._scale = loss_parts, mtp_weight, scale / m
        self.model.aux_weights = (balance_weight * scale / m, indexer_weight * scale / m)
        with self._split_backward_fsdp():
            self._run(inputs, targets_BS2, train=True)
        cfg = self.model.cfg
        parts = torch.zeros(4, dtype=torch.float64)
        if self._losses:
            parts[:2] = torch.stack(self._losses).sum(0)
        counts = torch.zeros(cfg.n_layers + cfg.n_mtp_layers, cfg.n_routed_experts, dtype=torch.long,
                             device=inputs.device)
        for rec in self.model.records:
            parts[2] += float(rec.balance)
            parts[3] += float(rec.indexer)
            counts[rec.rows] += rec.counts.to(counts.device, counts.dtype)
        self.model.records.clear()
        return parts / m, counts

    @contextmanager
    def _split_backward_fsdp(self):
        """Around a DualPipeV step with FSDP, what torch's pipelining does for a stage whose module is an FSDP
        module (UNSHARD / RESHARD / REDUCE_GRAD actions, no-sync backward), done here for the whole rank: our
        stages are `_StageChunk`s, which are not FSDP modules and share the rank's one FSDP root.

        The input pass (`stage_backward_input`) records the autograd nodes of the chunk's `parameters()` and the
        weight pass looks them up again by `parameters()`, so both must see the same gathered tensors: the units
        stay unsharded from their first forward to the end of the step (a reshard puts the sharded DTensors back on
        the modules). FSDP's post-backward hooks fire in the input pass, before the weight gradients exist, so
        during the step they only accumulate; afterwards every unit runs its post-backward with gradient sync on
        (reduce-scatter into the sharded gradients, reshard) and the root its end-of-backward callback, as
        `PipelineStage.perform_reduce_grad` does. 1F1B and Interleaved run one whole backward per chunk, whose
        hooks reduce as usual: nothing is changed for them."""
        root = self.model
        if self.dims.pp_schedule != "dualpipev" or not isinstance(root, FSDPModule):
            yield
            return
        # The root never reshards after forward (FSDP's default for it); the blocks and experts do (fsdp.py).
        inner = [m for m in root.modules() if isinstance(m, FSDPModule) and m is not root]
        root.set_is_last_backward(False)
        root.set_requires_gradient_sync(False)
        root.set_reshard_after_backward(False)
        for m in inner:
            m.set_reshard_after_forward(False, recurse=False)
        try:
            yield
        finally:
            for m in inner:
                m.set_reshard_after_forward(True, recurse=False)
            root.set_is_last_backward(True)
            root.set_requires_gradient_sync(True)
            root.set_reshard_after_backward(True)
        state = fully_shard.state(root)
        for unit in state._state_ctx.all_states:
            for group in unit._fsdp_param_groups:
                group.post_backward()
        state._root_post_backward_final_callback()

    @torch.no_grad()
    def evaluate(self, inputs: torch.Tensor, targets_BS2: torch.Tensor, loss_parts) -> torch.Tensor:
        """Forward only, the whole micro-batch at once, stage after stage with plain send/recv (the schedules run
        backward actions even in their eval mode, DualPipeV fails there). Returns this rank's CE (0 where the last
        stage is not held): sum it over the pp group."""
        owner = {s: r for r in range(self.dims.pp) for s in rank_stages(self.dims, r)}
        me = dist.get_rank(self.group)
        ce, acts = torch.zeros((), dtype=torch.float64), None
        for k, spec in sorted(enumerate(self.model.specs), key=lambda ks: ks[1].index):
            if spec.first:
                acts = self._first_stage_args(inputs, targets_BS2)
            elif owner[spec.index - 1] != me:
                acts = tuple(torch.empty(m.shape, dtype=m.dtype, device=inputs.device)
                             for m in self._metas(spec, *inputs.shape)[0])
                for t in acts:
                    dist.recv(t, group_src=owner[spec.index - 1], group=self.group)
            outs = self.model(*acts, input_ids=inputs, chunk=k)
            if spec.last:
                ce = loss_parts(outs, targets_BS2)[0].double().cpu()
            elif owner[spec.index + 1] != me:
                for t in outs:
                    dist.send(t.contiguous(), group_dst=owner[spec.index + 1], group=self.group)
            acts = outs
        return ce
