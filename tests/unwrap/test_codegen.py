"""The generated accessors and forwards: readable source, tracebacks, literals, no global growth."""

import inspect
import textwrap
import traceback

import pytest
import torch
from torch import nn
from torch.testing._internal.two_tensor import TwoTensor

from subclasses import Int4WeightOnlyConfig, quantize_
from unwrap import codegen, unwrap


def int4_model():
    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 16)).to(torch.bfloat16)
    return quantize_(model, Int4WeightOnlyConfig(group_size=32))


def test_generated_forward_has_source_and_reads_like_code():
    model = unwrap(int4_model())
    source = textwrap.dedent(inspect.getsource(type(model[0]).forward))  # defined inside its closure
    assert source.startswith("def forward(self, input):")
    # the rebuild is written out: class by qualified name, metadata as literals
    assert "subclasses_formats_int4_Int4WeightTensor.__tensor_unflatten__(" in source
    assert "(32, 'cpu', (32, 64), torch.bfloat16)" in source
    assert "subclasses_formats_int4_int4_linear(input, " in source
    getter = textwrap.dedent(inspect.getsource(type(model[0]).weight.fget))
    assert getter.startswith("def get(self):") and "return eager_get(self, 'weight')" in getter


def test_a_traceback_through_generated_code_shows_its_line():
    model = unwrap(int4_model())
    with pytest.raises(ValueError) as error, torch.no_grad():
        model(torch.randn(2, 48, dtype=torch.bfloat16))  # wrong in_features
    frames = traceback.extract_tb(error.value.__traceback__)
    generated = [f for f in frames if f.filename.startswith("<unwrap generated")]
    assert generated and generated[0].line.startswith("return subclasses_formats_int4_int4_linear(input, ")


@pytest.mark.parametrize(
    "value, text",
    [
        ((32, "cpu", (32, 64), torch.bfloat16), "(32, 'cpu', (32, 64), torch.bfloat16)"),
        ((1,), "(1,)"),
        ([1.5, None, True], "[1.5, None, True]"),
        (torch.Size([3, 4]), "torch.Size((3, 4))"),
        ({"group_size": 32, "dtype": torch.float16}, "{'group_size': 32, 'dtype': torch.float16}"),
    ],
)
def test_literal_writes_the_whitelisted_types(value, text):
    assert codegen.literal(value) == text
    assert eval(text, {"torch": torch}) == value


@pytest.mark.parametrize("value", [float("nan"), float("inf"), object(), torch.device("cpu"), {1: 2}, (1, object())])
def test_literal_refuses_everything_else(value):
    assert codegen.literal(value) is None


def test_per_weight_objects_live_in_their_class_s_own_globals():
    """Objects without an importable qualified name (a DTensor's mesh, a non-literal metadata
    value) are globals of one generated class's code only: the shared GLOBALS never change, and
    they go with the class."""

    class Marker:  # a local class: no importable qualified name
        pass

    marker, before = Marker(), dict(codegen.GLOBALS)
    names: codegen.Names = {}
    name = codegen.global_name(marker, names)
    assert names == {name: marker}

    class Holder:
        pass

    function = codegen.define(Holder, "def f(self):\n    return {name}\n", {"name": name}, names)
    assert function(None) is marker
    assert codegen.GLOBALS == before


def test_unwrapping_many_models_does_not_grow_the_globals():
    """The shared globals hold one entry per class or function generated code names, never one per weight."""

    def unwrap_both() -> None:
        model = nn.Sequential(nn.Linear(8, 8))
        model[0].weight = nn.Parameter(TwoTensor(torch.randn(8, 8), torch.randn(8, 8)), requires_grad=False)
        unwrap(model)
        unwrap(int4_model())

    unwrap_both()  # files TwoTensor's and the int4 classes by their qualified names, once
    before = dict(codegen.GLOBALS)
    for _ in range(3):
        unwrap_both()
    assert codegen.GLOBALS == before
