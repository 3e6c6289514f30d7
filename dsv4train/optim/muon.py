"""Muon (arch ref §8.1, Algorithm 1 of the V4 paper) for matrices and stacks of matrices.

Per logically independent matrix W (n x m), with G its gradient:
    M <- mu*M + G;  U = mu*M + G (Nesterov) or M;  O = NS(U) * sqrt(max(n, m)) * rms;
    W <- W*(1 - lr*wd) - lr*O
A 3-D parameter [E, n, m] is E independent matrices (MoE experts). A 2-D parameter in a group with
`row_blocks=g` is g independent [n/g, m] matrices stacked by rows (wo_a's output groups).
"""

from __future__ import annotations

import math

import torch
from torch.optim import Optimizer

# (a, b, c) of each step X <- a*X + b*(X X^T) X + c*(X X^T)^2 X
_FAST = (3.4445, -4.7750, 2.0315)  # steep at 0: pushes singular values quickly towards 1
_SETTLE = (2.0, -1.5, 0.5)  # fixed point at 1 with zero slope: settles them there
NS_COEFFICIENTS = {"hybrid": (_FAST,) * 8 + (_SETTLE,) * 2, "quintic": (_FAST,) * 5}
_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def newton_schulz(u: torch.Tensor, coefficients, eps: float = 1e-7, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Approximate orthogonal polar factor of every matrix in u [B, n, m]; returned in `dtype`."""
    x = u.to(dtype)
    tall = x.size(-2) > x.size(-1)
    if tall:  # work on the wide side so that the Gram matrix X X^T is the smaller one
        x = x.mT
    x = x / (torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True) + eps)
    for a, b, c in coefficients:
        gram = x @ x.mT
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b*A + c*A^2
        x = torch.baddbmm(x, poly, x, beta=a)  # a*X + (b*A + c*A^2) X
    return x.mT if tall else x


def as_matrices(t: torch.Tensor, row_blocks: int = 1) -> torch.Tensor:
    """View t as a batch [B, n, m] of the independent matrices it holds."""
    if t.ndim == 3:
        return t
    return t.reshape(row_blocks, t.size(0) // row_blocks, t.size(1))


def resolve_ns_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


def orthogonal_update(
    u: torch.Tensor,
    ns: str = "hybrid",
    rms: float = 0.18,
    row_blocks: int = 1,
    eps: float = 1e-7,
    ns_dtype: str = "auto",
) -> torch.Tensor:
    """NS(u) per independent matrix, scaled to RMS `rms`; same shape and dtype as u."""
    mats = as_matrices(u, row_blocks)
    o = newton_schulz(mats, NS_COEFFICIENTS[ns], eps, resolve_ns_dtype(ns_dtype, u.device))
    scale = math.sqrt(max(mats.size(-2), mats.size(-1))) * rms
    return (o.to(u.dtype) * scale).reshape(u.shape)


def momentum_input(m: torch.Tensor, grad: torch.Tensor, mu: float, nesterov: bool) -> torch.Tensor:
    """M <- mu*M + G in place; returns the NS input U (mu*M + G with Nesterov, else M). Elementwise, so it runs
    unchanged on a local shard (parallel/muon.py)."""
    m.mul_(mu).add_(grad)
    return grad.add(m, alpha=mu) if nesterov else m


def apply_update(p: torch.Tensor, o: torch.Tensor, lr: float, weight_decay: float) -> None:
    """W <- W*(1 - lr*wd) - lr*O in place (decoupled weight decay); elementwise, like momentum_input."""
    p.mul_(1 - lr * weight_decay).add_(o, alpha=-lr)


class Muon(Optimizer):
    """Muon for 2-D matrices and 3-D stacks [E, n, m]. Group options: lr, momentum, nesterov, weight_decay,
    ns ("hybrid" | "quintic"), ns_dtype ("auto" | "bfloat16" | "float32"), rms, eps, row_blocks.
    State per parameter: `momentum_buffer` (the sum-form M above)."""

    def __init__(
        self,
        params,
        lr: float = 2.7e-4,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.1,
        ns: str = "hybrid",
        ns_dtype: str = "auto",
        rms: float = 0.18,
        eps: float = 1e-7,
        row_blocks: int = 1,
    ) -> None:
        defaults = dict(
            lr=lr,
            momentum=momentum,
            nesterov=nesterov,
            weight_decay=weight_decay,
            ns=ns,
            ns_dtype=ns_dtype,
            rms=rms,
            eps=eps,
            row_blocks=row_blocks,
        )
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if group["ns"] not in NS_COEFFICIENTS:
            raise ValueError(f"Muon: ns must be one of {tuple(NS_COEFFICIENTS)}, got {group['ns']!r}")
        if group["ns_dtype"] != "auto" and group["ns_dtype"] not in _DTYPES:
            raise ValueError(f"Muon: ns_dtype must be auto, bfloat16 or float32, got {group['ns_dtype']!r}")
        if not 0 <= group["momentum"] < 1:
            raise ValueError(f"Muon: momentum must be in [0, 1), got {group['momentum']}")
        g = group["row_blocks"]
        for i, p in enumerate(group["params"]):
            if p.ndim not in (2, 3):
                raise ValueError(
                    f"Muon: parameter {i} of group {len(self.param_groups) - 1} has shape "
                    f"{tuple(p.shape)}; Muon takes matrices [n, m] or stacks [E, n, m]. "
                    "Give vectors (norm gains, biases, sinks) to AdamW."
                )
            if g != 1 and (p.ndim != 2 or g < 1 or p.size(0) % g):
                raise ValueError(
                    f"Muon: row_blocks={g} needs 2-D parameters whose row count divides by it; "
                    f"parameter {i} has shape {tuple(p.shape)}"
                )

    def _momentum_buffer(self, p: torch.Tensor) -> torch.Tensor:
        """p's momentum buffer (zeros on first use); Muon takes dense gradients only."""
        if p.grad.is_sparse:
            raise RuntimeError("Muon does not support sparse gradients")
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state["momentum_buffer"]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        sq_sum, count = None, 0
        for group in self.param_groups:
            lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                u = momentum_input(self._momentum_buffer(p), p.grad, mu, group["nesterov"])
                o = orthogonal_update(
                    u, group["ns"], group["rms"], group["row_blocks"], group["eps"], group["ns_dtype"]
                )
                apply_update(p, o, lr, wd)
                sq = o.float().square().sum()
                sq_sum, count = (sq if sq_sum is None else sq_sum + sq), count + o.numel()
        # RMS of the orthogonalised update before the LR (≈ `rms`, 0.18): a tensor, so logging pays the sync
        self.last_update_rms = None if sq_sum is None else (sq_sum / count).sqrt()
        return loss
