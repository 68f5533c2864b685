"""The base every quantized weight stands on: declare inner tensors and metadata once."""

from __future__ import annotations

import hashlib
import operator
import pickle
from collections.abc import Callable
from typing import Any, ClassVar, SupportsIndex

import torch
from torch.utils._python_dispatch import return_and_correct_aliasing

from ..kernels.linear_io import add_bias, as_kernel_input, as_linear_output  # noqa: F401 - re-exported for the formats
from . import portable
from .checks import FLOAT_DTYPES, weight_reason  # noqa: F401 - re-exported for the formats

aten = torch.ops.aten

FunctionImpl = Callable[..., Any]
DispatchImpl = Callable[[Any, tuple, dict], Any]

# Every quantized format by class name: what checkpoints may name (see serialization.py).
FORMATS: dict[str, type[QuantizedWeight]] = {}


class QuantizedWeight(torch.Tensor):
    """A traceable wrapper subclass for a quantized weight of shape [out_features, in_features].

    A format declares ``tensor_data_names`` (inner plain tensors) and ``tensor_attribute_names``
    (constant metadata: ints, strs, dtypes) and a typed constructor taking them in that order,
    then the high-precision weight's ``shape`` and ``dtype``:
    ``Format(*inner_tensors, *attributes, shape, dtype)``, positionally or by name. Its
    ``__init__`` stores them and calls ``QuantizedWeight.__init__(self, shape, dtype)``.
    ``__tensor_flatten__``/``__tensor_unflatten__`` are derived from the declarations.

    ``__torch_function__`` looks ``func`` up in the class's ``function_table`` (``F.linear`` goes
    straight to the kernel); everything else runs through ``__torch_dispatch__`` and its
    ``dispatch_table``. An aten op in neither raises NotImplementedError.

    Checkpoints (see ``portable``): a format says what it stores with ``portable()``,
    ``localized()`` and ``portable_inner_shapes()``; nothing outside its file knows its layout.
    """

    tensor_data_names: ClassVar[tuple[str, ...]] = ()
    tensor_attribute_names: ClassVar[tuple[str, ...]] = ()
    function_table: ClassVar[dict[Any, FunctionImpl]] = {}
    dispatch_table: ClassVar[dict[Any, DispatchImpl]] = {}
    # The high-precision shape and dtype. Plain attributes on purpose: .shape/.dtype of a
    # subclass go through __torch_function__ (~1.3 us each), and the eager hot path reads these.
    # (The one other per-instance cache is ``_flattened``, see ``__tensor_flatten__``.)
    outer_shape: tuple[int, ...]
    outer_dtype: torch.dtype
    _flatten_meta: ClassVar[Callable[..., tuple]]  # set per format by __init_subclass__
    # Earlier qualified names of this very class (not inherited) that checkpoints may hold.
    pickled_names: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Each format gets its own tables, seeded with the shared ops.
        cls.function_table = dict(cls.function_table)
        cls.dispatch_table = dict(cls.dispatch_table)
        # The flatten metadata: the declared attributes, then shape and dtype (the constructor's tail).
        cls._flatten_meta = operator.attrgetter(*cls.tensor_attribute_names, "outer_shape", "outer_dtype")
        # Loadable with torch.load(weights_only=True); __setstate__ validates what it is given.
        FORMATS[cls.__name__] = cls
        # Checkpoints name the class by the module path it had when they were written, too.
        torch.serialization.add_safe_globals([cls, *((cls, name) for name in cls.__dict__.get("pickled_names", ()))])

    @staticmethod
    def __new__(cls, *args: Any, **kwargs: Any) -> QuantizedWeight:
        # The constructor is (*inner_tensors, *attributes, shape, dtype), positional or by name.
        shape = kwargs["shape"] if "shape" in kwargs else args[-2]
        dtype = kwargs["dtype"] if "dtype" in kwargs else args[-1]
        first = args[0] if args else kwargs[cls.tensor_data_names[0]]
        return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=first.device, requires_grad=False)

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self.outer_shape, self.outer_dtype = tuple(shape), dtype

    def take_fields(self, other: QuantizedWeight) -> None:
        """Become ``other`` (same class): torch.load builds a bare wrapper, then its state."""
        for name in (*self.tensor_data_names, *self.tensor_attribute_names, "outer_shape", "outer_dtype"):
            setattr(self, name, getattr(other, name))
        self.__dict__.pop("_flattened", None)

    def __reduce_ex__(self, proto: SupportsIndex) -> tuple:
        # Pickle the portable form (canonical int4 packing), never the local kernel's layout.
        return portable.reduce_weight(self)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # torch.load: validate the portable form and pack it for this machine's kernel.
        portable.restore_state(self, state)

    def portable(self) -> QuantizedWeight:
        """This weight in the form a checkpoint stores; a format whose inner tensors depend on
        the machine (int4's CPU packing) returns a portable copy."""
        return self

    def localized(self) -> QuantizedWeight:
        """This weight in the form its device's kernel takes (undoes ``portable``)."""
        return self

    @classmethod
    def portable_inner_shapes(
        cls, shape: tuple[int, ...], dtype: torch.dtype, attributes: dict[str, Any]
    ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """The (shape, dtype) each inner tensor of a checkpoint must have, for a weight of this
        ``shape``/``dtype`` and these ``attributes``; ValueError naming the attribute's rule if
        one is invalid. Every format implements it: loading validates checkpoints with it."""
        raise NotImplementedError(f"{cls.__name__} does not declare its portable_inner_shapes")

    def __tensor_flatten__(self) -> tuple[list[str], tuple]:
        # Compiled, every call flattens each weight twice (guards, then AOTAutograd's unwrap):
        # built on first use, then returned as is (0.2 us instead of 0.6 us per flatten).
        try:
            return self._flattened
        except AttributeError:
            self._flattened: tuple[list[str], tuple] = (list(self.tensor_data_names), self._flatten_meta(self))
            return self._flattened

    @classmethod
    def __tensor_unflatten__(
        cls, inner_tensors: dict[str, torch.Tensor], meta: tuple, outer_size: Any, outer_stride: Any
    ) -> QuantizedWeight:
        constructor: Callable[..., QuantizedWeight] = cls  # a format's typed constructor
        return constructor(*(inner_tensors[name] for name in cls.tensor_data_names), *meta)

    def traced_choices(self) -> tuple:
        """What this weight's ``F.linear`` decides from the process rather than from its inputs
        while torch.compile traces it (the kernel, the compute dtype: switches, CPU capability),
        as picklable values. Part of the compiled-graph cache key (``_stable_hash_for_caching``)."""
        return ()

    def _stable_hash_for_caching(self) -> str:
        # AOTAutograd's cache keys a graph that calls F.linear on this weight by the weight's
        # metadata alone: a graph traced with another kernel choice (UNWRAP_INT4_GEMV=0, another
        # ATEN_CPU_CAPABILITY, another UNWRAP_PREFILL_DTYPE) would be reused. So the choices join it.
        inner = [(tuple(t.shape), t.stride(), t.dtype, str(t.device)) for t in self.inner_tensors()]
        payload = (type(self).__qualname__, self.attributes(), inner, self.traced_choices())
        return hashlib.blake2b(pickle.dumps(payload), digest_size=16).hexdigest()

    def inner_tensors(self) -> list[torch.Tensor]:
        return [getattr(self, name) for name in self.tensor_data_names]

    def attributes(self) -> tuple:
        """The constant metadata, followed by the outer shape and dtype (the constructor's tail)."""
        return self._flatten_meta(self)

    def rebuild(self, tensors: list[torch.Tensor], *, dtype: torch.dtype | None = None) -> QuantizedWeight:
        """The same weight with other inner tensors (and ``dtype``, if given)."""
        meta = self.attributes()
        constructor: Callable[..., QuantizedWeight] = type(self)
        return constructor(*tensors, *(meta if dtype is None else (*meta[:-1], dtype)))

    def dequantize(self) -> torch.Tensor:  # type: ignore[override]
        """The high-precision weight: original shape and dtype."""
        raise NotImplementedError(type(self).__name__)

    def __repr__(self) -> str:  # type: ignore[override]
        attrs = ", ".join(f"{n}={getattr(self, n)!r}" for n in self.tensor_attribute_names)
        return f"{type(self).__name__}(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device}, {attrs})"

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):  # type: ignore[override]
        impl = cls.function_table.get(func)
        if impl is not None:
            return impl(*args, **(kwargs or {}))
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # type: ignore[override]
        impl = cls.dispatch_table.get(func)
        if impl is None:
            raise NotImplementedError(
                f"{cls.__name__} does not implement {func}; call .dequantize() first to get a plain tensor"
            )
        return impl(func, args, kwargs or {})


