"""One V4 block: mHC around attention and around MoE, each sub-layer with its own pre-norm (arch ref §2)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dsv4train.config.model import ModelConfig
from dsv4train.models.attention import Attention
from dsv4train.models.documents import Documents
from dsv4train.models.kv_cache import LayerStep
from dsv4train.models.mhc import hc_collapse, hc_expand, hc_weights
from dsv4train.models.moe import MoE, MoEAux
from dsv4train.models.norms import RMSNorm


@dataclass
class BlockAux:
    moe: MoEAux
    indexer_loss: torch.Tensor | None


def _hc_params(block: nn.Module, prefix: str, n: int, dim: int) -> None:
    width = (2 + n) * n
    setattr(block, f"{prefix}_fn", nn.Parameter(torch.empty(width, n * dim)))
    setattr(block, f"{prefix}_base", nn.Parameter(torch.zeros(width)))
    setattr(block, f"{prefix}_scale", nn.Parameter(torch.ones(3)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_type: str, hashed: bool):
        super().__init__()
        self.cfg = cfg
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg, layer_type)
        self.ffn = MoE(cfg, hashed)
        _hc_params(self, "hc_attn", cfg.hc_mult, cfg.dim)
        _hc_params(self, "hc_ffn", cfg.hc_mult, cfg.dim)

    def _weights(self, x_BSND: torch.Tensor, prefix: str):
        c = self.cfg
        return hc_weights(
            x_BSND,
            getattr(self, f"{prefix}_fn"),
            getattr(self, f"{prefix}_base"),
            getattr(self, f"{prefix}_scale"),
            c.hc_sinkhorn_iters,
            c.hc_eps,
            c.norm_eps,
        )

    def forward(
        self,
        x_BSND: torch.Tensor,
        input_ids: torch.Tensor | None,
        docs: Documents | None = None,
        cache: LayerStep | None = None,
        routes_BSK: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, BlockAux]:
        """cache: generation's state of this layer (models/kv_cache.py); only attention keeps any. routes_BSK: the
        experts to replay (keep-routing, `DSV4Model.forward`)."""
        pre, post, comb = self._weights(x_BSND, "hc_attn")
        a_BSD, attn_aux = self.attn(self.attn_norm(hc_collapse(x_BSND, pre)), docs, cache)
        x_BSND = hc_expand(x_BSND, a_BSD, post, comb)
        pre, post, comb = self._weights(x_BSND, "hc_ffn")
        decode = cache is not None and not cache.step.prefill
        f_BSD, moe_aux = self.ffn(self.ffn_norm(hc_collapse(x_BSND, pre)), input_ids, decode, routes_BSK)
        return hc_expand(x_BSND, f_BSD, post, comb), BlockAux(moe_aux, attn_aux.indexer_loss)


class HCHead(nn.Module):
    """Owner of the final-collapse parameters (`hc_head_fn/base/scale`) for the model and for each MTP module."""

    @staticmethod
    def add_params(module: nn.Module, n: int, dim: int) -> None:
        module.hc_head_fn = nn.Parameter(torch.empty(n, n * dim))
        module.hc_head_base = nn.Parameter(torch.zeros(n))
        module.hc_head_scale = nn.Parameter(torch.ones(1))
