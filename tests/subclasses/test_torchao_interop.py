"""Conversion between torchao 0.18's weight-only tensors and ours (subclasses/io/torchao.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from subclasses import (
    Int4WeightOnlyConfig,
    Int4WeightTensor,
    Int8DynamicActivationInt8WeightConfig,
    Int8WeightTensor,
    TorchaoConversionError,
    from_torchao,
    quantize_,
    to_torchao,
)
from subclasses.io.torchao import from_torchao_tensor, to_torchao_tensor
from subclasses.kernels.int4_cuda import pack_tinygemm_reference
from tests.conftest import sqnr
from tests.optional import import_or_fail_in_ci

import_or_fail_in_ci("torchao", "torchao")
from torchao.prototype.quantization.int4 import Int4OpaqueTensor, PrototypeInt4WeightOnlyConfig  # noqa: E402
from torchao.quantization import (  # noqa: E402
    Int4TilePackedTo4dTensor,
    Int8Tensor,
    PerGroup,
    PerTensor,
)
from torchao.quantization import Int8DynamicActivationInt8WeightConfig as TorchaoInt8Dynamic  # noqa: E402
from torchao.quantization import Int8WeightOnlyConfig as TorchaoInt8WeightOnly  # noqa: E402
from torchao.quantization import quantize_ as torchao_quantize_  # noqa: E402


def model(dtype=torch.bfloat16, bias=True) -> nn.Sequential:
    return nn.Sequential(nn.Linear(256, 128, bias=bias), nn.ReLU(), nn.Linear(128, 64, bias=False)).to(dtype)


def torchao_quantized(config, dtype=torch.bfloat16) -> nn.Sequential:
    m = model(dtype)
    torchao_quantize_(m, config)
    return m


def run(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return m(x)


INPUTS = [(1, 256), (3, 256), (2, 5, 256)]


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_int4_opaque_converts_exactly_and_back(group_size, dtype, aten_int4_kernels):
    theirs = torchao_quantized(PrototypeInt4WeightOnlyConfig(group_size=group_size), dtype)
    ours = copy.deepcopy(theirs)
    summary = from_torchao(ours, strict=True)
    assert summary.converted == {
        "0.weight": "Int4OpaqueTensor -> Int4WeightTensor",
        "2.weight": "Int4OpaqueTensor -> Int4WeightTensor",
    }
    for i in (0, 2):
        t, o = theirs[i].weight, ours[i].weight
        assert type(o) is Int4WeightTensor and o.group_size == group_size and o.dtype == dtype
        assert torch.equal(o.packed, t.qdata) and torch.equal(o.scale_and_zero, t.scale_and_zero)
    back = copy.deepcopy(ours)
    to_torchao(back, strict=True)
    for shape in INPUTS:
        x = torch.randn(*shape, dtype=dtype)
        ref = run(theirs, x)
        # the same kernel on the same bytes: bit for bit (M <= the int4 prefill crossover here)
        assert torch.equal(run(ours, x), ref)
        assert torch.equal(run(back, x), ref)
    for i in (0, 2):
        assert type(back[i].weight) is Int4OpaqueTensor and back[i].weight.block_size == [1, group_size]
        assert torch.equal(back[i].weight.qdata, theirs[i].weight.qdata)


def test_ours_to_torchao_and_back_int4(aten_int4_kernels):
    ours = quantize_(model(), Int4WeightOnlyConfig(group_size=64))
    theirs = copy.deepcopy(ours)
    to_torchao(theirs, strict=True)
    again = copy.deepcopy(theirs)
    from_torchao(again, strict=True)
    x = torch.randn(2, 256, dtype=torch.bfloat16)
    assert torch.equal(run(theirs, x), run(ours, x)) and torch.equal(run(again, x), run(ours, x))
    assert torch.equal(again[0].weight.codes(), ours[0].weight.codes())


@pytest.mark.parametrize("granularity", [None, PerTensor()])
def test_int8_weight_only_converts(granularity):
    config = TorchaoInt8WeightOnly() if granularity is None else TorchaoInt8WeightOnly(granularity=granularity)
    theirs = torchao_quantized(config)
    ours = copy.deepcopy(theirs)
    from_torchao(ours, strict=True)
    back = copy.deepcopy(ours)
    to_torchao(back, strict=True)
    for i in (0, 2):
        t, o = theirs[i].weight, ours[i].weight
        assert type(o) is Int8WeightTensor and torch.equal(o.qdata, t.qdata)
        # torchao keeps an fp32 scale and multiplies by scale.to(activation dtype): that is ours
        assert torch.equal(o.scale, t.scale.reshape(-1).expand(o.shape[0]).to(torch.bfloat16))
        assert type(back[i].weight) is Int8Tensor and torch.equal(back[i].weight.qdata, t.qdata)
    for shape in INPUTS:
        x = torch.randn(*shape, dtype=torch.bfloat16)
        ref = run(theirs, x)
        assert torch.equal(run(back, x), ref)  # round trip: bit for bit on torchao's kernel
        reference = model_reference(ours, x)  # our kernel: against the dequantized weights
        assert sqnr(reference, run(ours, x)) > 40 and sqnr(ref, run(ours, x)) > 35


def model_reference(m: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """Every linear as dequantize-then-F.linear."""
    with torch.inference_mode():
        for layer in m:
            x = (
                nn.functional.linear(x, layer.weight.dequantize(), layer.bias)
                if isinstance(layer, nn.Linear)
                else layer(x)
            )
    return x


def test_ties_are_kept_and_the_summary_names_every_user():
    m = nn.Sequential(nn.Linear(64, 64, bias=False), nn.Linear(64, 64, bias=False)).to(torch.bfloat16)
    m[1].weight = m[0].weight
    torchao_quantize_(m, PrototypeInt4WeightOnlyConfig(group_size=32))
    m[1].weight = m[0].weight  # torchao quantizes each user on its own; tie them as a loaded model would be
    summary = from_torchao(m)
    assert m[0].weight is m[1].weight and type(m[0].weight) is Int4WeightTensor
    assert sorted(summary.converted) == ["0.weight", "1.weight"] and not summary.left
    to_torchao(m)
    assert m[0].weight is m[1].weight and type(m[0].weight) is Int4OpaqueTensor


def test_what_cannot_convert_is_left_with_the_reason():
    m = nn.ModuleDict(
        {
            "dyn": nn.Linear(64, 64, bias=False),
            "grouped": nn.Linear(128, 64, bias=False),
            "awq": nn.Linear(64, 64, bias=False),
            "ok": nn.Linear(64, 64, bias=False),
        }
    ).to(torch.bfloat16)
    torchao_quantize_(m["dyn"], TorchaoInt8Dynamic())
    torchao_quantize_(m["grouped"], TorchaoInt8WeightOnly(granularity=PerGroup(64)))
    torchao_quantize_(m["awq"], PrototypeInt4WeightOnlyConfig(group_size=32))
    w = m["awq"].weight  # as AWQ leaves it: an activation pre-scale our linear does not apply
    awq = Int4OpaqueTensor(
        w.qdata, w.scale_and_zero, w.block_size, w.shape, act_pre_scale=torch.ones(64, dtype=torch.bfloat16)
    )
    m["awq"].weight = nn.Parameter(awq, requires_grad=False)
    torchao_quantize_(m["ok"], TorchaoInt8WeightOnly())
    summary = from_torchao(m)
    assert list(summary.converted) == ["ok.weight"]
    assert "quantized at run time" in summary.left["dyn.weight"]
    assert "group-wise" in summary.left["grouped.weight"]
    assert "act_pre_scale" in summary.left["awq.weight"]
    assert type(m["dyn"].weight) is Int8Tensor  # left as torchao's
    with pytest.raises(TorchaoConversionError, match="dyn.weight"):
        from_torchao(m, strict=True)


def test_refusals_name_the_reason():
    w = torchao_quantized(TorchaoInt8WeightOnly())[0].weight
    asym = Int8Tensor(w.qdata, w.scale, w.block_size, w.dtype, zero_point=torch.ones_like(w.zero_point))
    with pytest.raises(TorchaoConversionError, match="zero_point is not 0"):
        from_torchao_tensor(asym)
    pre = Int8Tensor(w.qdata, w.scale, w.block_size, w.dtype, zero_point=w.zero_point, act_pre_scale=torch.ones(256))
    with pytest.raises(TorchaoConversionError, match="act_pre_scale"):
        from_torchao_tensor(pre)
    o = torchao_quantized(PrototypeInt4WeightOnlyConfig(group_size=32))[0].weight
    da8w4 = Int4OpaqueTensor(o.qdata, o.scale_and_zero, o.block_size, o.shape, act_mapping_type="asymmetric")
    with pytest.raises(TorchaoConversionError, match="DA8W4"):
        from_torchao_tensor(da8w4)
    with pytest.raises(TorchaoConversionError, match="TwoTensor has no equivalent"):
        from torch.testing._internal.two_tensor import TwoTensor

        from_torchao_tensor(TwoTensor(torch.ones(2), torch.ones(2)))
    dynamic = quantize_(model(), Int8DynamicActivationInt8WeightConfig())[0].weight
    with pytest.raises(TorchaoConversionError, match="Int8DynamicActivationInt8WeightTensor has no torchao"):
        to_torchao_tensor(dynamic)


def test_an_unwrapped_model_must_be_rewrapped_first():
    from unwrap import unwrap

    m = unwrap(torchao_quantized(TorchaoInt8WeightOnly()))
    with pytest.raises(ValueError, match="rewrap"):
        from_torchao(m)


def tile_packed_like_torchao(w: torch.Tensor, group_size: int) -> Int4TilePackedTo4dTensor:
    """Int4TilePackedTo4dTensor.from_hp on CPU: its own qparams and padding, with our CPU
    transcription of the CUDA packing op (from_hp itself asks for a CUDA device)."""
    from torchao.quantization.quant_primitives import (
        MappingType,
        _choose_qparams_affine_tinygemm,
        _quantize_affine_tinygemm,
    )
    from torchao.quantization.utils import pack_tinygemm_scales_and_zeros

    n, k = w.shape
    padded = nn.functional.pad(w, (0, -k % 1024, 0, -n % 8))
    block = (1, group_size)
    scale, zero = _choose_qparams_affine_tinygemm(
        padded, MappingType.ASYMMETRIC, block, torch.int32, 0, 15, scale_dtype=w.dtype, zero_point_dtype=w.dtype
    )
    q = _quantize_affine_tinygemm(padded, block, scale, zero, torch.int32, quant_min=0, quant_max=15)
    rows = padded.shape[0]
    sz = pack_tinygemm_scales_and_zeros(scale.reshape(rows, -1), zero.reshape(rows, -1), scale.dtype)
    return Int4TilePackedTo4dTensor(pack_tinygemm_reference(q), sz, [1, group_size], w.shape)


@pytest.mark.parametrize("n,k,group_size", [(48, 256, 128), (64, 1024, 32), (32, 1280, 64)])
def test_int4_tile_packed_converts_through_the_codes(n, k, group_size):
    w = torch.randn(n, k, dtype=torch.bfloat16)
    tiled = tile_packed_like_torchao(w, group_size)
    opaque = Int4OpaqueTensor.from_hp(w, [1, group_size])  # the same tinygemm math, CPU layout
    ours = from_torchao_tensor(tiled)
    assert type(ours) is Int4WeightTensor and ours.packing == "cpu" and ours.group_size == group_size
    assert torch.equal(ours.codes(), from_torchao_tensor(opaque).codes())
    assert torch.equal(ours.scale_and_zero, opaque.scale_and_zero)
    back = to_torchao_tensor(_as_cuda_layout(ours))
    assert type(back) is Int4TilePackedTo4dTensor and back.shape == tiled.shape and back.block_size == [1, group_size]
    assert torch.equal(back.qdata, tiled.qdata)  # torchao's padding included
    assert torch.equal(back.scale_and_zero, tiled.scale_and_zero)


def _as_cuda_layout(weight: Int4WeightTensor) -> Int4WeightTensor:
    """Our weight with the CUDA kernel's packing, built on CPU (no GPU here)."""
    packed = pack_tinygemm_reference(weight.codes())
    return Int4WeightTensor(
        packed, weight.scale_and_zero, weight.group_size, "cuda_tinygemm", tuple(weight.shape), weight.dtype
    )


def test_tile_packed_refusals():
    tiled = tile_packed_like_torchao(torch.randn(48, 256, dtype=torch.bfloat16), 128)
    short = Int4TilePackedTo4dTensor(tiled.qdata[:, :4], tiled.scale_and_zero, [1, 128], tiled.shape)
    with pytest.raises(TorchaoConversionError, match="inner_k_tiles=8"):
        from_torchao_tensor(short)
    fp16 = Int4WeightTensor(
        torch.zeros(6, 2, 32, 4, dtype=torch.int32),
        torch.zeros(2, 48, 2, dtype=torch.float16),
        128,
        "cuda_tinygemm",
        (48, 256),
        torch.float16,
    )
    with pytest.raises(TorchaoConversionError, match="bf16 only"):
        to_torchao_tensor(fp16)
