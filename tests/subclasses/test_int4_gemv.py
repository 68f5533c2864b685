"""The int4 M = 1 kernel (unwrap_cpu::int4_gemv) and its aten fallback, against the
dequantize-then-F.linear reference; and that F.linear on an int4 weight uses it at M = 1."""

from __future__ import annotations

import os
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import subclasses.kernels.int4_gemv as gemv
from subclasses import Int4WeightOnlyConfig, Int4WeightTensor, quantize_
from subclasses.kernels import int4_packing
from subclasses.kernels.compute_dtype import prefill_int8
from tests.conftest import sqnr
from tests.subclasses.test_int4_gemm import INT8_GEMM_MIN_SQNR
from unwrap import unwrap

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# SQNR against the reference computed in fp64: the output's own rounding bounds it (bf16 ~52 dB,
# fp16 ~70 dB); in fp32 the kernel's 15-bit activation rounding shows: an error uniform in half a
# step of max|x| / 32639 per 32-block, max|x| ~2.5 rms for Gaussian x, gives 20 log10(32639 *
# sqrt(12) / 2.5) ~ 93 dB (measured 85-93 dB, AVX512 and AVX2 kernels alike; aten's ~125 dB).
MIN_SQNR = {torch.bfloat16: 45.0, torch.float16: 62.0, torch.float32: 75.0}
# (N, K): whole 64-row blocks, a partial block alone (16, 48), blocks and a partial one (1072),
# one group, many groups.
SHAPES = [(64, 256), (16, 256), (48, 512), (192, 768), (1072, 512)]


