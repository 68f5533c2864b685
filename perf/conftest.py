"""Shared fixture of the pytest-benchmark modules in perf/."""

import os

import pytest
import torch


@pytest.fixture(autouse=True)
def bench_threads(request: pytest.FixtureRequest):
    """Run each benchmark with ``BENCH_THREADS`` torch threads, else its module's
    ``DEFAULT_THREADS`` (host-overhead benchmarks pin 1; prefill uses the machine's 2)."""
    before = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", getattr(request.module, "DEFAULT_THREADS", 1))))
    yield
    torch.set_num_threads(before)
