"""Int8 dynamic activation + int8 weight: per-token symmetric activations, ``torch._int_mm``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import (
    as_kernel_input,
    as_linear_output,
    check_activation,
    linear_with_input_grad,
)
from .int8 import Int8WeightTensor

ACTIVATION_QMAX = 127  # symmetric [-127, 127]: no -128, so negating a code never overflows
EPS = torch.finfo(torch.float32).eps


class Int8DynamicActivationInt8WeightTensor(Int8WeightTensor):
    """An ``Int8WeightTensor`` (its math, ``from_float``, ``dequantize`` and ``.to()``) whose
    ``F.linear`` also quantizes the activation, per row ("token"), symmetric, at every call and
    multiplies int8 x int8 -> int32 with ``torch._int_mm``.

    Inner tensors:
        qdata: int8 [N, K], codes in -128..127.
        scale: [N] in the weight's dtype.
    Metadata: shape (N, K), dtype.
    Dequantized weight: ``qdata * scale[:, None]``.
    Linear: ``x_scale = max(amax|x_row| / 127, eps)``, ``x_q = round(x / x_scale)`` in -127..127,
    ``out = (x_q @ qdata^T) * x_scale * scale`` (int32 accumulation, fp32 rescale, cast to x's
    dtype). ``torch._int_mm`` on CPU takes any M, K, N (M = 0 included); on CUDA it needs M > 16
    and K, N multiples of 8, elsewhere the same integer product runs in fp32 (exact while
    |x_q @ qdata^T| < 2**24, i.e. always for K <= 1040).
    """

    pickled_names = ("subclasses.int8_dynamic_tensor.Int8DynamicActivationInt8WeightTensor",)


def quantize_per_token(x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 of an activation [M, K]: codes int8 [M, K] and fp32 scale [M, 1]."""
    scale = (x2d.abs().amax(dim=1, keepdim=True).float() / ACTIVATION_QMAX).clamp(min=EPS)
    codes = torch.round(x2d / scale).clamp(-ACTIVATION_QMAX, ACTIVATION_QMAX).to(torch.int8)
    return codes, scale


def int_mm_supported(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``torch._int_mm(a [M, K], b [K, N])`` runs on a's device for these shapes."""
    if a.is_cpu:
        return True  # checked on torch 2.13: any M (0 too), K, N; b may be a transposed view
    m, k = a.shape
    return a.is_cuda and m > 16 and k % 8 == 0 and b.shape[1] % 8 == 0


def int8_dynamic_linear(
    x: torch.Tensor, weight: Int8DynamicActivationInt8WeightTensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    check_activation(x, weight)
    if x.requires_grad and torch.is_grad_enabled():
        return linear_with_input_grad(x, weight, bias)
    codes, x_scale = quantize_per_token(as_kernel_input(x))
    w_t = weight.qdata.t()
    if int_mm_supported(codes, w_t):
        acc = torch._int_mm(codes, w_t).float()
    else:  # the same integer product in fp32 (see the class docstring for exactness)
        acc = codes.float() @ w_t.float()
    out = (acc * x_scale * weight.scale.float()).to(x.dtype)
    return as_linear_output(out, x, bias)


Int8DynamicActivationInt8WeightTensor.function_table[F.linear] = int8_dynamic_linear
