"""Measure what a training step keeps alive for its backward: the activation memory that `dsv4 plan` estimates
(dsv4train/parallel/plan.py, `activation_bytes`). Used by tests/unit/test_plan.py, tests/distributed and
bench/activation_memory.py.

    meter = ActivationMeter(model)
    with meter:
        learner.step(batches, loss_fn)   # the real step: forward, loss, backward, optimizer
    meter.peak.total_bytes                            # bytes alive when a backward started, at its largest

What counts, and how:

- **Saved tensors.** `torch.autograd.graph.saved_tensors_hooks` sees every tensor autograd saves for backward
  (including `ctx.save_for_backward` in our autograd functions). Each distinct storage counts once, whole, keyed
  by (`untyped_storage().data_ptr()`, `nbytes`): a view saves its base's storage, so a slice of the attention
  probabilities (`p_comp`) counts the storage of all the probabilities, and two views of one tensor count once.
  A DTensor (tensor parallelism) counts its local shard, a wrapper tensor its inner tensor.
- **When.** At the start of each backward, i.e. the first time a saved tensor is unpacked after a forward: no
  node has released its tensors yet, so this is everything the forward and the loss saved. Tensors saved in a part
  of the graph that was already freed (weak references gone) do not count. The peak is the largest such snapshot
  over the step's micro-batches.
- **Held outputs.** The model's outputs (the logits, the MTP logits) stay referenced by the step until its
  backward ends but are not saved by the loss (log-softmax saves its own output); their storages are added,
  deduplicated with the saved ones.
- **Parameters are not activations**: a saved parameter, or a view of one (`w.t()`, `wo_a.weight.view(...)`),
  is skipped; it is counted in the plan's parameter term. A copy of a parameter in another dtype is NOT a view:
  bf16 autocast saves a bf16 copy of every weight a matmul uses (autocast caches it, so a weight used twice is
  copied once), and `grouped_linear` casts the expert stacks; those copies live until the backward and count,
  reported apart as `weight_copy_bytes` (a saved storage whose shape is a parameter's shape).
- **Recomputation.** The model has no activation checkpointing; a recomputed region would save nothing in its
  forward and count only what its checkpoint keeps (its inputs).
- Buffers (router bias, hash table) are skipped like parameters. Integer tensors (top-k indices, expert order)
  count: they are real memory.
"""

from __future__ import annotations

import weakref
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn


def _local(t: torch.Tensor) -> torch.Tensor:
    """The plain tensor holding `t`'s memory: a DTensor's local shard, a wrapper subclass's inner tensor (the
    AsyncCollectiveTensor that a tensor-parallel module returns)."""
    for _ in range(4):
        flatten = getattr(t, "__tensor_flatten__", None)
        if flatten is None:
            return t
        names = flatten()[0]
        if not names:
            return t
        t = getattr(t, names[0])
    return t


def storage_key(t: torch.Tensor) -> tuple[int, int] | None:
    """(data_ptr, nbytes) of the storage under `t`; None for tensors without real memory (meta, fake, empty)."""
    t = _local(t)
    if t.device.type == "meta":
        return None
    try:
        s = t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # a wrapper subclass without storage
        return None
    n = s.nbytes()
    return None if n == 0 else (s.data_ptr(), n)


@dataclass
class SavedStorage:
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]  # of the first tensor saved on this storage
    module: str  # innermost module running when it was first saved: a name of model.named_modules(),
    # '(model)' for the model's own forward, '(loss)' outside it, '(held output)'
    weight_copy: bool = False


@dataclass
class Snapshot:
    storages: dict[tuple[int, int], SavedStorage] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(s.nbytes for s in self.storages.values())

    @property
    def weight_copy_bytes(self) -> int:
        return sum(s.nbytes for s in self.storages.values() if s.weight_copy)

    @property
    def activation_bytes(self) -> int:
        """Everything but the compute-dtype weight copies."""
        return self.total_bytes - self.weight_copy_bytes

    def groups(self) -> dict[str, int]:
        """Bytes by formula group (`group_of`), weight copies apart under 'weight copies'."""
        out: dict[str, int] = defaultdict(int)
        for s in self.storages.values():
            out["weight copies" if s.weight_copy else group_of(s.module)] += s.nbytes
        return dict(out)

    def by_module(self, depth: int | None = None) -> dict[str, int]:
        """Bytes by the module that saved them; `depth` keeps that many leading name parts, with layer indices
        replaced by '*' (layers.*.attn...)."""
        out: dict[str, int] = defaultdict(int)
        for s in self.storages.values():
            parts = ["*" if p.isdigit() else p for p in s.module.split(".")]
            out[".".join(parts[:depth] if depth else parts)] += s.nbytes
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def rows(self) -> list[tuple[str, str, tuple, int]]:
        """(module, dtype, shape, bytes), biggest first: for reading what the formula must cover."""
        return sorted(
            ((s.module, str(s.dtype).removeprefix("torch."), s.shape, s.nbytes) for s in self.storages.values()),
            key=lambda r: -r[3],
        )


