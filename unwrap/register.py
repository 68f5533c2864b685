"""Register tensor-subclass parameters and buffers as plain tensors; rebuild the subclass on access."""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from . import codegen
from .linear import declared_linear, unread_inner
from .spec import SEPARATOR, DifferentiableRebuild, SubclassSpec, flatten_subclass, refresh_nested, untraceable_metadata


class UnwrappedModule(nn.Module):
    """Mixin of the per-module class ``unwrap`` swaps in; see ``unwrap_tensor_subclass_parameters``.

    ``_unwrapped[name]`` is the spec of each unwrapped attribute; ``_unwrapped_kind[name]`` is
    "parameter", "buffer" or "non-persistent buffer".
    """

    _unwrapped: dict[str, SubclassSpec]
    _unwrapped_kind: dict[str, str]
    _original_class: type[nn.Module]

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self.__dict__.get("_unwrapped", ()):
            object.__setattr__(self, name, value)  # the property: nn.Module would register a new Parameter
        else:
            super().__setattr__(name, value)

    def _plain_tensors(self, name: str) -> dict[str, torch.Tensor]:
        spec = self._unwrapped[name]
        store: dict[str, Any] = self._parameters if self._unwrapped_kind[name] == "parameter" else self._buffers
        return {path: store[f"{name}{SEPARATOR}{path}"] for path in spec.paths()}

    def _save_to_state_dict(self, destination, prefix, keep_vars):  # type: ignore[override]
        # Emit the subclass under its original key, where it stood, instead of its plain tensors.
        local: dict[str, Any] = {}
        super()._save_to_state_dict(local, prefix, keep_vars)
        first_plain = {f"{prefix}{name}{SEPARATOR}{spec.paths()[0]}": name for name, spec in self._unwrapped.items()}
        plain_keys = {
            f"{prefix}{name}{SEPARATOR}{path}" for name, spec in self._unwrapped.items() for path in spec.paths()
        }
        for key, value in local.items():
            if key in first_plain:
                name = first_plain[key]
                rebuilt = getattr(self, name)
                destination[prefix + name] = rebuilt if keep_vars else rebuilt.detach()
            elif key not in plain_keys:
                destination[key] = value

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):  # type: ignore[override]
        for name, spec in self._unwrapped.items():
            key = prefix + name
            if key not in state_dict or self._unwrapped_kind[name] == "non-persistent buffer":
                continue
            value = state_dict.pop(key)
            plain = self._plain_tensors(name)
            try:
                with torch.no_grad():
                    spec.rebuild(plain).copy_(value)
            except Exception as error:  # reported like nn.Module reports a failed copy
                error_msgs.append(f'While copying the parameter named "{key}": {error}')
            for path, tensor in plain.items():
                state_dict[f"{key}{SEPARATOR}{path}"] = tensor
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        # Convert each subclass as a whole (a device move may repack it), then update the plain
        # tensors in place (`.data`), so shared weights stay shared and the specs stay right.
        # Where `.data` cannot take the new tensor (e.g. to the meta device) the plain tensors are
        # replaced, the same new objects for every module sharing them.
        applied = _APPLIED.setdefault(fn, {})
        for name, spec in self._unwrapped.items():
            plain = self._plain_tensors(name)
            if applied.get(id(spec), (None,))[0] is not spec:  # a tied weight converts once
                converted = fn(spec.rebuild(plain))
                new_spec, new_plain = flatten_subclass(converted)
                replaced: dict[str, torch.Tensor] = {}
                for path, tensor in plain.items():
                    new = new_plain[path].detach()
                    if torch._has_compatible_shallow_copy_type(tensor, new):
                        tensor.data = new
                    else:
                        replaced[path] = (
                            nn.Parameter(new, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else new
                        )
                spec.meta, spec.outer_size, spec.outer_stride = (
                    new_spec.meta,
                    new_spec.outer_size,
                    new_spec.outer_stride,
                )
                refresh_nested(spec, new_spec)
                spec.cached = None
                applied[id(spec)] = (spec, replaced)
            store = self._parameters if self._unwrapped_kind[name] == "parameter" else self._buffers
            for path, tensor in applied[id(spec)][1].items():
                store[f"{name}{SEPARATOR}{path}"] = tensor
        _refresh_class(self)
        # The plain tensors are converted already: hide them from nn.Module._apply.
        orders = [(store, list(store)) for store in (self._parameters, self._buffers)]
        hidden = {}
        for name in self._unwrapped:
            store = self._parameters if self._unwrapped_kind[name] == "parameter" else self._buffers
            for path in self._unwrapped[name].paths():
                key = f"{name}{SEPARATOR}{path}"
                hidden[key] = store.pop(key)
        try:
            return super()._apply(fn, recurse)
        finally:
            for store, order in orders:
                items = dict(store)
                store.clear()
                store.update((key, hidden[key] if key in hidden else items[key]) for key in order)


_APPLIED: weakref.WeakKeyDictionary[Callable, dict[int, tuple[SubclassSpec, dict[str, torch.Tensor]]]] = (
    weakref.WeakKeyDictionary()
)


def _eager_get(module: UnwrappedModule, name: str) -> torch.Tensor:
    """Rebuild the subclass ``name`` in eager (the generated accessors' cache missed): with
    gradients to the plain tensors when it requires grad, else rebuilt once and cached."""
    spec = module._unwrapped[name]
    plain = module._plain_tensors(name)
    if spec.requires_grad and torch.is_grad_enabled():
        return DifferentiableRebuild.apply(spec, *plain.values())
    value = spec.rebuild(plain)
    spec.cached = (value, tuple(plain.values()))
    return value


def _install_accessors(module: UnwrappedModule) -> None:
    """Generate, on ``type(module)`` (a class of its own), a property per unwrapped name and, for
    an ``nn.Linear`` whose weight's class declares its ``F.linear`` (``linear.declared_linear``:
    ours, torchao's, or any class implementing ``__unwrap_linear__``), a forward that calls it directly.

    Under torch.compile the rebuild's metadata are literals in this generated code, so Dynamo
    guards nothing about them; the module's type is what it guards (one check it makes anyway).
    That is safe because new metadata always come with a new class (``_refresh_class``)."""
    cls = type(module)
    names: codegen.Names = {"eager_get": _eager_get}
    for name, spec in module._unwrapped.items():
        store = _store_name(module, name)
        fields = {
            "function": "get",
            "doc": f"The tensor subclass `{name}`, rebuilt from its plain tensors.",
            "store": store,
            "name": name,
            "rebuild": codegen.rebuild_source(spec, name, "plain", names),
            **codegen.cache_fields(spec, name),
        }
        getter = codegen.define(cls, codegen.GETTER, fields, names)
        setattr(cls, name, property(getter, _setter(name), doc=fields["doc"]))
    weight = module._unwrapped.get("weight")
    linear = declared_linear(weight.subclass) if weight is not None else None
    if weight is not None and linear is not None and module._original_class.forward is nn.Linear.forward:
        # Reading the weight here, not through the property, also spares Dynamo a guard per
        # layer on the property's getter; eager skips the __torch_function__ round trip.
        # nn.Linear keeps its bias in _parameters; reading it there spares nn.Module.__getattr__.
        # Inner tensors the linear never reads are left out of the compiled rebuild (no input, no guard).
        unread = (
            unread_inner(linear, weight.rebuild(module._plain_tensors("weight")))
            if hasattr(linear, "unread_inner")
            else frozenset()
        )
        fields = {
            "store": _store_name(module, "weight"),
            "linear": codegen.global_name(linear, names),
            "rebuild": codegen.rebuild_source(weight, "weight", "plain", names, unread),
            "bias": "self._parameters['bias']" if "bias" in module._parameters else "self.bias",
            **codegen.cache_fields(weight, "weight"),
        }
        cls.forward = codegen.define(cls, codegen.LINEAR_FORWARD, fields, names)


def _store_name(module: UnwrappedModule, name: str) -> str:
    return "_parameters" if module._unwrapped_kind[name] == "parameter" else "_buffers"


def _refresh_class(module: UnwrappedModule) -> None:
    """Move ``module`` to a fresh class and generate its accessors from the current specs: a
    compiled graph built with the old metadata fails its type guard and recompiles."""
    module.__class__ = _unwrapped_class(module._original_class)
    _install_accessors(module)


def _unwrapped_class(original: type) -> type:
    """A class of one module's own: ``Unwrapped<original>``, to hold its generated accessors."""
    return type(f"Unwrapped{original.__name__}", (UnwrappedModule, original), {"_original_class": original})


def _setter(name: str) -> Callable[[UnwrappedModule, torch.Tensor], None]:
    def set(module: UnwrappedModule, value: torch.Tensor) -> None:
        if not is_traceable_wrapper_subclass(value):
            raise TypeError(
                f"{type(module).__name__}.{name} is an unwrapped tensor subclass; assign a tensor "
                f"subclass (got {type(value).__name__}), or call unwrap.rewrap(model) first"
            )
        kind = module._unwrapped_kind[name]
        _unregister_plain(module, name)
        _register_plain(module, name, value, kind)
        _refresh_class(module)

    return set


def _register_plain(
    module: UnwrappedModule, name: str, value: torch.Tensor, kind: str, spec_cache: dict | None = None
) -> None:
    """Register ``value``'s plain tensors on ``module`` as ``name__path`` and record its spec."""
    shared = spec_cache.get(id(value)) if spec_cache is not None else None
    if shared is not None:
        spec, plain = shared
    else:
        spec, plain = flatten_subclass(value)
        if kind == "parameter":
            plain = {
                path: t
                if isinstance(t, nn.Parameter)
                else nn.Parameter(t, requires_grad=spec.requires_grad and t.is_floating_point())
                for path, t in plain.items()
            }
        if spec_cache is not None:
            spec_cache[id(value)] = (spec, plain)
    for path, tensor in plain.items():
        key = f"{name}{SEPARATOR}{path}"
        if kind == "parameter":
            module._parameters[key] = tensor
        else:
            module._buffers[key] = tensor
            if kind == "non-persistent buffer":
                module._non_persistent_buffers_set.add(key)
    module._unwrapped[name] = spec


def _unregister_plain(module: UnwrappedModule, name: str) -> dict[str, torch.Tensor]:
    plain = module._plain_tensors(name)
    store = module._parameters if module._unwrapped_kind[name] == "parameter" else module._buffers
    for path in plain:
        key = f"{name}{SEPARATOR}{path}"
        del store[key]
        module._non_persistent_buffers_set.discard(key)
    return plain


def _subclass_entries(
    module: nn.Module, prefix: str, left_wrapped: dict[str, str]
) -> list[tuple[str, torch.Tensor, str]]:
    """The subclass parameters and buffers ``unwrap`` can take; the others go to ``left_wrapped``
    (qualified name -> why)."""
    entries: list[tuple[str, torch.Tensor, str]] = []
    for name, param in module._parameters.items():
        if param is not None and is_traceable_wrapper_subclass(param):
            entries.append((name, param, "parameter"))
    for name, buffer in module._buffers.items():
        if buffer is not None and is_traceable_wrapper_subclass(buffer):
            persistent = name not in module._non_persistent_buffers_set
            entries.append((name, buffer, "buffer" if persistent else "non-persistent buffer"))
    kept = []
    for name, value, kind in entries:
        reason = untraceable_metadata(value)
        if reason is None:
            kept.append((name, value, kind))
        else:
            left_wrapped[f"{prefix}{name}"] = reason
    return kept


def _unwrap_module(original: nn.Module, prefix: str, spec_cache: dict, left_wrapped: dict[str, str]) -> None:
    entries = _subclass_entries(original, prefix, left_wrapped)
    if not entries:
        return
    if isinstance(original, UnwrappedModule):
        raise ValueError(f"{type(original).__name__} already holds unwrapped tensors; rewrap it first")
    original.__class__ = _unwrapped_class(type(original))
    module = cast(UnwrappedModule, original)
    module._unwrapped = {}
    module._unwrapped_kind = {}
    param_order, buffer_order = list(module._parameters), list(module._buffers)
    for name, value, kind in entries:
        store = module._parameters if kind == "parameter" else module._buffers
        del store[name]
        module._non_persistent_buffers_set.discard(name)
        module._unwrapped_kind[name] = kind
        _register_plain(module, name, value, kind, spec_cache)
    _install_accessors(module)
    # Keep the plain tensors where the subclass stood, so state_dict keeps its key order.
    _reorder(module._parameters, param_order)
    _reorder(module._buffers, buffer_order)


def _reorder(store: dict[str, Any], order: list[str]) -> None:
    items = dict(store)
    store.clear()
    for name in order:
        if name in items:
            store[name] = items.pop(name)
        else:
            for key in [k for k in items if k.startswith(name + SEPARATOR)]:
                store[key] = items.pop(key)
    store.update(items)


def unwrap_tensor_subclass_parameters(module: nn.Module) -> nn.Module:
    """Register every tensor-subclass parameter and buffer of ``module`` and its submodules as
    plain tensors; the subclass is rebuilt from them on attribute access.

    What changes for you: ``named_parameters()``/``named_buffers()`` list plain tensors named
    ``f"{name}__{inner}"`` (e.g. ``weight__packed``), so ``torch.compile`` and ``torch.export``
    see plain graph inputs and rebuild the subclass inside the graph. What does not change:
    ``module.weight`` still returns the subclass (cached in eager, rebuilt if a plain tensor is
    reassigned); ``state_dict()`` keys, values and order, and checkpoints in both directions;
    tied weights stay one set of plain tensors; non-persistent buffers stay non-persistent;
    ``.to()``/``.half()`` convert the subclass as a whole. A subclass whose flatten metadata holds
    objects torch.compile cannot treat as constants (see ``spec.untraceable_metadata``) stays
    wrapped, named in one warning: unwrapping it would break compilation. Assigning a tensor subclass to an
    unwrapped name re-registers it; assigning a plain tensor raises TypeError. Calling it on an
    already unwrapped module, or on one without subclasses, changes nothing. Returns ``module``.
    """
    spec_cache: dict[int, tuple[SubclassSpec, dict[str, torch.Tensor]]] = {}
    left_wrapped: dict[str, str] = {}
    for fqn, submodule in module.named_modules():
        if not isinstance(submodule, UnwrappedModule):
            _unwrap_module(submodule, f"{fqn}." if fqn else "", spec_cache, left_wrapped)
    if left_wrapped:
        # Unwrapped, such a weight would break torch.compile (Dynamo cannot rebuild the subclass
        # from its plain tensors); wrapped, it compiles as it did before.
        listed = "; ".join(f"{name} ({why})" for name, why in left_wrapped.items())
        warnings.warn(
            f"unwrap left {len(left_wrapped)} tensor(s) wrapped: torch.compile cannot rebuild them "
            f"from plain tensors because their metadata is not made of constants: {listed}",
            stacklevel=2,
        )
    return module


def unwrap(model: nn.Module) -> nn.Module:
    """The one call after ``subclasses.quantize_``: unwrap every tensor-subclass weight of
    ``model`` in place (see ``unwrap_tensor_subclass_parameters``) and return it."""
    return unwrap_tensor_subclass_parameters(model)


def rewrap(model: nn.Module) -> nn.Module:
    """Undo ``unwrap``: put every subclass back as an ordinary parameter or buffer, built from
    (sharing) the plain tensors, with the original class, names, order and ties. Returns ``model``."""
    rebuilt: dict[int, torch.Tensor] = {}
    for module in model.modules():
        if not isinstance(module, UnwrappedModule):
            continue
        param_order = _original_order(module._parameters, module._unwrapped)
        buffer_order = _original_order(module._buffers, module._unwrapped)
        values: dict[str, Any] = {}
        for name, spec in module._unwrapped.items():
            plain = _unregister_plain(module, name)
            if id(spec) not in rebuilt:
                value = spec.rebuild(plain)
                if module._unwrapped_kind[name] == "parameter":
                    value = nn.Parameter(value, requires_grad=spec.requires_grad)
                rebuilt[id(spec)] = value
            values[name] = rebuilt[id(spec)]
        kinds = module._unwrapped_kind
        module.__class__ = module._original_class  # type: ignore[assignment]  # back to the user's class
        for attr in ("_unwrapped", "_unwrapped_kind"):
            module.__dict__.pop(attr, None)
        for name, value in values.items():
            if kinds[name] == "parameter":
                module._parameters[name] = value
            else:
                module._buffers[name] = value
                if kinds[name] == "non-persistent buffer":
                    module._non_persistent_buffers_set.add(name)
        _reorder(module._parameters, param_order)
        _reorder(module._buffers, buffer_order)
    return model


def _original_order(store: dict[str, Any], unwrapped: dict[str, SubclassSpec]) -> list[str]:
    order: list[str] = []
    for key in store:
        base = key.split(SEPARATOR, 1)[0]
        name = base if base in unwrapped and key.startswith(base + SEPARATOR) else key
        if name not in order:
            order.append(name)
    return order
