"""The report's default run (``python -m perf``): the headline in minutes.

SmolLM2-135M with its real weights, greedy: decode ms/token and the time to the first token of a
512-token prompt for bf16 as transformers runs it (eager), ours the recommended way (default int4,
``unwrap``, ``compile_for_decode``; its prompt pass is eager), torchao's CPU int4 (eager) and llama.cpp
on the shipped GGUF when the ``llama`` extra is installed; then one synthetic overhead table (W1: eight
256x256 int4 linears at batch 1, where host work is most of the time) against the floor.
Everything else is behind ``--full`` and ``--only``.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..harness.decode import Decoder, Stepper, time_tokens
from ..harness.models import build_llm, quantized
from ..harness.timing import interleaved_min
from ..modes import torchao_available, torchao_model
from .blocks import HEADLINE_MODE as MODE
from .blocks import Block, Row
from .synthetic import measure_workload

MODEL = "SmolLM2 135M"
PROMPT_TOKENS = 512
DECODE_PROMPT_TOKENS = 8
DECODE_SLOTS = 256  # the static cache --full decodes in (harness.decode.Decoder's default)
OVERHEAD_WORKLOAD = "W1 8x256"
OVERHEAD_VARIANTS = ("floor", "ours wrapped", "ours unwrapped")
OVERHEAD_MODES = ("eager", "compiled")

# Seconds each step took on a 2-core AVX2 machine (AMD EPYC, torch 2.13): the start-up estimate.
ESTIMATE_S = {"load": 25, "bf16": 8, "ours": 70, "torchao": 25, "llama.cpp": 10, "timing": 45, "overhead": 15}


@dataclass(frozen=True)
class Engine:
    """A headline row: its name, how it runs, and two decoders of it (``reset``: a prompt, ``next``: a
    token): one whose prompt is the TTFT prompt, one that decodes from a short prompt in a cache as
    large as ``--full``'s (PyTorch's attention reads every slot of a static cache: a cache sized for
    the long prompt would slow its tokens down)."""

    name: str
    how: str
    prompt: Stepper
    tokens: Stepper


def plan(*, torchao: bool, llama: bool) -> list[str]:
    """The steps the headline runs, in order (keys of ``ESTIMATE_S``)."""
    steps = ["load", "bf16", "ours"] + ["torchao"] * torchao + ["llama.cpp"] * llama
    return [*steps, "timing", "overhead"]


def estimate_s(steps: list[str]) -> float:
    return float(sum(ESTIMATE_S[step] for step in steps))


def llama_engine() -> Engine:
    """llama.cpp on the shipped Q4_1 GGUF (SmolLM2's own file), the same prompt's tokens."""
    from ..llama_cpp import LlamaDecoder, prompt_tokens
    from ..real_model import smollm2_gguf_path

    source = smollm2_gguf_path()
    assert source is not None  # load_smollm2 read it already
    threads, prompt = torch.get_num_threads(), prompt_tokens(source, PROMPT_TOKENS)
    return Engine(
        "llama.cpp Q4_1",
        "llama-cpp-python, the shipped GGUF (build below)",
        LlamaDecoder(source, threads=threads, prompt=prompt, max_len=PROMPT_TOKENS + 8),
        LlamaDecoder(source, threads=threads, prompt=prompt[:DECODE_PROMPT_TOKENS], max_len=DECODE_SLOTS),
    )


def measure_headline(
    *, llama: bool, progress: Callable[[str], None], prompt_rounds: int = 3, rounds: int = 5, tokens: int = 8
) -> list[Block]:
    """The headline blocks: SmolLM2's engines (ms/token and time to first token, each row's one way of
    running under the ``"headline"`` key), then the synthetic overhead block."""

    def eager(model: torch.nn.Module) -> tuple[Decoder, Decoder]:
        # The prompt decoder's construction prefills the prompt once: the warm-up.
        return Decoder(model, max_len=PROMPT_TOKENS, prompt_len=PROMPT_TOKENS), Decoder(
            model, max_len=DECODE_SLOTS, prompt_len=DECODE_PROMPT_TOKENS
        )

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        progress(f"{MODEL}: loading the real checkpoint")
        bf16, _ = build_llm(MODEL)
        progress(f"{MODEL}: bf16, warming up a {PROMPT_TOKENS}-token prompt")
        engines = [Engine("bf16", "transformers eager", *eager(bf16))]
        progress(f"{MODEL}: ours, quantizing and compiling (compile_for_decode)")
        ours = Decoder.for_mode(quantized(copy.deepcopy(bf16), "int4"), "decode", max_len=DECODE_SLOTS)
        ours.next()  # compiles the step
        # compile_for_decode's prompt pass is its model's eager forward: the same model, a cache of its own.
        prompt = Decoder(ours.model, max_len=PROMPT_TOKENS, prompt_len=PROMPT_TOKENS)
        engines.append(Engine("ours", "default int4, unwrap, compile_for_decode", prompt, ours))
        if torchao_available():
            progress(f"{MODEL}: torchao int4, quantizing")
            how = "PrototypeInt4WeightOnlyConfig(group_size=128), eager"
            engines.append(Engine("torchao", how, *eager(torchao_model(bf16, "int4"))))
        llama_row = None
        if llama:
            progress(f"{MODEL}: llama.cpp, loading")
            llama_row = llama_engine()
            engines.append(llama_row)
    # llama.cpp is timed apart, as --full does: interleaved with PyTorch, each engine's OpenMP threads
    # spin-wait after its call and slow the other's next one (every row ~25 % slower, measured).
    ttft: dict[str, float] = {}
    decode: dict[str, float] = {}
    pytorch = [e for e in engines if e is not llama_row]
    for group in [pytorch, [llama_row]] if llama_row else [pytorch]:
        progress(f"{MODEL}: timing {len(group)} engine(s)' {PROMPT_TOKENS}-token prompts, interleaved")
        ttft |= interleaved_min({e.name: e.prompt.reset for e in group}, rounds=prompt_rounds, warmup=0)
        progress(f"{MODEL}: timing {len(group)} engine(s)' tokens, interleaved")
        decode |= time_tokens({e.name: e.tokens for e in group}, rounds=rounds, tokens=tokens)
    rows = [Row(e.name, {MODE: decode[e.name]}, note=e.how, ttft={MODE: ttft[e.name] * 1e3}) for e in engines]
    notes = [
        f"decode ms/token after a {DECODE_PROMPT_TOKENS}-token prompt in a {DECODE_SLOTS}-slot cache (as"
        f" --full's), {torch.get_num_threads()} thread(s); the first token's time in a cache of the prompt's size"
    ]
    if llama:
        from ..llama_cpp import BUSY_NOTE, build_line

        notes += [build_line(), BUSY_NOTE, "llama.cpp is timed after the PyTorch engines, not interleaved with them"]
    smollm2 = Block(MODEL, "int4", "ms/token", (MODE,), rows, notes, PROMPT_TOKENS)
    overhead = measure_workload(
        OVERHEAD_WORKLOAD, "int4", OVERHEAD_MODES, quick=False, progress=progress, variants=OVERHEAD_VARIANTS
    )
    return [smollm2, overhead]
