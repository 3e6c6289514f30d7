"""How the cache's entries are stored (models/kv_cache.py): as they are, or in V4's low-precision layouts (arch ref
§7.3, §10.2), with the bytes of `models/flops.py`'s KV formula.

- `PlainStore`: [slots, n, C] in the compute dtype.
- `Fp8EntryStore` (main K=V entries, window and compressed): the non-RoPE dims in FP8 E4M3 with one UE8M0 scale
  (a power of two, one byte) per 64 dims, the scale bytes padded to a multiple of 8 (vLLM's layout: 584 B at
  head_dim 512), the RoPE dims in BF16. A block of fewer than 64 dims (a small head_dim) is one block.
- `Fp4KeyStore` (the lightning indexer's keys): E2M1 codes, two per byte, with one UE8M0 scale byte per 32 dims
  (68 B at 128 dims). Fewer than 32 dims are one block.

Scales are the smallest power of two that maps the block's absolute maximum into the format (quant/formats.py),
so the values read back are exactly those formats' fake-quant of what was written. Every store has `write(slots,
places, values)` (values [M, C] into places [M] of slots [M]), `read(slots_R)` -> [R, n, C] in the compute dtype,
and `tensors()` (what it holds; the cache's bytes are theirs). `read(slots_R, n)` reads the first n places only."""

from __future__ import annotations

import math

import torch

from dsv4train.models.hub_format import unpack_e2m1
from dsv4train.quant.formats import E2M1_GRID, E2M1_MAX, E4M3_MAX, cast_e4m3, pow2_scale, round_e2m1

FP8_SCALE_BLOCK = 64  # dims per UE8M0 scale of a main entry (§7.3)
FP4_SCALE_BLOCK = 32  # dims per UE8M0 scale of an indexer key
CACHE_DTYPES = ("model", "fp8")


class PlainStore:
    def __init__(self, n_slots: int, n: int, dim: int, dtype: torch.dtype, device: torch.device):
        self.data = torch.zeros(n_slots, n, dim, dtype=dtype, device=device)

    def write(self, slots_M: torch.Tensor, places_M: torch.Tensor, values_MC: torch.Tensor) -> None:
        self.data[slots_M, places_M] = values_MC.to(self.data.dtype)

    def read(self, slots_R: torch.Tensor, n: int | None = None) -> torch.Tensor:
        return self.data[slots_R, :n]

    def tensors(self) -> list[torch.Tensor]:
        return [self.data]


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """[M, K] -> [M, ceil(K/block), block], zero-padded (zeros change no block maximum)."""
    pad = (-x.shape[-1]) % block
    return torch.nn.functional.pad(x, (0, pad)).view(x.shape[0], (x.shape[-1] + pad) // block, block)


def _scale_bytes(scale: torch.Tensor) -> torch.Tensor:
    """Powers of two 2^k (float32) -> UE8M0 bytes k + 127."""
    return ((scale.view(torch.int32) >> 23) & 0xFF).to(torch.uint8)


def _scale_values(scale_bytes: torch.Tensor) -> torch.Tensor:
    """UE8M0 bytes k + 127 -> 2^k (float32), by placing k + 127 in the exponent field (what a float8_e8m0fnu view
    gives, in operations inductor's CPU backend can compile)."""
    return (scale_bytes.to(torch.int32) << 23).view(torch.float32)


class Fp8EntryStore:
    def __init__(self, n_slots: int, n: int, dim: int, rope_dim: int, dtype: torch.dtype, device: torch.device):
        self.dtype, self.nope = dtype, dim - rope_dim
        n_scales = math.ceil(self.nope / FP8_SCALE_BLOCK)
        self.block = min(FP8_SCALE_BLOCK, self.nope)
        self.codes = torch.zeros(n_slots, n, self.nope, dtype=torch.float8_e4m3fn, device=device)
        self.scales = torch.zeros(n_slots, n, 8 * math.ceil(n_scales / 8), dtype=torch.uint8, device=device)
        self.rope = torch.zeros(n_slots, n, rope_dim, dtype=torch.bfloat16, device=device)
        self.n_scales = n_scales

    def write(self, slots_M: torch.Tensor, places_M: torch.Tensor, values_MC: torch.Tensor) -> None:
        x = values_MC.float()
        tiles = _blocks(x[:, : self.nope], self.block)
        scale = pow2_scale(tiles.abs().amax(-1, keepdim=True), E4M3_MAX)
        codes = cast_e4m3(tiles / scale).flatten(1)[:, : self.nope]
        self.codes[slots_M, places_M] = codes.to(torch.float8_e4m3fn)
        self.scales[slots_M, places_M, : self.n_scales] = _scale_bytes(scale.squeeze(-1))
        self.rope[slots_M, places_M] = x[:, self.nope :].to(torch.bfloat16)

    def read(self, slots_R: torch.Tensor, n: int | None = None) -> torch.Tensor:
        codes = self.codes[slots_R, :n].float()
        scale = _scale_values(self.scales[slots_R, :n, : self.n_scales])  # [R, n, n_scales]
        per_dim = scale.repeat_interleave(self.block, dim=-1)[..., : self.nope]
        return torch.cat((codes * per_dim, self.rope[slots_R, :n].float()), -1).to(self.dtype)

    def tensors(self) -> list[torch.Tensor]:
        return [self.codes, self.scales, self.rope]


def _e2m1_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Values on the E2M1 grid -> 4-bit codes (sign bit 8, then the grid index)."""
    grid = torch.tensor(E2M1_GRID, device=codes.device)
    index = (codes.abs().unsqueeze(-1) == grid).int().argmax(-1)
    return index | ((codes < 0).int() << 3)


class Fp4KeyStore:
    def __init__(self, n_slots: int, n: int, dim: int, dtype: torch.dtype, device: torch.device):
        if dim % 2:
            raise ValueError(f"FP4 indexer keys pack two dims per byte: index_head_dim {dim} must be even")
        self.dtype, self.dim = dtype, dim
        self.block = min(FP4_SCALE_BLOCK, dim)
        self.n_scales = math.ceil(dim / FP4_SCALE_BLOCK)
        self.packed = torch.zeros(n_slots, n, dim // 2, dtype=torch.uint8, device=device)
        self.scales = torch.zeros(n_slots, n, self.n_scales, dtype=torch.uint8, device=device)

    def write(self, slots_M: torch.Tensor, places_M: torch.Tensor, values_MC: torch.Tensor) -> None:
        tiles = _blocks(values_MC.float(), self.block)
        scale = pow2_scale(tiles.abs().amax(-1, keepdim=True), E2M1_MAX)
        nibbles = _e2m1_nibbles(round_e2m1(tiles / scale)).flatten(1)[:, : self.dim]
        self.packed[slots_M, places_M] = (nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)).to(torch.uint8)
        self.scales[slots_M, places_M] = _scale_bytes(scale.squeeze(-1))

    def read(self, slots_R: torch.Tensor, n: int | None = None) -> torch.Tensor:
        values = unpack_e2m1(self.packed[slots_R, :n])
        scale = _scale_values(self.scales[slots_R, :n]).repeat_interleave(self.block, dim=-1)[..., : self.dim]
        return (values * scale).to(self.dtype)

    def tensors(self) -> list[torch.Tensor]:
        return [self.packed, self.scales]
