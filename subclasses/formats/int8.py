"""Int8 weight-only, per-output-channel symmetric."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import return_and_correct_aliasing

from ..kernels.int8_cuda import int8_cuda_linear
from .base import (
    QuantizedWeight,
    as_kernel_input,
    as_linear_output,
    aten,
    check_activation,
    linear_with_input_grad,
    quantized_embedding,
    target_dtype_device,
    weight_reason,
)


class Int8WeightTensor(QuantizedWeight):
    """Int8 weight [N, K], one scale per output channel, symmetric (no zero point).

    Inner tensors:
        qdata: int8 [N, K], codes in -128..127.
        scale: [N] in the weight's dtype.
    Metadata: shape (N, K), dtype.
    Dequantized weight: ``qdata * scale[:, None]``.
    Kernel: ``torch._weight_int8pack_mm(x, qdata, scale)`` on CPU. With bf16 activations and K not
    a multiple of 16 that kernel segfaults or returns NaN, so there the kernel runs in fp32 and the
    result is cast back. On CUDA ``(x @ qdata.T) * scale`` (see int8_cuda); other devices fall back to
    ``dequantize()`` + ``F.linear``.
    """

    pickled_names = ("subclasses.int8_tensor.Int8WeightTensor",)

    tensor_data_names = ("qdata", "scale")
    tensor_attribute_names = ()

    def __init__(self, qdata: torch.Tensor, scale: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        super().__init__(shape, dtype)
        self.qdata, self.scale = qdata, scale

    @classmethod
    def unsupported_reason(cls, weight: torch.Tensor) -> str | None:
        """Why ``weight`` cannot be quantized, or None if it can."""
        return weight_reason(weight)

    @classmethod
    def portable_inner_shapes(
        cls, shape: tuple[int, ...], dtype: torch.dtype, attributes: dict
    ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        n, k = shape
        return {"qdata": ((n, k), torch.int8), "scale": ((n,), dtype)}

    @classmethod
    def from_float(cls, weight: torch.Tensor, amax: torch.Tensor | None = None) -> Int8WeightTensor:
        """Quantize a high-precision [N, K] weight (arithmetic in the weight's dtype). ``amax``
        [N]: each row's absolute maximum when ``weight`` holds only some of each row's inputs
        (a shard of a row-wise tensor-parallel weight), so the scale is the whole row's."""
        reason = cls.unsupported_reason(weight)
        if reason is not None:
            raise ValueError(reason)
        qdata, scale = quantize_int8(weight.detach(), amax)
        return cls(qdata, scale, tuple(weight.shape), weight.dtype)

    def cut_error(self, dim: int, start: int, length: int) -> str | None:
        """None: any cut is valid, the scale is per output channel."""
        return None

    def narrow_shard(self, dim: int, start: int, length: int) -> Int8WeightTensor:
        """Rows (dim 0, with their scales) or input features (dim 1, every scale) ``[start,
        start + length)`` as a weight of their own (same class)."""
        qdata = self.qdata.narrow(dim, start, length).contiguous()
        scale = self.scale.narrow(0, start, length).contiguous() if dim == 0 else self.scale.clone()
        return type(self)(qdata, scale, tuple(qdata.shape), self.dtype)

    def dequantize(self) -> torch.Tensor:  # type: ignore[override]
        return self.qdata.to(self.dtype) * self.scale.unsqueeze(1)


def quantize_int8(w: torch.Tensor, amax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: returns qdata int8 [N, K] and scale [N] in w's dtype (``amax``:
    the rows' absolute maxima if given, else w's own)."""
    if amax is None:
        amax = torch.maximum(w.amin(dim=1).neg().clamp(min=0), w.amax(dim=1).clamp(min=0))
    scale = (amax / 127.5).clamp(min=torch.finfo(torch.float32).eps)
    qdata = torch.round(w / scale.unsqueeze(1)).clamp(-128, 127).to(torch.int8)
    return qdata, scale


def int8_linear(x: torch.Tensor, weight: Int8WeightTensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    check_activation(x, weight)
    if not weight.qdata.is_cpu:
        if weight.qdata.is_cuda:
            return int8_cuda_linear(x, weight.qdata, weight.scale, bias)
        return F.linear(x, weight.dequantize(), bias)
    if x.requires_grad and torch.is_grad_enabled():
        return linear_with_input_grad(x, weight, bias)
    unsafe_bf16 = x.dtype == torch.bfloat16 and x.shape[-1] % 16
    if (
        x.dim() == 2 and bias is None and not unsafe_bf16 and x.is_contiguous() and x.stride(1) == 1
    ):  # decode: just the kernel
        return torch._weight_int8pack_mm(x, weight.qdata, weight.scale)
    x2d = as_kernel_input(x)
    if unsafe_bf16:
        # The bf16 kernel is unsafe for this K (segfault / NaN); fp32 is exact for bf16 inputs.
        out = torch._weight_int8pack_mm(x2d.float(), weight.qdata, weight.scale.float()).to(x.dtype)
    else:
        out = torch._weight_int8pack_mm(x2d, weight.qdata, weight.scale)
    return as_linear_output(out, x, bias)


def int8_embedding_rows(rows: torch.Tensor, weight: Int8WeightTensor) -> torch.Tensor:
    """The rows ``rows`` of the weight, [T, K]: gathers their codes and scales, dequantizes those rows."""
    return weight.qdata.index_select(0, rows).to(weight.outer_dtype) * weight.scale.index_select(0, rows).unsqueeze(1)


def _to_copy(func, args, kwargs):
    weight: Int8WeightTensor = args[0]
    dtype, device = target_dtype_device(weight, kwargs)
    out = weight.rebuild(
        [weight.qdata.to(device, copy=True), weight.scale.to(device=device, dtype=dtype, copy=True)],
        dtype=dtype,
    )
    return return_and_correct_aliasing(func, args, kwargs, out)


Int8WeightTensor.function_table[F.linear] = int8_linear
Int8WeightTensor.function_table[F.embedding] = quantized_embedding(int8_embedding_rows)
Int8WeightTensor.dispatch_table[aten._to_copy.default] = _to_copy
