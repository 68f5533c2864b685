"""Timing and guard counting shared by the benchmarks and the report."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn


def min_time_us(fn: Callable[[], object], *, repeats: int = 7, number: int = 200, warmup: int = 20) -> float:
    """Minimum over ``repeats`` of the mean time of ``number`` calls, in microseconds."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        best = min(best, (time.perf_counter() - start) / number)
    return best * 1e6


def compile_counting_guards(model: nn.Module, **compile_kwargs: object) -> tuple[Callable, list[int]]:
    """``torch.compile(model)`` plus a list that receives the guard count of each compiled frame
    (the number of entries a ``guard_filter_fn`` is shown; all of them are kept)."""
    counts: list[int] = []

    def keep_all(entries: list) -> list[bool]:
        counts.append(len(entries))
        return [True] * len(entries)

    options = dict(compile_kwargs.pop("options", {}) or {})
    compiled = torch.compile(model, options={**options, "guard_filter_fn": keep_all}, **compile_kwargs)
    return compiled, counts
