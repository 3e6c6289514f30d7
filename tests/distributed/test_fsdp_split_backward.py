"""The private FSDP2 state that dsv4train/parallel/fsdp_split_backward.py drives (DualPipeV's split backward under
FSDP) exists in the installed torch and does what the shim needs: a torch release that renames or changes it fails
here, naming the attribute, instead of deep inside a pipeline run. The end-to-end check is
tests/distributed/test_pipeline.py::test_dualpipev_composes_with_fsdp."""

import pytest
import torch
from torch import nn

from dsv4train.testing.distributed import run_distributed_test

pytestmark = pytest.mark.dist


def _check(rank, world_size):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group, _fsdp_state

    from dsv4train.parallel.fsdp_split_backward import PRIVATE_NAMES, split_backward_gradient_sync

    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4))
    sharded = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4))
    sharded.load_state_dict(plain.state_dict())
    for block in (sharded[0], sharded[2]):
        fully_shard(block)
    fully_shard(sharded)
    x = torch.randn(6, 8)

    owners = {
        "FSDPState": _fsdp_state.FSDPState,
        "FSDPStateContext": _fsdp_state.FSDPStateContext,
        "FSDPParamGroup": _fsdp_param_group.FSDPParamGroup,
    }
    # Instance attributes are set in __init__: check them on live objects after a forward (lazy init).
    sharded(x).sum().backward()
    sharded.zero_grad(set_to_none=True)
    state = fully_shard.state(sharded)
    live = {
        "FSDPState": state,
        "FSDPStateContext": state._state_ctx,
        "FSDPParamGroup": state._fsdp_param_groups[0] if state._fsdp_param_groups else None,
    }
    for owner, attr in PRIVATE_NAMES:
        obj = live[owner] if live[owner] is not None else owners[owner]
        assert hasattr(obj, attr), (
            f"torch {torch.__version__}: {owner}.{attr} is gone; fsdp_split_backward.py "
            "needs a new way to hold back and then run FSDP's gradient reduction"
        )

    # Behaviour: with the reduction held back during the backward and run afterwards, the gradients are the plain
    # model's (one rank: the reduce-scatter is the identity; exact up to fp32 summation order, 1e-6).
    with split_backward_gradient_sync(sharded, enabled=True):
        sharded(x).sum().backward()
    plain(x).sum().backward()
    for (name, p), q in zip(sharded.named_parameters(), plain.parameters()):
        assert p.grad is not None, f"{name}: no gradient after the held-back reduction"
        torch.testing.assert_close(p.grad.full_tensor(), q.grad, rtol=1e-6, atol=1e-6, msg=name)


def test_private_fsdp_state_the_split_backward_needs():
    run_distributed_test(_check, world_size=1)
