"""Import path of the synthetic workloads W1 and W2 (``perf.harness.models``), for callers outside perf/."""

from .harness.models import WORKLOADS, build_variants, stack_w1, two_layer_w2

__all__ = ["WORKLOADS", "build_variants", "stack_w1", "two_layer_w2"]
