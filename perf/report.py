"""The side-by-side overhead report: measure, build the table, write JSON and a bar chart."""

from __future__ import annotations

import contextlib
import gc
import json
import math
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import torch

from subclasses import Int4WeightOnlyConfig, Int8WeightOnlyConfig

from .modes import MODE_TITLES, MODES, kernel_chain, prepare, torchao_available, torchao_model
from .real_model import load_smollm2
from .timing import compile_counting_guards
from .workloads import WORKLOADS, build_variants


@dataclass
class Row:
    """One model variant: time per mode (None: not measured), guards of the default compile,
    kernel-only time of its kernels called directly (None: not applicable), and for LLMs the time
    to first token per mode (ms, a prefill of the block's ``prefill_tokens``)."""

    variant: str
    times: dict[str, float | None] = field(default_factory=dict)
    guards: int | None = None
    kernel: float | None = None
    note: str = ""
    ttft: dict[str, float | None] = field(default_factory=dict)

    def best(self) -> tuple[str, float] | None:
        measured = [(t, m) for m, t in self.times.items() if t is not None]
        return None if not measured else min(measured)[::-1]


@dataclass
class Block:
    """One workload in one format: a table of rows, in ``unit`` per forward (or per token)."""

    workload: str
    format: str
    unit: str
    modes: tuple[str, ...]
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    prefill_tokens: int | None = None  # LLMs: prompt length of the rows' ``ttft`` (None: not measured)

    def row(self, variant: str) -> Row | None:
        return next((r for r in self.rows if r.variant == variant), None)

    def fastest(self) -> tuple[Row, str, float] | None:
        """Our variant and mode with the lowest time: what a user of this library should run."""
        best = [(r.best()[1], r.best()[0], r) for r in self.rows if r.variant.startswith("ours") and r.best()]
        if not best:
            return None
        t, mode, row = min(best, key=lambda b: b[0])
        return row, mode, t


class Progress:
    """Progress lines on stderr with the elapsed time, so long runs show where they are."""

    def __init__(self, stream=sys.stderr) -> None:
        self.start, self.stream = time.perf_counter(), stream

    def __call__(self, message: str) -> None:
        print(f"[{time.perf_counter() - self.start:6.1f}s] {message}", file=self.stream, flush=True)


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


def interleaved_min_us(
    fns: dict[str, Callable[[], object]], *, repeats: int, number: int, warmup: int = 10
) -> dict[str, float]:
    """Per callable, the minimum over ``repeats`` rounds of the mean of ``number`` calls (us).
    Rounds visit every callable in turn, so a burst of load on a shared machine hits them alike."""
    with no_gc():
        for fn in fns.values():
            for _ in range(warmup):
                fn()
        best = {key: float("inf") for key in fns}
        for _ in range(repeats):
            for key, fn in fns.items():
                start = time.perf_counter()
                for _ in range(number):
                    fn()
                best[key] = min(best[key], (time.perf_counter() - start) / number * 1e6)
    return best


def measure_workload(
    workload: str, fmt: str, modes: tuple[str, ...], *, quick: bool, progress: Callable[[str], None]
) -> Block:
    """Time every variant of ``workload`` in every mode (us per forward, batch 1): prepare (compile)
    everything first, then time it all interleaved, so load on a shared machine hits all alike."""
    models, x = build_variants(workload, fmt)
    if torchao_available():
        try:
            models["torchao"] = torchao_model(models["bf16"], fmt)
        except Exception as error:  # an API change in torchao must not sink the report
            progress(f"torchao row skipped: {error}")
    block = Block(workload, fmt, "us", modes, [Row(variant) for variant in models])
    repeats, number = (3, 50) if quick else (9, 200)
    fns: dict[tuple[str, str], Callable[[], object]] = {}
    for v in ("bf16", "floor"):
        chain = kernel_chain(models[v])
        if chain is not None:
            fns[(v, "kernel")] = lambda chain=chain: chain(x)
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
        times = interleaved_min_us(fns, repeats=repeats, number=number)
    for row in block.rows:
        for mode in modes:
            row.times[mode] = times.get((row.variant, mode))
        row.kernel = times.get(("bf16" if row.variant == "bf16" else "floor", "kernel"))
    return block


