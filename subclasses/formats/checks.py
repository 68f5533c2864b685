"""The rules every quantized format shares: which high-precision weights it can take."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def weight_reason(weight: torch.Tensor) -> str | None:
    """Why ``weight`` is no weight a format can quantize (not 2-D, not a float dtype), or None."""
    if weight.dim() != 2:
        return f"weight must be 2-D, got shape {tuple(weight.shape)}"
    if weight.dtype not in FLOAT_DTYPES:
        return f"weight dtype must be one of {FLOAT_DTYPES}, got {weight.dtype}"
    return None
