"""Host-overhead benchmarks: W1 and W2, bf16 / floor / ours wrapped / ours unwrapped, eager and
compiled, int4 and int8, batch 1, one thread.

Run: ``pytest perf/bench_overhead.py --benchmark-only`` (``BENCH_THREADS`` changes the thread count).
Each group (``{workload} {format} {mode}``) holds the four variants side by side. Every case also
times itself against the floor in interleaved rounds (the same moment of a noisy machine) and
records in ``extra_info``: ``floor_us``, ``ours_us`` (minima of those rounds), ``ratio_to_floor``,
``guards`` and ``floor_guards`` (compiled: entries a ``guard_filter_fn`` receives), ``layers``.
"""

from __future__ import annotations

import functools
import os
from typing import Callable

import pytest
import torch

from perf.modes import prepare
from perf.report import interleaved_min_us
from perf.workloads import CONFIGS, WORKLOADS, build_variants

VARIANTS = ("bf16", "floor", "ours wrapped", "ours unwrapped")
MODES = ("eager", "compiled")
ROUNDS = 20  # interleaved rounds behind ratio_to_floor (minimum of each)


@functools.cache
def prepared(workload: str, fmt: str, variant: str, mode: str) -> tuple[Callable[[], object], int | None]:
    """A warm no-argument runner of ``variant`` in ``mode`` and its guard count (cached: the floor
    is shared by every case of its group; each compiled variant has its own code object)."""
    models, x = _variants(workload, fmt)
    return prepare(models[variant], (x,), mode)


@functools.cache
def _variants(workload: str, fmt: str) -> tuple[dict, torch.Tensor]:
    return build_variants(workload, fmt)


def run_case(benchmark: Callable[..., object], workload: str, fmt: str, variant: str, mode: str,
             *, rounds: int = ROUNDS, number: int = 200) -> dict[str, object]:
    """The body of every case: time ``variant`` with ``benchmark``, then against the floor
    interleaved; returns (and stores in ``benchmark.extra_info``) the numbers named above."""
    with torch.inference_mode():
        ours, guards = prepared(workload, fmt, variant, mode)
        floor, floor_guards = prepared(workload, fmt, "floor", mode)
        benchmark(ours)
        times = interleaved_min_us({"floor": floor, "ours": ours}, repeats=rounds, number=number)
    info = {
        "floor_us": times["floor"],
        "ours_us": times["ours"],
        "ratio_to_floor": times["ours"] / times["floor"],
        "guards": guards,
        "floor_guards": floor_guards,
        "layers": sum(1 for _ in _variants(workload, fmt)[0]["floor"].children()),
    }
    benchmark.extra_info.update(info)
    return info


@pytest.fixture(autouse=True)
def _threads():
    before = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fmt", list(CONFIGS))
@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_overhead(benchmark, workload: str, fmt: str, mode: str, variant: str) -> None:
    benchmark.group = f"{workload} {fmt} {mode}"
    run_case(benchmark, workload, fmt, variant, mode)
