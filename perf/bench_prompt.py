"""``python -m perf.bench_prompt``: time to first token of a long prompt, ms: bf16, ours (default int4,
``compile_for_decode``'s prompt pass) with the prefill GEMMs as this CPU chooses them (``auto``: the AVX2
integer GEMM where it runs) and in each compute dtype (``UNWRAP_PREFILL_DTYPE``: ``model`` = the
activation's bf16, ``float32``), and llama.cpp on the same weights when llama-cpp-python is importable.
One process, interleaved rounds, minimum per engine.

``--model smollm2`` (SmolLM2-135M, llama.cpp ``--types`` from its shipped Q4_1 file) or ``--model qwen2``
(Qwen2.5-0.5B's shapes, random weights converted by llama.cpp's converter, ``perf.same_weights``; ours
in fp32 only: a bf16 prompt of that size takes minutes on a CPU without native bf16).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import warnings
from collections.abc import Callable
from unittest import mock

import torch

from subclasses.decode import compile_for_decode
from subclasses.kernels.compute_dtype import ENV_OVERRIDE, describe_prefill, native_half_precision, prefill_int8

from .decode_vs_llama import PEER_MODELS, model_and_peer_source, peer_types
from .harness.decode import Decoder
from .harness.tables import machine, markdown_table
from .harness.timing import interleaved_min


def with_prefill_dtype(choice: str, fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` run with ``UNWRAP_PREFILL_DTYPE=choice`` (read per call by the eager prefill)."""
    return mock.patch.dict(os.environ, {ENV_OVERRIDE: choice})(fn)


def measure(
    threads: int, prompt_len: int, rounds: int, *, model: str = "smollm2", types: tuple[str, ...] = ("Q4_1",)
) -> dict[str, float]:
    """{engine: ms to the first token of a ``prompt_len``-token prompt}, interleaved. ``model``: a key
    of ``perf.decode_vs_llama.PEER_MODELS``; ``types``: llama.cpp's, when it is importable."""
    from .harness.models import quantized
    from .llama_cpp import SHIPPED, LlamaDecoder, available, build_line, gguf_files, prompt_tokens

    torch.set_num_threads(threads)
    max_len = prompt_len + 8
    with contextlib.ExitStack() as stack:
        bf16_model, source = stack.enter_context(model_and_peer_source(model))
        paths = stack.enter_context(gguf_files(source, list(types))) if available() else {}
        # bf16 prompts only at SmolLM2's size: at 0.5B they take minutes on a CPU without native bf16
        with_bf16 = model == "smollm2"
        engines: dict[str, Callable[[], object]] = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if with_bf16:
                engines["bf16 eager"] = Decoder(copy.deepcopy(bf16_model), max_len=max_len, prompt_len=prompt_len).reset
            ours = Decoder.of(compile_for_decode(quantized(bf16_model, "int4"), max_len), prompt_len=prompt_len)
        if prefill_int8(torch.bfloat16):
            engines["ours, prefill GEMMs in int8 x int4"] = with_prefill_dtype("auto", ours.reset)
        if with_bf16 and native_half_precision():  # else ~65x slower than fp32 (docs/results.md): not timed
            engines["ours, prefill GEMMs in bf16"] = with_prefill_dtype("model", ours.reset)
        engines["ours, prefill GEMMs in fp32"] = with_prefill_dtype("float32", ours.reset)
        if paths:
            print(build_line())
            prompt = prompt_tokens(source, prompt_len)
        for ggml_type, path in paths.items():
            llama = LlamaDecoder(path, threads=threads, prompt=prompt, max_len=max_len)
            engines[f"llama.cpp {ggml_type}" + (" (shipped GGUF)" if ggml_type == SHIPPED else "")] = llama.reset
        seconds = interleaved_min(engines, rounds=rounds, warmup=1)
    return {name: s * 1e3 for name, s in seconds.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perf.bench_prompt", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", choices=sorted(PEER_MODELS))
    parser.add_argument("--types", default=None, help="llama.cpp types, comma-separated (smollm2: Q4_1; qwen2: Q4_0)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=512, help="prompt tokens")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    try:
        types = peer_types(args.model, args.types or None)
    except ValueError as error:
        parser.error(str(error))
    times = measure(args.threads, args.prompt, args.rounds, model=args.model, types=tuple(types))
    peers = [name for name in times if name.startswith("llama.cpp")]
    base_name = peers[0] if peers else "ours, prefill GEMMs in fp32"
    base = times[base_name]
    print(f"{machine()}, {args.threads} threads, torch {torch.__version__}; {describe_prefill(torch.bfloat16)}")
    print(
        markdown_table(
            [
                f"engine ({PEER_MODELS[args.model]}, {args.prompt}-token prompt)",
                "ms to first token",
                f"ratio to {base_name}",
            ],
            [[name, f"{ms:.0f}", f"{ms / base:.2f}"] for name, ms in times.items()],
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
