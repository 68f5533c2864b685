"""``python -m perf.bench_generate``: SmolLM2-135M int4, ms per new token of one whole generation
(a short prompt, then ``--new`` tokens; eos ignored so every engine makes all of them), four ways:
``GreedyDecoder.generate``; ``model.generate(custom_generate=decoder)`` greedy; the same sampling
(temperature 0.7, top-p 0.9, a ``TextStreamer`` into a null sink); transformers' own ``generate``
with a static cache (eager on CPU: it compiles on accelerators only). One process, interleaved
rounds, minimum per engine; greedy tokens of the first two are checked equal.

``--prompt-lookup K``: SmolLM2-135M int4 on a paragraph and an instruction to rewrite it (the answer
copies most of it): tokens/s of ``generate(custom_generate=decoder)`` greedy without and with
``prompt_lookup_num_tokens=K``, the draft tokens accepted per verification, and whether the tokens are
equal (else where they part and the plain run's top-2 gap there).

``--batch 4 [--peer]``: Qwen2.5-0.5B's shapes (random weights), int4: tokens/s of ``--batch`` left-padded
prompts of different lengths through ``generate(custom_generate=decoder)`` against one prompt
through ``GreedyDecoder.generate``, and each row's greedy tokens against its prompt decoded alone;
``--peer``: llama.cpp Q4_0 of the same weights decoding the same prompts at batch 1 and ``--batch``
(its batched API, ``perf.llama_cpp.LlamaBatch``), interleaved with ours.
"""

from __future__ import annotations

import argparse
import contextlib
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
PARAGRAPH = (
    "The lighthouse stood at the edge of the cliff for more than two hundred years. Every night its keeper climbed "
    "the narrow spiral staircase, trimmed the wick, and polished the great lens until it shone. Ships passing in the "
    "dark relied on its steady beam to find their way around the rocks, and the villagers below set their clocks by "
    "the moment it was lit."
)
EDIT_PROMPT = PARAGRAPH + '\n\nRewrite the paragraph above, replacing the word "lighthouse" with "tower":\n\n'


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


