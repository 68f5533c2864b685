"""``python -m perf.bench_generate``: SmolLM2-135M int4, ms per new token of one whole generation
(a short prompt, then ``--new`` tokens; eos ignored so every engine makes all of them), four ways:
``GreedyDecoder.generate``; ``model.generate(custom_generate=decoder)`` greedy; the same sampling
(temperature 0.7, top-p 0.9, a ``TextStreamer`` into a null sink); transformers' own ``generate``
with a static cache (eager on CPU: it compiles on accelerators only). One process, interleaved
rounds, minimum per engine; greedy tokens of the first two are checked equal.
"""

from __future__ import annotations

import argparse
import copy
import warnings
from collections.abc import Callable
from typing import Any

import torch

from subclasses.decode import compile_for_decode

from .harness.models import build_llm, quantized
from .harness.tables import machine, markdown_table
from .harness.timing import Progress, interleaved_min

PROMPT = "The three primary colors are"


def null_streamer(tokenizer: Any) -> Any:
    """A ``TextStreamer`` that decodes every token as usual and prints nothing."""
    from transformers import TextStreamer

    class NullStreamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            pass

    return NullStreamer(tokenizer, skip_prompt=True)


def engines(new: int, progress: Callable[[str], None]) -> tuple[dict[str, Callable[[], torch.Tensor]], list[str]]:
    """{engine: a call that generates ``new`` tokens after the prompt}, and notes (token checks)."""
    bf16, tokenizer = build_llm("SmolLM2 135M")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain: Any = quantized(bf16, "int4")  # a transformers model
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    decoder = compile_for_decode(copy.deepcopy(plain), max_len=ids.shape[1] + new)
    model: Any = decoder.model
    common: dict[str, Any] = {"max_new_tokens": new, "eos_token_id": None, "pad_token_id": tokenizer.eos_token_id}
    calls: dict[str, Callable[[], torch.Tensor]] = {
        "GreedyDecoder.generate": lambda: decoder.generate(ids, new),
        "generate(custom_generate=decoder), greedy": lambda: model.generate(
            ids, do_sample=False, custom_generate=decoder, **common
        ),
        "generate(custom_generate=decoder), sampling + TextStreamer": lambda: model.generate(
            ids,
            do_sample=True,
            temperature=0.7,
            top_p=0.9,
            custom_generate=decoder,
            streamer=null_streamer(tokenizer),
            **common,
        ),
        "transformers generate, static cache": lambda: plain.generate(
            ids, do_sample=False, cache_implementation="static", **common
        ),
    }
    progress("compiling the decode step (first calls)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = {name: call() for name, call in calls.items()}
    greedy, through = first["GreedyDecoder.generate"], first["generate(custom_generate=decoder), greedy"]
    notes = [
        f"greedy tokens through generate equal GreedyDecoder's: {through.tolist() == greedy.tolist()}",
        f"transformers' static-cache greedy tokens equal them: {first['transformers generate, static cache'].tolist() == greedy.tolist()}",
        f"each call: {ids.shape[1]}-token prompt + {new} new tokens",
    ]
    return calls, notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perf.bench_generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new", type=int, default=64, help="new tokens per generation")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    progress = Progress()
    calls, notes = engines(args.new, progress)
    progress(f"timing {len(calls)} engines, {args.rounds} interleaved rounds")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        seconds = interleaved_min(calls, rounds=args.rounds, warmup=1)
    ms = {name: s * 1e3 / args.new for name, s in seconds.items()}
    base = ms["GreedyDecoder.generate"]
    print(f"{machine()}, {args.threads} threads, torch {torch.__version__}; " + "; ".join(notes))
    print(
        markdown_table(
            ["engine (SmolLM2-135M int4)", "ms/token", "ratio to GreedyDecoder"],
            [[name, f"{value:.2f}", f"{value / base:.3f}"] for name, value in ms.items()],
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
