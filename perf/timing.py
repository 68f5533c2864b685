"""Import path of ``perf.harness.timing`` (the timing functions), for callers outside perf/."""

from .harness.timing import compile_counting_guards, interleaved_min, min_time_us, no_gc

__all__ = ["compile_counting_guards", "interleaved_min", "min_time_us", "no_gc"]
