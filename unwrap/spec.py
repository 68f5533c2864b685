"""How one tensor subclass is rebuilt from the plain tensors ``unwrap`` registers for it."""

from __future__ import annotations

import enum
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

SEPARATOR = "__"


@dataclass(frozen=True, eq=False)
class Opaque:
    """A non-tensor that ``__tensor_flatten__`` lists among the inner tensors (DTensor's
    ``device_mesh``): kept as is in the spec, not registered on the module."""

    value: Any


@dataclass(eq=False)
class SubclassSpec:
    """How to rebuild one tensor subclass from plain tensors registered on its module(s).

    ``inner`` maps each name of ``__tensor_flatten__`` to a nested spec or to a plain tensor's
    path (``"packed"``, or ``"a__b"`` when nested); the plain tensor lives on the owning module as
    ``f"{attribute}__{path}"``, or to an ``Opaque`` non-tensor (DTensor's device mesh). One spec
    is shared by every module that shares the weight.
    """

    subclass: type[Any]
    meta: Any
    outer_size: torch.Size
    outer_stride: tuple[int, ...]
    inner: dict[str, SubclassSpec | str | Opaque]
    requires_grad: bool = False
    # Eager cache: the last rebuilt subclass and the plain tensors it was built from.
    cached: tuple[torch.Tensor, tuple[torch.Tensor, ...]] | None = field(default=None, repr=False)

    def paths(self) -> list[str]:
        out: list[str] = []
        for value in self.inner.values():
            if isinstance(value, SubclassSpec):
                out.extend(value.paths())
            elif not isinstance(value, Opaque):
                out.append(value)
        return out

    def rebuild(self, plain: dict[str, torch.Tensor]) -> torch.Tensor:
        inner = {
            name: value.rebuild(plain)
            if isinstance(value, SubclassSpec)
            else value.value
            if isinstance(value, Opaque)
            else plain[value]
            for name, value in self.inner.items()
        }
        return self.subclass.__tensor_unflatten__(inner, self.meta, self.outer_size, self.outer_stride)


def flatten_subclass(tensor: torch.Tensor, prefix: str = "") -> tuple[SubclassSpec, dict[str, torch.Tensor]]:
    """Spec and plain tensors (by path) of a traceable wrapper subclass, recursively."""
    names, meta = tensor.__tensor_flatten__()  # type: ignore[attr-defined]
    inner: dict[str, SubclassSpec | str | Opaque] = {}
    plain: dict[str, torch.Tensor] = {}
    for name in names:
        value = getattr(tensor, name)
        path = f"{prefix}{name}"
        if not isinstance(value, torch.Tensor):
            inner[name] = Opaque(value)
        elif is_traceable_wrapper_subclass(value):
            inner[name], nested = flatten_subclass(value, path + SEPARATOR)
            plain.update(nested)
        else:
            inner[name] = path
            plain[path] = value
    spec = SubclassSpec(type(tensor), meta, tensor.size(), tensor.stride(), inner, tensor.requires_grad)
    return spec, plain


# Metadata values Dynamo treats as constants when it rebuilds a subclass inside a graph.
_CONSTANT_TYPES = (
    type(None),
    bool,
    int,
    float,
    str,
    torch.dtype,
    torch.device,
    torch.layout,
    torch.memory_format,
    enum.Enum,
)


def untraceable_metadata(tensor: Any) -> str | None:
    """What in ``tensor``'s flatten metadata (or a nested subclass's) torch.compile cannot treat as
    a constant, e.g. ``"a QuantizeTensorToInt8Kwargs"``; None when every value is one of
    ``_CONSTANT_TYPES`` or a tuple, list, dict or ``torch.Size`` of them."""
    names, meta = tensor.__tensor_flatten__()  # type: ignore[attr-defined]
    dtensor = sys.modules.get("torch.distributed.tensor")
    # DTensor's metadata (placements, spec) is not made of constants, but unwrap rebuilds it with
    # DTensor.from_local, which Dynamo traces: only its local tensor is checked
    bad = None if dtensor is not None and isinstance(tensor, dtensor.DTensor) else _first_non_constant(meta)
    if bad is not None:
        return f"a {type(bad).__name__} in {type(tensor).__name__}'s metadata"
    for name in names:
        inner = getattr(tensor, name)
        if is_traceable_wrapper_subclass(inner):
            reason = untraceable_metadata(inner)
            if reason is not None:
                return reason
    return None


def _first_non_constant(value: Any) -> Any:
    if isinstance(value, _CONSTANT_TYPES):
        return None
    if isinstance(value, (tuple, list)):
        items: Any = value
    elif isinstance(value, dict):
        items = [*value.keys(), *value.values()]
    else:
        return value
    return next((bad for bad in map(_first_non_constant, items) if bad is not None), None)


def refresh_nested(spec: SubclassSpec, new: SubclassSpec) -> None:
    """Copy the metadata of ``new``'s nested specs into ``spec``'s (same nesting), in place."""
    for name, value in spec.inner.items():
        other = new.inner[name]
        if isinstance(value, SubclassSpec) and isinstance(other, SubclassSpec):
            value.meta, value.outer_size, value.outer_stride = other.meta, other.outer_size, other.outer_stride
            refresh_nested(value, other)


class DifferentiableRebuild(torch.autograd.Function):
    """Eager rebuild with gradients: the subclass's gradient is split back into the plain ones."""

    @staticmethod
    def forward(ctx: Any, spec: SubclassSpec, *plain: torch.Tensor) -> torch.Tensor:
        ctx.spec = spec
        return spec.rebuild(dict(zip(spec.paths(), plain)))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        # The inputs' gradients never depend on this: only what the plain tensors receive does.
        paths = ctx.spec.paths()
        if is_traceable_wrapper_subclass(grad):
            _, grads = flatten_subclass(grad)
            if set(grads) == set(paths):
                return (None, *(grads[path] for path in paths))
            got = f"a {type(grad).__name__} nested as {sorted(grads)}"
        else:
            got = f"a plain {type(grad).__name__}"
        _warn_unmapped_gradient_once(ctx.spec, got, paths)
        return (None, *(None for _ in paths))


_WARNED_UNMAPPED: set[type] = set()


def _warn_unmapped_gradient_once(spec: SubclassSpec, got: str, paths: list[str]) -> None:
    if spec.subclass in _WARNED_UNMAPPED:
        return
    _WARNED_UNMAPPED.add(spec.subclass)
    warnings.warn(
        f"an unwrapped {spec.subclass.__name__} parameter received {got} as its gradient, which does "
        f"not map onto its plain tensors ({paths}): they get no gradient (None). The other "
        "gradients are unaffected. Rewrap the model (unwrap.rewrap) to train such a parameter.",
        stacklevel=2,
    )
