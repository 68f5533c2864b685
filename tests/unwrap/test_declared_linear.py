"""unwrap calls the linear a subclass declares (unwrap/linear.py), with no __torch_function__ round trip."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.testing._internal.two_tensor import TwoTensor

from unwrap import declared_linear, register_linear, rewrap, unwrap


def first_linear(x: torch.Tensor, w: TwoTensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    CALLS.append("declared")
    return F.linear(x, w.a, bias)


CALLS: list[str] = []


class OwnTwoTensor(TwoTensor):
    """TwoTensor rebuilds a TwoTensor whatever the subclass; this rebuilds its own class."""

    @classmethod
    def __tensor_unflatten__(cls, inner, meta, outer_size, outer_stride):
        return cls(inner["a"], inner["b"])


class DeclaringTensor(OwnTwoTensor):
    """A TwoTensor whose F.linear is F.linear on ``a``, declared through the protocol."""

    __unwrap_linear__ = staticmethod(first_linear)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        CALLS.append(getattr(func, "__name__", str(func)))
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))


class TableTensor(OwnTwoTensor):
    """torchao's convention: a per-class table of torch-function overrides."""


def _table_linear(func, types, args, kwargs):
    CALLS.append("table")
    x, w, bias = args
    return F.linear(x, w.a, bias)


TableTensor._TORCH_FN_TABLE = {TableTensor: {F.linear: _table_linear}}


def linear_with(cls: type) -> nn.Linear:
    layer = nn.Linear(8, 4)
    w = layer.weight.detach()
    layer.weight = nn.Parameter(cls(w, w * 2), requires_grad=False)
    return layer


def test_the_protocol_in_order():
    assert declared_linear(DeclaringTensor) is first_linear
    assert declared_linear(TwoTensor) is None
    adapted = declared_linear(TableTensor)
    assert adapted is declared_linear(TableTensor)  # one adapter per class, shared by every layer
    w = TableTensor(torch.ones(4, 8), torch.zeros(4, 8))
    CALLS.clear()
    assert torch.equal(adapted(torch.ones(2, 8), w, None), torch.full((2, 4), 8.0)) and CALLS == ["table"]


@pytest.mark.parametrize("cls,expected", [(DeclaringTensor, ["declared"]), (TableTensor, ["table"])])
def test_an_unwrapped_linear_calls_the_declared_function_directly(cls, expected):
    layer = linear_with(cls)
    x = torch.randn(3, 8)
    reference = F.linear(x, layer.weight.a, layer.bias)
    unwrap(layer)
    assert type(layer).forward is not nn.Linear.forward
    CALLS.clear()
    with torch.no_grad():
        out = layer(x)
    assert torch.equal(out, reference)
    assert CALLS == expected  # no __torch_function__ call on the weight (DeclaringTensor records them)
    compiled = torch.compile(layer, fullgraph=True)
    with torch.no_grad():
        assert torch.equal(compiled(x), reference)
    rewrap(layer)
    assert type(layer) is nn.Linear and type(layer.weight) is cls


def test_a_subclass_declaring_nothing_keeps_the_generic_path():
    layer = linear_with(TwoTensor)
    x = torch.randn(3, 8)
    with torch.no_grad():
        reference = layer(x)
        unwrap(layer)
        assert type(layer).forward is nn.Linear.forward
        assert torch.equal(layer(x), reference)


class RegisteredTensor(OwnTwoTensor):
    """Declares nothing itself: its linear is registered by class name (as subclasses does for torchao's)."""


class RegisteredSubTensor(RegisteredTensor):
    pass


def registered_linear(x: torch.Tensor, w: TwoTensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    CALLS.append("registered")
    return F.linear(x, w.a, bias)


register_linear(f"{RegisteredTensor.__module__}.{RegisteredTensor.__qualname__}", registered_linear)


def test_a_linear_registered_by_class_name():
    assert declared_linear(RegisteredTensor) is registered_linear
    assert declared_linear(RegisteredSubTensor) is None  # the exact class only
    layer = unwrap(linear_with(RegisteredTensor))
    x = torch.randn(3, 8)
    CALLS.clear()
    with torch.no_grad():
        assert torch.equal(layer(x), F.linear(x, layer.weight.a, layer.bias))
    assert CALLS == ["registered"]
    with pytest.raises(TypeError, match="must be callable"):
        register_linear("some.Class", None)
