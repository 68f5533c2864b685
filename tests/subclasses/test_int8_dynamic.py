import io
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import subclasses.formats.int8_dynamic as int8_dynamic
from subclasses import Int8DynamicActivationInt8WeightConfig, Int8DynamicActivationInt8WeightTensor, quantize_
from subclasses.formats.int8 import quantize_int8
from subclasses.formats.int8_dynamic import quantize_per_token
from tests.conftest import sqnr
from unwrap import unwrap

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _emulated(x: torch.Tensor, weight: Int8DynamicActivationInt8WeightTensor) -> torch.Tensor:
    """The documented math, step by step, in float64 (exact integer products)."""
    x2d = x.reshape(-1, x.shape[-1])
    amax = x2d.abs().amax(dim=1, keepdim=True).float()
    x_scale = torch.clamp(amax / 127, min=torch.finfo(torch.float32).eps)
    codes = torch.clamp(torch.round(x2d / x_scale), -127, 127)
    acc = codes.double() @ weight.qdata.double().t()
    out = (acc.float() * x_scale * weight.scale.float()).to(x.dtype)
    return out.view(*x.shape[:-1], out.shape[-1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_weight_math_is_int8_weight_only_and_activation_math(dtype):
    w = torch.randn(48, 96, dtype=dtype)
    w[3] = 0
    weight = Int8DynamicActivationInt8WeightTensor.from_float(w)
    qdata, scale = quantize_int8(w)
    assert torch.equal(weight.qdata, qdata) and torch.equal(weight.scale, scale)
    assert torch.equal(weight.dequantize(), qdata.to(dtype) * scale[:, None])
    x = torch.randn(5, 96, dtype=dtype)
    x[2] = 0  # an all-zero token gets the eps scale, not NaN
    codes, x_scale = quantize_per_token(x)
    assert codes.dtype == torch.int8 and x_scale.shape == (5, 1) and torch.isfinite(x_scale).all()
    assert codes.abs().max() == 127 and torch.equal(codes[2], torch.zeros_like(codes[2]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [24, 64, 100, 520])
@pytest.mark.parametrize("m", [0, 1, 4, 17])
def test_int_mm_matches_emulation_and_dequantize_reference(dtype, k, m):
    """Odd K/N/M (CUDA's _int_mm would refuse most of these; CPU takes them) and M = 0."""
    weight = Int8DynamicActivationInt8WeightTensor.from_float(torch.randn(40, k, dtype=dtype))
    x = torch.randn(m, k, dtype=dtype)
    out = F.linear(x, weight)
    assert out.shape == (m, 40) and out.dtype == dtype
    torch.testing.assert_close(out, _emulated(x, weight), rtol=0, atol=0)
    if m:
        assert sqnr(F.linear(x, weight.dequantize()), out) > 30


def test_fallback_without_int_mm_is_the_same_product():
    weight = Int8DynamicActivationInt8WeightTensor.from_float(torch.randn(32, 72, dtype=torch.bfloat16))
    x = torch.randn(6, 72, dtype=torch.bfloat16)
    with (
        mock.patch.object(int8_dynamic, "int_mm_supported", return_value=False),
        mock.patch.object(torch, "_int_mm", side_effect=AssertionError("_int_mm called")),
    ):
        out = F.linear(x, weight)
    assert torch.equal(out, F.linear(x, weight))


def test_int_mm_support_rule():
    a, b = torch.zeros(3, 7, dtype=torch.int8), torch.zeros(7, 5, dtype=torch.int8)
    assert int8_dynamic.int_mm_supported(a, b)  # CPU: any shape
    meta = a.to("meta")
    assert not int8_dynamic.int_mm_supported(meta, b.to("meta"))


def test_sqnr_of_512_1024_256_model():
    ws = [torch.randn(1024, 512, dtype=torch.bfloat16), torch.randn(256, 1024, dtype=torch.bfloat16)]
    qs = [Int8DynamicActivationInt8WeightTensor.from_float(w) for w in ws]
    x = torch.randn(64, 512, dtype=torch.bfloat16)
    out = F.linear(F.linear(x, qs[0]), qs[1])
    assert sqnr(F.linear(F.linear(x, qs[0].dequantize()), qs[1].dequantize()), out) >= 30
    assert sqnr(F.linear(F.linear(x, ws[0]), ws[1]), out) >= 28


@pytest.mark.parametrize("dtype", DTYPES)
def test_3d_input_and_bias(dtype):
    weight = Int8DynamicActivationInt8WeightTensor.from_float(torch.randn(40, 72, dtype=dtype))
    bias = torch.randn(40, dtype=dtype)
    x = torch.randn(2, 5, 144, dtype=dtype)[..., ::2]
    out = F.linear(x, weight, bias)
    assert out.shape == (2, 5, 40)
    assert sqnr(F.linear(x, weight.dequantize(), bias), out) > 30


def test_moves_gradient_and_dtype_error():
    weight = Int8DynamicActivationInt8WeightTensor.from_float(torch.randn(16, 32, dtype=torch.bfloat16))
    half = weight.to(torch.float16)
    assert type(half) is Int8DynamicActivationInt8WeightTensor and half.scale.dtype == torch.float16
    assert weight.to("meta").qdata.device.type == "meta"
    with pytest.raises(TypeError, match="cannot be cast"):
        weight.to(torch.int32)
    with pytest.raises(TypeError, match="does not match"):
        F.linear(torch.randn(2, 32), weight)
    x = torch.randn(3, 32, dtype=torch.bfloat16, requires_grad=True)
    F.linear(x, weight).float().sum().backward()
    torch.testing.assert_close(x.grad, weight.dequantize().sum(0).expand_as(x))


def test_quantize_unwrap_compile_and_checkpoint():
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32)).to(torch.bfloat16)
    quantize_(model, Int8DynamicActivationInt8WeightConfig())
    assert type(model[0].weight) is Int8DynamicActivationInt8WeightTensor
    x = torch.randn(20, 64, dtype=torch.bfloat16)
    with torch.inference_mode():
        eager = model(x)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert torch.equal(state["0.weight"].qdata, model[0].weight.qdata)
    unwrap(model)
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    with torch.inference_mode():
        out = compiled(x)
    assert counter.frame_count == 1
    assert sqnr(eager, out) > 30


def test_safetensors_checkpoint_round_trip(tmp_path):
    from subclasses import load_checkpoint, save_checkpoint

    model = nn.Sequential(nn.Linear(64, 48)).to(torch.bfloat16)
    quantize_(model, Int8DynamicActivationInt8WeightConfig())
    save_checkpoint(model.state_dict(), tmp_path / "model.safetensors")
    state = load_checkpoint(tmp_path / "model.safetensors")
    loaded = state["0.weight"]
    assert type(loaded) is Int8DynamicActivationInt8WeightTensor
    assert torch.equal(loaded.qdata, model[0].weight.qdata) and torch.equal(loaded.scale, model[0].weight.scale)