# Prompt length of the time-to-first-token columns, per LLM (LLMs not named here: not measured).
PREFILL_TOKENS: dict[str, int] = {"Qwen2 0.5B": 512, "SmolLM2 135M": 512}


def measure_llm(
    name: str, fmts: list[str], *, quick: bool, progress: Callable[[str], None], prefill_tokens: int | None = None
) -> list[Block]:
    """Next-token ms/token of a transformers LLM (a Qwen2 with random weights, or SmolLM2 with its
    real weights and then also perplexity, weight bytes and a greedy sample; greedy, static KV cache), eager and compiled,
    for bf16 and, per format, the floor and ours (wrapped: eager only; unwrapped: both). All
    decoders of a format are built and compiled first, then timed interleaved.

    With ``prefill_tokens`` (default ``PREFILL_TOKENS.get(name)``), also the time to first token of
    a prompt that long (prefill into an empty static cache, greedy first token), eager for every
    row, compiled (a compile of its own for that length, apart from the decode step's) for bf16,
    ours unwrapped and torchao, timed interleaved after the decoders."""
    from .modes import fresh_caller
    from .qwen import QWEN2_SHAPES, Decoder, build_qwen2, qwen2_variants

    if prefill_tokens is None:
        prefill_tokens = PREFILL_TOKENS.get(name)
    tokenizer = None
    if name in REAL_MODELS:
        progress(f"{name}: loading the real checkpoint")
        bf16, tokenizer = load_smollm2()
        small = False
    else:
        progress(f"{name}: building (random weights)")
        bf16 = build_qwen2(QWEN2_SHAPES[name])
        small = QWEN2_SHAPES[name]["hidden_size"] <= 256
    rounds, tokens = (3, 4) if quick else ((30, 8) if small else (7, 4))  # small: ~2 ms a token
    prefill_rounds = 2 if quick else 3

    def decoders(variant: str, model: torch.nn.Module, row: Row, compiled_too: bool) -> dict:
        out = {(variant, "eager"): Decoder(model)}
        row.times["compiled"] = row.times["decode"] = None
        if compiled_too:
            progress(f"{name}: {variant}, compiling")
            step, counts = compile_counting_guards(fresh_caller(model))
            out[(variant, "compiled")] = Decoder(model, step)
            out[(variant, "compiled")].next()  # compiles now
            guard_counts[variant] = counts
        if variant in DECODE_VARIANTS:  # the recommended way (README "Decode"), on a copy: it switches attention
            progress(f"{name}: {variant}, compiling for decode")
            out[(variant, "decode")] = decode_decoder(model)
        return out

    def prefills(variant: str, model: torch.nn.Module, compiled_too: bool) -> dict:
        """Decoders whose ``reset`` is one timed prefill (the constructor's is the warm-up)."""
        if not prefill_tokens:
            return {}
        progress(f"{name}: {variant}, {prefill_tokens}-token prefill" + (", compiling" if compiled_too else ""))
        length = dict(max_len=prefill_tokens, prompt_len=prefill_tokens)
        out = {(variant, "eager"): Decoder(model, **length)}
        if compiled_too:
            out[(variant, "compiled")] = Decoder(
                model, prefill=compile_counting_guards(fresh_caller(model))[0], **length
            )
        return out

    guard_counts: dict[str, list[int]] = {}
    quality_cache: dict[str, tuple[float, int, str]] = {}
    bf16_row = Row("bf16")
    bf16_decoders = decoders("bf16", bf16, bf16_row, True)
    bf16_prefills = prefills("bf16", bf16, True)
    blocks = []
    for fmt in fmts:
        # a real model gets the library's default config (int4: groups of 32); the random-weight
        # Qwen2 shapes keep the report's group 128 (numbers comparable with earlier runs)
        variants, notes = qwen2_variants(bf16, fmt, DEFAULT_CONFIGS[fmt]() if tokenizer is not None else None)
        if torchao_available():
            try:
                variants["torchao"] = torchao_model(bf16, fmt)
            except Exception as error:  # an API change in torchao must not sink the report
                progress(f"torchao row skipped: {error}")
        block = Block(name, fmt, "ms/token", LLM_MODES, [bf16_row], notes, prefill_tokens or None)
        if tokenizer is not None:
            progress(f"{name} {fmt}: perplexity and a greedy sample, bf16 and {fmt}")
            block.notes.extend(quality_notes(bf16, variants["ours wrapped"], fmt, tokenizer, cache=quality_cache))
        if prefill_tokens:
            block.notes.append(
                "TTFT compiled is not measured for the floor (its prefill runs the kernel at every "
                "M, as in eager) nor for ours wrapped (as its decode)"
            )
        all_decoders, all_prefills = dict(bf16_decoders), dict(bf16_prefills)
        for variant, model in variants.items():
            block.rows.append(Row(variant))
            all_decoders.update(decoders(variant, model, block.rows[-1], compiled_too=variant != "ours wrapped"))
            # The floor's prefill is the int4/int8 kernel at every M (eager shows that); compiling it
            # would add ~40 s cold to the default run (measured 2541 vs 2591 ms eager, int4 at 0.5B).
            all_prefills.update(prefills(variant, model, compiled_too=variant not in ("ours wrapped", "floor")))
        progress(f"{name} {fmt}: timing {len(all_decoders)} decoders, interleaved")
        best = interleaved_min_ms_per_token(all_decoders, rounds=rounds, tokens=tokens)
        ttft: dict = {}
        if all_prefills:
            progress(f"{name} {fmt}: timing {len(all_prefills)} prefills of {prefill_tokens} tokens, interleaved")
            prefill_us = interleaved_min_us(
                {key: d.reset for key, d in all_prefills.items()}, repeats=prefill_rounds, number=1, warmup=0
            )
            ttft = {key: us / 1e3 for key, us in prefill_us.items()}
        for row in block.rows:
            row.times.update({mode: best[(row.variant, mode)] for mode in block.modes if (row.variant, mode) in best})
            if row.variant in guard_counts:
                row.guards = sum(guard_counts[row.variant])
            if block.prefill_tokens:
                row.ttft = {mode: ttft.get((row.variant, mode)) for mode in block.modes if mode != "decode"}
        blocks.append(block)
        del variants, all_decoders, all_prefills
    return blocks


