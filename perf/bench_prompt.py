"""``python -m perf.bench_prompt``: SmolLM2-135M time to first token of a long prompt, ms: bf16, ours
(default int4, ``compile_for_decode``'s prompt pass) with the prefill GEMMs in each compute dtype
(``UNWRAP_PREFILL_DTYPE``: ``model`` = the activation's bf16, ``float32``), and llama.cpp on the same
GGUF when llama-cpp-python is importable. One process, interleaved rounds, minimum per engine.
"""

from __future__ import annotations

import argparse
import os
import warnings
from collections.abc import Callable
from unittest import mock

import torch

from subclasses.decode import compile_for_decode
from subclasses.kernels.compute_dtype import ENV_OVERRIDE, describe_prefill

from .harness.decode import Decoder
from .harness.tables import machine, markdown_table
from .harness.timing import interleaved_min


def with_prefill_dtype(choice: str, fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` run with ``UNWRAP_PREFILL_DTYPE=choice`` (read per call by the eager prefill)."""
    return mock.patch.dict(os.environ, {ENV_OVERRIDE: choice})(fn)


def measure(threads: int, prompt_len: int, rounds: int) -> dict[str, float]:
    """{engine: ms to the first token of a ``prompt_len``-token prompt}, interleaved."""
    from .decode_profile import build_model
    from .llama_cpp import LlamaDecoder, available, prompt_tokens
    from .real_model import smollm2_gguf_path

    torch.set_num_threads(threads)
    max_len = prompt_len + 8
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bf16 = Decoder(build_model("smollm2", "bf16"), max_len=max_len, prompt_len=prompt_len)
        ours = Decoder.of(compile_for_decode(build_model("smollm2", "int4"), max_len), prompt_len=prompt_len)
    engines: dict[str, Callable[[], object]] = {
        "bf16 eager": bf16.reset,
        "ours, prefill GEMMs in bf16": with_prefill_dtype("model", ours.reset),
        "ours, prefill GEMMs in fp32": with_prefill_dtype("float32", ours.reset),
    }
    source = smollm2_gguf_path()
    if available() and source is not None:
        llama = LlamaDecoder(source, threads=threads, prompt=prompt_tokens(source, prompt_len), max_len=max_len)
        engines["llama.cpp (shipped Q4_1 GGUF)"] = llama.reset
        from .llama_cpp import build_line

        print(build_line())
    seconds = interleaved_min(engines, rounds=rounds, warmup=1)
    return {name: s * 1e3 for name, s in seconds.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perf.bench_prompt", description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=512, help="prompt tokens")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    times = measure(args.threads, args.prompt, args.rounds)
    base = times["ours, prefill GEMMs in fp32"]
    print(f"{machine()}, {args.threads} threads, torch {torch.__version__}; {describe_prefill(torch.bfloat16)}")
    print(
        markdown_table(
            [f"engine ({args.prompt}-token prompt)", "ms to first token", "ratio to ours fp32"],
            [[name, f"{ms:.0f}", f"{ms / base:.2f}"] for name, ms in times.items()],
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
