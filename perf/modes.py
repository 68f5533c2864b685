"""Ways to run a model (eager, compiled, cpp_wrapper, AOTInductor), kernel-only time, torchao rows."""

from __future__ import annotations

import copy
import os
import tempfile
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from subclasses.kernels.int4_gemv import int4_mm_for_cpu

from .floor import Int4FloorLinear, Int8FloorLinear
from .harness.timing import compile_counting_guards, fresh_caller

# The names every report, benchmark and table uses: what is measured, and how it is run.
VARIANTS = ("bf16", "floor", "ours wrapped", "ours unwrapped", "torchao")
MODES = ("eager", "compiled", "cpp_wrapper", "aoti")
# Inductor options per compiled mode; "frozen" (freezing: parameters become constants, so work on
# them alone is folded at compile time) is offered to benchmarks, not run by the report.
COMPILE_OPTIONS: dict[str, dict[str, bool]] = {
    "compiled": {},
    "cpp_wrapper": {"cpp_wrapper": True},
    "frozen": {"freezing": True},
}
CUDA_MODES = ("eager", "compiled", "reduce-overhead")  # "reduce-overhead": CUDA graphs
MODE_TITLES = {
    "eager": "eager",
    "compiled": "compiled",
    "cpp_wrapper": "cpp_wrapper",
    "aoti": "AOTInductor",
    "decode": "compile_for_decode",
    "llama.cpp": "llama.cpp",
    "headline": "each engine's own way",
}  # LLM decode columns

_PACKAGE_DIR: str | None = None


def _package_dir() -> str:
    """One temporary folder per process for AOTInductor packages (kept while runners are alive)."""
    global _PACKAGE_DIR
    if _PACKAGE_DIR is None:
        _PACKAGE_DIR = tempfile.mkdtemp(prefix="unwrap-perf-")
    return _PACKAGE_DIR


def prepare(model: nn.Module, args: tuple, mode: str) -> tuple[Callable[[], object], int | None]:
    """A no-argument callable running ``model(*args)`` in ``mode``, already compiled and warm,
    and the guard count of the compiled frames (None for eager and AOTInductor, which has none)."""
    if mode not in MODES and mode not in COMPILE_OPTIONS:
        raise ValueError(f"mode must be one of {MODES} or {tuple(COMPILE_OPTIONS)}, got {mode!r}")
    if mode == "eager":
        return (lambda: model(*args)), None
    if mode in COMPILE_OPTIONS:
        compiled, counts = compile_counting_guards(fresh_caller(model))
        # Patched around the first call (which compiles), not passed as options=: Dynamo reads
        # ``freezing`` itself (torch._dynamo.utils.is_parameter_freezing) to treat parameters as constants.
        with torch.inference_mode(), torch._inductor.config.patch(COMPILE_OPTIONS[mode]):
            compiled(*args)
        return (lambda: compiled(*args)), sum(counts)
    # AOTInductor: export (which unwraps subclass parameters itself), compile to a .pt2, load.
    with torch.no_grad():
        exported = torch.export.export(model, args)
        path = os.path.join(_package_dir(), f"model{len(os.listdir(_package_dir()))}.pt2")
        path = torch._inductor.aoti_compile_and_package(exported, package_path=path)
    runner = torch._inductor.aoti_load_package(path)
    return (lambda: runner(*args)), None


def kernel_chain(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The model's linear kernels called directly, in order, on the same inner tensors (the
    floor's buffers or the bf16 weights), each feeding the next: the time nothing can beat.
    None when ``model`` holds other layers."""
    layers = [m for m in model.modules() if not list(m.children())]
    if all(type(m) is nn.Linear and m.bias is None and type(m.weight) is nn.Parameter for m in layers):
        weights = [m.weight for m in layers if isinstance(m, nn.Linear)]

        def run(x: torch.Tensor) -> torch.Tensor:
            for w in weights:
                x = F.linear(x, w)
            return x

        return run
    if all(type(m) is Int4FloorLinear for m in layers):
        int4 = [(m.packed, m.group_size, m.scale_and_zero) for m in layers if isinstance(m, Int4FloorLinear)]

        def run(x: torch.Tensor) -> torch.Tensor:
            for packed, group_size, scale_and_zero in int4:
                x = int4_mm_for_cpu(x, packed, group_size, scale_and_zero)  # ours' kernels, M = 1 and more
            return x

        return run
    if all(type(m) is Int8FloorLinear for m in layers):
        int8 = [(m.qdata, m.scale) for m in layers if isinstance(m, Int8FloorLinear)]

        def run(x: torch.Tensor) -> torch.Tensor:
            for qdata, scale in int8:
                x = torch._weight_int8pack_mm(x, qdata, scale)
            return x

        return run
    return None


def torchao_available() -> bool:
    """True when torchao can be imported (it is an optional comparison, never required)."""
    try:
        import torchao  # noqa: F401
    except Exception:
        return False
    return True


def torchao_model(bf16: nn.Module, fmt: str) -> nn.Module:
    """A copy of ``bf16`` quantized with torchao's equivalent config (int4: tinygemm math, the
    CPU "opaque" packing, group 128; int8: weight-only per channel)."""
    from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    model = copy.deepcopy(bf16)
    if fmt == "int4":  # torchao 0.18 moved the CPU "opaque" int4 (Int4OpaqueTensor) to the prototype
        config = PrototypeInt4WeightOnlyConfig(group_size=128)
    elif fmt == "int8":
        config = Int8WeightOnlyConfig()
    else:
        raise ValueError(f"format must be 'int4' or 'int8', got {fmt!r}")
    quantize_(model, config)
    return model


__all__ = [
    "VARIANTS",
    "MODES",
    "COMPILE_OPTIONS",
    "CUDA_MODES",
    "MODE_TITLES",
    "prepare",
    "fresh_caller",
    "kernel_chain",
    "torchao_available",
    "torchao_model",
]