REAL_MODELS = ("SmolLM2 135M",)
LLM_MODES = ("eager", "compiled", "decode")
DECODE_VARIANTS = ("bf16", "ours unwrapped")  # rows with a "decode" (compile_for_decode) column


def decode_decoder(model: torch.nn.Module):
    """A ``Decoder`` whose step is ``perf.decode_profile``'s "decode" mode (what ``compile_for_decode``
    runs: grouped-KV attention, fused int4 projections, frozen, module guards skipped) on a copy of
    ``model``, with the report's cache size. Compiled now."""
    from .decode_profile import make_step
    from .qwen import Decoder

    decoder = Decoder(*make_step(model, "decode", []))
    decoder.next()
    return decoder


DEFAULT_CONFIGS = {"int4": Int4WeightOnlyConfig, "int8": Int8WeightOnlyConfig}
SAMPLE_PROMPT = "The capital of France is"


def quality_notes(
    bf16: torch.nn.Module,
    quantized: torch.nn.Module,
    fmt: str,
    tokenizer: object,
    *,
    cache: dict[str, tuple[float, int, str]],
) -> list[str]:
    """Perplexity on the shipped text, weight bytes and 12 greedy tokens, bf16 beside ``fmt`` (the
    floor and ours unwrapped hold the same weights as ours wrapped: same numbers)."""
    from subclasses.quantize.api import model_bytes

    from .real_model import eval_token_ids, perplexity

    ids = eval_token_ids(tokenizer)
    prompt = tokenizer(SAMPLE_PROMPT, return_tensors="pt").input_ids  # type: ignore[operator]

    def measure(model: torch.nn.Module) -> tuple[float, int, str]:
        with torch.inference_mode():
            sample = model.generate(prompt, max_new_tokens=12, do_sample=False)
        text = tokenizer.decode(sample[0, prompt.shape[1] :], skip_special_tokens=True)  # type: ignore[attr-defined]
        return perplexity(model, ids), model_bytes(model), text

    if "bf16" not in cache:
        cache["bf16"] = measure(bf16)
    cache[fmt] = measure(quantized)
    (ppl_ref, bytes_ref, text_ref), (ppl, size, text) = cache["bf16"], cache[fmt]
    others = ", ".join(
        f"{label} {value:.2f} ({value / ppl_ref - 1:+.1%})"
        for label, value in other_algorithms(bf16, fmt, tokenizer, ids).items()
    )
    return [
        f"perplexity on perf/data/eval_text.txt ({ids.shape[1]} tokens, 512-token windows): bf16 {ppl_ref:.2f}, "
        f"{fmt} {ppl:.2f} ({ppl / ppl_ref - 1:+.1%})" + (f"; other algorithms: {others}" if others else ""),
        f"weight bytes: bf16 {bytes_ref / 2**20:.1f} MiB, {fmt} {size / 2**20:.1f} MiB ({size / bytes_ref:.2f}x)",
        f"greedy {SAMPLE_PROMPT!r} -> bf16: {text_ref!r}; {fmt}: {text!r}",
    ]


