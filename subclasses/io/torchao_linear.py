"""Lean linears for torchao 0.18's weight-only tensors, declared to ``unwrap`` (``unwrap.register_linear``).

An unwrapped ``nn.Linear`` whose weight is torchao's calls its class's declared linear on every
forward. torchao's own (``_TORCH_FN_TABLE[cls][F.linear]``) is Python that asserts, reshapes and
slices before its kernel, and for weight-only int8 converts the whole weight to the activation
dtype and runs a dense GEMM: 1.7-5x the floor in eager. These call the floor's kernel on torchao's
inner tensors and nothing else; whatever they do not cover goes to torchao's own linear.

| torchao class | kernel | outputs |
|---|---|---|
| ``Int4OpaqueTensor`` (A16W4, tinygemm) | ``_weight_int4pack_mm_for_cpu``, as torchao calls it; one row: ``int4_gemv``, the M = 1 kernel of ours and the floor | bit-identical to torchao's; one row: within the GEMV's rounding (bit-identical with ``UNWRAP_INT4_GEMV=0``) |
| ``Int8Tensor``, weight-only, per row or per tensor | ``_weight_int8pack_mm`` with the scale in the activation dtype | bit-identical to ``torch.compile`` of torchao's model (Inductor rewrites torchao's ``mm(x, q.to(dtype).T) * scale`` to this kernel); within bf16 rounding of torchao's eager |

Falls back to torchao's linear: DA8W4 / dynamic-activation / ``act_pre_scale`` weights, group-wise
int8, non-CPU tensors, an activation dtype other than the weight's (int8), bf16 with K not a
multiple of 16 (the int8 kernel is unsafe there), an input that requires grad (int8: the kernel has
no derivative; torchao's mm does).

Registered by class name when ``subclasses`` is imported: torchao is never imported here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.nn import functional as F
from torch.utils.weak import WeakTensorKeyDictionary

from unwrap.linear import register_linear

from ..kernels.int4_gemv import int4_mm_for_cpu

INT4_OPAQUE = "torchao.prototype.quantization.int4.Int4OpaqueTensor"
INT8 = "torchao.quantization.Int8Tensor"


def torchao_linear(input: torch.Tensor, weight: Any, bias: torch.Tensor | None = None) -> torch.Tensor:
    """torchao's own ``F.linear`` for ``weight``'s class (its per-class table), what the lean ones fall back to."""
    cls = type(weight)
    return cls._TORCH_FN_TABLE[cls][F.linear](F.linear, (cls,), (input, weight, bias), {})


# Eager, the unwrapped module passes the same (cached) weight object on every call, so what the
# lean linears need to know about it is worked out once per object: reading a Tensor property of
# torchao's subclass (``weight.shape``, ``weight.dtype``) goes through its ``__torch_function__``
# (~2 us). weight -> (the version of the tensor the plan was made from, plan); entries go with
# their weights.
_PLANS: WeakTensorKeyDictionary = WeakTensorKeyDictionary()


def _planned(weight: Any, plan: Callable[[torch.Tensor], Any], source: torch.Tensor | None = None) -> Any:
    """``plan(weight)``, remembered per weight object (and per in-place version of ``source``, a
    tensor the plan is computed from); traced by torch.compile it is simply computed."""
    if torch.compiler.is_compiling() or (source is not None and source.is_inference()):  # no version counter
        return plan(weight)
    version = source._version if source is not None else 0
    entry = _PLANS.get(weight)
    if entry is None or entry[0] != version:
        entry = (version, plan(weight))
        _PLANS[weight] = entry
    return entry[1]


def _int4_group_size(weight: Any) -> int | None:
    """The group size when torchao's linear for ``weight`` is the tinygemm kernel call alone (A16W4,
    no act_pre_scale, CPU, no padding of N: its output slice is then a no-op), else None."""
    if weight.act_mapping_type is not None or weight.act_pre_scale is not None or not weight.qdata.is_cpu:
        return None
    return weight.block_size[1] if weight.qdata.shape[0] == weight.shape[0] else None


def int4_opaque_linear(input: torch.Tensor, weight: Any, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` on torchao's ``Int4OpaqueTensor``: torchao's tinygemm path (the same kernel call
    on the same tensors, so bit-identical) without its Python around the kernel."""
    group_size = _planned(weight, _int4_group_size)
    if group_size is None or not input.is_cpu:
        return torchao_linear(input, weight, bias)
    # one row: the M = 1 kernel ours and the floor use (int4_gemv: the C++ GEMV where it is built,
    # else this same aten kernel); more rows: aten's kernel, as torchao calls it
    if input.dim() == 2 and bias is None and input.is_contiguous():  # decode: nothing but the kernel
        return int4_mm_for_cpu(input, weight.qdata, group_size, weight.scale_and_zero)
    x2d = input.reshape(-1, input.shape[-1]).contiguous()
    out = int4_mm_for_cpu(x2d, weight.qdata, group_size, weight.scale_and_zero)
    out = out.reshape(*input.shape[:-1], out.shape[-1])
    if bias is not None:
        out += bias  # as torchao adds it: in place, in the activation dtype
    return out


def _int8_kernel_scale(weight: Any) -> torch.Tensor | None:
    """The [N] scale in ``weight.dtype`` that ``_weight_int8pack_mm`` takes for torchao's weight-only
    ``weight``, or None when its linear is not that kernel's (see the module docstring)."""
    qdata, scale = weight.qdata, weight.scale
    if weight.act_quant_kwargs is not None or weight.act_pre_scale is not None or qdata.dim() != 2 or not qdata.is_cpu:
        return None
    n, k = qdata.shape
    if weight.block_size[-1] != k or scale.numel() not in (1, n) or (weight.dtype == torch.bfloat16 and k % 16):
        return None
    return scale.to(weight.dtype).reshape(-1).expand(n).contiguous()


def int8_linear(input: torch.Tensor, weight: Any, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` on torchao's weight-only ``Int8Tensor`` through ``_weight_int8pack_mm``: what
    ``torch.compile`` makes of torchao's linear, bit for bit, in eager as well."""
    scale = _planned(weight, _int8_kernel_scale, weight.scale)  # redone when the scale changes in place
    if (
        scale is None
        or input.dtype != scale.dtype
        or not input.is_cpu
        or (input.requires_grad and torch.is_grad_enabled())
    ):
        return torchao_linear(input, weight, bias)
    if input.dim() == 2 and bias is None and input.is_contiguous():  # decode: nothing but the kernel
        return torch._weight_int8pack_mm(input, weight.qdata, scale)
    x2d = input.reshape(-1, input.shape[-1]).contiguous()
    out = torch._weight_int8pack_mm(x2d, weight.qdata, scale).reshape(*input.shape[:-1], scale.shape[0])
    if bias is not None:
        out += bias
    return out


def _int8_unread(weight: Any) -> tuple[str, ...]:
    # Weight-only per row/tensor: neither int8_linear nor torchao's linear reads the zero point
    # (torchao's weight-only Int8Tensor carries an all-zero one).
    per_row = (
        weight.act_quant_kwargs is None and weight.qdata.dim() == 2 and weight.block_size[-1] == weight.qdata.shape[-1]
    )
    return ("zero_point",) if per_row else ()


int8_linear.unread_inner = _int8_unread  # type: ignore[attr-defined]

register_linear(INT4_OPAQUE, int4_opaque_linear)
register_linear(INT8, int8_linear)
