"""Tensor parallelism over the "tp" mesh dim, by DTensor plans, module by module (tp ranks see the same batch).

| module | plan | why |
|---|---|---|
| attn.wq_b | ColwiseParallel | query heads split: each rank attends with H/tp heads (its input grad is all-reduced) |
| attn.attn_sink | Shard(0) | one sink per local head |
| attn.wo_a | Shard(0) (output groups) | heads are grouped for the low-rank output; o_groups/tp groups per rank |
| attn.wo_b | RowwiseParallel | input = the local groups' channels; output all-reduced |
| attn.wkv, kv_norm | replicated, grad all-reduced | the one K=V head (MQA) serves all heads; its grad sums theirs |
| attn.compressor | replicated, grad all-reduced | compressed entries, likewise shared by all heads |
| attn.wq_a, q_norm, indexer | replicated | small paths; the indexer's KL target sums all ranks' heads |
| ffn.shared_experts w1, w3 / w2 | Colwise / Rowwise | channel split of the shared SwiGLU expert |
| routed experts, router | replicated here | experts are split by expert parallelism (ep.py), not by TP |
| embed | RowwiseParallel | vocabulary rows split; output all-reduced |
| head | ColwiseParallel, output gathered | vocabulary split; logits all-gathered for the loss |
| norms, mHC | replicated | O(dim) work |

The model sees TP only through its parameters and one seam: `Attention` reads how many heads and output groups it
runs from the local shapes of `attn_sink` and `wo_a.weight` (`attention.local_shard`), and calls
`sum_over_head_shards` (set here) to sum the indexer's KL target over the heads of all ranks. Besides the parameters
it shards, that seam and the gradient all-reduce forward hooks on `kv_norm` and the compressor, nothing of a module
is written.

Per layer per micro-batch this costs one all-reduce of [B, S, dim] after wo_b and after the shared expert in the
forward, and in the backward one each for the inputs of wq_b and the shared expert and the K=V and compressed
entries (see docs/parallelism.md for the volume).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from dsv4train.config.errors import ConfigError
from dsv4train.models.attention import Attention
from dsv4train.models.moe import MoE

# the linears tp splits, and which of their dims: "out" (ColwiseParallel, weight Shard(0)) or "in" (Rowwise, Shard(1))
_SPLIT_DIMS = {
    "attn.wq_b": "out",
    "attn.wo_b": "in",
    "shared_experts.w1": "out",
    "shared_experts.w3": "out",
    "shared_experts.w2": "in",
}


class _GradAllReduce(torch.autograd.Function):
    """Identity forward; backward sums the gradient over the group (a replicated tensor used by sharded heads)."""

    @staticmethod
    def forward(ctx, t, group):
        ctx.group = group
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _SumOverGroup:
    """Sum of a (gradient-free) tensor over the tp ranks; picklable, no closures."""

    def __init__(self, group):
        self.group = group

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        t = t.contiguous()
        dist.all_reduce(t, group=self.group)
        return t


def _grad_all_reduce_hook(group):
    def hook(module, inputs, output):
        return _GradAllReduce.apply(output, group)

    return hook


def _shard_param(module: nn.Module, name: str, mesh: DeviceMesh) -> None:
    full = getattr(module, name)
    setattr(module, name, nn.Parameter(distribute_tensor(full.data, mesh, [Shard(0)])))


def _attention(attn: Attention, mesh: DeviceMesh) -> None:
    """Shard the heads' parameters (Attention reads its local head and group counts from their shapes), hook the
    shared K=V and compressed paths, and set the `sum_over_head_shards` seam."""
    group = mesh.get_group()
    parallelize_module(attn, mesh, {"wq_b": ColwiseParallel(), "wo_b": RowwiseParallel()})
    _shard_param(attn, "attn_sink", mesh)
    _shard_param(attn.wo_a, "weight", mesh)
    attn.kv_norm.register_forward_hook(_grad_all_reduce_hook(group))
    if hasattr(attn, "compressor"):
        attn.compressor.register_forward_hook(_grad_all_reduce_hook(group))
    attn.sum_over_head_shards = _SumOverGroup(group)


def check_fp8_blocks_under_tp(model: nn.Module, tp: int) -> None:
    """An FP8 linear (quant/modules.py; it has a `block`) that tp splits must keep whole FP8 blocks on every rank:
    its weight's B×B blocks and its activations' 1×B tiles are cut along the split dim. A ConfigError names the
    layer and a block that would fit, before anything is sharded."""
    for name, module in model.named_modules():
        block = getattr(module, "block", None)
        split = next((d for suffix, d in _SPLIT_DIMS.items() if name == suffix or name.endswith("." + suffix)), None)
        if block is None or split is None:
            continue
        size = module.out_features if split == "out" else module.in_features
        local = size // tp
        if local % block:
            fit = 1 << min((local & -local).bit_length() - 1, block.bit_length() - 1)
            raise ConfigError(
                f"{name}: parallel.tp={tp} leaves {local} of its {size} {split}put channels on each "
                f"rank, not a multiple of the FP8 block {block}; use precision.fp8_block={fit} or a "
                f"smaller parallel.tp"
            )


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Split `model` over `tp_mesh` in place, per the table above."""
    check_fp8_blocks_under_tp(model, tp_mesh.size())
    parallelize_module(
        model,
        tp_mesh,
        {
            "embed": RowwiseParallel(input_layouts=Replicate()),
            "head": ColwiseParallel(output_layouts=Replicate()),
        },
    )
    for module in model.modules():
        if isinstance(module, Attention):
            _attention(module, tp_mesh)
        elif isinstance(module, MoE) and module.shared_experts is not None:
            parallelize_module(
                module.shared_experts,
                tp_mesh,
                {"w1": ColwiseParallel(), "w3": ColwiseParallel(), "w2": RowwiseParallel()},
            )
