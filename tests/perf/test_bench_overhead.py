"""perf/bench_overhead.py: every benchmark body runs once (so none can rot), and the deterministic
half of the floor targets: guard counts and the kernels in the compiled graph."""

from __future__ import annotations

import re
from collections import Counter
from itertools import product

import pytest
import torch
from torch._inductor.utils import run_and_get_code

from perf import bench_overhead
from perf.harness.models import REPORT_FORMATS, WORKLOADS, build_variants
from perf.harness.timing import compile_counting_guards, fresh_caller


class OnceBenchmark:
    """pytest-benchmark's fixture, reduced to one call."""

    def __init__(self) -> None:
        self.group, self.extra_info, self.calls = None, {}, 0

    def __call__(self, fn):
        self.calls += 1
        return fn()


def body_cases() -> list[tuple[str, str, str, str]]:
    """(workload, format, variant, mode): every variant in every mode, each workload and format in eager;
    compiled on the first workload and format only (the body is the same code for all, and each compile
    of it costs seconds)."""
    first = (next(iter(WORKLOADS)), REPORT_FORMATS[0])
    return [
        (workload, fmt, variant, mode)
        for mode in bench_overhead.MODES
        for variant in bench_overhead.VARIANTS
        for workload, fmt in ([first] if mode != "eager" else product(WORKLOADS, REPORT_FORMATS))
    ]


def test_every_benchmark_body_runs_once():
    cases = body_cases()
    assert {(v, m) for _, _, v, m in cases} == set(product(bench_overhead.VARIANTS, bench_overhead.MODES))
    for workload, fmt, variant, mode in cases:
        benchmark = OnceBenchmark()
        info = bench_overhead.run_case(benchmark, workload, fmt, variant, mode, rounds=1, number=1)
        assert benchmark.calls == 1
        assert benchmark.extra_info == info
        assert info["ratio_to_floor"] > 0
        assert info["layers"] == (8 if workload.startswith("W1") else 2)
        assert (info["guards"] is None) == (mode == "eager")
    bench_overhead.prepared.cache_clear()


def compiled_kernels(model: torch.nn.Module, x: torch.Tensor) -> tuple[Counter, int]:
    """The calls in Inductor's generated code (kernels, extern ops) and the guard count."""
    compiled, guards = compile_counting_guards(fresh_caller(model))
    with torch.inference_mode():
        _, code = run_and_get_code(compiled, x)
    calls = re.findall(r"(torch\.ops\.[\w.]+|extern_kernels\.\w+|cpp_fused_\w+|aten\.\w+)\(", "\n".join(code))
    return Counter(calls), sum(guards)


# Guards on the globals the quantized linear path reads (its functions, the subclass class, the
# packing constant...): checked once per call, whatever the number of layers.
GLOBAL_GUARDS = 8


@pytest.mark.parametrize("fmt", REPORT_FORMATS)
@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_compiled_graph_and_guards_match_the_floor(workload, fmt):
    """No copy / pad / slice kernel the floor lacks; guards at most the floor's + 1 per layer
    (+ GLOBAL_GUARDS once)."""
    models, x = build_variants(workload, fmt)
    floor_calls, floor_guards = compiled_kernels(models["floor"], x)
    layers = len(models["floor"])
    assert sum(floor_calls.values()) == layers  # the kernel per layer, nothing else
    for variant in ("ours wrapped", "ours unwrapped"):
        calls, guards = compiled_kernels(models[variant], x)
        assert calls == floor_calls, variant
        if variant == "ours unwrapped":
            assert guards <= floor_guards + layers + GLOBAL_GUARDS, (guards, floor_guards)


def test_every_torchao_benchmark_body_runs_once_in_eager():
    """perf/bench_torchao.py: every variant's eager case once, on W1 int4 and W2 int8 (the
    compiled models of every group are built by tests/unwrap/test_torchao_unwrap.py's guard test,
    from the same cached variants)."""
    from tests.optional import import_or_fail_in_ci

    import_or_fail_in_ci("torchao", "torchao")
    from perf import bench_torchao

    for workload, fmt in (("W1 8x256", "int4"), ("W2 512-1024-1024", "int8")):
        for variant in bench_torchao.VARIANTS:
            benchmark = OnceBenchmark()
            info = bench_torchao.run_case(benchmark, workload, fmt, variant, "eager", rounds=1, number=1)
            assert benchmark.calls == 1 and info["ratio_to_floor"] > 0 and info["guards"] is None
    bench_overhead.prepared.cache_clear()  # the runners (bench_torchao shares them); the models stay cached
