"""Prefill benchmarks: one 2048x2048 linear, M activation rows, per format with bf16 beside it.

Run: ``pytest perf/bench_prefill.py --benchmark-only`` (2 threads; ``BENCH_THREADS`` to change).
Each case is ``(format, mode, M)``; ``compiled`` compiles the unwrapped layer once per format with
dynamic M, so one graph serves every M above the int4 crossover (see ``subclasses.kernels.int4_prefill``);
``wrapped eager`` / ``wrapped dynamic=True``: the layer as ``quantize_`` leaves it (no ``unwrap``), eager and
compiled with ``dynamic=True``.
``prefill_ms`` times a whole model's prefill (time to first token).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import pytest
import torch
from torch import nn

from perf.harness.models import report_config
from perf.harness.timing import min_time_us
from subclasses import quantize_
from unwrap import unwrap

FORMATS = ("bf16", "int4", "int8", "int8-dyn")  # bf16 beside each format of perf.harness.models.FORMATS
# mode -> (unwrap the quantized weight, compile, torch.compile's dynamic). "compiled": the default
# torch.compile; "wrapped dynamic=True": the weight kept as its tensor subclass, one graph for every M
# (what a server's prompts get).
MODES: dict[str, tuple[bool, bool, bool | None]] = {
    "eager": (True, False, None),
    "compiled": (True, True, None),
    "wrapped eager": (False, False, None),
    "wrapped dynamic=True": (False, True, True),
}
ROWS = (1, 8, 32, 128, 512)
SIZE = 2048
DEFAULT_THREADS = 2  # BENCH_THREADS overrides (perf/conftest.py)


def prefill_ms(model: Callable[..., object], *args: object, repeats: int = 5, warmup: int = 1) -> float:
    """Minimum wall time of ``model(*args)`` in ms under ``torch.inference_mode()`` (one call per
    repeat: a prefill is long enough to time alone). Use it for time-to-first-token."""
    with torch.inference_mode():
        return min_time_us(lambda: model(*args), repeats=repeats, number=1, warmup=warmup) / 1e3


@functools.cache
def layer(fmt: str, mode: str, size: int = SIZE) -> Callable[[torch.Tensor], torch.Tensor]:
    """A bias-free bf16 ``nn.Linear(size, size)`` in ``fmt``, unwrapped and compiled as ``MODES[mode]``
    says (cached, so that every M of a format shares one compiled model)."""
    unwrapped, compiled, dynamic = MODES[mode]
    torch.manual_seed(0)
    model: nn.Module = nn.Linear(size, size, bias=False).to(torch.bfloat16).eval()
    if fmt != "bf16":
        quantize_(model, report_config(fmt))
        if unwrapped:
            unwrap(model)
    return torch.compile(model, dynamic=dynamic) if compiled else model


def run_prefill(benchmark: Callable[..., object], fmt: str, mode: str, rows: int, size: int = SIZE) -> None:
    """The body of every case: build (cached), warm up (compiles), then ``benchmark(model, x)``."""
    model = layer(fmt, mode, size)
    x = torch.randn(rows, size, dtype=torch.bfloat16)
    with torch.inference_mode():
        model(x)
        model(x)
        benchmark(model, x)


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("fmt", FORMATS)
def test_prefill(benchmark, fmt: str, mode: str, rows: int) -> None:
    benchmark.group = f"prefill {SIZE}x{SIZE} {mode} M={rows}"
    run_prefill(benchmark, fmt, mode, rows)


def main(argv: list[str] | None = None) -> int:
    """``python -m perf.bench_prefill``: the 2048x2048 layer at one M, every format in every mode, interleaved;
    ms and the ratio to bf16 in the same mode (the pytest-benchmark cases above time each case alone)."""
    import argparse

    from .harness.tables import kernels, markdown_table
    from .harness.timing import interleaved_min

    parser = argparse.ArgumentParser(prog="python -m perf.bench_prefill", description=main.__doc__)
    parser.add_argument("--rows", type=int, default=512, help="activation rows M (default: 512, a prompt)")
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS)
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    x = torch.randn(args.rows, SIZE, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(0))
    calls = {(fmt, mode): functools.partial(layer(fmt, mode), x) for fmt in FORMATS for mode in MODES}
    with torch.inference_mode():
        ms = {key: s * 1e3 for key, s in interleaved_min(calls, rounds=args.rounds, warmup=2).items()}
    print(kernels())
    head = ["format", *(f"{mode} ms (vs bf16)" for mode in MODES)]
    rows = [
        [fmt, *(f"{ms[fmt, mode]:.2f} ({ms[fmt, mode] / ms['bf16', mode]:.2f})" for mode in MODES)] for fmt in FORMATS
    ]
    print(markdown_table(head, rows, title=f"{SIZE}x{SIZE} layer, M = {args.rows}, group 128 int4"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
