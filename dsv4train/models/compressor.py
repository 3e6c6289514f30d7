"""KV compressors (arch ref §3.4). One entry per `ratio` tokens, softmax-gated per channel.

HCA (overlap=False): entry i pools tokens [ratio*i, ratio*(i+1)).
CSA (overlap=True): projections are 2*c wide; entry i pools 2*ratio slots: the FIRST half `[..., :c]` of the
previous block's tokens and the SECOND half `[..., c:]` of its own block's tokens (the reference layout).
Entry 0's previous-block slots are empty (value 0, gate -inf). A tail shorter than `ratio` is dropped."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsv4train.models.norms import RMSNorm
from dsv4train.models.rope import apply_rope, rope_cos_sin


class Compressor(nn.Module):
    def __init__(self, dim: int, head_dim: int, ratio: int, overlap: bool, eps: float):
        super().__init__()
        self.head_dim, self.ratio, self.overlap = head_dim, ratio, overlap
        width = (2 if overlap else 1) * head_dim
        self.wkv = nn.Linear(dim, width, bias=False)
        self.wgate = nn.Linear(dim, width, bias=False)
        self.ape = nn.Parameter(torch.zeros(ratio, width))
        self.norm = RMSNorm(head_dim, eps)

    def forward(self, x_BSD: torch.Tensor, freqs: tuple[float, ...]) -> torch.Tensor:
        """[B, S, d] -> compressed entries [B, S // ratio, head_dim], normalised and rotated at position ratio*i."""
        B, S, _ = x_BSD.shape
        T, m, c = S // self.ratio, self.ratio, self.head_dim
        if T == 0:
            return x_BSD.new_zeros(B, 0, c)
        x = x_BSD[:, : T * m]
        kv = self.wkv(x).view(B, T, m, -1)
        gate = self.wgate(x).view(B, T, m, -1) + self.ape.to(x.dtype)
        if self.overlap:
            prev_kv = F.pad(kv[:, :-1, :, :c], (0, 0, 0, 0, 1, 0))
            prev_gate = F.pad(gate[:, :-1, :, :c], (0, 0, 0, 0, 1, 0), value=float("-inf"))
            kv = torch.cat((prev_kv, kv[..., c:]), dim=2)
            gate = torch.cat((prev_gate, gate[..., c:]), dim=2)
        weights = gate.softmax(dim=2, dtype=torch.float32).to(kv.dtype)
        pooled = self.norm((kv * weights).sum(dim=2))
        cos, sin = rope_cos_sin(freqs, torch.arange(T, device=x.device) * m)
        return apply_rope(pooled, cos, sin)


def visible_entries(positions: torch.Tensor, ratio: int) -> torch.Tensor:
    """Number of compressed entries a query at 0-based position t may use: floor((t+1)/ratio) (arch ref §3.5)."""
    return torch.div(positions + 1, ratio, rounding_mode="floor")
