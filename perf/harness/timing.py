"""Timing: the one interleaved minimum-of-rounds loop every benchmark and the report use, guard
counting for compiled callables, and progress lines."""

from __future__ import annotations

import contextlib
import gc
import itertools
import sys
import time
import types
from collections.abc import Callable, Hashable, Iterator, Mapping
from typing import Any, TextIO, TypeVar

import torch

K = TypeVar("K", bound=Hashable)
GuardFilter = Callable[[list[Any]], list[bool]]


@contextlib.contextmanager
def no_gc() -> Iterator[None]:
    """The garbage collector collected once, then off (as ``timeit`` does): after compiling, the
    heap holds millions of objects and one full collection inside a timed span costs 0.2-2 s."""
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def interleaved_min(
    fns: Mapping[K, Callable[[], object]],
    *,
    rounds: int,
    number: int = 1,
    warmup: int = 0,
    before: Callable[[K], object] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[K, float]:
    """Per key, the minimum over ``rounds`` of the mean time of ``number`` consecutive calls of its
    callable, in seconds of ``clock`` (wall time by default). Each round visits every key in turn,
    in ``fns``' order, so a burst of load on a shared machine hits them alike. ``warmup`` untimed
    calls per key come first; ``before(key)``, untimed, runs ahead of each key's calls (warm-up
    included: e.g. re-prefill a decoder whose cache is about to fill, or wait at a barrier). The
    garbage collector is off throughout (``no_gc``)."""
    best = {key: float("inf") for key in fns}
    with no_gc():
        if warmup:
            for key, fn in fns.items():
                if before is not None:
                    before(key)
                for _ in range(warmup):
                    fn()
        for _ in range(rounds):
            for key, fn in fns.items():
                if before is not None:
                    before(key)
                start = clock()
                for _ in range(number):
                    fn()
                best[key] = min(best[key], (clock() - start) / number)
    return best


def min_time_us(fn: Callable[[], object], *, repeats: int = 7, number: int = 200, warmup: int = 20) -> float:
    """One callable's ``interleaved_min``: minimum over ``repeats`` of the mean time of ``number``
    calls, in microseconds."""
    return interleaved_min({0: fn}, rounds=repeats, number=number, warmup=warmup)[0] * 1e6


def counting_guards(counts: list[int], guard_filter: GuardFilter | None = None) -> GuardFilter:
    """A ``guard_filter_fn`` that appends to ``counts`` how many guards each compiled frame keeps:
    those ``guard_filter`` keeps (all of them when None)."""

    def keep(entries: list[Any]) -> list[bool]:
        flags = [True] * len(entries) if guard_filter is None else list(guard_filter(entries))
        counts.append(sum(flags))
        return flags

    return keep


def compile_counting_guards(model: Callable[..., Any], **compile_kwargs: Any) -> tuple[Callable[..., Any], list[int]]:
    """``torch.compile(model)`` plus a list that receives the guard count of each compiled frame
    (the number of entries a ``guard_filter_fn`` is shown; all of them are kept)."""
    counts: list[int] = []
    options = {**(compile_kwargs.pop("options", None) or {}), "guard_filter_fn": counting_guards(counts)}
    return torch.compile(model, options=options, **compile_kwargs), counts


_CALLERS = itertools.count()


def fresh_caller(model: Callable[..., Any]) -> Callable[..., Any]:
    """``lambda *a, **k: model(*a, **k)`` with a code object of its own. Dynamo keeps compiled
    code per code object, and every variant here shares forward code (nn.Sequential, the
    transformers classes): compiled directly, each variant's guards would be tried on the others'
    calls and count toward the recompile limit. A fresh caller keeps them apart, so many compiled
    variants can live side by side and be timed interleaved."""

    def call(*args: object, **kwargs: object) -> object:
        return model(*args, **kwargs)

    code = call.__code__.replace(co_name=f"call_{next(_CALLERS)}")
    return types.FunctionType(code, call.__globals__, code.co_name, None, call.__closure__)


class Progress:
    """Progress lines on stderr with the elapsed time, so long runs show where they are."""

    def __init__(self, stream: TextIO = sys.stderr) -> None:
        self.start, self.stream = time.perf_counter(), stream
        self.expected_s: float | None = None

    def expect(self, seconds: float) -> None:
        """From now on each line also shows the time left of a run expected to take ``seconds``."""
        self.expected_s = seconds

    def __call__(self, message: str) -> None:
        elapsed = time.perf_counter() - self.start
        left = "" if self.expected_s is None else f", ~{max(self.expected_s - elapsed, 0):.0f}s left"
        print(f"[{elapsed:6.1f}s{left}] {message}", file=self.stream, flush=True)
