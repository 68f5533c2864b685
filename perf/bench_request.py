"""``python -m perf.bench_request``: one whole request in seconds, a ``--prompt``-token prompt (1024) and then
``--new`` greedy tokens (128): ours (default int4, ``compile_for_decode``: its prompt pass, then its compiled
step) against llama.cpp on the same weights (``perf.same_weights``). One process, interleaved rounds, the
minimum per engine. The default model is Qwen2.5-0.5B's shapes, the workload the library was started for.
"""

from __future__ import annotations

import argparse
import contextlib
import warnings
from collections.abc import Callable

import torch

from subclasses.decode import compile_for_decode
from subclasses.kernels.compute_dtype import describe_prefill

from .decode_vs_llama import PEER_MODELS, model_and_peer_source, peer_types
from .harness.decode import Decoder, Stepper
from .harness.tables import machine, markdown_table
from .harness.timing import interleaved_min


def whole_request(decoder: Stepper, new_tokens: int) -> Callable[[], None]:
    """One request on ``decoder``: the prompt (its first new token), then ``new_tokens - 1`` steps."""

    def run() -> None:
        decoder.reset()
        for _ in range(new_tokens - 1):
            decoder.next()

    return run


def measure(
    threads: int,
    prompt_len: int,
    new_tokens: int,
    rounds: int,
    *,
    model: str = "qwen2",
    types: tuple[str, ...] = ("Q4_0",),
) -> dict[str, float]:
    """{engine: seconds for the whole request}, interleaved; llama.cpp's ``types`` when it is importable."""
    from .harness.models import quantized
    from .llama_cpp import SHIPPED, LlamaDecoder, available, build_line, gguf_files, prompt_tokens

    torch.set_num_threads(threads)
    max_len = prompt_len + new_tokens + 8
    with contextlib.ExitStack() as stack:
        bf16_model, source = stack.enter_context(model_and_peer_source(model))
        paths = stack.enter_context(gguf_files(source, list(types))) if available() else {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ours = Decoder.of(compile_for_decode(quantized(bf16_model, "int4"), max_len), prompt_len=prompt_len)
        engines: dict[str, Callable[[], object]] = {"ours (compile_for_decode)": whole_request(ours, new_tokens)}
        if paths:
            print(build_line())
            prompt = prompt_tokens(source, prompt_len)
        for ggml_type, path in paths.items():
            llama = LlamaDecoder(path, threads=threads, prompt=prompt, max_len=max_len)
            name = f"llama.cpp {ggml_type}" + (" (shipped GGUF)" if ggml_type == SHIPPED else "")
            engines[name] = whole_request(llama, new_tokens)
        return interleaved_min(engines, rounds=rounds, warmup=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perf.bench_request", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen2", choices=sorted(PEER_MODELS))
    parser.add_argument("--types", default=None, help="llama.cpp types, comma-separated (qwen2: Q4_0; smollm2: Q4_1)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=1024, help="prompt tokens")
    parser.add_argument("--new", type=int, default=128, help="new tokens")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    if min(args.threads, args.prompt, args.new, args.rounds) < 1:
        parser.error(
            f"--threads, --prompt, --new, --rounds must be positive, got {args.threads}, {args.prompt}, "
            f"{args.new}, {args.rounds}"
        )
    try:
        types = peer_types(args.model, args.types or None)
    except ValueError as error:
        parser.error(str(error))
    seconds = measure(args.threads, args.prompt, args.new, args.rounds, model=args.model, types=tuple(types))
    peers = [name for name in seconds if name.startswith("llama.cpp")]
    base_name = peers[0] if peers else next(iter(seconds))
    print(f"{machine()}, {args.threads} threads, torch {torch.__version__}; {describe_prefill(torch.bfloat16)}")
    header = f"engine ({PEER_MODELS[args.model]}, {args.prompt}-token prompt + {args.new} new tokens)"
    rows = [[name, f"{s:.2f}", f"{s / seconds[base_name]:.2f}"] for name, s in seconds.items()]
    print(markdown_table([header, "seconds", f"ratio to {base_name}"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