def _map_inner(func, args, kwargs):
    """Apply ``func`` to every inner tensor; used for ops that keep the format as is."""
    weight = args[0]
    out = weight.rebuild([func(t, *args[1:], **kwargs) for t in weight.inner_tensors()])
    if func is not aten.clone.default and getattr(weight, "is_cut_copy", False):  # a view of a cut (tensor_parallel)
        out.is_cut_copy = True
    return return_and_correct_aliasing(func, args, kwargs, out)


def _copy_(func, args, kwargs):
    dst, src = args[0], args[1]
    if getattr(dst, "is_cut_copy", False):
        raise ValueError(
            f"cannot copy into a cut (slice) of a quantized weight, {dst!r}: a cut is a copy, the "
            "weight would not change. A distributed checkpoint loads quantized shards only at the "
            "tensor-parallel degree it was saved with"
        )
    if type(src) is not type(dst):
        raise TypeError(
            f"cannot copy a {type(src).__name__} into a {type(dst).__name__}: load a checkpoint "
            "saved from a model quantized with the same config"
        )
    if src.attributes() != dst.attributes() or src.device != dst.device:
        # converts dtype, device and (int4) packing to the destination's
        src = aten._to_copy.default(src, dtype=dst.dtype, device=dst.device)
    if src.attributes() != dst.attributes():
        raise ValueError(f"cannot copy {src!r} into {dst!r}: shape, dtype or quantization settings differ")
    for d, s in zip(dst.inner_tensors(), src.inner_tensors()):
        d.copy_(s)
    return dst


