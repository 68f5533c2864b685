"""Int4 weight-only, group-wise asymmetric, torchao-compatible "tinygemm" format (scales and zeros
chosen by ``qparams_algorithm``: see int4_qparams)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import guard_or_false
from torch.utils._python_dispatch import return_and_correct_aliasing

from ..kernels.compute_dtype import prefill_compute_dtype, prefill_int8
from ..kernels.int4_cuda import pack_tinygemm, tinygemm_linear, tinygemm_supported, unpack_tinygemm
from ..kernels.int4_gemv import int4_gemv, int4_mm_for_cpu, traced_kernel_available
from ..kernels.int4_packing import (
    EPS,
    affine_dequantize,
    dequantize_codes,
    gather_cpu_rows,
    pack_canonical,
    pack_cpu,
    unpack_canonical,
    unpack_cpu,
)
from ..kernels.int4_prefill import PREFILL_MIN_ROWS, int4_prefill_mm
from ..kernels.int4_qparams import check_qparams_algorithm, mse_qparams
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

GROUP_SIZES = (32, 64, 128, 256)
ROWS_MULTIPLE = 16  # the kernels' out_features rule


def shape_reason(n: int, k: int, group_size: int) -> str | None:
    """Why an [n, k] weight cannot be int4 with ``group_size``, or None: the one place of the rule."""
    if group_size not in GROUP_SIZES:
        return f"group_size must be one of {GROUP_SIZES}, got {group_size!r}"
    if n % ROWS_MULTIPLE:
        return f"out_features={n} must be a multiple of {ROWS_MULTIPLE} for the int4 kernel"
    if k % group_size:
        return f"in_features={k} must be divisible by group_size={group_size}"
    return None


class Packing:
    """How ``Int4WeightTensor.packed`` is laid out (str constants: dynamo treats them as constants)."""

    CPU = "cpu"  # the local CPU kernel's ISA-dependent layout
    CANONICAL = "canonical"  # portable, see int4_packing.pack_canonical
    CUDA_TINYGEMM = "cuda_tinygemm"  # the CUDA kernel's int32 layout, see int4_cuda


def packing_for(device: torch.device) -> str:
    """The packing a weight on ``device`` is kept in: the kernel's where one exists."""
    if device.type == "cuda" and tinygemm_supported(device):  # else (pre-sm80, ROCm): dequantize
        return Packing.CUDA_TINYGEMM
    return Packing.CPU if device.type == "cpu" else Packing.CANONICAL


# packing -> (codes uint8 [N, K] -> packed) and its inverse
_PACK = {Packing.CPU: pack_cpu, Packing.CANONICAL: pack_canonical, Packing.CUDA_TINYGEMM: pack_tinygemm}
_UNPACK = {Packing.CPU: unpack_cpu, Packing.CANONICAL: unpack_canonical, Packing.CUDA_TINYGEMM: unpack_tinygemm}


