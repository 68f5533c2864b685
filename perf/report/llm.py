"""The report's transformers models: next-token ms/token and time to first token of bf16, the floor,
ours (and torchao), eager, compiled and ``compile_for_decode``; for SmolLM2 also its quality."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..harness import decode
from ..harness.decode import Decoder, time_tokens
from ..harness.models import QWEN2_SHAPES, build_llm, config, qwen2_variants
from ..harness.timing import interleaved_min
from ..modes import torchao_available, torchao_model
from .blocks import Block, Row
from .quality import quality_notes

# Prompt length of the time-to-first-token columns, per LLM (LLMs not named here: not measured).
PREFILL_TOKENS: dict[str, int] = {"Qwen2 0.5B": 512, "SmolLM2 135M": 512}
LLM_MODES = ("eager", "compiled", "decode")
DECODE_VARIANTS = ("bf16", "ours unwrapped")  # rows with a "decode" (compile_for_decode) column


def decode_decoder(model: torch.nn.Module) -> Decoder:
    """A ``Decoder`` of ``compile_for_decode`` (``harness.decode``'s "decode" mode: grouped-KV attention,
    fused int4 projections, frozen, module guards skipped) on a copy of ``model``, with the report's
    cache size. Compiled now."""
    decoder = Decoder.for_mode(model, "decode")
    decoder.next()
    return decoder


def measure_llm(
    name: str, fmts: list[str], *, quick: bool, progress: Callable[[str], None], prefill_tokens: int | None = None
) -> list[Block]:
    """Next-token ms/token of a transformers LLM (a Qwen2 with random weights, or SmolLM2 with its
    real weights and then also perplexity, weight bytes and a greedy sample; greedy, static KV cache),
    eager and compiled, for bf16 and, per format, the floor and ours (wrapped: eager only; unwrapped:
    both). All decoders of a format are built and compiled first, then timed interleaved.

    With ``prefill_tokens`` (default ``PREFILL_TOKENS.get(name)``), also the time to first token of
    a prompt that long (prefill into an empty static cache, greedy first token), eager for every
    row, compiled (a compile of its own for that length, apart from the decode step's) for bf16,
    ours unwrapped and torchao, timed interleaved after the decoders."""
    if prefill_tokens is None:
        prefill_tokens = PREFILL_TOKENS.get(name)
    progress(f"{name}: " + ("building (random weights)" if name in QWEN2_SHAPES else "loading the real checkpoint"))
    bf16, tokenizer = build_llm(name)
    small = tokenizer is None and QWEN2_SHAPES[name]["hidden_size"] <= 256
    rounds, tokens = (3, 4) if quick else ((30, 8) if small else (7, 4))  # small: ~2 ms a token
    prefill_rounds = 2 if quick else 3
    guard_counts: dict[str, list[int]] = {}

    def decoders(variant: str, model: torch.nn.Module, row: Row, compiled_too: bool) -> dict[tuple[str, str], Decoder]:
        out = {(variant, "eager"): Decoder(model)}
        row.times["compiled"] = row.times["decode"] = None
        if compiled_too:
            progress(f"{name}: {variant}, compiling")
            guard_counts[variant] = []
            out[(variant, "compiled")] = Decoder.for_mode(model, "compiled", counts=guard_counts[variant])
            out[(variant, "compiled")].next()  # compiles now
        if variant in DECODE_VARIANTS:  # the recommended way (docs/decoding.md), on a copy: it switches attention
            progress(f"{name}: {variant}, compiling for decode")
            out[(variant, "decode")] = decode_decoder(model)
        return out

    def prefills(variant: str, model: torch.nn.Module, compiled_too: bool) -> dict[tuple[str, str], Decoder]:
        """Decoders whose ``reset`` is one timed prefill (the constructor's is the warm-up)."""
        if not prefill_tokens:
            return {}
        progress(f"{name}: {variant}, {prefill_tokens}-token prefill" + (", compiling" if compiled_too else ""))
        out = {(variant, "eager"): Decoder(model, max_len=prefill_tokens, prompt_len=prefill_tokens)}
        if compiled_too:
            prefill = decode.compile_forward(model, [])
            out[(variant, "compiled")] = Decoder(
                model, max_len=prefill_tokens, prompt_len=prefill_tokens, prefill=prefill
            )
        return out

    quality_cache: dict[str, tuple[float, int, str]] = {}
    bf16_row = Row("bf16")
    bf16_decoders = decoders("bf16", bf16, bf16_row, True)
    bf16_prefills = prefills("bf16", bf16, True)
    blocks = []
    for fmt in fmts:
        # a real model gets the library's default config (int4: groups of 32); the random-weight
        # Qwen2 shapes keep the report's group 128 (numbers comparable with earlier runs)
        variants, notes = qwen2_variants(bf16, fmt, config(fmt) if tokenizer is not None else None)
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
        best = time_tokens(all_decoders, rounds=rounds, tokens=tokens)
        ttft: dict[tuple[str, str], float] = {}
        if all_prefills:
            progress(f"{name} {fmt}: timing {len(all_prefills)} prefills of {prefill_tokens} tokens, interleaved")
            seconds = interleaved_min({key: d.reset for key, d in all_prefills.items()}, rounds=prefill_rounds)
            ttft = {key: s * 1e3 for key, s in seconds.items()}
        for row in block.rows:
            row.times.update({mode: best[(row.variant, mode)] for mode in block.modes if (row.variant, mode) in best})
            if row.variant in guard_counts:
                row.guards = sum(guard_counts[row.variant])
            if block.prefill_tokens:
                row.ttft = {mode: ttft.get((row.variant, mode)) for mode in block.modes if mode != "decode"}
        blocks.append(block)
        del variants, all_decoders, all_prefills
    return blocks


__all__ = ["DECODE_VARIANTS", "LLM_MODES", "PREFILL_TOKENS", "decode_decoder", "measure_llm"]