def other_algorithms(bf16: torch.nn.Module, fmt: str, tokenizer: object, ids: torch.Tensor) -> dict[str, float]:
    """Perplexity of ``fmt`` quantized the other ways (the default config is the row itself): int4
    with the qparams algorithm that is not the default ("mse" or min-max "tinygemm"), and with GPTQ
    on perf/data/calibration_text.txt; int8 with GPTQ."""
    import copy

    from subclasses import quantize_

    from .real_model import calibration_batches, perplexity

    calibration = calibration_batches(tokenizer)
    config = DEFAULT_CONFIGS[fmt]
    ways = {f"{fmt} + GPTQ": (config(), calibration)}
    if fmt == "int4":
        other = "mse" if config().qparams_algorithm == "tinygemm" else "tinygemm"
        ways = {f"int4 {other}": (config(qparams_algorithm=other), None), **ways}
    out = {}
    for label, (way, batches) in ways.items():
        model = copy.deepcopy(bf16)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_(model, way, calibration=batches)
        out[label] = perplexity(model, ids)
        del model
    return out


def interleaved_min_ms_per_token(
    decoders: dict, *, rounds: int, tokens: int, warmup: int = 3, clock: Callable[[], float] = time.perf_counter
) -> dict:
    """Per decoder, the minimum over ``rounds`` of the mean time of ``tokens`` greedy steps (ms) by
    ``clock`` (seconds; wall time by default); each round visits every decoder in turn."""
    with no_gc():
        for decoder in decoders.values():
            for _ in range(warmup):
                decoder.next()
        best = {key: float("inf") for key in decoders}
        for _ in range(rounds):
            for key, decoder in decoders.items():
                if decoder.position + tokens > decoder.max_len:
                    decoder.reset()
                start = clock()
                for _ in range(tokens):
                    decoder.next()
                best[key] = min(best[key], (clock() - start) / tokens * 1e3)
    return best


def _ratio(a: float | None, b: float | None) -> str:
    return "" if a is None or b is None or b == 0 else f"{a / b:.2f}"


def _num(t: float) -> str:
    """Three significant digits, without exponents (1840, not 1.84e+03)."""
    return f"{t:.0f}" if abs(t) >= 100 else f"{t:.3g}"


def _cell(t: float | None, floor: float | None) -> str:
    if t is None:
        return "-"
    ratio = _ratio(t, floor)
    return f"{_num(t)} ({ratio})" if ratio else _num(t)


