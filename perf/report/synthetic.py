"""The report's synthetic workloads (W1, W2): every variant in every mode, us per forward."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from ..harness.models import build_variants
from ..harness.timing import interleaved_min
from ..modes import MODE_TITLES, kernel_chain, prepare, torchao_available, torchao_model
from .blocks import Block, Row


def measure_workload(
    workload: str,
    fmt: str,
    modes: tuple[str, ...],
    *,
    quick: bool,
    progress: Callable[[str], None],
    variants: tuple[str, ...] | None = None,
) -> Block:
    """Time every variant of ``workload`` (or those named in ``variants``) in every mode (us per
    forward, batch 1): prepare (compile) everything first, then time it all interleaved, so load on a
    shared machine hits all alike."""
    models, x = build_variants(workload, fmt)
    if torchao_available() and (variants is None or "torchao" in variants):
        try:
            models["torchao"] = torchao_model(models["bf16"], fmt)
        except Exception as error:  # an API change in torchao must not sink the report
            progress(f"torchao row skipped: {error}")
    block = Block(workload, fmt, "us", modes, [Row(v) for v in models if variants is None or v in variants])
    repeats, number = (3, 50) if quick else (9, 200)
    fns: dict[tuple[str, str], Callable[[], object]] = {}
    # the kernels alone: bf16's for its row, the floor's for every quantized row
    for v in sorted({"bf16" if row.variant == "bf16" else "floor" for row in block.rows}):
        chain = kernel_chain(models[v])
        if chain is not None:
            fns[(v, "kernel")] = functools.partial(chain, x)
    for row in block.rows:
        for mode in modes:
            row.times[mode] = None
            if mode == "aoti" and row.variant == "ours wrapped":
                continue  # export unwraps it itself: the same package as "ours unwrapped"
            progress(f"{workload} {fmt}: {row.variant}, {MODE_TITLES[mode]}")
            try:
                fn, guards = prepare(models[row.variant], (x,), mode)
            except Exception as error:
                row.note = f"{MODE_TITLES[mode]} failed: {type(error).__name__}"
                progress(f"  failed: {error}")
                continue
            fns[(row.variant, mode)] = fn
            if mode == "compiled":
                row.guards = guards
    progress(f"{workload} {fmt}: timing {len(fns)} ways, interleaved")
    with torch.inference_mode():
        seconds = interleaved_min(fns, rounds=repeats, number=number, warmup=10)
    times = {key: s * 1e6 for key, s in seconds.items()}
    for row in block.rows:
        for mode in modes:
            row.times[mode] = times.get((row.variant, mode))
        row.kernel = times.get(("bf16" if row.variant == "bf16" else "floor", "kernel"))
    return block
