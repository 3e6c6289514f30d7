"""Multi-token prediction, depth 1 (arch ref §6). At position t it fuses the main model's final streams with
the embedding of token t+1 and predicts token t+2 through a sliding-window, non-hash V4 block, its own
final collapse and norm, and the shared output head."""

from __future__ import annotations

import torch
from torch import nn

from dsv4train.config.model import ModelConfig
from dsv4train.models.block import Block, BlockAux, HCHead
from dsv4train.models.documents import Documents
from dsv4train.models.mhc import hc_head
from dsv4train.models.norms import RMSNorm


class MTPBlock(Block):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, "swa", hashed=False)
        self.e_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.h_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.enorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.hnorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        HCHead.add_params(self, cfg.hc_mult, cfg.dim)

    def forward_mtp(
        self, streams_BSND: torch.Tensor, next_emb_BSD: torch.Tensor, docs: Documents | None = None
    ) -> tuple[torch.Tensor, BlockAux]:
        """Returns the normalised hidden state [B, S, d] to feed the shared head, and the block's aux."""
        x = self.h_proj(self.hnorm(streams_BSND)) + self.e_proj(self.enorm(next_emb_BSD)).unsqueeze(-2)
        x, aux = self(x, None, docs)
        c = self.cfg
        y = hc_head(x, self.hc_head_fn, self.hc_head_base, self.hc_head_scale, c.hc_eps, c.norm_eps)
        return self.norm(y), aux
