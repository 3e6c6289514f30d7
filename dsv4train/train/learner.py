"""The Learner: the model, its optimizer, the parallel runtime and the precision of a run, and the one training step
every stage uses (pre-training now; SFT, GRPO and distillation next). A stage supplies its micro-batches and a loss
function; everything else of a step happens here, once:

    step(micro_batches, loss_fn):
        count the target tokens of the whole global batch (N) -> forward + backward of each micro-batch (whole model,
        or the pipeline schedule) -> metrics reduced over the ranks -> NaN policy -> clip -> optimizer step ->
        router bias update

**Loss convention.** A step's loss is the sum over target tokens divided by the number N of target tokens in the
whole global batch (all micro-batches, all data and context ranks). `loss_fn(outputs, batch)` returns SUMS over its
micro-batch's target tokens (train/losses.py `LossOutput`). N is known before the first forward: every rank counts
its micro-batches' targets (labels != IGNORE) and one all-reduce over the data ranks adds them up. Each micro-batch
then back-propagates (loss_sum + n · aux) · R / N, where R = dp·cp·ep is the number of ranks whose gradients FSDP
averages, so the averaged gradient is that of Σ loss / N. When every row has the same number of targets (packed
pre-training rows) this equals the old mean of micro-batch means; with masks (SFT, RL token-mean) only this is right.

**Padding.** A step whose micro-batches the data ranks cannot share equally (GRPO's, of any number) gives the ranks
with fewer some padding micro-batches (`step(..., padding=k)`, the last k): every label IGNORE, so they add no target
to N and nothing to the loss, and their expert counts are left out. They only make every rank run as many
forward/backward passes, which FSDP's and EP's collectives need.

The model's auxiliary losses (the MoE balance loss and the indexer KL, arch ref §5.3, §3.4) are means over one
micro-batch; they enter weighted by the micro-batch's target count n, i.e. as a token-weighted mean over the
micro-batches (the plain mean when micro-batches hold equal counts), with the weights of `train.balance_loss_weight`
and `train.indexer_loss_weight`.

The loss function sees the model's outputs, not the model: under pipeline parallelism only the last stage has the
logits, and the schedule calls the same `loss_fn` there on each pipeline chunk.

Work a step does not need is not done: a loss function whose `uses_mtp` is False (GRPO's) gets no MTP logits, so
the MTP block is not run, and one with `logits_from(batch)` gets the logits from that position on only (GRPO: from
the first completion token; the prompt's positions skip the output head). Both without pipeline parallelism,
whose stages run their whole slice. (A stage that does not train the indexer turns its KL off itself,
`model.set_indexer_kl(False)`, and freezes the indexer: a parameter that never gets a gradient has no optimizer
state, and a checkpoint without it does not resume.)
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from tqdm import tqdm

from dsv4train.config.pretrain import TrainConfig
from dsv4train.models.model import DSV4Model, ModelOutput
from dsv4train.models.moe import update_router_bias
from dsv4train.parallel.runtime import ParallelRuntime
from dsv4train.train import checkpoint
from dsv4train.train.losses import LossOutput, batch_routes, row_targets

Batch = dict[str, torch.Tensor]  # whole rows [B, S] per key, see train/losses.py


class LossFn(Protocol):
    metric_names: tuple[str, ...]  # the keys of LossOutput.metrics, in a fixed order
    # uses_mtp: bool, optional (default True): False when the loss never reads outputs.mtp_logits
    # logits_from(batch) -> int, optional: the first position whose logits the loss reads (outputs.logits then
    # starts there)

    def __call__(self, outputs: ModelOutput, batch: Batch) -> LossOutput: ...


@dataclass
class StepResult:
    loss: float  # Σ (loss_sum + n · aux) / N: what was minimised
    metrics: dict[str, float]  # the loss function's metrics and the aux losses, each Σ / N
    n_targets: int  # N, the global batch's target tokens
    grad_norm: float
    expert_counts: torch.Tensor  # [n_moe_layers, E], summed over the micro-batches and the data ranks
    skipped: bool = False
    reason: str = ""

    def log(self) -> dict:
        counts = self.expert_counts.float()
        load = (counts.max(-1).values / counts.mean(-1).clamp_min(1e-9)).tolist()
        return {
            "loss": self.loss,
            **self.metrics,
            "grad_norm": self.grad_norm,
            "expert_load_max_over_mean": load,
            "skipped": self.skipped,
        }


def autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


_AUX = ("balance_loss", "indexer_loss")


@dataclass
class Learner:
    model: DSV4Model  # already parallelised (rt.parallelize) and with its precision applied
    optimizer: object  # anything with zero_grad / step
    train: TrainConfig  # grad_clip, aux loss weights, bias_update_speed, nan_policy, max_nan_skips
    rt: ParallelRuntime = field(default_factory=ParallelRuntime)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32  # autocast dtype (float32: none)
    checkpoint_root: Path | None = None  # named in the error when the NaN policy stops the run
    nan_skips: int = 0  # steps skipped in a row for a non-finite loss or gradient

    # ------------------------------------------------------------------ the step
    def step(
        self, micro_batches: list[Batch], loss_fn: LossFn, number: int | None = None, padding: int = 0
    ) -> StepResult:
        """Forward/backward over this rank's micro-batches, then clip and step (or skip, by the NaN policy). Every
        rank returns the same numbers and takes the same skip decision. `number`: the step's number in the run, for
        the messages. `padding`: the last that many micro-batches only keep this rank in step with data ranks that
        have more (FSDP's collectives need as many forward/backward passes on every rank; GRPO's step splits into
        any number): their labels must be all IGNORE, and their tokens add nothing, not even expert counts."""
        rt, model = self.rt, self.model
        model.train()
        self.optimizer.zero_grad(set_to_none=True)
        shards = [self._shard(b) for b in micro_batches]
        rows_counted = [row_targets(b) for b in shards]
        counted = torch.stack([r.sum().cpu() for r in rows_counted])
        n_real = len(shards) - padding
        if not 0 <= padding <= len(shards) or bool(counted[n_real:].any()):
            raise ValueError(
                f"padding={padding}: the last {padding} of the {len(shards)} micro-batches must exist and have every "
                "label IGNORE (padding holds no target tokens)"
            )
        n_global = int(rt.sum_over_data(counted.sum().double()))
        if n_global == 0:
            raise ValueError(
                "the step's micro-batches hold no target tokens (every label is IGNORE): check the "
                "data's loss masks (a prompt longer than the sequence masks a whole row)"
            )
        scale = self._grad_average_ranks() / n_global
        names = ("loss", *loss_fn.metric_names, *_AUX)
        if rt.pipeline is None:
            sums, counts = self._forward_backward(shards, counted, loss_fn, scale, n_real)
        elif any(batch_routes(b) for b in shards):
            raise NotImplementedError(
                "keep-routing (routes.<layer> batch keys) is not passed through the pipeline schedule yet: train "
                "with replayed routes without pipeline parallelism (parallel.pp=1)"
            )
        else:
            sums, counts = self._pipelined_forward_backward(shards, rows_counted, counted, loss_fn, scale, n_real)
        # one all-reduce of the sums [loss, metrics..., balance, indexer] and one of the counts, over the data ranks
        totals = dict(zip(names, (rt.sum_over_data(sums) / n_global).tolist()))
        counts = rt.sum_over_data(counts)
        loss = totals.pop("loss") + sum(w * totals[k] for k, w in zip(_AUX, self._aux_weights()))
        grad_norm = float(rt.clip_grad_norm(model.parameters(), self.train.grad_clip))
        result = StepResult(loss, totals, n_global, grad_norm, counts)
        if not (
            torch.isfinite(torch.tensor([loss, *totals.values()])).all() and torch.isfinite(torch.tensor(grad_norm))
        ):
            return self._skip(result, f"step {number}: " if number is not None else "")
        self.nan_skips = 0
        self.optimizer.step()
        update_router_bias(model, self._local_expert_counts(counts), self.train.bias_update_speed)
        return result

    def _skip(self, result: StepResult, where: str) -> StepResult:
        """The NaN policy: drop the update; stop the run when train.nan_policy=stop or too many in a row."""
        self.optimizer.zero_grad(set_to_none=True)
        self.nan_skips += 1
        result.skipped, result.reason = True, f"loss {result.loss}, grad norm {result.grad_norm}"
        t = self.train
        if t.nan_policy == "stop" or self.nan_skips > t.max_nan_skips:
            resume = checkpoint.latest(self.checkpoint_root) if self.checkpoint_root is not None else None
            raise FloatingPointError(
                f"{where}non-finite loss or gradient ({result.reason}); {self.nan_skips} such step(s) in a row. Lower "
                f"optim.lr, check the data, or resume from {resume}"
            )
        if self.rt.is_main:
            tqdm.write(
                f"{where}non-finite loss or gradient ({result.reason}); update skipped ({self.nan_skips} in a row, at "
                f"most train.max_nan_skips={t.max_nan_skips})",
                file=sys.stderr,
            )
        return result

    def _aux_weights(self) -> tuple[float, float]:
        return self.train.balance_loss_weight, self.train.indexer_loss_weight

    def _grad_average_ranks(self) -> int:
        """Ranks whose gradients FSDP averages (dp·cp·ep; 1 without FSDP, where dp·cp·ep is 1 too)."""
        d = self.rt.dims
        return d.dp * d.cp * d.ep

    def _forward(self, batch: Batch, loss_fn: LossFn) -> ModelOutput:
        """The whole model on one micro-batch (the MTP block reads `next_ids`; packed documents give `positions`;
        GRPO's `routes.<layer>` are replayed), under the run's autocast, with what `loss_fn` reads (module
        docstring)."""
        with_mtp = getattr(loss_fn, "uses_mtp", True)
        logits_from = loss_fn.logits_from(batch) if hasattr(loss_fn, "logits_from") else 0
        with autocast(self.device, self.dtype):
            return self.model(
                batch["input_ids"],
                mtp_input_ids=batch.get("next_ids"),
                with_aux=True,
                positions=batch.get("positions"),
                routes=batch_routes(batch),
                with_mtp=with_mtp,
                logits_from=logits_from,
            )

    def _shard(self, batch: Batch) -> Batch:
        """This rank's piece of every [B, S] tensor (its context-parallel shard; all of it otherwise)."""
        return {k: self.rt.seq.shard(v.to(self.device, non_blocking=True)) for k, v in batch.items()}

    def _forward_backward(
        self, shards: list[Batch], counted: torch.Tensor, loss_fn: LossFn, scale: float, n_real: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole model on this rank: the float64 sums [loss, metrics..., n·balance, n·indexer] over its
        micro-batches, and the expert counts [n_moe_layers, E] of the first `n_real` (the rest is padding)."""
        w_bal, w_idx = self._aux_weights()
        sums = torch.zeros(3 + len(loss_fn.metric_names), dtype=torch.float64)
        counts = []
        for batch, n in zip(shards, counted):
            out = self._forward(batch, loss_fn)
            lo = loss_fn(out, batch)
            _check_count(lo, n)
            aux = n * (w_bal * out.balance_loss + w_idx * out.indexer_loss)
            ((lo.loss_sum + aux) * scale).backward()
            n_aux = torch.stack([n * out.balance_loss, n * out.indexer_loss]).detach().double().cpu()
            sums += torch.cat([lo.sums(loss_fn.metric_names), n_aux])
            counts.append(out.expert_counts.detach())
        return sums, _real_counts(counts, n_real)

    def _pipelined_forward_backward(
        self,
        shards: list[Batch],
        rows_counted: list[torch.Tensor],
        counted: torch.Tensor,
        loss_fn: LossFn,
        scale: float,
        n_real: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The same through this rank's pipeline stages (parallel/pp.py): the schedule calls `loss_fn` on the last
        stage's chunks, the aux losses get their gradient on the stage that computed them; the sums and counts of
        the stages are added over the pp ranks."""
        pipeline = self.rt.pipeline
        records = [
            pipeline.train(batch, rows, loss_fn, scale, self._aux_weights())
            for batch, rows in zip(shards, rows_counted)
        ]
        if pipeline.holds_last_stage:
            for rec, n in zip(records, counted):
                _check_count(rec, n)
        sums = self.rt.sum_over_stages(sum(r.sums for r in records))
        return sums, self.rt.sum_over_stages(_real_counts([r.counts for r in records], n_real))

    def _local_expert_counts(self, counts: torch.Tensor) -> torch.Tensor:
        """The rows of the global expert counts that belong to this rank's MoE layers (its stages' under pp)."""
        return counts if self.rt.pipeline is None else counts[self.rt.pipeline.moe_rows]

    # ------------------------------------------------------------------ checkpoints
    def save(self, ckpt_root: Path, step: int, stage_state: dict, keep: int, optim_cfg=None) -> Path:
        """`ckpt_root/step_<step>`: model and optimizer (DCP shards, any layout loads them) and the stage's state
        (data position, RNG, counters; the Learner adds its `nan_skips`). Every rank calls it."""
        state = {**stage_state, "nan_skips": self.nan_skips}
        return checkpoint.save(ckpt_root, step, self.model, self.optimizer, state, keep, self.rt, optim=optim_cfg)

    def load(self, step_dir: Path, optimizer_state: bool | None = True) -> tuple[bool, dict]:
        """Model and (see checkpoint.load) optimizer from `step_dir`; returns (optimizer state loaded, the stage's
        state as saved)."""
        loaded = checkpoint.load(step_dir, self.model, self.optimizer, optimizer_state=optimizer_state)
        state = checkpoint.trainer_state(step_dir)
        self.nan_skips = state["nan_skips"]
        return loaded, state

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, batches: list[Batch], loss_fn: LossFn) -> dict[str, float]:
        """The loss function's metrics over `batches` (this rank's rows of them), each Σ / N over the global
        batch, as in training."""
        self.model.eval()
        sums = torch.zeros(2 + len(loss_fn.metric_names), dtype=torch.float64)  # [n, loss, metrics...]
        for batch in map(self._shard, batches):
            if self.rt.pipeline is None:
                lo = loss_fn(self._forward(batch, loss_fn), batch)
                sums += lo.counted_sums(loss_fn.metric_names)
            else:
                with autocast(self.device, self.dtype):
                    sums += self.rt.pipeline.evaluate(batch, loss_fn)
        self.model.train()
        n, _, *values = self.rt.sum_over_data(self.rt.sum_over_stages(sums)).tolist()
        return dict(zip(loss_fn.metric_names, (v / n for v in values)))


def _real_counts(counts: list[torch.Tensor], n_real: int) -> torch.Tensor:
    """The sum of the first `n_real` micro-batches' expert counts (zeros when there are none): padding routes
    tokens too, but they are not the step's."""
    return sum(counts[:n_real], torch.zeros_like(counts[0]))


def _check_count(lo, counted: torch.Tensor) -> None:
    """The loss function's target count must be the one the step was normalised by (its non-IGNORE labels)."""
    if int(lo.n_targets) != int(counted):
        raise ValueError(
            f"the loss function reports {int(lo.n_targets)} target tokens for a micro-batch whose labels "
            f"hold {int(counted)}: the Learner divides by the labels' count (non-IGNORE), so a loss "
            "must sum over exactly those positions"
        )
