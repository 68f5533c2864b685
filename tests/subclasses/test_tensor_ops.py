"""The tensor contract: ops a model needs, clear errors for the rest, dtype checks, autograd."""

import pytest
import torch
import torch.nn.functional as F

from subclasses import Int4WeightTensor, Int8WeightTensor

FORMATS = {
    "int4": lambda w: Int4WeightTensor.from_float(w, 64),
    "int8": Int8WeightTensor.from_float,
}


@pytest.fixture(params=sorted(FORMATS))
def weight(request):
    return FORMATS[request.param](torch.randn(64, 128, dtype=torch.bfloat16))


def test_detach_alias_clone_keep_values(weight):
    for out in (weight.detach(), torch.ops.aten.alias(weight), weight.clone()):
        assert type(out) is type(weight)
        assert torch.equal(out.dequantize(), weight.dequantize())
    clone = weight.clone()
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(clone.inner_tensors(), weight.inner_tensors()))


def test_to_dtype_keeps_codes(weight):
    out = weight.to(torch.float32)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.dequantize(), weight.dequantize().float(), rtol=1e-2, atol=1e-2)


def test_copy_into_same_format(weight):
    other = type(weight).from_float(
        torch.randn(64, 128, dtype=torch.bfloat16),
        *((weight.group_size,) if isinstance(weight, Int4WeightTensor) else ()),
    )
    with torch.no_grad():
        weight.copy_(other)
    assert torch.equal(weight.dequantize(), other.dequantize())
    with pytest.raises(TypeError, match="cannot copy"):
        weight.copy_(torch.randn(64, 128, dtype=torch.bfloat16))


def test_unimplemented_op_names_op_and_class(weight):
    with pytest.raises(NotImplementedError, match=rf"{type(weight).__name__}.*aten\.add"):
        weight + 1


def test_activation_dtype_mismatch_is_type_error(weight):
    with pytest.raises(TypeError, match="float32.*bfloat16"):
        F.linear(torch.randn(2, 128), weight)


def test_gradient_flows_to_activation_not_weight(weight):
    x = torch.randn(3, 128, dtype=torch.bfloat16, requires_grad=True)
    F.linear(x, weight).sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    F.linear(x_ref, weight.dequantize()).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)


def test_repr_names_format(weight):
    assert type(weight).__name__ in repr(weight) and "(64, 128)" in repr(weight)
