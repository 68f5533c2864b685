"""The ops tensor parallelism needs from every format, in the base op table.

``parallelize_module`` with ``ColwiseParallel`` / ``RowwiseParallel`` cuts each weight with
``torch.chunk`` (``aten.split``), ``to_local()`` views it, and ``F.linear`` on DTensors reaches the
local tensors as ``aten.linear`` (under ``inference_mode``) or decomposed into ``aten.t`` then
``aten.mm`` / ``aten.addmm`` / ``aten.matmul``. A cut is the format's ``narrow_shard`` (whole groups
and channels, else ValueError), ``t()`` is a ``TransposedWeight`` that exists only until the product
that consumes it, and every product is the format's own ``F.linear`` (its kernel).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import return_and_correct_aliasing

from .base import QuantizedWeight, aten


def _slice(func, args, kwargs):
    weight: QuantizedWeight = args[0]
    given = {**dict(zip(("dim", "start", "end", "step"), args[1:])), **kwargs}
    dim, step = given.get("dim", 0) % 2, given.get("step", 1)
    if step != 1:
        raise ValueError(f"{type(weight).__name__} can be sliced with step 1 only, got step={step}")
    start, end, _ = slice(given.get("start"), given.get("end")).indices(weight.outer_shape[dim])
    out = weight.narrow_shard(dim, start, max(end - start, 0))
    out.is_cut_copy = True  # copy_ into it raises: the write would be lost
    return return_and_correct_aliasing(func, args, kwargs, out)


def _split(func, args, kwargs):
    weight: QuantizedWeight = args[0]
    split_size = args[1] if len(args) > 1 else kwargs["split_size"]
    dim = (args[2] if len(args) > 2 else kwargs.get("dim", 0)) % 2
    size = weight.outer_shape[dim]
    out = [weight.narrow_shard(dim, start, min(split_size, size - start)) for start in range(0, size, split_size)]
    for piece in out:
        piece.is_cut_copy = True
    return return_and_correct_aliasing(func, args, kwargs, out)


def _view(func, args, kwargs):
    # DTensor.to_local() returns local.view_as(local): the same shape is all a weight can be viewed as.
    weight: QuantizedWeight = args[0]
    if tuple(args[1]) != tuple(weight.outer_shape):
        raise NotImplementedError(
            f"{type(weight).__name__} of shape {tuple(weight.outer_shape)} cannot be viewed as {tuple(args[1])}"
        )
    out = weight.rebuild([t.view(t.shape) for t in weight.inner_tensors()])
    return return_and_correct_aliasing(func, args, kwargs, out)


def _linear_op(func, args, kwargs):
    # DTensor runs F.linear as aten.linear on the local tensors: the format's own F.linear.
    x, weight = args[0], args[1]
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    return type(weight).function_table[F.linear](x, weight, bias)


def _is_pinned(func, args, kwargs):
    # torch.distributed.checkpoint records it for every tensor it saves.
    return all(t.is_pinned() for t in args[0].inner_tensors())


def _transpose(func, args, kwargs):
    return TransposedWeight(args[0])


def _no_empty_like(func, args, kwargs):
    # distribute_tensor(src_data_rank=0), the default of parallelize_module, scatters from rank 0
    # into an empty_like buffer; a quantized weight cannot go through c10d as one tensor.
    raise NotImplementedError(
        f"{type(args[0]).__name__} does not implement {func}: to shard quantized weights, call "
        "parallelize_module(..., src_data_rank=None) (every rank holds the same model and cuts its "
        "own shard) or subclasses.runtime.tensor_parallel.parallelize"
    )


class TransposedWeight(torch.Tensor):
    """``weight.t()`` of a quantized weight: shape [in_features, out_features], as DTensor's
    ``F.linear`` decomposition asks for it. ``mm(x, w.t())``, ``matmul(x, w.t())`` and
    ``addmm(bias, x, w.t())`` call the weight's own ``F.linear`` (its kernel); ``.t()`` gives the
    weight back. Nothing else is defined."""

    weight: QuantizedWeight
    __torch_function__ = torch._C._disabled_torch_function_impl  # type: ignore[assignment]

    @staticmethod
    def __new__(cls, weight: QuantizedWeight) -> TransposedWeight:
        n, k = weight.outer_shape
        return torch.Tensor._make_wrapper_subclass(
            cls, (k, n), strides=(1, k), dtype=weight.outer_dtype, device=weight.device, requires_grad=False
        )

    def __init__(self, weight: QuantizedWeight) -> None:
        self.weight = weight

    def __repr__(self) -> str:  # type: ignore[override]
        return f"TransposedWeight({self.weight!r})"

    def __tensor_flatten__(self) -> tuple[list[str], None]:
        return ["weight"], None

    @staticmethod
    def __tensor_unflatten__(inner: dict, meta: Any, outer_size: Any, outer_stride: Any) -> TransposedWeight:
        return TransposedWeight(inner["weight"])

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if func in (aten.mm.default, aten.matmul.default) and type(args[1]) is cls and type(args[0]) is not cls:
            return _linear(args[0], args[1].weight, None)
        if (
            func is aten.addmm.default
            and type(args[2]) is cls
            and type(args[1]) is not cls
            and kwargs.get("beta", 1) == 1
            and kwargs.get("alpha", 1) == 1
        ):
            return _linear(args[1], args[2].weight, args[0])
        if func is aten.t.default:  # an alias, not the weight itself: t() is a view
            return aten.alias.default(args[0].weight)
        if func in (aten.detach.default, aten.alias.default):
            return TransposedWeight(func(args[0].weight))
        raise NotImplementedError(
            f"{cls.__name__} does not implement {func}: only x @ w.t() (mm, matmul, addmm: a linear "
            "layer) is defined; call .dequantize() on the weight first"
        )


def _linear(x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    out = type(weight).function_table[F.linear](x, weight, None)
    return out if bias is None else out + bias  # addmm broadcasts a [N] or [M, N] bias


# On the base's table, which every format copies when its class is defined: this module runs when
# ``subclasses.formats`` is imported, before any format module.
QuantizedWeight.dispatch_table.update(
    {
        aten.slice.Tensor: _slice,
        aten.split.Tensor: _split,
        aten.linear.default: _linear_op,
        aten.t.default: _transpose,
        aten.view.default: _view,
        aten.is_pinned.default: _is_pinned,
        aten.empty_like.default: _no_empty_like,
    }
)