QuantizedWeight.dispatch_table = {
    aten.detach.default: _map_inner,
    aten.alias.default: _map_inner,
    aten.clone.default: _map_inner,
    aten.copy_.default: _copy_,
}


def check_activation(x: torch.Tensor, weight: QuantizedWeight) -> None:
    """Reject, before any kernel runs, activations ``F.linear(x, weight)`` cannot take.

    TypeError if ``x``'s dtype is not the weight's (integer activations included); ValueError if
    ``x`` is 0-D or its last dimension is not the weight's in_features.
    """
    # weight.shape/.dtype would go through __torch_function__ (~1.5 us each in eager); the
    # constructor's shape and dtype are plain Python attributes.
    shape, dtype = weight.outer_shape, weight.outer_dtype
    if x.dtype != dtype:
        if not x.is_floating_point():
            raise TypeError(
                f"activations must be floating point ({dtype} for this "
                f"{type(weight).__name__}), got {x.dtype}; cast the input with x.to({dtype})"
            )
        raise TypeError(
            f"activation dtype {x.dtype} does not match the {type(weight).__name__}'s dtype "
            f"{dtype}; cast the input or the model (model.to({dtype}))"
        )
    if x.dim() == 0 or x.shape[-1] != shape[1]:
        raise ValueError(
            f"activation shape {tuple(x.shape)} does not fit the {type(weight).__name__} of shape "
            f"{tuple(shape)}: the last dimension must be in_features={shape[1]}"
        )


def target_dtype_device(weight: QuantizedWeight, kwargs: dict) -> tuple[torch.dtype, torch.device]:
    """The dtype and device an ``aten._to_copy`` call asks for; only float dtypes are allowed."""
    dtype = kwargs.get("dtype") or weight.dtype
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{type(weight).__name__} cannot be cast to {dtype}; supported: {FLOAT_DTYPES}")
    return dtype, torch.device(kwargs.get("device") or weight.device)


class _LinearWithDequantizedGrad(torch.autograd.Function):
    """Kernel forward; the activation's gradient uses the dequantized weight (weights are frozen)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: QuantizedWeight) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return torch.nn.functional.linear(x, weight)  # grad mode is off here: the kernel path

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor, None]:
        (weight,) = ctx.saved_tensors
        return grad_out @ weight.dequantize(), None


def linear_with_input_grad(x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear that is differentiable w.r.t. ``x`` (and ``bias``); the weight gets no gradient."""
    out = _LinearWithDequantizedGrad.apply(x, weight)
    return add_bias(out, bias)


def quantized_embedding(lookup: Callable[[torch.Tensor, Any], torch.Tensor]) -> FunctionImpl:
    """``F.embedding`` for a format, from ``lookup(rows, weight)``: the high-precision rows of
    ``weight`` at the int64 indices ``rows`` [T], as [T, K] (dequantizing only those rows)."""

    def embedding(
        ids: torch.Tensor,
        weight: QuantizedWeight,
        padding_idx: int | None = None,
        max_norm: float | None = None,
        norm_type: float = 2.0,
        scale_grad_by_freq: bool = False,
        sparse: bool = False,
    ) -> torch.Tensor:
        check_embedding(ids, weight, max_norm)
        return lookup(ids.reshape(-1).long(), weight).view(*ids.shape, weight.outer_shape[1])

    return embedding


def check_embedding(ids: torch.Tensor, weight: QuantizedWeight, max_norm: float | None) -> None:
    """Reject, before any lookup, what ``F.embedding(ids, weight)`` cannot do on a quantized weight.
    (``padding_idx``, ``scale_grad_by_freq`` and ``sparse`` only shape the weight's gradient, and
    quantized weights have none.)"""
    if ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"embedding indices must be int32 or int64, got {ids.dtype}")
    if max_norm is not None:
        raise ValueError(
            f"max_norm={max_norm} renormalizes the weight in place; a {type(weight).__name__} cannot be "
            "changed in place: dequantize it first (nn.Embedding.from_pretrained(weight.dequantize()))"
        )
