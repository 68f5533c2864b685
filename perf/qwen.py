"""Import path of the Qwen2 builders (``perf.harness.models``) and the greedy ``Decoder``
(``perf.harness.decode``), for callers outside perf/."""

from .harness.decode import Decoder
from .harness.models import QWEN2_SHAPES, build_qwen2, floor_model_nd, qwen2_variants

__all__ = ["QWEN2_SHAPES", "Decoder", "build_qwen2", "floor_model_nd", "qwen2_variants"]
