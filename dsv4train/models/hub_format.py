"""The low-precision tensors of the official DeepSeek-V4 hub checkpoint, dequantised on load (arch ref §7.1, §7.2,
§11.1). Pure functions on tensors; file reading lives in `models/pretrained.py`, names in `models/hf.py`.

- FP8 linear weights: `X.weight [..., N, K]` in E4M3 with a block scale `X.scale [..., ⌈N/b⌉, ⌈K/b⌉]`, b = 128
  (the config's `quantization_config.weight_block_size`); each b×b block of the weight is multiplied by its scale.
  transformers' FP8 quantizer names the same scale `X.weight_scale_inv` (and `P_scale_inv` for a fused parameter
  `P`); it is a multiplier too.
- FP4 routed experts: E2M1 codes packed two per byte in an int8 (or uint8 / float4_e2m1fn_x2) `X.weight [..., N,
  K/2]`, the **low nibble first**, with a scale `X.scale [..., N, K/32]`, one per 1×32 block along the input dim.
  A nibble is a sign bit (bit 3) over a 3-bit index into (0, 0.5, 1, 1.5, 2, 3, 4, 6).
- Scales: UE8M0 (`float8_e8m0fnu`, or its raw bytes as uint8: 2^(byte-127), 255 = NaN) or plain float
  (V3-style fp32 scales).

Every dequantised value is a short mantissa times a power of two, so the float32 result is exact. A tensor in any
other layout (a wrong scale shape, an FP8 weight without a scale, a scale on a bf16 weight) raises a
CheckpointLayoutError that names the tensor and what was expected.
"""

from __future__ import annotations

import math

import torch

from dsv4train.config.errors import ConfigError
from dsv4train.quant.formats import E2M1_GRID

FP8_BLOCK = 128
FP4_BLOCK = 32
FP8_DTYPES = (torch.float8_e4m3fn,)
FP4_PACKED_DTYPES = (torch.int8, torch.uint8, torch.float4_e2m1fn_x2)


class CheckpointLayoutError(ConfigError):
    """A checkpoint tensor is stored in a layout dsv4train does not read; the message names the tensor."""


def e8m0_to_float(scale: torch.Tensor, name: str = "scale") -> torch.Tensor:
    """Block scales as float32: UE8M0 (float8_e8m0fnu or its uint8 bytes) or an already-float scale."""
    if scale.dtype == torch.float8_e8m0fnu:
        return scale.float()
    if scale.dtype == torch.uint8:
        return scale.view(torch.float8_e8m0fnu).float()
    if scale.is_floating_point() and scale.dtype not in FP8_DTYPES:
        return scale.float()
    raise CheckpointLayoutError(
        f"{name}: a block scale must be float8_e8m0fnu (UE8M0), its uint8 bytes or a float tensor, got {scale.dtype}"
    )


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """[..., K/2] bytes holding two E2M1 codes each (low nibble first) -> float32 values [..., K]."""
    byte = packed.contiguous().view(torch.uint8).long()
    nibble = torch.stack((byte & 0xF, byte >> 4), dim=-1).flatten(-2)
    magnitude = torch.tensor(E2M1_GRID, dtype=torch.float32, device=packed.device)[nibble & 0x7]
    return torch.where((nibble & 0x8) != 0, -magnitude, magnitude)


def _expand_blocks(scale: torch.Tensor, rows: int, cols: int, n: int, k: int) -> torch.Tensor:
    """Scale per rows×cols block [..., ⌈n/rows⌉, ⌈k/cols⌉] -> one scale per element [..., n, k]."""
    return scale.repeat_interleave(rows, dim=-2).repeat_interleave(cols, dim=-1)[..., :n, :k]


