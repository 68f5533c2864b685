"""The int4 prefill path of CPUs without the integer GEMM: kernel below the crossover, dequantize +
GEMM above it. Pinned here with ``UNWRAP_PREFILL_DTYPE=float32`` so that it is tested on every CPU; the
integer GEMM (AVX2) has its own tests in test_int4_gemm.py."""

from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import subclasses.kernels.int4_prefill as prefill
from subclasses import Int4WeightOnlyConfig, Int4WeightTensor, quantize_
from subclasses.kernels.compute_dtype import ENV_OVERRIDE
from subclasses.kernels.int4_gemv import kernel_available
from subclasses.kernels.int4_prefill import PREFILL_CROSSOVER, PREFILL_MIN_ROWS, crossover_rows, dequantize_kn
from tests.conftest import sqnr
from unwrap import unwrap


@pytest.fixture(autouse=True)
def _dequantize_path(monkeypatch):
    monkeypatch.setenv(ENV_OVERRIDE, "float32")


def _spy_prefill_mm():
    return mock.patch.object(prefill, "prefill_mm", wraps=prefill.prefill_mm)


def test_table_is_ordered_and_lookup_follows_classes():
    bounds = [bound for bound, _ in PREFILL_CROSSOVER]
    assert bounds == sorted(bounds) and bounds[-1] == float("inf")
    assert PREFILL_MIN_ROWS == 1 and min(rows for _, rows in PREFILL_CROSSOVER) >= 1
    for bound, rows in PREFILL_CROSSOVER[:-1]:
        n = 64
        assert crossover_rows(n, int(bound) // n) == rows  # the bound belongs to its class
    assert crossover_rows(1 << 16, 1 << 16) == PREFILL_CROSSOVER[-1][1]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n, k, group_size", [(128, 256, 64), (4864 // 4, 896, 128)])
def test_eager_dequantize_kn_equals_dequantize(dtype, n, k, group_size):
    weight = Int4WeightTensor.from_float(torch.randn(n, k, dtype=dtype), group_size)
    scale, zero = prefill.split_scale_and_zero(weight.scale_and_zero)
    w_kn = dequantize_kn(weight.packed, scale, zero, group_size, dtype, n, k)
    assert w_kn.is_contiguous() and torch.equal(w_kn.t(), weight.dequantize())


@pytest.mark.parametrize("n, k", [(256, 512), (1024, 1024)])
def test_boundary_rows_take_different_paths_and_both_match_reference(n, k):
    """M = t runs the int4 kernel, M = t + 1 the dequantize path; both match the reference."""
    weight = Int4WeightTensor.from_float(torch.randn(n, k, dtype=torch.bfloat16), 128)
    t = crossover_rows(n, k)
    for m, expect_prefill in [(t, False), (t + 1, True), (4 * t + 3, True)]:
        x = torch.randn(m, k, dtype=torch.bfloat16)
        with _spy_prefill_mm() as spy, torch.inference_mode():
            out = F.linear(x, weight)
        assert spy.called == expect_prefill, f"M={m}, crossover {t}"
        assert sqnr(F.linear(x, weight.dequantize()), out) > 35


def test_decode_rows_never_reach_the_prefill_module():
    weight = Int4WeightTensor.from_float(torch.randn(64, 256, dtype=torch.bfloat16), 128)
    with mock.patch.object(prefill, "crossover_rows", side_effect=AssertionError("looked up")):
        for m in range(1, PREFILL_MIN_ROWS + 1):
            F.linear(torch.randn(m, 256, dtype=torch.bfloat16), weight)


def test_3d_input_bias_and_non_contiguous_prefill():
    weight = Int4WeightTensor.from_float(torch.randn(192, 256, dtype=torch.bfloat16), 64)
    bias = torch.randn(192, dtype=torch.bfloat16)
    rows = crossover_rows(192, 256) + 1
    x = torch.randn(2, rows, 512, dtype=torch.bfloat16)[..., ::2]
    with _spy_prefill_mm() as spy:
        out = F.linear(x, weight, bias)
    assert spy.called and out.shape == (2, rows, 192)
    assert sqnr(F.linear(x, weight.dequantize(), bias), out) > 35


def test_partial_block_uses_generic_dequantize():
    """N = 48 is not a multiple of the AVX512 block (64): the generic unpack, same numerics."""
    weight = Int4WeightTensor.from_float(torch.randn(48, 256, dtype=torch.bfloat16), 128)
    x = torch.randn(crossover_rows(48, 256) + 1, 256, dtype=torch.bfloat16)
    with (
        mock.patch.object(prefill, "dequantize_kn", side_effect=AssertionError("fast path")),
        mock.patch.object(prefill, "eager_dequantize_kn", side_effect=AssertionError("fast path")),
    ):
        out = F.linear(x, weight)
    assert sqnr(F.linear(x, weight.dequantize()), out) > 35


def test_gradient_still_flows_on_the_prefill_path():
    weight = Int4WeightTensor.from_float(torch.randn(64, 128, dtype=torch.float32), 64)
    x = torch.randn(crossover_rows(64, 128) + 1, 128, requires_grad=True)
    F.linear(x, weight).sum().backward()
    torch.testing.assert_close(x.grad, weight.dequantize().sum(0).expand_as(x))


def test_compiled_dynamic_rows_two_graphs_and_numerics():
    """Decode, then M on both sides of the crossovers: one graph for M = 1, one for every M >= 2."""
    model = nn.Sequential(nn.Linear(256, 128, bias=False), nn.Linear(128, 64, bias=False)).to(torch.bfloat16)
    quantize_(model, Int4WeightOnlyConfig(group_size=64))
    unwrap(model)
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    t = max(crossover_rows(128, 256), crossover_rows(64, 128))
    with torch.inference_mode():
        for m in (1, t + 2, 2, t, t + 40, 3 * t + 7, 1):
            x = torch.randn(m, 256, dtype=torch.bfloat16)
            reference = F.linear(F.linear(x, model[0].weight.dequantize()), model[1].weight.dequantize())
            assert sqnr(reference, compiled(x)) > 30, m
    assert counter.frame_count == 2


def test_prefill_benchmark_bodies_run_once():
    """Smoke: every case of perf/bench_prefill.py, each body once (small layer to stay fast)."""
    from perf import bench_prefill

    calls = []

    def once(fn, *args):
        calls.append(fn(*args).shape)

    for fmt in bench_prefill.FORMATS:
        for mode in bench_prefill.MODES:
            for rows in bench_prefill.ROWS:
                bench_prefill.run_prefill(once, fmt, mode, rows, size=256)
    cases = len(bench_prefill.FORMATS) * len(bench_prefill.MODES)
    assert calls == [(rows, 256) for _ in range(cases) for rows in bench_prefill.ROWS]
    assert bench_prefill.prefill_ms(lambda: None, repeats=1) >= 0


def test_compiled_3d_decode_calls_the_kernel_directly():
    """Compiled [1, 1, K] decode (the transformers layout, static M = 1): no torch.cond, no custom op."""
    model = nn.Linear(256, 128, bias=False).to(torch.bfloat16)
    quantize_(model, Int4WeightOnlyConfig(group_size=64))
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm

    compiled = torch.compile(unwrap(model), backend=backend, fullgraph=True)
    x = torch.randn(1, 1, 256, dtype=torch.bfloat16)
    with torch.inference_mode():
        torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=0)
    decode_kernel = (
        "unwrap_cpu.int4_gemv" if kernel_available() else "_weight_int4pack_mm_for_cpu"
    )  # subclasses.kernels.int4_gemv
    assert len(graphs) == 1 and decode_kernel in graphs[0]
    assert "cond" not in graphs[0] and "kernel_in_cond" not in graphs[0]