def format_block(block: Block) -> str:
    """A Markdown table: each time with its ratio to the floor in the same mode, the time to first
    token with its ratio to bf16 (LLMs with ``prefill_tokens``), the guards of the default compile,
    kernel-only time, host overhead (best − kernel), best ÷ bf16's best."""
    floor, bf16 = block.row("floor"), block.row("bf16")
    # compile_for_decode prefills in eager: its time to first token is the eager column's
    ttft_modes = tuple(m for m in block.modes if m != "decode") if block.prefill_tokens else ()
    head = [
        "variant",
        *(MODE_TITLES[m] for m in block.modes),
        *(f"TTFT {MODE_TITLES[m]}" for m in ttft_modes),
        "guards",
        "kernel",
        "overhead",
        "best/bf16",
        "best/floor",
    ]
    ttft_title = (
        f"; TTFT: ms to the first token of a {block.prefill_tokens}-token prompt, in brackets: ratio to bf16"
        if ttft_modes
        else ""
    )
    lines = [
        f"### {block.workload}, {block.format} ({block.unit}; in brackets: ratio to the floor in the same mode{ttft_title})",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    bf16_best = bf16.best()[1] if bf16 and bf16.best() else None
    floor_best = floor.best()[1] if floor and floor.best() else None
    for row in block.rows:
        best = row.best()
        cells = [_cell(row.times.get(m), floor.times.get(m) if floor else None) for m in block.modes]
        cells += [_cell(row.ttft.get(m), bf16.ttft.get(m) if bf16 else None) for m in ttft_modes]
        overhead = _num(best[1] - row.kernel) if best and row.kernel is not None else "-"
        kernel = _num(row.kernel) if row.kernel is not None else "-"
        guards = str(row.guards) if row.guards is not None else "-"
        best_t = best[1] if best else None
        lines.append(
            "| "
            + " | ".join(
                [row.variant, *cells, guards, kernel, overhead, _ratio(best_t, bf16_best), _ratio(best_t, floor_best)]
            )
            + " |"
        )
    fastest = block.fastest()
    if fastest:
        row, mode, t = fastest
        versus = f", {t / bf16_best:.2f}x bf16's best" if bf16_best else ""
        lines += ["", f"Fastest: **{row.variant}, {MODE_TITLES[mode]}**: {_num(t)} {block.unit}{versus}."]
    lines += [f"Note: {note}" for note in block.notes]
    lines += [f"Note: {row.variant}: {row.note}" for row in block.rows if row.note]
    return "\n".join(lines)


def format_report(blocks: list[Block], meta: dict) -> str:
    """The whole report: a header line with the setup, then one table per block."""
    header = (
        f"unwrap overhead report: torch {meta['torch']}, {meta['threads']} thread(s), batch 1, "
        f"minimum of repeated timings"
    )
    return "\n\n".join([header, *(format_block(b) for b in blocks)]) + "\n"


def to_json(blocks: list[Block], meta: dict) -> dict:
    """The report as plain data (documented in the README)."""
    out = []
    for block in blocks:
        rows = []
        for row in block.rows:
            best = row.best()
            rows.append({**asdict(row), "best_mode": best[0] if best else None, "best": best[1] if best else None})
        fastest = block.fastest()
        out.append(
            {
                "workload": block.workload,
                "format": block.format,
                "unit": block.unit,
                "modes": list(block.modes),
                "rows": rows,
                "notes": block.notes,
                "prefill_tokens": block.prefill_tokens,
                "fastest": None
                if not fastest
                else {"variant": fastest[0].variant, "mode": fastest[1], "time": fastest[2]},
            }
        )
    return {"meta": meta, "blocks": out}


def write_json(path: str, blocks: list[Block], meta: dict) -> None:
    with open(path, "w") as f:
        json.dump(to_json(blocks, meta), f, indent=2, allow_nan=False)


def write_plot(path: str, blocks: list[Block]) -> None:
    """A PNG bar chart: one panel per block, bars per variant and mode (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise SystemExit(
            "--plot needs matplotlib, an optional extra: pip install 'unwrap[plot]' (or pip install matplotlib)"
        ) from error
    fig, axes = plt.subplots(len(blocks), 1, figsize=(10, 3.2 * len(blocks)), squeeze=False)
    for ax, block in zip(axes[:, 0], blocks):
        width = 0.8 / len(block.modes)
        for i, mode in enumerate(block.modes):
            values = [row.times.get(mode) or math.nan for row in block.rows]
            ax.bar([j + i * width for j in range(len(block.rows))], values, width, label=MODE_TITLES[mode])
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(block.rows))], [r.variant for r in block.rows])
        ax.set_title(f"{block.workload}, {block.format}")
        ax.set_ylabel(f"{block.unit} (log scale)")
        ax.set_yscale("log")  # bf16 and the quantized rows differ by up to 10x
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path)


def run_report(
    fmts: list[str], *, quick: bool, llm: list[str], progress: Callable[[str], None], workloads: list[str] | None = None
) -> list[Block]:
    """Measure the built-in workloads (W2, W1; default all) in every mode, then the LLMs, per format."""
    blocks = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # compile/export chatter; quantize_'s notes are kept per block
        for workload in sorted(WORKLOADS if workloads is None else workloads, reverse=True):  # W2 first
            for fmt in fmts:
                blocks.append(measure_workload(workload, fmt, MODES, quick=quick, progress=progress))
        for name in llm:
            blocks.extend(measure_llm(name, fmts, quick=quick, progress=progress))
    return blocks
