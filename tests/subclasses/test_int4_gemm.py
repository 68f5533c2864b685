"""The AVX2 integer prompt GEMM (unwrap_cpu::int4_gemm): exact for its 8-bit rounding of x, within that
rounding of the dequantize-then-F.linear reference, chosen by F.linear for every M > 1, compiled with one
graph for every M, and refusing what it cannot read."""

from __future__ import annotations

import os
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounter

import subclasses.kernels.int4_gemv as gemv
import subclasses.kernels.int4_prefill as prefill
from subclasses import Int4WeightTensor
from subclasses.kernels.compute_dtype import ENV_OVERRIDE, prefill_int8
from subclasses.kernels.int4_packing import dequantize_codes
from tests.conftest import sqnr

FP32 = torch.float32
# SQNR floor of the GEMM against the dequantize-then-F.linear reference for Gaussian x: rounding to a
# step of max|x| / 127 per 32 features is uniform noise of step^2 / 12, and max|x| of 32 Gaussian samples
# is ~2.0-2.7 rms: 20 log10(127 sqrt(12) / 2.7) ~ 44 dB, the same in y (independent errors over K); 41 dB
# leaves the tail of the block maxima. bf16 output rounding (~52 dB) is below it.
INT8_GEMM_MIN_SQNR = 41.0


@pytest.fixture(autouse=True)
def require_gemm() -> None:
    """Skip where the kernel cannot exist (a CPU capability other than AVX2: the AVX512 or DEFAULT
    packing) or is not built locally; in CI (CI=true) under AVX2 a missing kernel is a broken setup: fail."""
    if gemv.int8_gemm_available():
        return
    capability = torch.backends.cpu.get_cpu_capability()
    message = (
        f"unwrap_cpu::int4_gemm is not available (CPU capability {capability}, no compiler, or UNWRAP_INT4_GEMV=0)"
    )
    if os.environ.get("CI", "").lower() == "true" and capability == "AVX2":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def rounded(x: torch.Tensor) -> torch.Tensor:
    """x as the kernel rounds it, in float64: per 32 features, to integers times max|x| / 127, with the
    kernel's fp32 arithmetic (x * (127 / max) rounded to nearest even: a bf16 x can sit exactly on a tie,
    where float64 arithmetic would round the other way)."""
    blocks = x.float().view(x.shape[0], -1, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    inverse = torch.full_like(amax, 127) / amax  # a division: `127 / amax` is reciprocal-then-multiply in torch
    codes = torch.round(blocks * torch.where(amax > 0, inverse, 0))
    return (codes.double() * (amax / 127).double()).view(x.shape)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, FP32])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("m, n, k", [(1, 32, 128), (2, 64, 256), (3, 96, 384), (37, 32, 128)])
