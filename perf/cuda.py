"""The GPU side of the benchmarks: CUDA-event timing, the CUDA floor, compiled variants, a table.

``python -m perf.cuda`` prints, on a machine with a CUDA GPU, the per-forward time of bf16, the
floor, ours wrapped, ours unwrapped (and torchao when installed) for each workload and format, in
eager, ``torch.compile`` and ``torch.compile(mode="reduce-overhead")`` (CUDA graphs); without a
GPU it says so and exits 0. The other perf modules can use ``cuda_time_us`` / ``synchronized``
for their CUDA rows.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .floor import CUDA_LINEARS, CudaInt4FloorLinear, CudaInt8FloorLinear, floor_model  # noqa: F401 - re-exported
from .harness.models import WORKLOADS, build_variants
from .harness.tables import markdown_table
from .harness.timing import fresh_caller
from .modes import CUDA_MODES


def cuda_available() -> bool:
    """True when a CUDA GPU can run kernels here."""
    return torch.cuda.is_available()


def synchronized(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` followed by ``torch.cuda.synchronize()``: what a wall-clock timer (pytest-benchmark,
    ``timing.min_time_us``) must call so it measures the GPU work, not just its launch."""

    def run() -> object:
        out = fn()
        torch.cuda.synchronize()
        return out

    return run


def cuda_time_us(fn: Callable[[], object], *, repeats: int = 7, number: int = 100, warmup: int = 10) -> float:
    """Minimum over ``repeats`` of the mean time of ``number`` back-to-back calls, in microseconds,
    measured with CUDA events on the current stream. Host time is included whenever the host is
    the bottleneck: the GPU then idles between kernels and the end event is reached later."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(number):
            fn()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / number)  # elapsed_time is in ms
    return best * 1e3


def cuda_floor_model(quantized: nn.Module) -> nn.Module:
    """``floor.floor_model`` with the CUDA floor modules (``quantized`` already on the GPU)."""
    return floor_model(quantized, CUDA_LINEARS)


def prepare_cuda(model: nn.Module, args: tuple, mode: str) -> Callable[[], object]:
    """A no-argument callable running ``model(*args)`` in ``mode`` (one of ``CUDA_MODES``), compiled
    and warm. "reduce-overhead" is ``torch.compile(mode="reduce-overhead")``: CUDA graphs."""
    if mode not in CUDA_MODES:
        raise ValueError(f"mode must be one of {CUDA_MODES}, got {mode!r}")
    if mode == "eager":
        return lambda: model(*args)
    # fresh_caller: the variants share forward code (nn.Sequential); each keeps its own compiled code
    compiled = torch.compile(fresh_caller(model), mode=None if mode == "compiled" else mode)
    with torch.inference_mode():
        for _ in range(3):  # CUDA graphs record on a later call than the first
            compiled(*args)
    return lambda: compiled(*args)


def cuda_variants(workload: str, fmt: str, seed: int = 0) -> tuple[dict[str, nn.Module], torch.Tensor]:
    """The perf variants (bf16, floor, ours wrapped, ours unwrapped, torchao when installed) on the
    GPU, with the same weights, and a batch-1 bf16 input there. Ours are moved with ``.to("cuda")``,
    which repacks int4 for the tinygemm kernel."""
    from unwrap import unwrap

    models, x = build_variants(workload, fmt, seed)
    wrapped = models["ours wrapped"].to("cuda")
    out = {
        "bf16": models["bf16"].to("cuda"),
        "floor": cuda_floor_model(wrapped),
        "ours wrapped": wrapped,
        "ours unwrapped": unwrap(copy.deepcopy(wrapped)),
    }
    torchao = _torchao_cuda(models["bf16"], fmt)
    if torchao is not None:
        out["torchao"] = torchao
    return out, x.to("cuda")


def _torchao_cuda(bf16: nn.Module, fmt: str) -> nn.Module | None:
    """torchao's equivalent on the GPU (int4: its tinygemm layout), or None when it is not
    installed or refuses the config (its int4 options changed between releases)."""
    try:
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

        model = copy.deepcopy(bf16).to("cuda")
        if fmt == "int4":
            config = Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d")
        else:
            config = Int8WeightOnlyConfig()
        quantize_(model, config)
        return model
    except Exception as error:  # optional comparison row
        print(f"torchao row skipped: {type(error).__name__}: {error}", file=sys.stderr)
        return None


def cuda_table(workloads: list[str], formats: list[str], modes: tuple[str, ...] = CUDA_MODES) -> list[dict[str, Any]]:
    """One row per (workload, format, variant, mode): its time per forward in microseconds."""
    rows = []
    for workload in workloads:
        for fmt in formats:
            models, x = cuda_variants(workload, fmt)
            for mode in modes:
                for name, model in models.items():
                    with torch.inference_mode():
                        us = cuda_time_us(prepare_cuda(model, (x,), mode))
                    rows.append({"workload": workload, "format": fmt, "model": name, "mode": mode, "us": us})
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: one line per (workload, format, variant), one column per mode, plus x bf16 and
    x floor for the compiled mode."""
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    keyed = {(r["workload"], r["format"], r["model"], r["mode"]): r["us"] for r in rows}
    head = ["workload", "format", "model", *(f"{m} (us)" for m in modes), "compiled / bf16", "compiled / floor"]
    cells = []
    for workload, fmt, model in dict.fromkeys((r["workload"], r["format"], r["model"]) for r in rows):
        times = [keyed.get((workload, fmt, model, m)) for m in modes]
        compiled = keyed.get((workload, fmt, model, "compiled"))
        bf16 = keyed.get((workload, fmt, "bf16", "compiled"))
        floor = keyed.get((workload, fmt, "floor", "compiled"))
        ratios = [f"{compiled / base:.2f}" if compiled and base else "-" for base in (bf16, floor)]
        cells.append([workload, fmt, model, *("-" if t is None else f"{t:.1f}" for t in times), *ratios])
    return markdown_table(head, cells)


def main(argv: list[str] | None = None) -> int:
    """``python -m perf.cuda [--workload NAME ...] [--format int4|int8 ...]``."""
    parser = argparse.ArgumentParser(prog="python -m perf.cuda", description=__doc__.splitlines()[0])
    parser.add_argument("--workload", action="append", choices=sorted(WORKLOADS), help="default: W2")
    parser.add_argument("--format", action="append", choices=["int4", "int8"], help="default: both")
    parser.add_argument("--mode", action="append", choices=CUDA_MODES, help="default: all")
    args = parser.parse_args(argv)
    if not cuda_available():
        print("perf.cuda: no CUDA GPU here (torch.cuda.is_available() is False); nothing measured.")
        return 0
    workloads = args.workload or ["W2 512-1024-1024"]
    rows = cuda_table(workloads, args.format or ["int4", "int8"], tuple(args.mode or CUDA_MODES))
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, batch 1, bf16, us per forward")
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
