"""How one tensor subclass is rebuilt from the plain tensors ``unwrap`` registers for it."""

from __future__ import annotations

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

    subclass: type
    meta: Any
    outer_size: torch.Size
    outer_stride: tuple[int, ...]
    inner: dict[str, "SubclassSpec | str | Opaque"]
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
            name: value.rebuild(plain) if isinstance(value, SubclassSpec)
            else value.value if isinstance(value, Opaque) else plain[value]
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
        paths = ctx.spec.paths()
        if not is_traceable_wrapper_subclass(grad):
            return (None, *(None for _ in paths))
        _, grads = flatten_subclass(grad)
        if set(grads) != set(paths):
            raise NotImplementedError(
                f"the gradient of an unwrapped {ctx.spec.subclass.__name__} is nested differently "
                f"({sorted(grads)}) than the parameter ({paths}); run under torch.compile, or rewrap"
            )
        return (None, *(grads[path] for path in paths))