_VIEW_NODES = (
    "TBackward",
    "ViewBackward",
    "TransposeBackward",
    "PermuteBackward",
    "ExpandBackward",
    "UnsafeViewBackward",
    "AliasBackward",
    "SelectBackward",
    "SliceBackward",
    "UnsqueezeBackward",
    "SqueezeBackward",
    "AsStridedBackward",
    "ReshapeAliasBackward",
    "_ScaleGradBackward",
    "_ToTorchTensorBackward",
)  # + EP's gradient scaling and DTensor.to_local(): identities


def _through_views(fn):
    """The first autograd node at or behind `fn` that is not a view (nor EP's gradient-scaling identity)."""
    for _ in range(16):
        if fn is None or not fn.name().startswith(_VIEW_NODES):
            return fn
        fn = fn.next_functions[0][0] if fn.next_functions else None
    return fn


def group_of(module: str) -> str:
    """The group of dsv4train.parallel.plan.GROUPS that the formula counts a storage first saved in `module` under:
    per block its mHC code (the block's own forward), its two norms, its attention (projections, window,
    compressor, indexer, KL), its MoE; the MTP fusion and block; everything else (embedding ids, final
    collapse, norms, head, logits, losses) is 'head'."""
    parts = module.split(".")
    if parts[0] == "layers" and len(parts) >= 2:
        if len(parts) == 2:
            return "layers.mhc"
        return {
            "attn_norm": "layers.norms",
            "ffn_norm": "layers.norms",
            "attn": "layers.attention",
            "ffn": "layers.moe",
        }[parts[2]]
    if parts[0] == "mtp" and module != "mtp.0.norm":
        return "mtp"
    return "head"


