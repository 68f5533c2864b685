"""Host-overhead benchmarks: W1 and W2, bf16 / floor / ours wrapped / ours unwrapped, eager and
compiled, int4 and int8, batch 1, one thread.

Run: ``pytest perf/bench_overhead.py --benchmark-only`` (``BENCH_THREADS`` changes the thread count).
On a machine with a CUDA GPU, ``test_overhead_cuda`` adds the same cases on the GPU (plus
``reduce-overhead``: CUDA graphs, and torchao when installed), each call synchronized.
Each group (``{workload} {format} {mode}``) holds the four variants side by side. Every case also
times itself against the floor in interleaved rounds (the same moment of a noisy machine) and
records in ``extra_info``: ``floor_us``, ``ours_us`` (minima of those rounds), ``ratio_to_floor``,
``guards`` and ``floor_guards`` (compiled: entries a ``guard_filter_fn`` receives), ``layers``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import pytest
import torch

from perf.cuda import cuda_available, cuda_time_us, cuda_variants, prepare_cuda, synchronized
from perf.harness.models import REPORT_FORMATS, WORKLOADS, build_variants
from perf.harness.timing import interleaved_min
from perf.modes import CUDA_MODES, prepare
from perf.modes import VARIANTS as ALL_VARIANTS

VARIANTS = ALL_VARIANTS[:4]  # torchao's rows are perf/bench_torchao.py's
MODES = ("eager", "compiled")  # of modes.MODES: what host overhead is about
DEFAULT_THREADS = 1  # host overhead: one thread (BENCH_THREADS overrides; perf/conftest.py)
ROUNDS = 20  # interleaved rounds behind ratio_to_floor (minimum of each)


@functools.cache
def _variants(workload: str, fmt: str) -> tuple[dict, torch.Tensor]:
    return build_variants(workload, fmt)


Variants = Callable[[str, str], tuple[dict, torch.Tensor]]


@functools.cache
def prepared(
    workload: str, fmt: str, variant: str, mode: str, variants: Variants = _variants
) -> tuple[Callable[[], object], int | None]:
    """A warm no-argument runner of ``variant`` in ``mode`` and its guard count (cached: the floor
    is shared by every case of its group; each compiled variant has its own code object).
    ``variants(workload, fmt)``: the cached models and input (bench_torchao passes its own)."""
    models, x = variants(workload, fmt)
    return prepare(models[variant], (x,), mode)


def run_case(
    benchmark: Any,  # pytest-benchmark's fixture (or a stand-in with extra_info)
    workload: str,
    fmt: str,
    variant: str,
    mode: str,
    *,
    rounds: int = ROUNDS,
    number: int = 200,
    variants: Variants = _variants,
) -> dict[str, object]:
    """The body of every case: time ``variant`` with ``benchmark``, then against the floor
    interleaved; returns (and stores in ``benchmark.extra_info``) the numbers named above."""
    with torch.inference_mode():
        ours = prepared(workload, fmt, variant, mode, variants)
        floor = prepared(workload, fmt, "floor", mode, variants)
    layers = sum(1 for _ in variants(workload, fmt)[0]["floor"].children())
    return time_against_floor(benchmark, ours, floor, layers, rounds=rounds, number=number)


def time_against_floor(
    benchmark: Any,  # pytest-benchmark's fixture (or a stand-in with extra_info)
    ours: tuple[Callable[[], object], int | None],
    floor: tuple[Callable[[], object], int | None],
    layers: int,
    *,
    rounds: int,
    number: int,
) -> dict[str, object]:
    """Time the prepared ``ours`` (runner, guards) with ``benchmark``, then interleaved with the
    prepared ``floor``; the ``extra_info`` numbers (also returned)."""
    (ours_fn, guards), (floor_fn, floor_guards) = ours, floor
    with torch.inference_mode():
        benchmark(ours_fn)
        seconds = interleaved_min({"floor": floor_fn, "ours": ours_fn}, rounds=rounds, number=number, warmup=10)
    times = {key: s * 1e6 for key, s in seconds.items()}
    info: dict[str, object] = {
        "floor_us": times["floor"],
        "ours_us": times["ours"],
        "ratio_to_floor": times["ours"] / times["floor"],
        "guards": guards,
        "floor_guards": floor_guards,
        "layers": layers,
    }
    benchmark.extra_info.update(info)
    return info


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fmt", REPORT_FORMATS)
@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_overhead(benchmark, workload: str, fmt: str, mode: str, variant: str) -> None:
    benchmark.group = f"{workload} {fmt} {mode}"
    run_case(benchmark, workload, fmt, variant, mode)


@functools.cache
def _cuda_variants(workload: str, fmt: str) -> tuple[dict, torch.Tensor]:
    return cuda_variants(workload, fmt)


@functools.cache
def prepared_cuda(workload: str, fmt: str, variant: str, mode: str) -> Callable[[], object]:
    """A warm, synchronized runner of ``variant`` on the GPU in ``mode`` (one of ``CUDA_MODES``)."""
    models, x = _cuda_variants(workload, fmt)
    return synchronized(prepare_cuda(models[variant], (x,), mode))


@pytest.mark.skipif(not cuda_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("variant", [*VARIANTS, "torchao"])
@pytest.mark.parametrize("mode", CUDA_MODES)
@pytest.mark.parametrize("fmt", REPORT_FORMATS)
@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_overhead_cuda(benchmark, workload: str, fmt: str, mode: str, variant: str) -> None:
    if variant not in _cuda_variants(workload, fmt)[0]:
        pytest.skip("torchao is not installed")
    benchmark.group = f"cuda {workload} {fmt} {mode}"
    with torch.inference_mode():
        ours, floor = prepared_cuda(workload, fmt, variant, mode), prepared_cuda(workload, fmt, "floor", mode)
        benchmark(ours)
        ours_us, floor_us = cuda_time_us(ours), cuda_time_us(floor)
    benchmark.extra_info.update({"ours_us": ours_us, "floor_us": floor_us, "ratio_to_floor": ours_us / floor_us})
