import pytest
import torch
import torch.nn.functional as F

from subclasses import Int8WeightTensor
from subclasses.formats.int8 import quantize_int8
from tests.conftest import sqnr

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.mark.parametrize("dtype", DTYPES)
def test_quantization_math_matches_formulas(dtype):
    w = torch.randn(48, 96, dtype=dtype)
    w[3] = 0  # an all-zero row must get the eps scale, not a division by zero
    qdata, scale = quantize_int8(w)
    amax = torch.maximum(w.min(1).values.abs() * (w.min(1).values < 0), w.max(1).values.clamp(min=0))
    expected_scale = torch.clamp(amax / 127.5, min=torch.finfo(torch.float32).eps)
    assert torch.equal(scale, expected_scale)
    assert torch.equal(qdata, torch.clamp(torch.round(w / expected_scale[:, None]), -128, 127).to(torch.int8))
    weight = Int8WeightTensor.from_float(w)
    assert torch.equal(weight.dequantize(), qdata.to(dtype) * expected_scale[:, None])
    assert torch.isfinite(weight.dequantize()).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [24, 64, 100, 520])
@pytest.mark.parametrize("m", [1, 4])
def test_kernel_matches_dequantize_reference(dtype, k, m):
    """K=24/100/520 with bf16 is where the raw kernel segfaults or returns NaN."""
    weight = Int8WeightTensor.from_float(torch.randn(32, k, dtype=dtype))
    x = torch.randn(m, k, dtype=dtype)
    out = F.linear(x, weight)
    assert torch.isfinite(out).all()
    assert sqnr(F.linear(x, weight.dequantize()), out) > 35


def test_sqnr_of_512_1024_256_model_int8():
    ws = [torch.randn(1024, 512, dtype=torch.bfloat16), torch.randn(256, 1024, dtype=torch.bfloat16)]
    qs = [Int8WeightTensor.from_float(w) for w in ws]
    x = torch.randn(4, 512, dtype=torch.bfloat16)
    out = F.linear(F.linear(x, qs[0]), qs[1])
    assert sqnr(F.linear(F.linear(x, qs[0].dequantize()), qs[1].dequantize()), out) >= 40
    assert sqnr(F.linear(F.linear(x, ws[0]), ws[1]), out) >= 35


@pytest.mark.parametrize("dtype", DTYPES)
def test_3d_input_and_bias(dtype):
    weight = Int8WeightTensor.from_float(torch.randn(40, 72, dtype=dtype))
    bias = torch.randn(40, dtype=dtype)
    x = torch.randn(2, 5, 72, dtype=dtype)
    out = F.linear(x, weight, bias)
    assert out.shape == (2, 5, 40)
    assert sqnr(F.linear(x, weight.dequantize(), bias), out) > 35


def test_device_and_dtype_moves():
    weight = Int8WeightTensor.from_float(torch.randn(16, 32, dtype=torch.bfloat16))
    half = weight.to(torch.float16)
    assert half.dtype == torch.float16 and half.scale.dtype == torch.float16
    assert torch.equal(half.qdata, weight.qdata)
    meta = weight.to("meta")
    assert meta.device.type == "meta" and meta.qdata.device.type == "meta"
    with pytest.raises(TypeError, match="cannot be cast"):
        weight.to(torch.int32)