def test_exact_for_its_rounded_activation(m, n, k, group_size, dtype):
    """Against the dequantized weight times x rounded as the kernel rounds it (float64): each 32-block's
    sum of q * x is exact in integers, so the error is fp32's: the products of two scales (2 eps32), the
    K / 32 block terms and K / g group terms summed in fp32 (K / 32 eps32 of S, S = |x_r| @ |w|.T), and the
    output's rounding to its dtype (half an ulp of |y|; a rounded x of +-0.5 step ties may round the
    other way in fp32: none in these seeded inputs, checked by the bound)."""
    if k % group_size:
        pytest.skip(f"K={k} is not a multiple of group_size={group_size}")
    weight = Int4WeightTensor.from_float(torch.randn(n, k, dtype=dtype), group_size)
    x = torch.randn(m, k, dtype=dtype)
    out = gemv.int4_gemm(x, weight.packed, group_size, weight.scale_and_zero)
    assert out.shape == (m, n) and out.dtype == dtype
    w = dequantize_codes(weight.codes(), weight.scale_and_zero, group_size, torch.float64)
    x_r = rounded(x)
    exact = x_r @ w.T
    s = x_r.abs() @ w.abs().T
    eps = torch.finfo(FP32).eps
    bound = torch.finfo(dtype).eps * exact.abs() + (k // 32 + k // group_size + 4) * eps * s
    error = (out.double() - exact).abs()
    assert (error <= bound).all(), f"worst error / bound: {(error / bound).max().item():.3g}"


def test_within_its_8_bit_rounding_of_the_reference():
    """SQNR against the dequantize-then-F.linear reference, Gaussian x (INT8_GEMM_MIN_SQNR)."""
    weight = Int4WeightTensor.from_float(torch.randn(256, 1024, dtype=torch.bfloat16), 32)
    x = torch.randn(64, 1024, dtype=torch.bfloat16)
    out = gemv.int4_gemm(x, weight.packed, 32, weight.scale_and_zero)
    reference = F.linear(x.double(), weight.dequantize().double())
    assert INT8_GEMM_MIN_SQNR < sqnr(reference, out) < 50  # and not the fp32 path's ~55 dB: the 8-bit rounding is there


@pytest.mark.parametrize("m", [2, 7, 300])
def test_linear_takes_it_for_every_row_count_above_one(m):
    weight = Int4WeightTensor.from_float(torch.randn(64, 256, dtype=torch.bfloat16), 32)
    x = torch.randn(m, 256, dtype=torch.bfloat16)
    # int4_prefill calls the name it imported: the one place F.linear reaches the op from
    with mock.patch.object(prefill, "int4_gemm", wraps=prefill.int4_gemm) as spy, torch.inference_mode():
        out = F.linear(x, weight)
    assert spy.call_count == 1
    assert torch.equal(out, gemv.int4_gemm(x, weight.packed, 32, weight.scale_and_zero))


def test_override_float32_keeps_the_dequantize_path(monkeypatch):
    assert prefill_int8(torch.bfloat16) and not prefill_int8(FP32)  # fp32 models keep the fp32 GEMM
    monkeypatch.setenv(ENV_OVERRIDE, "float32")
    assert not prefill_int8(torch.bfloat16)
    weight = Int4WeightTensor.from_float(torch.randn(64, 256, dtype=torch.bfloat16), 32)
    x = torch.randn(300, 256, dtype=torch.bfloat16)
    out = F.linear(x, weight)
    reference = F.linear(x.double(), weight.dequantize().double())
    assert sqnr(reference, out) > 50  # the fp32 path: bf16 output rounding only


def test_compiled_dynamic_rows_one_graph_equal_to_eager():
    """dynamic=True: one graph for every M (the op takes any M: no guard, no run-time choice), each
    output equal to the eager op's (the same kernel)."""
    weight = Int4WeightTensor.from_float(torch.randn(96, 256, dtype=torch.bfloat16), 64)
    counter = CompileCounter()
    compiled = torch.compile(F.linear, backend=counter, dynamic=True)
    with torch.inference_mode():
        for m in (3, 64, 513):
            x = torch.randn(m, 256, dtype=torch.bfloat16)
            assert torch.equal(compiled(x, weight), F.linear(x, weight))
    assert counter.frame_count == 1


def test_bad_input_names_the_value():
    weight = Int4WeightTensor.from_float(torch.randn(48, 256, dtype=torch.bfloat16), 32)
    x = torch.randn(4, 256, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"N=48 must be a multiple of 32"):
        gemv.int4_gemm(x, weight.packed, 32, weight.scale_and_zero)
    weight = Int4WeightTensor.from_float(torch.randn(64, 256, dtype=torch.bfloat16), 32)
    with pytest.raises(RuntimeError, match=r"group_size=16 must be a multiple of 32 that divides K=256"):
        gemv.int4_gemm(x, weight.packed, 16, weight.scale_and_zero.repeat_interleave(2, 0))
    with pytest.raises(RuntimeError, match=r"scale_and_zero must be a contiguous \[K/g, N, 2\] in x's dtype"):
        gemv.int4_gemm(x, weight.packed, 32, weight.scale_and_zero.float())


def test_a_weight_it_cannot_read_takes_the_other_path():
    """N = 48 (a partial packed block): F.linear runs the dequantize path, correctly."""
    weight = Int4WeightTensor.from_float(torch.randn(48, 256, dtype=torch.bfloat16), 32)
    x = torch.randn(300, 256, dtype=torch.bfloat16)
    with mock.patch.object(prefill, "int4_gemm", side_effect=AssertionError("called")):
        out = F.linear(x, weight)
    assert sqnr(F.linear(x.double(), weight.dequantize().double()), out) > 50
