"""How a tensor subclass declares its ``F.linear``, so an unwrapped ``nn.Linear`` can call it directly.

An unwrapped ``nn.Linear`` whose weight's class declares its linear gets a generated ``forward``
that calls that function with the rebuilt weight: eager skips the ``__torch_function__`` round
trip, and a compiled model guards nothing about the class's tables. The protocol, first match wins:

1. ``__unwrap_linear__``: a class attribute, a function ``(input, weight, bias) -> Tensor`` that
   computes ``F.linear(input, weight, bias)`` for a ``weight`` of that class (a ``staticmethod``, or
   a plain function stored on the class). This is the protocol to implement.
2. ``register_linear(name, fn)``: the same function registered for a class by its qualified name
   (``module.qualname``), for classes one cannot edit; ``subclasses`` registers lean linears for
   torchao's classes this way (``subclasses/io/torchao_linear.py``) without importing torchao.
3. ``function_table[F.linear]``: the same function in a dict of ``__torch_function__`` overrides
   (``subclasses.QuantizedWeight`` keeps one per class).
4. ``_TORCH_FN_TABLE[cls][F.linear]``: torchao's ``TorchAOBaseTensor`` convention, a per-class dict
   of overrides called as ``impl(func, types, args, kwargs)``; adapted here to the signature of 1.

A declared linear may also carry ``unread_inner(weight) -> names``: optional inner tensors of
``weight`` (keyword arguments of a torchao-style constructor, see ``torchao_style_constructor``) it
never reads. The compiled forward's rebuild passes None for them, so Dynamo neither takes them as
graph inputs nor guards them (torchao's weight-only ``Int8Tensor`` carries an all-zero
``zero_point`` its linear ignores: one guard per layer).

A subclass with none of them keeps the generic path (``nn.Linear.forward`` reading the weight
through its property, so ``F.linear`` goes through ``__torch_function__``). This module imports no
subclass package: it only reads attributes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch.nn import functional as F

LinearFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]

_REGISTERED: dict[str, LinearFn] = {}


def register_linear(qualified_name: str, linear: LinearFn) -> None:
    """Declare ``linear`` (``(input, weight, bias) -> Tensor``) as ``F.linear`` for the class named
    ``qualified_name`` (``f"{cls.__module__}.{cls.__qualname__}"``, exactly; subclasses of it are
    not covered), without importing or editing that class."""
    if not callable(linear):
        raise TypeError(
            f"register_linear({qualified_name!r}, ...): linear must be callable, got {type(linear).__name__}"
        )
    _REGISTERED[qualified_name] = linear


def declared_linear(subclass: type) -> LinearFn | None:
    """The ``(input, weight, bias) -> Tensor`` function ``subclass`` declares for ``F.linear``
    (see the module docstring for the protocol), or None if it declares none."""
    linear = getattr(subclass, "__unwrap_linear__", None)
    if callable(linear):
        return linear
    registered = _REGISTERED.get(f"{subclass.__module__}.{subclass.__qualname__}")
    if registered is not None:
        return registered
    table = getattr(subclass, "function_table", None)
    if isinstance(table, dict) and callable(table.get(F.linear)):
        return table[F.linear]
    tables = getattr(subclass, "_TORCH_FN_TABLE", None)
    per_class = tables.get(subclass) if isinstance(tables, dict) else None
    if isinstance(per_class, dict) and callable(per_class.get(F.linear)):
        return _adapt_torch_function(subclass, per_class[F.linear])
    return None


@functools.cache
def _adapt_torch_function(subclass: type, impl: Callable) -> LinearFn:
    """``impl(func, types, args, kwargs)`` as ``(input, weight, bias)``; one adapter per class
    and implementation, so the generated forwards of a model share it.

    Written so that a compiled model guards as little as possible on it: the implementation is
    unwrapped from a ``functools.wraps`` wrapper (torchao registers such a wrapper, whose default
    argument Dynamo would guard), and the adapter reads it and ``F.linear`` from a namespace of
    its own rather than from closure cells and this module's globals."""
    namespace = {"impl": getattr(impl, "__wrapped__", impl), "F_linear": F.linear}
    source = (
        "def linear(input, weight, bias=None):\n    return impl(F_linear, (type(weight),), (input, weight, bias), {})\n"
    )
    exec(compile(source, f"<unwrap linear of {subclass.__qualname__}>", "exec"), namespace)
    linear = namespace["linear"]
    linear.__qualname__ = linear.__name__ = f"{subclass.__name__}_linear"
    return linear


def unread_inner(linear: LinearFn, weight: torch.Tensor) -> frozenset[str]:
    """The inner tensors of ``weight`` that ``linear`` declares it never reads (its optional
    ``unread_inner(weight)``; empty if it has none)."""
    unread = getattr(linear, "unread_inner", None)
    return frozenset(unread(weight)) if callable(unread) else frozenset()


def torchao_style_constructor(
    subclass: type[Any],
    sources: dict[str, str],
    meta: Any,
    constant: Callable[[Any], str],
    unread: frozenset[str] = frozenset(),
) -> str | None:
    """Source calling ``subclass(...)`` directly, for a class that keeps torchao's generic
    ``TorchAOBaseTensor.__tensor_unflatten__`` (its constructor takes the required tensors, the
    required attributes, then the optional ones by keyword); None for any other class.

    ``sources``: source of each inner tensor by name; ``constant(value)``: source of a metadata
    value; ``unread``: optional inner tensors to pass as None (see ``unread_inner``). Used for the
    compiled rebuild of the weight: that unflatten asks ``hasattr`` of the class four times, and
    Dynamo adds a guard for each call of each layer; the call it ends in, written out with the
    metadata as constants, needs none."""
    unflatten = getattr(subclass.__tensor_unflatten__, "__func__", None)
    base = next((c for c in subclass.__mro__ if c.__name__ == "TorchAOBaseTensor"), None)
    if base is None or unflatten is not getattr(base.__dict__.get("__tensor_unflatten__"), "__func__", None):
        return None
    if not isinstance(meta, dict):
        return None
    args = [sources[n] for n in subclass.tensor_data_names]
    args += [constant(meta[n]) for n in subclass.tensor_attribute_names]
    args += [
        f"{n}={'None' if n in unread else sources.get(n, 'None')}"
        for n in getattr(subclass, "optional_tensor_data_names", ())
    ]
    args += [f"{n}={constant(meta[n])}" for n in getattr(subclass, "optional_tensor_attribute_names", ())]
    return f"{constant(subclass)}({', '.join(args)})"
