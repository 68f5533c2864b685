"""The int4 prefill's compute dtype: fp32 where the CPU has no native bf16, both choices accurate."""

from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import subclasses.kernels.compute_dtype as compute_dtype
from subclasses import Int4WeightOnlyConfig, Int4WeightTensor, quantize_
from subclasses.kernels.compute_dtype import ENV_OVERRIDE, describe_prefill, prefill_compute_dtype, prefill_int8
from subclasses.kernels.int4_packing import dequantize_codes
from subclasses.kernels.int4_prefill import crossover_rows
from unwrap import unwrap

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


@pytest.mark.parametrize(
    "native, override, expected",
    [
        (frozenset(), "auto", {BF16: FP32, FP16: FP32, FP32: FP32}),
        (frozenset({BF16}), "auto", {BF16: BF16, FP16: FP32, FP32: FP32}),
        (frozenset({BF16, FP16}), "float32", {BF16: FP32, FP16: FP32, FP32: FP32}),
        (frozenset(), "model", {BF16: BF16, FP16: FP16, FP32: FP32}),
    ],
)
def test_choice_follows_the_cpu_and_the_override(monkeypatch, native, override, expected):
    monkeypatch.setenv(ENV_OVERRIDE, override)
    with mock.patch.object(compute_dtype, "native_half_precision", return_value=native):
        assert {dtype: prefill_compute_dtype(dtype) for dtype in expected} == expected


def test_bad_override_names_the_value_and_the_choices(monkeypatch):
    monkeypatch.setenv(ENV_OVERRIDE, "fp8")
    with pytest.raises(ValueError, match=r"UNWRAP_PREFILL_DTYPE='fp8': expected one of auto, float32, model"):
        prefill_compute_dtype(BF16)


def test_capability_below_avx512_has_no_native_half_precision():
    native = compute_dtype.native_half_precision()
    if torch.backends.cpu.get_cpu_capability() not in ("AVX512", "AMX"):
        assert native == frozenset()
    assert native <= {BF16, FP16}


@pytest.mark.parametrize("override", ["float32", "model"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_prefill_in_either_dtype_is_within_its_rounding_of_the_exact_product(monkeypatch, override, compiled):
    monkeypatch.setenv(ENV_OVERRIDE, override)
    n, k = 256, 512
    weight = Int4WeightTensor.from_float(torch.randn(n, k, dtype=BF16), 32)
    x = torch.randn(2 * crossover_rows(n, k) + 5, k, dtype=BF16)  # well above the crossover: the GEMM path
    with torch.inference_mode():
        if compiled:
            out = torch.compile(F.linear)(x, weight)
        else:
            with mock.patch.object(torch, "mm", wraps=torch.mm) as mm:
                out = F.linear(x, weight)
            assert mm.call_args.args[0].dtype == prefill_compute_dtype(BF16)  # the GEMM's dtype
    assert out.dtype == BF16
    # Against the exact product of the exact dequantized weight (float64): the weight is rounded once
    # to the compute dtype (bf16: 2^-9 relative), the K products summed in at least fp32 (K * eps32),
    # the result rounded once to bf16 (2^-9 relative): |error| <= 2^-9 (|y| + S) + K eps32 S + rounding
    # of the rounding (a second 2^-9 |y|), S = |x| @ |w|.T.
    w = dequantize_codes(weight.codes(), weight.scale_and_zero, weight.group_size, torch.float64)
    exact = x.double() @ w.T
    s = x.abs().double() @ w.abs().T
    bound = 2**-8 * exact.abs() + (2**-9 + k * torch.finfo(FP32).eps) * s
    error = (out.double() - exact).abs()
    assert (error <= bound).all(), f"worst error / bound: {(error / bound).max().item():.3g}"


def test_summary_states_the_prefill_dtype():
    model = nn.Sequential(nn.Linear(256, 128)).to(BF16)
    quantize_(model, Int4WeightOnlyConfig())
    assert f"int4 {describe_prefill(BF16)}" in str(model.quantize_summary)
    assert ("int8 x int4" in describe_prefill(BF16)) == prefill_int8(BF16)
    unwrap(model)  # the summary stays; unwrapping changes nothing of the choice
    assert model.quantize_summary.prefill
