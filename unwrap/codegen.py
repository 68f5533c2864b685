"""The Python source of an unwrapped module's accessors and ``forward``, generated per module.

Why generated and not closures: under torch.compile a closure's cells and a shared getter are
guarded per call and per layer (~7 guards a layer, measured); a function whose rebuild of the
subclass is written out, with its metadata as literals, needs only the module's type guard,
which Dynamo adds anyway. Each module class gets functions of its own (see ``register``).

The source is a fixed template per function (``GETTER``, ``LINEAR_FORWARD``) filled with
expressions, registered with ``linecache``: tracebacks show the generated line and
``inspect.getsource`` works. Metadata becomes a literal only for the types ``literal`` knows;
anything else (a class, a function, a DTensor's mesh) is a global of the generated code, named
after its qualified name and shared by all generated functions. Globals that are not named
(per-weight objects) are dropped when the last class using them is collected.
"""

from __future__ import annotations

import hashlib
import linecache
import sys
import textwrap
from collections.abc import Callable
from typing import Any

import torch

from .linear import torchao_style_constructor
from .spec import SEPARATOR, Opaque, SubclassSpec

# The globals of all generated code: what every template calls, and the classes and functions it
# names by their qualified names (deterministic; one entry per class or function, never per weight).
# One shared dict: Dynamo then guards each of them once, not once per generated class.
GLOBALS: dict[str, Any] = {"torch": torch, "is_compiling": torch.compiler.is_compiling}
Names = dict[str, Any]  # one generated class's own objects (closure variables of its code): name -> object

GETTER = '''\
def {function}(self):
    """{doc}"""
    if is_compiling():
        plain = self.{store}
        return {rebuild}
    cached = self._unwrapped[{name!r}].cached
    if cached is not None{and_no_grad}:
        value, held = cached
        plain = self.{store}
        if {all_held}:
            return value
    return eager_get(self, {name!r})
'''

LINEAR_FORWARD = '''\
def forward(self, input):
    """F.linear with the rebuilt `weight`, calling its class's declared linear directly."""
    if is_compiling():
        plain = self.{store}
        return {linear}(input, {rebuild}, {bias})
    cached = self._unwrapped['weight'].cached
    if cached is not None{and_no_grad}:
        value, held = cached
        plain = self.{store}
        if {all_held}:
            return {linear}(input, value, {bias})
    return {linear}(input, eager_get(self, 'weight'), {bias})
'''


def literal(value: Any) -> str | None:
    """Source that evaluates to ``value``, for None, bool, int, str, finite floats, dtypes,
    ``torch.Size`` and tuples, lists and str-keyed dicts of those; None for anything else."""
    kind = type(value)
    if value is None or kind in (bool, int, str) or (kind is float and value == value and abs(value) != float("inf")):
        return repr(value)
    if kind is torch.dtype:
        return str(value)  # "torch.bfloat16"
    if kind in (tuple, list, torch.Size):
        items: list[str] = []
        for item in value:
            text = literal(item)
            if text is None:
                return None
            items.append(text)
        body = ", ".join(items) + ("," if kind is not list and len(items) == 1 else "")
        text = f"[{body}]" if kind is list else f"({body})"
        return f"torch.Size({text})" if kind is torch.Size else text
    if kind is dict and all(type(k) is str for k in value):
        entries = {k: literal(v) for k, v in value.items()}
        if any(v is None for v in entries.values()):
            return None
        return "{" + ", ".join(f"{k!r}: {v}" for k, v in entries.items()) + "}"
    return None


def global_name(obj: Any, names: Names) -> str:
    """The name under which generated code reads ``obj``: its qualified name for a class or
    function (``subclasses_formats_int4_Int4WeightTensor``, a shared global), else a numbered name
    in ``names``, the generated class's own objects (they go with the class)."""
    qualname = getattr(obj, "__qualname__", None)
    module = getattr(obj, "__module__", None)
    if isinstance(qualname, str) and isinstance(module, str) and "<" not in qualname:
        name = f"{module}.{qualname}".replace(".", "_")
        existing = GLOBALS.setdefault(name, obj)
        if existing is obj or existing == obj:  # == : a bound method is made anew on each access
            return name
    for name, value in names.items():
        if value is obj:
            return name
    name = f"{type(obj).__name__}_{len(names)}"
    names[name] = obj
    return name


