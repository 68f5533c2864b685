"""The lean linears declared for torchao's tensors (subclasses/io/torchao_linear.py): the same results as
torchao's own linear (int4: bit for bit; int8: torchao's compiled linear bit for bit), and torchao's
own linear wherever they do not apply."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from subclasses.io.torchao_linear import _int8_unread, int4_opaque_linear, int8_linear
from subclasses.kernels.int4_gemv import int4_gemv
from tests.conftest import sqnr
from tests.optional import import_or_fail_in_ci
from unwrap import declared_linear, unwrap

import_or_fail_in_ci("torchao", "torchao")
from torchao.prototype.quantization.int4 import Int4OpaqueTensor, PrototypeInt4WeightOnlyConfig  # noqa: E402
from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8Tensor, Int8WeightOnlyConfig, PerGroup  # noqa: E402
from torchao.quantization import quantize_ as torchao_quantize_  # noqa: E402


def torchao_weight(config, n: int = 64, k: int = 256, dtype=torch.bfloat16) -> torch.Tensor:
    layer = nn.Linear(k, n, bias=False).to(dtype)
    torchao_quantize_(layer, config)
    return layer.weight.detach()


def torchaos_linear(x, w, bias=None):
    """torchao's own linear: F.linear through its __torch_function__."""
    return F.linear(x, w, bias)


INPUTS = {  # name -> input of K=256 features
    "decode": lambda dtype: torch.randn(1, 256, dtype=dtype),
    "rows": lambda dtype: torch.randn(5, 256, dtype=dtype),
    "3-D": lambda dtype: torch.randn(2, 3, 256, dtype=dtype),
    "strided": lambda dtype: torch.randn(256, 4, dtype=dtype).t(),
}


def test_torchaos_classes_declare_the_lean_linears():
    assert declared_linear(Int4OpaqueTensor) is int4_opaque_linear
    assert declared_linear(Int8Tensor) is int8_linear


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", list(INPUTS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int4_is_bit_identical_to_torchaos_linear(dtype, shape, bias, aten_int4_kernels):
    w = torchao_weight(PrototypeInt4WeightOnlyConfig(group_size=128), dtype=dtype)
    x = INPUTS[shape](dtype)
    b = torch.randn(64, dtype=dtype) if bias else None
    with torch.inference_mode():
        assert torch.equal(int4_opaque_linear(x, w, b), torchaos_linear(x, w, b))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int4_one_row_runs_the_m1_kernel_of_ours_and_the_floor(dtype):
    """One row: int4_gemv (the C++ GEMV where built; fp32 keeps aten's kernel), as our int4 linear
    and the floor do; close to torchao's aten kernel, not bit-identical (the test above is, without it)."""
    w = torchao_weight(PrototypeInt4WeightOnlyConfig(group_size=128), dtype=dtype)
    x = INPUTS["decode"](dtype)
    with torch.inference_mode():
        out = int4_opaque_linear(x, w)
        assert torch.equal(out, int4_gemv(x, w.qdata, 128, w.scale_and_zero))
        assert torch.equal(int4_opaque_linear(x.view(1, 1, 256), w).view(1, 64), out)  # 3-D, one row
        assert sqnr(torchaos_linear(x, w), out) > 35


def test_int4_with_an_act_pre_scale_is_torchaos_linear():
    w = torchao_weight(PrototypeInt4WeightOnlyConfig(group_size=128))
    x = torch.randn(1, 256, dtype=torch.bfloat16)
    scaled = copy.deepcopy(w)
    scaled.act_pre_scale = torch.rand(256, dtype=torch.bfloat16) + 0.5  # as AWQ leaves it
    with torch.inference_mode():
        out = int4_opaque_linear(x, scaled)
        assert torch.equal(out, torchaos_linear(x, scaled))
        assert not torch.equal(out, int4_opaque_linear(x, w))  # the pre-scale is applied


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", list(INPUTS))
def test_int8_is_the_int8pack_kernel_close_to_torchaos_eager(shape, bias):
    w = torchao_weight(Int8WeightOnlyConfig())
    x = INPUTS[shape](torch.bfloat16)
    b = torch.randn(64, dtype=torch.bfloat16) if bias else None
    with torch.inference_mode():
        out = int8_linear(x, w, b)
        kernel = torch._weight_int8pack_mm(
            x.reshape(-1, 256).contiguous(), w.qdata, w.scale.to(torch.bfloat16).flatten()
        )
        expected = kernel.reshape(*x.shape[:-1], 64) + (b if bias else 0)
        assert torch.equal(out, expected)
        assert sqnr(torchaos_linear(x, w, b), out) > 40  # torchao's eager rounds twice (bf16 GEMM, then the scale)


