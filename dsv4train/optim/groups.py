"""Which parameter goes to which optimizer, by name (arch ref §8.1), and building the optimizers.

AdamW: the embedding and output head (weight decay `weight_decay`); RMSNorm gains, the mHC static biases
and gates `hc_*_base`/`hc_*_scale`, `attn_sink` and the compressor position biases `ape` (weight decay
`vector_weight_decay`). Muon: every other matrix, i.e. attention / compressor / indexer linears, mHC `fn`,
the router gate, MTP e_proj/h_proj, stacked experts (per expert) and wo_a (per output group).
With `cfg.name == "adamw"` the Muon matrices go to AdamW as well.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from dsv4train.config.optim import OptimConfig
from dsv4train.optim.combined import CombinedOptimizer
from dsv4train.optim.muon import Muon

ADAMW_MATRICES = ("embed.weight", "head.weight")
_VECTOR_LIKE = re.compile(r"(^|\.)(\w*norm\.weight|hc_\w+_(base|scale)|attn_sink|ape)$")
_WO_A = re.compile(r"(^|\.)attn\.wo_a\.weight$")

# group labels: "<optimizer>" or "<optimizer>:<variant>"
MUON, MUON_BLOCKS, ADAMW, ADAMW_NO_DECAY = "muon", "muon:row_blocks", "adamw", "adamw:vector"


def _label(name: str, p: torch.Tensor, split_wo_a: bool) -> str:
    if name in ADAMW_MATRICES:
        return ADAMW
    if _VECTOR_LIKE.search(name):
        return ADAMW_NO_DECAY
    if p.ndim in (2, 3):
        return MUON_BLOCKS if split_wo_a and _WO_A.search(name) else MUON
    raise ValueError(
        f"{name} (shape {tuple(p.shape)}) matches no optimizer rule; add it to "
        "dsv4train/optim/groups.py (AdamW for vectors, Muon for matrices)"
    )


def describe_groups(model: nn.Module, cfg: OptimConfig | None = None) -> dict[str, str]:
    """Parameter name -> group label (`muon`, `muon:row_blocks`, `adamw`, `adamw:vector`); the optimizer
    is the part before the colon. Frozen parameters are left out."""
    cfg = cfg or OptimConfig()
    labels = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        label = _label(name, p, cfg.muon_split_wo_a)
        if cfg.name == "adamw" and label.startswith(MUON):
            label = ADAMW
        labels[name] = label
    return labels


def build_optimizers(model: nn.Module, cfg: OptimConfig) -> CombinedOptimizer:
    """Muon + AdamW (or AdamW alone) over the model's trainable parameters, at lr = cfg.lr."""
    labels = describe_groups(model, cfg)
    params = dict(model.named_parameters())
    by_label = {
        label: [params[n] for n, lab in labels.items() if lab == label]
        for label in (MUON, MUON_BLOCKS, ADAMW, ADAMW_NO_DECAY)
    }
    optimizers = {}
    muon_groups = [{"params": by_label[MUON]}]
    if by_label[MUON_BLOCKS]:
        o_groups = getattr(getattr(model, "cfg", None), "o_groups", 1)
        muon_groups.append({"params": by_label[MUON_BLOCKS], "row_blocks": o_groups})
    muon_groups = [g for g in muon_groups if g["params"]]
    if muon_groups:
        optimizers["muon"] = Muon(
            muon_groups,
            lr=cfg.lr,
            momentum=cfg.muon_momentum,
            nesterov=cfg.muon_nesterov,
            weight_decay=cfg.weight_decay,
            ns=cfg.muon_ns,
            ns_dtype=cfg.muon_ns_dtype,
            rms=cfg.muon_rms,
        )
    adam_groups = [
        {"params": by_label[ADAMW], "weight_decay": cfg.weight_decay},
        {"params": by_label[ADAMW_NO_DECAY], "weight_decay": cfg.vector_weight_decay},
    ]
    adam_groups = [g for g in adam_groups if g["params"]]
    if adam_groups:
        optimizers["adamw"] = torch.optim.AdamW(
            adam_groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps
        )
    return CombinedOptimizer(optimizers)
