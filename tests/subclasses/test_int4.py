import pytest
import torch
import torch.nn.functional as F

from subclasses import Int4WeightTensor, Packing
from subclasses.formats.int4 import quantize_int4
from subclasses.kernels.int4_packing import CPU_LAYOUTS, pack_canonical, pack_cpu, unpack_canonical, unpack_cpu
from tests.conftest import sqnr

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size", [32, 64, 128, 256])
def test_quantization_math_matches_formulas(dtype, group_size):
    w = torch.randn(32, 512, dtype=dtype)
    q, scale, zero = quantize_int4(w, group_size)
    groups = w.view(32, -1, group_size)
    mn, mx = groups.min(-1).values, groups.max(-1).values
    expected_scale = torch.clamp((mx - mn) / 15, min=1e-6)
    expected_zero = mn + 8 * expected_scale
    low = expected_zero - 8 * expected_scale
    expected_q = torch.clamp(torch.round((groups - low[..., None]) / expected_scale[..., None]), 0, 15)
    assert torch.equal(scale, expected_scale) and torch.equal(zero, expected_zero)
    assert torch.equal(q, expected_q.to(torch.uint8).view(32, 512))
    weight = Int4WeightTensor.from_float(w, group_size)
    assert torch.equal(weight.codes(), q)
    # dequantize computes in fp32 and rounds once (as inductor and the kernel do)
    f32 = torch.float32
    expected_w = ((expected_q.to(f32) - 8) * expected_scale[..., None].to(f32) + expected_zero[..., None].to(f32)).to(
        dtype
    )
    assert torch.equal(weight.dequantize(), expected_w.view(32, 512))
    assert weight.dequantize().dtype == dtype


def test_constant_group_gets_eps_scale_not_nan():
    w = torch.ones(16, 128, dtype=torch.bfloat16)
    weight = Int4WeightTensor.from_float(w, 128)
    assert torch.isfinite(weight.dequantize()).all()
    torch.testing.assert_close(weight.dequantize(), w)


@pytest.mark.parametrize("n", [16, 32, 48, 64, 80, 112, 144, 1024])
def test_cpu_and_canonical_packing_round_trip(n):
    q = torch.randint(0, 16, (n, 256), dtype=torch.int32)
    assert torch.equal(unpack_cpu(pack_cpu(q)), q.to(torch.uint8))
    assert torch.equal(unpack_canonical(pack_canonical(q)), q.to(torch.uint8))
    canonical = pack_canonical(q)
    assert torch.equal(canonical[:, 0], (q[:, 0] << 4 | q[:, 1]).to(torch.uint8))


def test_local_cpu_layout_is_a_known_one():
    assert torch.backends.cpu.get_cpu_capability() in CPU_LAYOUTS


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size", [32, 64, 128, 256])
def test_kernel_matches_dequantize_reference(dtype, group_size):
    w = torch.randn(256, 512, dtype=dtype)
    weight = Int4WeightTensor.from_float(w, group_size)
    x = torch.randn(4, 512, dtype=dtype)
    out = F.linear(x, weight)
    assert sqnr(F.linear(x, weight.dequantize()), out) > 35
    assert sqnr(F.linear(x, w), out) > 15


def test_sqnr_of_512_1024_256_model_int4_g128():
    dims = [512, 1024, 256]
    ws = [torch.randn(dims[i + 1], dims[i], dtype=torch.bfloat16) for i in range(2)]
    x = torch.randn(4, 512, dtype=torch.bfloat16)
    qs = [Int4WeightTensor.from_float(w, 128) for w in ws]
    reference = F.linear(F.linear(x, qs[0].dequantize()), qs[1].dequantize())
    out = F.linear(F.linear(x, qs[0]), qs[1])
    assert sqnr(reference, out) >= 20
    # and the quantization itself stays within the usual int4 g128 quality
    assert sqnr(F.linear(F.linear(x, ws[0]), ws[1]), out) >= 15


@pytest.mark.parametrize("dtype", DTYPES)
def test_3d_input_bias_and_non_contiguous(dtype):
    w = torch.randn(64, 256, dtype=dtype)
    weight = Int4WeightTensor.from_float(w, 64)
    bias = torch.randn(64, dtype=dtype)
    x = torch.randn(2, 3, 256, dtype=dtype)
    ref = F.linear(x, weight.dequantize(), bias)
    out = F.linear(x, weight, bias)
    assert out.shape == (2, 3, 64)
    assert sqnr(ref, out) > 35
    xt = torch.randn(256, 5, dtype=dtype).t()
    assert sqnr(F.linear(xt, weight.dequantize()), F.linear(xt, weight)) > 35


def test_meta_device_falls_back_to_dequantize():
    weight = Int4WeightTensor.from_float(torch.randn(32, 128), 32)
    meta = weight.to("meta")
    assert meta.packing == Packing.CANONICAL and meta.device.type == "meta"
    assert F.linear(torch.randn(2, 128, device="meta"), meta).shape == (2, 32)


def test_canonical_round_trip_through_another_device_keeps_values():
    weight = Int4WeightTensor.from_float(torch.randn(80, 256, dtype=torch.bfloat16), 128)
    canonical = Int4WeightTensor(
        pack_canonical(weight.codes()), weight.scale_and_zero, 128, Packing.CANONICAL, (80, 256), torch.bfloat16
    )
    assert torch.equal(canonical.dequantize(), weight.dequantize())
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    torch.testing.assert_close(F.linear(x, canonical), F.linear(x, weight.dequantize()))


@pytest.mark.parametrize(
    "shape, group_size, match",
    [((20, 128), 128, "multiple of 16"), ((32, 100), 32, "divisible by group_size"), ((32, 128), 48, "group_size")],
)
def test_bad_shapes_raise_value_error(shape, group_size, match):
    with pytest.raises(ValueError, match=match):
        Int4WeightTensor.from_float(torch.randn(shape), group_size)


def test_copy_from_canonical_repacks_for_the_local_kernel():
    src = Int4WeightTensor.from_float(torch.randn(80, 256, dtype=torch.bfloat16), 128)
    canonical = Int4WeightTensor(
        pack_canonical(src.codes()), src.scale_and_zero.clone(), 128, Packing.CANONICAL, (80, 256), torch.bfloat16
    )
    dst = Int4WeightTensor.from_float(torch.randn(80, 256, dtype=torch.bfloat16), 128)
    with torch.no_grad():
        dst.copy_(canonical)
    assert dst.packing == Packing.CPU
    assert torch.equal(dst.packed, src.packed) and torch.equal(dst.dequantize(), src.dequantize())
