"""Register tensor-subclass parameters and buffers as plain tensors; rebuild the subclass on access."""

from __future__ import annotations

import sys
import warnings
import weakref
from typing import Any, Callable

import torch
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from .linear import declared_linear, torchao_style_constructor, unread_inner
from .spec import SEPARATOR, DifferentiableRebuild, Opaque, SubclassSpec, flatten_subclass, refresh_nested, untraceable_metadata


class UnwrappedModule(nn.Module):
    """Mixin of the per-module class ``unwrap`` swaps in; see ``unwrap_tensor_subclass_parameters``.

    ``_unwrapped[name]`` is the spec of each unwrapped attribute; ``_unwrapped_kind[name]`` is
    "parameter", "buffer" or "non-persistent buffer".
    """

    _unwrapped: dict[str, SubclassSpec]
    _unwrapped_kind: dict[str, str]
    _original_class: type

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self.__dict__.get("_unwrapped", ()):
            object.__setattr__(self, name, value)  # the property: nn.Module would register a new Parameter
        else:
            super().__setattr__(name, value)

    def _plain_tensors(self, name: str) -> dict[str, torch.Tensor]:
        spec = self._unwrapped[name]
        store = self._parameters if self._unwrapped_kind[name] == "parameter" else self._buffers
        return {path: store[f"{name}{SEPARATOR}{path}"] for path in spec.paths()}

    def _save_to_state_dict(self, destination, prefix, keep_vars):  # type: ignore[override]
        # Emit the subclass under its original key, where it stood, instead of its plain tensors.
        local: dict[str, Any] = {}
        super()._save_to_state_dict(local, prefix, keep_vars)
        first_plain = {
            f"{prefix}{name}{SEPARATOR}{spec.paths()[0]}": name for name, spec in self._unwrapped.items()
        }
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

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):  # type: ignore[override]
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
                        replaced[path] = nn.Parameter(new, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else new
                spec.meta, spec.outer_size, spec.outer_stride = new_spec.meta, new_spec.outer_size, new_spec.outer_stride
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


_APPLIED: "weakref.WeakKeyDictionary[Callable, dict[int, tuple[SubclassSpec, dict[str, torch.Tensor]]]]" = weakref.WeakKeyDictionary()


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


# Globals of the generated getters: classes and non-literal metadata they refer to.
_GENERATED_GLOBALS: dict[str, Any] = {
    "torch": torch,
    "is_compiling": torch.compiler.is_compiling,
    "_eager_get": _eager_get,
}


def _literal(value: Any) -> str | None:
    """Python source that evaluates to ``value`` (ints, strs, tuples, dtypes...), or None."""
    text = repr(value)
    try:
        same = eval(text, {"torch": torch})  # noqa: S307 - our own repr of constants
        return text if type(same) is type(value) and same == value else None
    except Exception:
        return None


def _global(obj: Any) -> str:
    key = f"_g{id(obj)}"
    _GENERATED_GLOBALS[key] = obj
    return key


def _inner_source(value: "SubclassSpec | str | Opaque", name: str, store: str) -> str:
    if isinstance(value, SubclassSpec):
        return _rebuild_source(value, name, store)
    if isinstance(value, Opaque):
        return _global(value.value)
    return f"{store}[{name + SEPARATOR + value!r}]"


def _rebuild_source(spec: SubclassSpec, name: str, store: str, unread: frozenset[str] = frozenset()) -> str:
    if _is_dtensor(spec.subclass):
        # Dynamo cannot trace DTensor's constructor (its __tensor_unflatten__), but traces
        # DTensor.from_local: the local tensor (plain or ours) and the mesh, shape, stride as is.
        placements = spec.meta[0]
        return (
            f"{_global(spec.subclass.from_local)}({_inner_source(spec.inner['_local_tensor'], name, store)}, "
            f"{_inner_source(spec.inner['device_mesh'], name, store)}, {_global(placements)}, run_check=False, "
            f"shape={tuple(spec.outer_size)!r}, stride={tuple(spec.outer_stride)!r})"
        )
    sources = {inner_name: _inner_source(value, name, store) for inner_name, value in spec.inner.items()}
    constructor = torchao_style_constructor(spec.subclass, sources, spec.meta, lambda v: _literal(v) or _global(v), unread)
    if constructor is not None:
        return constructor
    inner = ", ".join(f"{inner_name!r}: {source}" for inner_name, source in sources.items())
    meta = _literal(spec.meta) or _global(spec.meta)
    return (
        f"{_global(spec.subclass)}.__tensor_unflatten__({{{inner}}}, {meta}, "
        f"{tuple(spec.outer_size)!r}, {tuple(spec.outer_stride)!r})"
    )


def _is_dtensor(cls: type) -> bool:
    module = sys.modules.get("torch.distributed.tensor")  # not imported: no tensor is a DTensor
    return module is not None and issubclass(cls, module.DTensor)


def _accessor_source(module: UnwrappedModule, name: str, signature: str, result: str, unread: frozenset[str] = frozenset()) -> str:
    """Source of a function returning ``result`` (``{}``: the subclass ``name``). Under
    torch.compile it rebuilds the subclass from the plain tensors with the metadata written in as
    literals; in eager it returns the cached subclass while each plain tensor it was built from is
    still registered (in-place changes show through), else ``_eager_get`` rebuilds it. ``unread``:
    inner tensors the compiled rebuild leaves out (``linear.unread_inner``)."""
    store = "_parameters" if module._unwrapped_kind[name] == "parameter" else "_buffers"
    spec = module._unwrapped[name]
    lines = [
        f"def {signature}:",
        "    if is_compiling():",
        f"        plain = self.{store}",
        f"        return {result.format(_rebuild_source(spec, name, 'plain', unread))}",
    ]
    held = " and ".join(f"plain[{name + SEPARATOR + path!r}] is held[{i}]" for i, path in enumerate(spec.paths()))
    lines += [
        f"    cached = self._unwrapped[{name!r}].cached",  # not a global: that would outlive the module
        # a subclass that requires grad is rebuilt differentiably whenever grad mode is on
        f"    if cached is not None{' and not torch.is_grad_enabled()' if spec.requires_grad else ''}:",
        "        value, held = cached",
        f"        plain = self.{store}",
        f"        if {held}:",
        f"            return {result.format('value')}",
    ]
    lines.append(f"    return {result.format(f'_eager_get(self, {name!r})')}")
    return "\n".join(lines) + "\n"


def _generate(module: UnwrappedModule, source: str, function: str) -> Callable:
    namespace: dict[str, Any] = {}
    filename = f"<unwrap {type(module).__name__}.{function}>"
    exec(compile(source, filename, "exec"), _GENERATED_GLOBALS, namespace)
    return namespace[function]


def _install_accessors(module: UnwrappedModule) -> None:
    """Generate, on ``type(module)`` (a class of its own), a property per unwrapped name and, for
    an ``nn.Linear`` whose weight's class declares its ``F.linear`` (``linear.declared_linear``:
    ours, torchao's, or any class implementing ``__unwrap_linear__``), a forward that calls it directly.

    Under torch.compile the rebuild's metadata are literals in this generated code, so Dynamo
    guards nothing about them; the module's type is what it guards (one check it makes anyway).
    That is safe because new metadata always come with a new class (``_refresh_class``)."""
    cls = type(module)
    for name in module._unwrapped:
        getter = _generate(module, _accessor_source(module, name, "get(self)", "{}"), "get")
        doc = f"The tensor subclass `{name}`, rebuilt from its plain tensors."
        setattr(cls, name, property(getter, _setter(name), doc=doc))
    spec = module._unwrapped.get("weight")
    linear = declared_linear(spec.subclass) if spec is not None else None
    if module._original_class.forward is nn.Linear.forward and linear is not None:
        # Reading the weight here, not through the property, also spares Dynamo a guard per
        # layer on the property's getter; eager skips the __torch_function__ round trip.
        # nn.Linear keeps its bias in _parameters; reading it there spares nn.Module.__getattr__.
        bias = "self._parameters['bias']" if "bias" in module._parameters else "self.bias"
        result = f"{_global(linear)}(input, {{}}, {bias})"
        weight = spec.rebuild(module._plain_tensors("weight")) if hasattr(linear, "unread_inner") else None
        unread = unread_inner(linear, weight) if weight is not None else frozenset()
        cls.forward = _generate(module, _accessor_source(module, "weight", "forward(self, input)", result, unread), "forward")


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


def _register_plain(module: nn.Module, name: str, value: torch.Tensor, kind: str, spec_cache: dict | None = None) -> None:
    """Register ``value``'s plain tensors on ``module`` as ``name__path`` and record its spec."""
    shared = spec_cache.get(id(value)) if spec_cache is not None else None
    if shared is not None:
        spec, plain = shared
    else:
        spec, plain = flatten_subclass(value)
        if kind == "parameter":
            plain = {
                path: t if isinstance(t, nn.Parameter) else nn.Parameter(t, requires_grad=spec.requires_grad and t.is_floating_point())
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


def _subclass_entries(module: nn.Module, prefix: str, left_wrapped: dict[str, str]) -> list[tuple[str, torch.Tensor, str]]:
    """The subclass parameters and buffers ``unwrap`` can take; the others go to ``left_wrapped``
    (qualified name -> why)."""
    entries = []
    for name, value in module._parameters.items():
        if value is not None and is_traceable_wrapper_subclass(value):
            entries.append((name, value, "parameter"))
    for name, value in module._buffers.items():
        if value is not None and is_traceable_wrapper_subclass(value):
            persistent = name not in module._non_persistent_buffers_set
            entries.append((name, value, "buffer" if persistent else "non-persistent buffer"))
    kept = []
    for name, value, kind in entries:
        reason = untraceable_metadata(value)
        if reason is None:
            kept.append((name, value, kind))
        else:
            left_wrapped[f"{prefix}{name}"] = reason
    return kept


def _unwrap_module(module: nn.Module, prefix: str, spec_cache: dict, left_wrapped: dict[str, str]) -> None:
    entries = _subclass_entries(module, prefix, left_wrapped)
    if not entries:
        return
    if not isinstance(module, UnwrappedModule):
        module.__class__ = _unwrapped_class(type(module))
        module._unwrapped = {}
        module._unwrapped_kind = {}
    else:
        raise ValueError(f"{type(module).__name__} already holds unwrapped tensors; rewrap it first")
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
        values = {}
        for name, spec in module._unwrapped.items():
            plain = _unregister_plain(module, name)
            if id(spec) not in rebuilt:
                value = spec.rebuild(plain)
                if module._unwrapped_kind[name] == "parameter":
                    value = nn.Parameter(value, requires_grad=spec.requires_grad)
                rebuilt[id(spec)] = value
            values[name] = rebuilt[id(spec)]
        kinds = module._unwrapped_kind
        module.__class__ = module._original_class
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
