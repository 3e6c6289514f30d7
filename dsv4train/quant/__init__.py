"""FP8 / FP4 mixed-precision training (docs/precision.md): exact block-scaled formats (formats.py, fp4_fp8.py),
FP8 GEMMs with straight-through gradients (linear.py, modules.py), and `apply_precision` to convert a built
model from outside (apply.py); backends `emulated` (any device) and `te` (transformer-engine, te_backend.py)."""

from dsv4train.quant.apply import apply_precision, describe_precision

__all__ = ["apply_precision", "describe_precision"]