class ActivationMeter:
    """Context manager recording, over whatever runs inside it, the storages alive for each backward (module
    docstring). `model`: the module whose parameters and buffers are excluded and whose outputs are held."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.snapshots: list[Snapshot] = []
        self._names = {m: n or "(model)" for n, m in model.named_modules()}
        self._stack: list[str] = []
        self._modules: list[nn.Module] = []
        self._records: dict[tuple[int, int], tuple[list, SavedStorage]] = {}
        self._outputs: list = []
        self._forwarding = False
        self._handles: list = []

    # ------------------------------------------------------------------ results
    @property
    def peak(self) -> Snapshot:
        if not self.snapshots:
            raise RuntimeError("no backward ran inside the ActivationMeter")
        return max(self.snapshots, key=lambda s: s.total_bytes)

    # ------------------------------------------------------------------ hooks
    def _param_keys(self) -> None:
        """Storages of the parameters and buffers (skipped), their ids, and the shapes a dequantised copy of
        a weight has (a parameter's, or one expert's of a stacked [E, ...] one)."""
        self._param_ptrs, self._param_ids, self._param_shapes = set(), set(), set()
        for t in [*self.model.parameters(), *self.model.buffers()]:
            self._param_ids.add(id(t))
            t = _local(t)
            key = storage_key(t)
            if key is not None:
                self._param_ptrs.add(key[0])
            if t.is_floating_point():
                self._param_shapes.update({tuple(t.shape), *((tuple(t.shape[1:]),) if t.dim() == 3 else ())})

    def _is_weight_copy(self, t: torch.Tensor) -> bool:
        """A cast of a parameter (autocast's, or `.to(dtype)`): through views back to a cast whose input is,
        through views, the parameter. Or a tensor of a weight's shape without autograd history saved inside an
        FP8 module: its dequantised fp32 weight (made inside the FP8 autograd Function)."""
        if not t.is_floating_point():
            return False
        if t.grad_fn is None:
            from dsv4train.quant.modules import FP8Experts, FP8Linear

            return (
                not t.requires_grad
                and tuple(_local(t).shape) in self._param_shapes
                and bool(self._modules)
                and isinstance(self._modules[-1], (FP8Linear, FP8Experts))
            )
        fn = _through_views(t.grad_fn)
        if fn is None or fn.name() != "ToCopyBackward0":
            return False
        leaf = _through_views(fn.next_functions[0][0])
        return leaf is not None and id(getattr(leaf, "variable", None)) in self._param_ids

    def _pack(self, t: torch.Tensor):
        key = storage_key(t)
        if key is not None and key[0] not in self._param_ptrs:
            if not self._forwarding:  # a new forward: the previous micro-batch's records are spent
                self._records.clear()
                self._forwarding = True
            refs, rec = self._records.get(key, ([], None))
            if rec is None:
                local = _local(t)
                module = self._stack[-1] if self._stack else "(loss)"
                rec = SavedStorage(key[1], local.dtype, tuple(local.shape), module, self._is_weight_copy(t))
                self._records[key] = (refs, rec)
            refs.append(weakref.ref(t))
        return t

    def _unpack(self, t: torch.Tensor) -> torch.Tensor:
        if self._forwarding:
            self._forwarding = False
            self._snapshot()
        return t

    def _snapshot(self) -> None:
        snap = Snapshot()
        for key, (refs, rec) in self._records.items():
            if any(r() is not None for r in refs):
                snap.storages[key] = rec
        for ref in self._outputs:
            t = ref()
            key = None if t is None else storage_key(t)
            if key is not None and key not in snap.storages:
                snap.storages[key] = SavedStorage(key[1], t.dtype, tuple(t.shape), "(held output)")
        self._outputs.clear()
        self.snapshots.append(snap)

    def _pre(self, module, args):
        self._stack.append(self._names.get(module, self._stack[-1] if self._stack else ""))
        self._modules.append(module)

    def _post(self, module, args, output):
        self._stack.pop()
        self._modules.pop()

    def _model_output(self, module, args, output):
        values = (
            output
            if isinstance(output, (tuple, list))
            else list(vars(output).values())
            if hasattr(output, "__dataclass_fields__")
            else [output]
        )
        self._outputs += [weakref.ref(v) for v in values if isinstance(v, torch.Tensor) and v.requires_grad]

    def __enter__(self):
        self._param_keys()
        self._saved_hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._saved_hooks.__enter__()
        reg = nn.modules.module
        self._handles = [
            reg.register_module_forward_pre_hook(self._pre),
            reg.register_module_forward_hook(self._post, always_call=True),
            self.model.register_forward_hook(self._model_output),
        ]
        return self

    def __exit__(self, *exc):
        self._saved_hooks.__exit__(*exc)
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._records.clear()
        return False


def measure_step(
    model_cfg,
    seq: int,
    rows: int,
    precision: str = "fp32",
    indexer: str = "sparse",
    dims=None,
    fp8_block: int = 32,
    seed: int = 0,
) -> Snapshot:
    """Build `model_cfg`, run one real Learner step on `rows` random rows of `seq` tokens with the CSA layers in
    `indexer` mode (fp32, bf16 autocast or emulated fp8 with bf16 autocast) under an ActivationMeter and return
    its peak. `dims` (tp/cp/ep, with a process group already up): the model is split as parallelize() does, but
    without FSDP, whose gathered parameters live in storages it frees and refills in place (no storage count
    can tell them from activations; the plan counts them in its FSDP term); FSDP does not change activations."""
    from dsv4train.config.pretrain import PrecisionConfig, TrainConfig
    from dsv4train.models.model import DSV4Model
    from dsv4train.parallel.runtime import ParallelRuntime
    from dsv4train.quant import apply_precision
    from dsv4train.train.learner import Learner
    from dsv4train.train.losses import NextTokenLoss, lm_batch

    torch.manual_seed(seed)
    model = DSV4Model(model_cfg)
    model.init_weights(seed)
    if precision == "fp8":
        apply_precision(model, PrecisionConfig(name="fp8", compute_dtype="bfloat16", fp8=True, fp8_block=fp8_block))
    model.set_indexer_mode(indexer)
    rt = ParallelRuntime() if dims is None else ParallelRuntime(dims)
    if dims is not None and dims.world_size > 1:
        from dsv4train.parallel.cp import apply_context_parallel
        from dsv4train.parallel.ep import apply_expert_parallel
        from dsv4train.parallel.tp import apply_tensor_parallel

        if dims.tp > 1:
            apply_tensor_parallel(model, rt.mesh["tp"])
        if dims.ep > 1:
            apply_expert_parallel(model, rt.mesh["ep"])
        if dims.cp > 1:
            apply_context_parallel(model, rt.seq)
    batch = [
        lm_batch(torch.randint(0, model_cfg.vocab_size, (rows, seq + 1), generator=torch.Generator().manual_seed(seed)))
    ]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    with ActivationMeter(model) as meter:
        learner = Learner(model, optimizer, TrainConfig(seq_len=seq, micro_batch_size=rows), rt, dtype=dtype)
        learner.step(batch, NextTokenLoss(mtp_weight=0.3))
    return meter.peak