def dequant_fp8(weight: torch.Tensor, scale: torch.Tensor, block: int = FP8_BLOCK, name: str = "weight"):
    """E4M3 weight [..., N, K] times its block×block scales [..., ⌈N/block⌉, ⌈K/block⌉] -> float32 [..., N, K]."""
    if weight.dim() < 2:
        raise CheckpointLayoutError(f"{name}: an FP8 weight must have at least 2 dims, got {tuple(weight.shape)}")
    *lead, n, k = weight.shape
    want = (*lead, math.ceil(n / block), math.ceil(k / block))
    if tuple(scale.shape) != want:
        raise CheckpointLayoutError(
            f"{name}: FP8 weight of shape {tuple(weight.shape)} needs a scale of shape {want} (one per "
            f"{block}x{block} block), got {tuple(scale.shape)}"
        )
    return weight.float() * _expand_blocks(e8m0_to_float(scale, name), block, block, n, k)


def dequant_fp4(packed: torch.Tensor, scale: torch.Tensor, block: int = FP4_BLOCK, name: str = "weight"):
    """Packed E2M1 weight [..., N, K/2] times its 1×block scales [..., N, K/block] -> float32 [..., N, K]."""
    if packed.dim() < 2:
        raise CheckpointLayoutError(f"{name}: a packed FP4 weight must have at least 2 dims, got {tuple(packed.shape)}")
    *lead, n, half_k = packed.shape
    k = 2 * half_k
    want = (*lead, n, k // block)
    if k % block or tuple(scale.shape) != want:
        raise CheckpointLayoutError(
            f"{name}: packed FP4 weight of shape {tuple(packed.shape)} (logical [..., {n}, {k}]) needs a scale of "
            f"shape {want} (one per 1x{block} block along the input dim, which must be a multiple of {block}), got "
            f"{tuple(scale.shape)}"
        )
    return unpack_e2m1(packed) * _expand_blocks(e8m0_to_float(scale, name), 1, block, n, k)


def scale_partner(key: str, keys) -> str | None:
    """The weight a key is the quantisation scale of (the hub's `X.scale` of `X.weight`; transformers' `P_scale_inv`
    of `P`, e.g. `X.weight_scale_inv`), if that weight is in `keys`; None otherwise (e.g. the mHC's own
    `attn_hc.scale` parameter)."""
    if key.endswith(".scale") and key[: -len(".scale")] + ".weight" in keys:
        return key[: -len(".scale")] + ".weight"
    if key.endswith("_scale_inv") and key[: -len("_scale_inv")] in keys:
        return key[: -len("_scale_inv")]
    return None


def is_quantized(t: torch.Tensor) -> bool:
    return t.dtype in FP8_DTYPES or t.dtype in FP4_PACKED_DTYPES


def dequantize_state_dict(
    sd: dict[str, torch.Tensor], fp8_block: int = FP8_BLOCK, fp4_block: int = FP4_BLOCK
) -> dict[str, torch.Tensor]:
    """Replace every (quantised weight, scale) pair by the float32 weight; other tensors pass through unchanged.
    The weight's dtype picks the format: E4M3 -> FP8 blocks, int8/uint8/float4_e2m1fn_x2 -> packed FP4."""
    scales = {}
    for key in sd:
        weight = scale_partner(key, sd)
        if weight is not None:
            if weight in scales:
                raise CheckpointLayoutError(f"{weight}: has two scales, {scales[weight]} and {key}; keep one")
            scales[weight] = key
    scale_keys = set(scales.values())
    out = {}
    for key, value in sd.items():
        if key in scale_keys:
            continue
        scale_key = scales.get(key)
        if scale_key is None:
            if is_quantized(value):
                raise CheckpointLayoutError(
                    f"{key}: stored as {value.dtype} but the checkpoint has no block scale for it (expected "
                    f"{key.removesuffix('.weight')}.scale next to it)"
                )
            out[key] = value
        elif value.dtype in FP8_DTYPES:
            out[key] = dequant_fp8(value, sd[scale_key], fp8_block, name=key)
        elif value.dtype in FP4_PACKED_DTYPES:
            out[key] = dequant_fp4(value, sd[scale_key], fp4_block, name=key)
        else:
            raise CheckpointLayoutError(
                f"{key}: has a block scale ({scale_key}) but is stored as {value.dtype}; a scaled weight must be "
                f"float8_e4m3fn (FP8 blocks) or FP4 packed in int8"
            )
    return out
