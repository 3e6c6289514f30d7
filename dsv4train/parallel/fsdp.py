"""Data parallelism with FSDP2 (`fully_shard`): each block is one FSDP unit (its weights are gathered just before
it runs and freed after), routed experts are their own unit on the "efsdp" mesh, and the root holds the
embedding, head, final norm and the MTP block (MTP runs through `forward_mtp`, which FSDP's forward hooks do
not see, so it stays in the root unit that is gathered for the whole forward). The root keeps torch's default
`reshard_after_forward` (None): it stays unsharded from forward into backward, as backward needs it first (head),
which saves one all-gather of the largest unit per step (as torchtitan does); blocks and experts reshard.

Gradient averaging: FSDP2 divides by the size of the unit's mesh. Dense weights see dp·cp·ep ranks of data, so
the default is right. Experts live on efsdp (dp·cp) but receive the tokens of the ep ranks as well through the
all-to-all; ep.py scales their gradient by 1/ep, so both equal the gradient of the mean loss over the whole
global batch, as on one process.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from dsv4train.models.moe import Experts


def apply_fsdp(
    model: nn.Module, fsdp_mesh: DeviceMesh, efsdp_mesh: DeviceMesh | None, param_dtype: torch.dtype = torch.float32
) -> None:
    """Shard `model` in place; experts go on `efsdp_mesh` when EP has split them. A mesh may be 2-D (replicate,
    shard): HSDP (mesh.fsdp_meshes)."""
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    kw = dict(mp_policy=mp, reshard_after_forward=True)
    if efsdp_mesh is not None:
        for m in model.modules():
            if isinstance(m, Experts):
                fully_shard(m, mesh=efsdp_mesh, **kw)
    for block in model.layers:
        fully_shard(block, mesh=fsdp_mesh, **kw)
    fully_shard(model, mesh=fsdp_mesh, mp_policy=mp)