class Int4WeightTensor(QuantizedWeight):
    """Int4 weight [N, K], groups of ``group_size`` input features, asymmetric.

    Inner tensors:
        packed: uint8 [N, K/2], two 4-bit codes q in 0..15 per byte, laid out per ``packing``.
        scale_and_zero: [K/group_size, N, 2] in the weight's dtype; [..., 0] scale, [..., 1] zero.
    Metadata: group_size (32/64/128/256), packing ("cpu", "canonical" or
    "cuda_tinygemm"), shape (N, K), dtype.
    Dequantized weight: ``(q - 8) * scale + zero`` per group.
    Kernel: ``torch._weight_int4pack_mm_for_cpu(x, packed, group_size, scale_and_zero)`` on CPU,
    ``torch._weight_int4pack_mm`` on CUDA (packing "cuda_tinygemm": ``packed`` is int32
    [N/8, K/(t*16), 32, t/2], see int4_cuda); other devices fall back to ``dequantize()`` + ``F.linear``.
    """

    pickled_names = ("subclasses.int4_tensor.Int4WeightTensor",)

    tensor_data_names = ("packed", "scale_and_zero")
    tensor_attribute_names = ("group_size", "packing")

    def __init__(
        self,
        packed: torch.Tensor,
        scale_and_zero: torch.Tensor,
        group_size: int,
        packing: str,
        shape: tuple[int, ...],
        dtype: torch.dtype,
    ) -> None:
        super().__init__(shape, dtype)
        self.packed, self.scale_and_zero = packed, scale_and_zero
        self.group_size, self.packing = group_size, packing

    @classmethod
    def unsupported_reason(cls, weight: torch.Tensor, group_size: int) -> str | None:
        """Why ``weight`` cannot be quantized with ``group_size``, or None if it can."""
        return weight_reason(weight) or shape_reason(weight.shape[0], weight.shape[1], group_size)

    def portable(self) -> Int4WeightTensor:
        """In the canonical packing (``int4_packing.pack_canonical``; also runs on fake CUDA)."""
        if self.packing == Packing.CANONICAL:
            return self
        return Int4WeightTensor(
            pack_canonical(self.codes()),
            self.scale_and_zero,
            self.group_size,
            Packing.CANONICAL,
            self.outer_shape,
            self.outer_dtype,
        )

    def localized(self) -> Int4WeightTensor:
        """Packed for its device's kernel (the local CPU layout on CPU)."""
        if self.packing == packing_for(self.device):
            return self
        return Int4WeightTensor.from_codes(self.codes(), self.scale_and_zero, self.group_size, self.outer_dtype)

    def traced_choices(self) -> tuple:
        """On CPU: the packing's CPU capability, whether the C++ M = 1 kernel runs, and the
        prefill GEMM's path (8-bit integer or a compute dtype) for half-precision activations."""
        if self.packing != Packing.CPU:
            return ()
        prefill = tuple(
            (prefill_int8(dtype), prefill_compute_dtype(dtype)) for dtype in (torch.bfloat16, torch.float16)
        )
        return torch.backends.cpu.get_cpu_capability(), traced_kernel_available(), prefill

    @classmethod
    def portable_inner_shapes(
        cls, shape: tuple[int, ...], dtype: torch.dtype, attributes: dict
    ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        (n, k), group_size, packing = shape, attributes["group_size"], attributes["packing"]
        reason = shape_reason(n, k, group_size)
        if reason is not None:
            raise ValueError(f"int4 checkpoint of shape {shape}: {reason}")
        if packing != Packing.CANONICAL:
            raise ValueError(f"int4 checkpoints store packing {Packing.CANONICAL!r}, got {packing!r}")
        return {"packed": ((n, k // 2), torch.uint8), "scale_and_zero": ((k // group_size, n, 2), dtype)}

    @classmethod
    def from_float(
        cls, weight: torch.Tensor, group_size: int = 128, qparams_algorithm: str = "tinygemm"
    ) -> Int4WeightTensor:
        """Quantize a high-precision [N, K] weight; ``qparams_algorithm`` chooses scales and zeros
        ("tinygemm": torchao's min-max math, in the weight's dtype; "mse", "clip": see int4_qparams)."""
        check_qparams_algorithm(qparams_algorithm)
        reason = cls.unsupported_reason(weight, group_size)
        if reason is not None:
            raise ValueError(reason)
        q, scale, zero = quantize_int4(weight.detach(), group_size, qparams_algorithm)
        scale_and_zero = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()
        return cls.from_codes(q, scale_and_zero, group_size, weight.dtype)

    @classmethod
    def from_codes(
        cls, q: torch.Tensor, scale_and_zero: torch.Tensor, group_size: int, dtype: torch.dtype
    ) -> Int4WeightTensor:
        """Build from codes q [N, K] in 0..15, packed for the device q lives on."""
        packing = packing_for(q.device)
        packed = _PACK[packing](q)
        return cls(packed, scale_and_zero, group_size, packing, tuple(q.shape), dtype)

    def codes(self) -> torch.Tensor:
        """The 4-bit codes q as uint8 [N, K], whatever the packing."""
        return _UNPACK[self.packing](self.packed)

    def cut_error(self, dim: int, start: int, length: int) -> str | None:
        """Why rows (dim 0) or input features (dim 1) ``[start, start + length)`` cannot be a
        weight of their own, or None: input features are cut only at group boundaries, rows only
        to a multiple of 16 (the kernel's out_features rule)."""
        n, k = self.outer_shape
        if dim == 1 and (start % self.group_size or length % self.group_size):
            return (
                f"cannot cut the int4 weight of shape ({n}, {k}) at in_features [{start}, {start + length}): "
                f"every piece must hold whole groups of group_size={self.group_size}"
            )
        if dim == 0 and length % ROWS_MULTIPLE:
            return (
                f"cannot cut the int4 weight of shape ({n}, {k}) at out_features [{start}, {start + length}): "
                f"every piece must hold a multiple of {ROWS_MULTIPLE} rows for the int4 kernel"
            )
        return None

    def narrow_shard(self, dim: int, start: int, length: int) -> Int4WeightTensor:
        """Rows (dim 0) or input features (dim 1) ``[start, start + length)`` as a weight of
        their own, packed for its device, through the codes: the CPU packing interleaves blocks
        of rows, so its bytes cannot be cut. ValueError where ``cut_error`` says why not."""
        error = self.cut_error(dim, start, length)
        if error is not None:
            raise ValueError(error)
        q = self.codes().narrow(dim, start, length)
        groups = (start // self.group_size, length // self.group_size) if dim == 1 else (start, length)
        scale_and_zero = self.scale_and_zero.narrow(1 - dim, *groups)  # [K/g, N, 2]: dims swapped
        return Int4WeightTensor.from_codes(q.contiguous(), scale_and_zero.contiguous(), self.group_size, self.dtype)

    def dequantize(self) -> torch.Tensor:  # type: ignore[override]
        return dequantize_codes(self.codes(), self.scale_and_zero, self.group_size, self.dtype)


def quantize_int4(
    w: torch.Tensor, group_size: int, qparams_algorithm: str = "tinygemm"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns q uint8 [N, K], scale [N, K/g], zero [N, K/g] in w's dtype: tinygemm int4 math, then
    for "mse" and "clip" the per-group search of ``int4_qparams.mse_qparams`` (which starts from it)."""
    check_qparams_algorithm(qparams_algorithm)
    n, k = w.shape
    groups = w.reshape(n, k // group_size, group_size)
    mn, mx = groups.amin(dim=-1), groups.amax(dim=-1)
    scale = ((mx - mn) / 15).clamp(min=EPS)
    zero = mn + 8 * scale
    low = (zero - 8 * scale).unsqueeze(-1)
    q = torch.round((groups - low) / scale.unsqueeze(-1)).clamp(0, 15)
    q = q.to(torch.uint8).reshape(n, k)
    if qparams_algorithm != "tinygemm":
        return mse_qparams(w, group_size, q, scale, zero, qparams_algorithm)
    return q, scale, zero


def int4_linear(x: torch.Tensor, weight: Int4WeightTensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    check_activation(x, weight)
    if x.requires_grad and torch.is_grad_enabled():
        return linear_with_input_grad(x, weight, bias)
    if weight.packing != Packing.CPU:  # no kernel here (an activation elsewhere: the kernel says so)
        if weight.packing == Packing.CUDA_TINYGEMM:
            return tinygemm_linear(x, weight.packed, weight.group_size, weight.scale_and_zero, bias)
        return F.linear(x, weight.dequantize(), bias)
    # decode (M = 1; K > 1, so contiguous means unit stride): nothing but the kernel.
    # guard_or_false: a dynamic (even unbacked) M goes on below.
    if x.dim() == 2 and bias is None and x.is_contiguous() and guard_or_false(x.shape[0] == 1):
        return int4_gemv(x, weight.packed, weight.group_size, weight.scale_and_zero)
    x2d = as_kernel_input(x)
    # prefill: kernel or dequantize + GEMM by the crossover. Compiled, M may be dynamic (even
    # unbacked): no Python comparison on it; int4_prefill_mm decides inside the graph.
    if torch.compiler.is_compiling() or x2d.shape[0] > PREFILL_MIN_ROWS:
        out = int4_prefill_mm(x2d, weight.packed, weight.scale_and_zero, weight.group_size, *weight.outer_shape)
        return as_linear_output(out, x, bias)
    out = int4_mm_for_cpu(x2d, weight.packed, weight.group_size, weight.scale_and_zero)  # M = 1: a 3-D x, or a bias
    return as_linear_output(out, x, bias)


def int4_embedding_rows(rows: torch.Tensor, weight: Int4WeightTensor) -> torch.Tensor:
    """The rows ``rows`` of the weight, [T, K]: gathers their codes, dequantizes only those rows."""
    n, k = weight.outer_shape
    if weight.packing == Packing.CUDA_TINYGEMM:  # an int32 tile layout: no cheap row gather
        return F.embedding(rows, weight.dequantize())
    # index_select bounds-checks the ids (eager and inductor) before the gather reads bytes
    scale_and_zero = weight.scale_and_zero.index_select(1, rows).transpose(0, 1)  # [T, K/g, 2]
    if weight.packing == Packing.CPU:
        codes = gather_cpu_rows(weight.packed, rows, n, k)
    else:
        codes = unpack_canonical(weight.packed.index_select(0, rows))
    groups = codes.view(-1, k // weight.group_size, weight.group_size)
    return affine_dequantize(groups, scale_and_zero[..., :1], scale_and_zero[..., 1:], weight.outer_dtype).view(-1, k)


def _to_copy(func, args, kwargs):
    weight: Int4WeightTensor = args[0]
    dtype, device = target_dtype_device(weight, kwargs)
    scale_and_zero = weight.scale_and_zero.to(device=device, dtype=dtype)
    if device == weight.device and weight.packing == packing_for(device):
        out = weight.rebuild([weight.packed.clone(), scale_and_zero], dtype=dtype)
    else:
        q = weight.codes().to(device)
        out = Int4WeightTensor.from_codes(q, scale_and_zero, weight.group_size, dtype)
    return return_and_correct_aliasing(func, args, kwargs, out)


Int4WeightTensor.function_table[F.linear] = int4_linear
Int4WeightTensor.function_table[F.embedding] = quantized_embedding(int4_embedding_rows)
Int4WeightTensor.dispatch_table[aten._to_copy.default] = _to_copy