def require_kernel() -> None:
    """Skip where the kernel cannot exist (CPU capability DEFAULT, e.g. ATEN_CPU_CAPABILITY=default)
    or is not built locally; in CI (CI=true) under AVX2 or AVX512 a missing kernel is a broken
    setup: fail."""
    if gemv.kernel_available():
        return
    message = (
        "unwrap_cpu::int4_gemv is not available (CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}, no compiler, or UNWRAP_INT4_GEMV=0)"
    )
    if os.environ.get("CI", "").lower() == "true" and torch.backends.cpu.get_cpu_capability() in ("AVX512", "AVX2"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def reference(x: torch.Tensor, weight: Int4WeightTensor) -> torch.Tensor:
    return F.linear(x.double(), weight.dequantize().double())


def weight_of(n: int, k: int, group_size: int, dtype: torch.dtype) -> Int4WeightTensor:
    return Int4WeightTensor.from_float(torch.randn(n, k, dtype=dtype), group_size)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size", [32, 64, 128, 256])
@pytest.mark.parametrize("n, k", SHAPES)
def test_kernel_matches_reference_and_aten(n, k, group_size, dtype):
    require_kernel()
    if k % group_size:
        pytest.skip(f"K={k} is not a multiple of group_size={group_size}")
    weight = weight_of(n, k, group_size, dtype)
    x = torch.randn(1, k, dtype=dtype)
    out = torch.ops.unwrap_cpu.int4_gemv(x, weight.packed, group_size, weight.scale_and_zero)
    aten = torch._weight_int4pack_mm_for_cpu(x, weight.packed, group_size, weight.scale_and_zero)
    assert out.shape == (1, n) and out.dtype == dtype
    assert sqnr(reference(x, weight), out) > MIN_SQNR[dtype]
    assert sqnr(aten, out) > MIN_SQNR[dtype]


def test_kernel_handles_zero_and_extreme_activations():
    """A group of zeros (scale 0), and values over a wide range in one 32-block."""
    require_kernel()
    weight = weight_of(128, 256, 64, torch.float32)
    x = torch.randn(1, 256)
    x[0, :32] = 0
    x[0, 64] = 1e4
    out = torch.ops.unwrap_cpu.int4_gemv(x, weight.packed, 64, weight.scale_and_zero)
    assert sqnr(reference(x, weight), out) > MIN_SQNR[torch.float32]


def test_kernel_rejects_bad_input_with_the_rule():
    require_kernel()
    weight = weight_of(64, 256, 64, torch.bfloat16)
    args = (weight.packed, 64, weight.scale_and_zero)
    with pytest.raises(RuntimeError, match=r"x must be a contiguous \[1, K\]"):
        torch.ops.unwrap_cpu.int4_gemv(torch.randn(2, 256, dtype=torch.bfloat16), *args)
    with pytest.raises(RuntimeError, match="in x's dtype"):
        torch.ops.unwrap_cpu.int4_gemv(torch.randn(1, 256), *args)
    with pytest.raises(RuntimeError, match="group_size=48 must divide K=256"):
        torch.ops.unwrap_cpu.int4_gemv(
            torch.randn(1, 256, dtype=torch.bfloat16), weight.packed, 48, weight.scale_and_zero
        )


def test_fake_impl_and_schema():
    require_kernel()
    weight = weight_of(64, 256, 64, torch.bfloat16)
    x = torch.randn(1, 256, dtype=torch.bfloat16)
    torch.library.opcheck(
        torch.ops.unwrap_cpu.int4_gemv.default,
        (x, weight.packed, 64, weight.scale_and_zero),
        test_utils=("test_schema", "test_faketensor"),
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size", [32, 256])
def test_fallback_matches_reference_and_kernel(group_size, dtype):
    """Without the C++ op (no compiler, UNWRAP_INT4_GEMV=0) F.linear at M = 1 runs aten's
    kernel: the same result up to the kernel's activation rounding."""
    weight = weight_of(1072, 512, group_size, dtype)
    x = torch.randn(1, 512, dtype=dtype)
    with mock.patch.object(gemv, "traced_kernel_available", return_value=False):
        fallback = F.linear(x, weight)
    assert torch.equal(fallback, torch._weight_int4pack_mm_for_cpu(x, weight.packed, group_size, weight.scale_and_zero))
    assert sqnr(reference(x, weight), fallback) > MIN_SQNR[dtype]
    if gemv.kernel_available():
        assert sqnr(fallback, F.linear(x, weight)) > MIN_SQNR[dtype]


def test_kernel_reads_the_running_capability_packing():
    """The library picks the kernel for the packing aten makes under torch's capability (the self
    check at load, ``_agrees_with_aten``, compared it with aten's on that packing)."""
    require_kernel()
    assert gemv.kernel_isa() == {"AVX512": "avx512", "AVX2": "avx2"}[torch.backends.cpu.get_cpu_capability()]


def test_no_kernel_under_capability_default(monkeypatch):
    """DEFAULT packs rows adjacently in blocks no kernel reads: aten's kernel runs."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    gemv.kernel_available.cache_clear()
    try:
        assert not gemv.kernel_available()
    finally:
        gemv.kernel_available.cache_clear()


def test_switched_off_by_environment(monkeypatch):
    monkeypatch.setenv(gemv.ENV_SWITCH, "0")
    gemv.kernel_available.cache_clear()
    try:
        assert not gemv.kernel_available()
    finally:
        gemv.kernel_available.cache_clear()


def _model(bias: bool) -> nn.Module:
    model = (
        nn.Sequential(nn.Linear(256, 192, bias=bias), nn.ReLU(), nn.Linear(192, 64, bias=False))
        .to(torch.bfloat16)
        .eval()
    )
    return quantize_(model, Int4WeightOnlyConfig(group_size=64))


def _expected(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model at M = 1 computed with the kernel called directly."""
    first, second = model[0], model[2]
    h = torch.ops.unwrap_cpu.int4_gemv(x.reshape(1, -1), first.weight.packed, 64, first.weight.scale_and_zero)
    h = torch.relu(h if first.bias is None else h + first.bias)
    return torch.ops.unwrap_cpu.int4_gemv(h, second.weight.packed, 64, second.weight.scale_and_zero).view(
        *x.shape[:-1], 64
    )


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("unwrapped", [False, True], ids=["wrapped", "unwrapped"])
@pytest.mark.parametrize(
    "shape, bias", [((1, 256), False), ((1, 1, 256), False), ((1, 256), True)], ids=["2d", "3d", "bias"]
)
def test_linear_at_one_row_uses_the_kernel(shape, bias, unwrapped, compiled):
    require_kernel()
    model = _model(bias)
    x = torch.randn(shape, dtype=torch.bfloat16)
    expected = _expected(model, x)
    assert not torch.equal(expected, _aten_model(model, x))  # the check below can tell the paths apart
    if unwrapped:
        model = unwrap(model)
    if compiled:
        model = torch.compile(model, fullgraph=True)
    with torch.inference_mode():
        assert torch.equal(model(x), expected)


def _aten_model(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with mock.patch.object(gemv, "traced_kernel_available", return_value=False), torch.inference_mode():
        return model(x)


def test_the_first_kernel_checks_may_run_inside_torch_compile():
    """In a fresh process the first int4 call may be a compiled one: the kernel's self-check and
    the packing probe, first run while Dynamo traces (under its fake tensors), check real tensors;
    one row and a prompt's rows compile and give the eager model's results."""
    weight = weight_of(192, 256, 64, torch.bfloat16)
    gemv.kernel_available.cache_clear()
    int4_packing.cpu_layout.cache_clear()
    compiled = torch.compile(lambda x: F.linear(x, weight), fullgraph=True)
    with torch.inference_mode():
        one_row = torch.randn(1, 256, dtype=torch.bfloat16)
        assert torch.equal(compiled(one_row), F.linear(one_row, weight))
        rows = torch.randn(64, 256, dtype=torch.bfloat16)
        floor = INT8_GEMM_MIN_SQNR if prefill_int8(torch.bfloat16) else MIN_SQNR[torch.bfloat16]
        assert sqnr(reference(rows, weight), compiled(rows)) > floor


def test_a_graph_compiled_without_the_kernel_is_not_reused_with_it(monkeypatch, tmp_path):
    """torch.compile's on-disk cache keys a wrapped model's graph by its inputs, and the kernel
    F.linear picks while traced is not one: the weight's cache key carries that choice
    (``traced_choices``), so a graph compiled with ``UNWRAP_INT4_GEMV=0`` is not the one served
    without it; compiled again with the same choice, the graph comes from the cache."""
    require_kernel()
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # empty: no earlier test's graphs
    model = _model(bias=False)
    x = torch.randn(1, 256, dtype=torch.bfloat16)

    def compiled_output() -> torch.Tensor:
        torch._dynamo.reset()  # the next call compiles (or loads) anew
        with torch.inference_mode():
            return torch.compile(model, fullgraph=True)(x)

    aten = _aten_model(model, x)
    monkeypatch.setenv(gemv.ENV_SWITCH, "0")
    gemv.kernel_available.cache_clear()
    try:
        assert torch.equal(compiled_output(), aten)
    finally:
        monkeypatch.delenv(gemv.ENV_SWITCH)
        gemv.kernel_available.cache_clear()
    hits = torch._dynamo.utils.counters["aot_autograd"]
    hits.clear()
    assert torch.equal(compiled_output(), _expected(model, x))
    assert hits["autograd_cache_hit"] == 0 and hits["autograd_cache_miss"] == 1
    assert torch.equal(compiled_output(), _expected(model, x))
    assert hits["autograd_cache_hit"] == 1
