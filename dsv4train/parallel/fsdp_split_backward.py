"""The one place that drives private FSDP2 state: holding FSDP's gradient reduction back during DualPipeV's split
backward, then running it once the weight gradients exist. tests/unit/test_fsdp_split_backward.py checks every
private name used here against the installed torch, so a torch release that renames them fails there, loudly,
instead of in the middle of a pipeline run.

Why: DualPipeV's split backward (input gradients, later weight gradients, each its own autograd pass) needs the FSDP
units gathered from forward to weight pass, and FSDP's gradient reduction held back until the weight gradients
exist. torch's pipelining does this only for stages whose module is an FSDP module (its UNSHARD / RESHARD /
REDUCE_GRAD actions, no-sync backward); our stages (parallel/pp.py `_StageChunk`) are not FSDP modules and share the
rank's one FSDP root, so it is done here for the whole rank around the schedule step.

The input pass (`stage_backward_input`) records the autograd nodes of the chunk's `parameters()` and the weight pass
looks them up again by `parameters()`, so both must see the same gathered tensors: the units stay unsharded from
their first forward to the end of the step (a reshard puts the sharded DTensors back on the modules). FSDP's
post-backward hooks fire in the input pass, before the weight gradients exist, so during the step they only
accumulate; afterwards every unit runs its post-backward with gradient sync on (reduce-scatter into the sharded
gradients, reshard) and the root its end-of-backward callback, as `PipelineStage.perform_reduce_grad` does. 1F1B and
Interleaved run one whole backward per chunk, whose hooks reduce as usual: nothing is changed for them.
"""

from __future__ import annotations

from contextlib import contextmanager

from torch import nn
from torch.distributed.fsdp import FSDPModule, fully_shard

# (object, attribute) pairs of FSDP2 internals used below; the test reads this list.
PRIVATE_NAMES = (
    ("FSDPState", "_state_ctx"),
    ("FSDPStateContext", "all_states"),
    ("FSDPState", "_fsdp_param_groups"),
    ("FSDPParamGroup", "post_backward"),
    ("FSDPState", "_root_post_backward_final_callback"),
)


@contextmanager
def split_backward_gradient_sync(root: nn.Module, enabled: bool):
    """Around one DualPipeV schedule step of an FSDP `root` (see the module docstring); a no-op when not `enabled`
    or when `root` is not an FSDP module (no data parallelism)."""
    if not enabled or not isinstance(root, FSDPModule):
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
    reduce_held_gradients(root)


def reduce_held_gradients(root: FSDPModule) -> None:
    """Every unit's post-backward (reduce-scatter, reshard), then the root's end-of-backward callback."""
    state = fully_shard.state(root)
    for unit in state._state_ctx.all_states:
        for group in unit._fsdp_param_groups:
            group.post_backward()
    state._root_post_backward_final_callback()