def test_int8_equals_torchaos_compiled_linear_bit_for_bit():
    layer = nn.Linear(256, 64, bias=False).to(torch.bfloat16)
    torchao_quantize_(layer, Int8WeightOnlyConfig())
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    with torch.inference_mode():
        compiled = torch.compile(copy.deepcopy(layer))(x)  # Inductor rewrites torchao's math to the kernel
        eager = torchaos_linear(x, layer.weight)
        assert torch.equal(int8_linear(x, layer.weight), compiled)
        assert not torch.equal(compiled, eager)  # else this test would not tell the two apart


def test_int8_follows_in_place_changes_of_its_scale():
    w = torchao_weight(Int8WeightOnlyConfig())
    x = torch.randn(1, 256, dtype=torch.bfloat16)
    before = int8_linear(x, w)
    with torch.no_grad():
        w.scale.mul_(2)
    assert torch.equal(int8_linear(x, w), torch._weight_int8pack_mm(x, w.qdata, w.scale.to(torch.bfloat16).flatten()))
    assert not torch.equal(int8_linear(x, w), before)


def test_int8_built_in_inference_mode_follows_in_place_changes():
    # inference tensors have no version counter: nothing cached, the scale is converted every call
    with torch.inference_mode():
        w = torchao_weight(Int8WeightOnlyConfig())
        x = torch.randn(1, 256, dtype=torch.bfloat16)
        before = int8_linear(x, w)
        w.scale.mul_(2)
        assert torch.equal(int8_linear(x, w), 2 * before)  # a power of two: exact through both roundings


def test_an_unwrapped_int8_model_follows_load_state_dict():
    torch.manual_seed(0)
    models = []
    for _ in range(2):
        model = nn.Sequential(nn.Linear(256, 64, bias=False)).to(torch.bfloat16)
        torchao_quantize_(model, Int8WeightOnlyConfig())
        models.append(model)
    unwrapped = unwrap(copy.deepcopy(models[0]))
    x = torch.randn(1, 256, dtype=torch.bfloat16)
    with torch.inference_mode():
        assert torch.equal(unwrapped(x), int8_linear(x, models[0][0].weight))
    unwrapped.load_state_dict(models[1].state_dict())
    with torch.inference_mode():
        assert torch.equal(unwrapped(x), int8_linear(x, models[1][0].weight))


def _int8_fallbacks():
    k24 = (Int8WeightOnlyConfig(), 24, torch.bfloat16, False)  # the bf16 kernel is unsafe for K % 16
    fp32_input = (Int8WeightOnlyConfig(), 256, torch.float32, False)  # activation dtype != the weight's
    grad = (Int8WeightOnlyConfig(), 256, torch.bfloat16, True)  # the kernel has no derivative
    grouped = (Int8WeightOnlyConfig(granularity=PerGroup(64)), 256, torch.bfloat16, False)
    dynamic = (Int8DynamicActivationInt8WeightConfig(), 256, torch.bfloat16, False)
    return {"K=24": k24, "fp32 input": fp32_input, "input grad": grad, "group-wise": grouped, "w8a8": dynamic}


@pytest.mark.parametrize("case", list(_int8_fallbacks()))
def test_int8_falls_back_to_torchaos_linear(case):
    config, k, x_dtype, grad = _int8_fallbacks()[case]
    w = torchao_weight(config, k=k)
    x = torch.randn(2, k, dtype=x_dtype, requires_grad=grad)
    out = int8_linear(x, w)
    assert torch.equal(out, torchaos_linear(x, w))
    if grad:
        out.float().sum().backward()
        assert x.grad is not None and x.grad.shape == x.shape
    per_row = case in ("K=24", "fp32 input", "input grad")
    assert _int8_unread(w) == (("zero_point",) if per_row else ())