def constant(value: Any, names: Names) -> str:
    """``literal(value)``, else a global holding it."""
    text = literal(value)
    return text if text is not None else global_name(value, names)


def rebuild_source(
    spec: SubclassSpec, attribute: str, store: str, names: Names, unread: frozenset[str] = frozenset()
) -> str:
    """An expression rebuilding the subclass of ``spec`` from the plain tensors in the dict named
    ``store`` (keys ``f"{attribute}__{path}"``): DTensor by ``from_local``, a torchao-style class
    by its constructor (``unread``: optional inner tensors passed as None, see
    ``linear.unread_inner``), any other by its ``__tensor_unflatten__`` with the metadata as literals."""
    sources = {name: _inner_source(value, attribute, store, names) for name, value in spec.inner.items()}
    if _is_dtensor(spec.subclass):
        # Dynamo cannot trace DTensor's __tensor_unflatten__, but traces from_local: the local
        # tensor (plain or ours) and the mesh, placements, shape and stride as they are.
        return (
            f"{global_name(spec.subclass.from_local, names)}({sources['_local_tensor']}, {sources['device_mesh']}, "
            f"{constant(spec.meta[0], names)}, run_check=False, shape={literal(tuple(spec.outer_size))}, "
            f"stride={literal(tuple(spec.outer_stride))})"
        )
    constructor = torchao_style_constructor(spec.subclass, sources, spec.meta, lambda v: constant(v, names), unread)
    if constructor is not None:
        return constructor
    inner = ", ".join(f"{name!r}: {source}" for name, source in sources.items())
    return (
        f"{global_name(spec.subclass, names)}.__tensor_unflatten__({{{inner}}}, {constant(spec.meta, names)}, "
        f"{literal(tuple(spec.outer_size))}, {literal(tuple(spec.outer_stride))})"
    )


def _inner_source(value: SubclassSpec | str | Opaque, attribute: str, store: str, names: Names) -> str:
    if isinstance(value, SubclassSpec):
        return rebuild_source(value, attribute, store, names)
    if isinstance(value, Opaque):
        return global_name(value.value, names)
    return f"{store}[{attribute + SEPARATOR + value!r}]"


def _is_dtensor(cls: type[Any]) -> bool:
    module = sys.modules.get("torch.distributed.tensor")  # not imported: no tensor is a DTensor
    return module is not None and issubclass(cls, module.DTensor)


def cache_fields(spec: SubclassSpec, attribute: str) -> dict[str, str]:
    """The template fields of the eager cache check: the tensors the cached subclass was built
    from must all still be registered (a reassigned plain tensor means rebuild), and a subclass
    that requires grad is rebuilt differentiably whenever grad mode is on."""
    held = [f"plain[{attribute + SEPARATOR + path!r}] is held[{i}]" for i, path in enumerate(spec.paths())]
    return {
        "all_held": " and ".join(held),
        "and_no_grad": " and not torch.is_grad_enabled()" if spec.requires_grad else "",
    }


def define(cls: type, template: str, fields: dict[str, Any], names: Names) -> Callable:
    """The function ``template.format(**fields)`` defines, compiled under a file name that
    ``linecache`` knows (one per distinct source), its globals ``GLOBALS``, ``names`` its closure
    variables."""
    body = template.format(**fields)
    function = body[len("def ") : body.index("(")]
    source = f"def make({', '.join(names)}):\n" + textwrap.indent(body, "    ") + f"    return {function}\n"
    digest = hashlib.sha1(source.encode()).hexdigest()[:10]
    filename = f"<unwrap generated {cls.__name__}.{function} {digest}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)
    namespace: dict[str, Any] = {}
    exec(compile(source, filename, "exec"), GLOBALS, namespace)
    generated = namespace["make"](**names)
    generated.__qualname__ = f"{cls.__name__}.{function}"
    return generated