def batch_engines(
    batch: int, new: int, peer: contextlib.ExitStack | None = None
) -> tuple[dict[str, Callable[[], Any]], list[str]]:
    """{"batch 1": GreedyDecoder on the longest prompt, "batch N": N left-padded prompts through
    generate}, and a note per row on its tokens against the prompt decoded alone. With ``peer`` (an
    open ``ExitStack`` that keeps the files and the context until it closes), also llama.cpp Q4_0 of the
    same weights (converted by llama.cpp's converter before ours are quantized) decoding the same prompts
    at batch 1 and N (``LlamaBatch``)."""
    bf16 = build_llm("Qwen2 0.5B")[0]
    peer_path = None
    if peer is not None:
        from .llama_cpp import gguf_files
        from .same_weights import same_weights_gguf

        peer_path = peer.enter_context(gguf_files(peer.enter_context(same_weights_gguf(bf16)), ["Q4_0"]))["Q4_0"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain: Any = quantized(bf16, "int4")
    generator = torch.Generator().manual_seed(0)
    lengths = [5 + 3 * row for row in range(batch)]
    prompts = [torch.randint(3, plain.config.vocab_size, (n,), generator=generator) for n in lengths]
    longest = max(lengths)
    ids = torch.zeros(batch, longest, dtype=torch.long)  # pad id 0, on the left
    mask = torch.zeros(batch, longest, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt) :], mask[row, longest - len(prompt) :] = prompt, 1
    slots = longest + new  # every call below sizes its cache to this: one compiled step per batch size
    decoder = compile_for_decode(plain, max_len=slots)
    common: dict[str, Any] = {"do_sample": False, "eos_token_id": None, "pad_token_id": 0, "custom_generate": decoder}
    calls: dict[str, Callable[[], Any]] = {
        "batch 1 (GreedyDecoder.generate)": lambda: decoder.generate(prompts[-1][None], new),
        f"batch {batch} (generate, left-padded)": lambda: plain.generate(
            ids, attention_mask=mask, max_new_tokens=new, **common
        ),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        together = calls[f"batch {batch} (generate, left-padded)"]()[:, longest:]
        notes = []
        for row, prompt in enumerate(prompts):
            alone = plain.generate(
                prompt[None],
                max_new_tokens=slots - len(prompt),
                return_dict_in_generate=True,
                output_logits=True,
                **common,
            )
            mine, theirs = together[row].tolist(), alone.sequences[0, len(prompt) : len(prompt) + new].tolist()
            first = next((j for j in range(new) if mine[j] != theirs[j]), new)
            note = f"row {row} ({len(prompt)} tokens): {first}/{new} equal"
            if first < new:  # M = batch and M = 1 GEMMs round differently: a near-tie may flip
                top = alone.logits[first][0].float().topk(2).values
                gap, ulp = float(top[0] - top[1]), 2.0**-8 * abs(float(top[0]))
                note += f", then top-2 gap {gap:.4f} ({gap / ulp:.1f} bf16 ulps of the top logit)"
            notes.append(note)
    if peer is not None and peer_path is not None:
        from .llama_cpp import LlamaBatch

        rows = [prompt.tolist() for prompt in prompts]
        per_sequence = -(-slots // 256) * 256  # llama.cpp splits its context evenly between the sequences
        llama = LlamaBatch(peer_path, threads=torch.get_num_threads(), sequences=batch, n_ctx=batch * per_sequence)
        peer.callback(llama.close)
        calls["llama.cpp Q4_0, batch 1"] = lambda: llama.generate(rows[-1:], new)
        calls[f"llama.cpp Q4_0, batch {batch}"] = lambda: llama.generate(rows, new)
    return calls, notes


class StepWidths:
    """A decoder's step, recording how many tokens each call feeds."""

    def __init__(self, step: Callable[..., Any]) -> None:
        self.step = step
        self.widths: list[int] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.widths.append(args[0].shape[1])
        return self.step(*args, **kwargs)


def lookup_engines(k: int, new: int, progress: Callable[[str], None]) -> tuple[dict[str, Callable[[], Any]], list[str]]:
    """{"plain": greedy generate through the decoder, "lookup": the same with prompt lookup} on
    ``EDIT_PROMPT``, and notes: tokens equal, verifications and draft tokens accepted per one."""
    bf16, tokenizer = build_llm("SmolLM2 135M")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain: Any = quantized(bf16, "int4")
    ids = tokenizer(EDIT_PROMPT, return_tensors="pt").input_ids
    decoder = compile_for_decode(plain, max_len=ids.shape[1] + new)
    common: dict[str, Any] = {
        "max_new_tokens": new,
        "do_sample": False,
        "eos_token_id": None,
        "pad_token_id": tokenizer.eos_token_id,
        "custom_generate": decoder,
    }
    names = ("generate(custom_generate=decoder), greedy", f"the same, prompt_lookup_num_tokens={k}")
    calls: dict[str, Callable[[], Any]] = {
        names[0]: lambda: plain.generate(ids, **common),
        names[1]: lambda: plain.generate(ids, prompt_lookup_num_tokens=k, **common),
    }
    progress("compiling the decode step and the verification (first calls)")
    step = decoder.step
    decoder.step = widths = StepWidths(step)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = plain.generate(ids, return_dict_in_generate=True, output_logits=True, **common)
        widths.widths.clear()
        lookup = calls[names[1]]()
    decoder.step = step
    mine, theirs = lookup[0, ids.shape[1] :].tolist(), reference.sequences[0, ids.shape[1] :].tolist()
    first = next((j for j in range(new) if mine[j] != theirs[j]), new)
    equal = f"tokens equal: {first == new}"
    if first < new:  # the verification's int4 GEMM rounds differently from the GEMV: a near-tie may flip
        top = reference.logits[first][0].float().topk(2).values
        equal += f" (the first {first} of {new}; then the plain run's top-2 gap {float(top[0] - top[1]):.4f})"
    verifications, singles = widths.widths.count(k + 1), widths.widths.count(1)
    accepted = new - 1 - singles - verifications  # each forward makes its accepted drafts + 1 token
    notes = [
        equal,
        f"{verifications} verifications, {accepted / max(verifications, 1):.2f} draft tokens accepted per one, "
        f"{singles} one-token steps",
        f"each call: {ids.shape[1]}-token prompt + {new} new tokens",
    ]
    return calls, notes


def main_lookup(args: argparse.Namespace) -> int:
    """``--prompt-lookup K``: tokens/s without and with prompt lookup, and the notes on its tokens."""
    progress = Progress()
    calls, notes = lookup_engines(args.prompt_lookup, args.new, progress)
    progress(f"timing {len(calls)} engines, {args.rounds} interleaved rounds")
    rates = {name: args.new / s for name, s in timed(calls, args.rounds).items()}
    base = next(iter(rates.values()))
    head = ["engine (SmolLM2-135M int4, rewrite a paragraph)", "new tokens/s", "ratio to plain"]
    show(args, notes, head, [[name, f"{rate:.1f}", f"{rate / base:.2f}"] for name, rate in rates.items()])
    return 0


def main_batch(args: argparse.Namespace) -> int:
    """``--batch``: tokens/s of the batch against batch 1, and the rows' token checks (``--peer``: and
    llama.cpp's, interleaved with ours)."""
    notes: list[str] = []
    with contextlib.ExitStack() as stack:
        if args.peer:
            from .llama_cpp import available, build_line

            if not available():
                print("--peer needs llama-cpp-python: `make llama`")
                return 2
            notes.append(build_line())
        calls, rows_notes = batch_engines(args.batch, args.new, stack if args.peer else None)
        seconds = timed(calls, args.rounds)
    rates = {name: (args.batch if f"batch {args.batch}" in name else 1) * args.new / s for name, s in seconds.items()}
    # each engine's own batch 1 (ours: GreedyDecoder; llama.cpp: one sequence), the first of its rows
    engine = {name: name.startswith("llama.cpp") for name in rates}
    bases = {name: next(rates[other] for other in rates if engine[other] == engine[name]) for name in rates}
    head = ["engine (Qwen2.5-0.5B shapes, int4)", "new tokens/s", "ratio to its batch 1"]
    show(
        args,
        notes + rows_notes,
        head,
        [[name, f"{rate:.1f}", f"{rate / bases[name]:.2f}"] for name, rate in rates.items()],
    )
    return 0


def timed(calls: dict[str, Callable[[], Any]], rounds: int) -> dict[str, float]:
    """Seconds per call of each engine: the minimum over ``rounds`` interleaved rounds."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return interleaved_min(calls, rounds=rounds, warmup=1)


def show(args: argparse.Namespace, notes: list[str], head: list[str], rows: list[list[str]]) -> None:
    """Print the setup and ``notes`` on one line, then the table."""
    print(f"{machine()}, {args.threads} threads, torch {torch.__version__}; " + "; ".join(notes))
    print(markdown_table(head, rows))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perf.bench_generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new", type=int, default=64, help="new tokens per generation")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1, help="above 1: the batched Qwen2 comparison instead")
    parser.add_argument("--peer", action="store_true", help="with --batch: llama.cpp's batched decode too")
    parser.add_argument(
        "--prompt-lookup", type=int, default=0, metavar="K", help="above 0: greedy with and without prompt lookup"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.prompt_lookup > 0:
        return main_lookup(args)
    if args.batch > 1:
        return main_batch(args)
    progress = Progress()
    calls, notes = engines(args.new, progress)
    progress(f"timing {len(calls)} engines, {args.rounds} interleaved rounds")
    ms = {name: s * 1e3 / args.new for name, s in timed(calls, args.rounds).items()}
    base = ms["GreedyDecoder.generate"]
    head = ["engine (SmolLM2-135M int4)", "ms/token", "ratio to GreedyDecoder"]
    show(args, notes, head, [[name, f"{value:.2f}", f"{value / base:.3f}"] for name, value in ms.items()])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
