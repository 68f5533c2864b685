"""Greedy decoding as the benchmarks time it: the library's decode (``subclasses.decode``:
``GreedyDecoder``, ``compile_for_decode``, ``compile_decode_step``) run one token per call, in each of
the ways the benchmarks compare (``MODES``), and ms/token of several decoders timed interleaved."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import torch
from torch import nn

from subclasses.kernels.int4_gemv import greedy_tokens
from subclasses.runtime.decode import (
    GreedyDecoder,
    compile_decode_step,
    compile_for_decode,
    frozen_model_guards,
    step_tokens,
    use_gqa_decode_attention,
)

from .timing import K, counting_guards, fresh_caller, interleaved_min

# Mode name -> what it runs (docs/decoding.md explains each).
MODES: dict[str, str] = {
    "eager": "eager forward, transformers' SDPA",
    "compiled": "torch.compile(forward), transformers' SDPA (K/V expanded to every head)",
    "compiled+gqa": "torch.compile(forward, fullgraph), the decode attention of use_gqa_decode_attention",
    "decode": "compile_for_decode: fused q/k/v and gate/up GEMVs, decode attention over the filled slots, "
    "the one-token step an AOTInductor package (recommended)",
    "decode+dynamo": "the same step through torch.compile (fullgraph, module guards skipped, C++ wrapper; packaged=False)",
    "decode+python_wrapper": "the torch.compile step with Inductor's Python wrapper (cpp_wrapper=False)",
}


def compile_forward(model: nn.Module, counts: list[int]) -> Callable[..., Any]:
    """``torch.compile`` of ``model``'s forward as a transformers user would (the "compiled" mode; also a
    compiled prefill), on a code object of its own (``timing.fresh_caller``); ``counts`` receives the
    guard count of each compiled frame."""
    return torch.compile(fresh_caller(model), options={"guard_filter_fn": counting_guards(counts)})


class Stepper(Protocol):
    """What ``time_tokens`` times: a greedy decoder stepped one token at a time (ours, llama.cpp's)."""

    position: int
    max_len: int

    def reset(self) -> int: ...

    def next(self) -> int: ...


class Decoder:
    """A ``GreedyDecoder`` (the model, its ``StaticCache`` and its one-token ``step``) run one call at a
    time, so that each can be timed: ``reset`` empties the cache and prefills a fixed prompt through
    ``prefill`` (the model itself by default, or a compiled version: the time to first token), ``next``
    decodes one token through the step at the next cache position."""

    def __init__(
        self,
        model: nn.Module,
        step: Callable[..., Any] | None = None,
        *,
        max_len: int = 256,
        prompt_len: int = 8,
        prefill: Callable[..., Any] | None = None,
    ) -> None:
        self._start(GreedyDecoder(model, max_len, step), prompt_len, prefill)

    @classmethod
    def of(cls, greedy: GreedyDecoder, *, prompt_len: int = 8, prefill: Callable[..., Any] | None = None) -> Decoder:
        """A ``Decoder`` on a library decoder (e.g. ``compile_for_decode``'s): its model, cache and step."""
        decoder = cls.__new__(cls)
        decoder._start(greedy, prompt_len, prefill)
        return decoder

    @classmethod
    def for_mode(
        cls, model: nn.Module, mode: str, *, max_len: int = 256, counts: list[int] | None = None, prompt_len: int = 8
    ) -> Decoder:
        """``model`` decoded the way ``mode`` (a key of ``MODES``) says, after a ``prompt_len``-token
        prompt; ``counts`` receives the guard count of each compiled frame. Modes with the grouped-KV
        decode attention run on a copy of ``model`` (the attention implementation is per model). Not
        compiled yet: the first ``next`` is."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {tuple(MODES)}, got {mode!r}")
        counts = [] if counts is None else counts
        if mode == "eager":
            return cls(model, max_len=max_len, prompt_len=prompt_len)
        if mode == "compiled":
            return cls(model, compile_forward(model, counts), max_len=max_len, prompt_len=prompt_len)
        if mode == "compiled+gqa":
            gqa = use_gqa_decode_attention(copy.deepcopy(model))
            options: dict[str, Any] = {"guard_filter_fn": counting_guards(counts)}
            step = compile_decode_step(gqa, skip_module_guards=False, options=options)
            return cls(gqa, step, max_len=max_len, prompt_len=prompt_len)
        options = {"guard_filter_fn": counting_guards(counts, frozen_model_guards)}
        if mode == "decode+python_wrapper":
            options["cpp_wrapper"] = False
        greedy = compile_for_decode(copy.deepcopy(model), max_len, packaged=mode == "decode", options=options)
        return cls.of(greedy, prompt_len=prompt_len)

    def _start(self, greedy: GreedyDecoder, prompt_len: int, prefill: Callable[..., Any] | None) -> None:
        self.greedy, self.prompt_len = greedy, prompt_len
        self.model, self.step, self.cache, self.max_len = greedy.model, greedy.step, greedy.cache, greedy.max_len
        self.cache_keyword = greedy.cache_keyword
        self.prefill = self.model if prefill is None else prefill
        with torch.inference_mode():  # the cache allocates its tensors on first use: do that in eager, or a
            self.model(  # compiled prefill recompiles on its 2nd call
                torch.zeros(1, 1, dtype=torch.long),
                **{self.cache_keyword: self.cache},
                use_cache=True,
                cache_position=torch.tensor([0]),
                logits_to_keep=1,
            )
        self.reset()

    def reset(self) -> int:
        """Empty the cache and prefill a fixed prompt (token ids 1..prompt_len, modulo the
        vocabulary); returns the first generated token. Timing it gives the time to first token."""
        config: Any = self.model.config  # a transformers model's
        prompt = (torch.arange(1, self.prompt_len + 1) % config.vocab_size).unsqueeze(0)
        with torch.inference_mode():  # the cache's tensors are inference tensors
            self.cache.reset()
            out = self.prefill(
                prompt,
                **{self.cache_keyword: self.cache},
                use_cache=True,
                cache_position=torch.arange(self.prompt_len),
                logits_to_keep=1,
            )
        self.position = self.prompt_len
        self.token = greedy_tokens(out.logits[:, -1])  # as GreedyDecoder picks it
        return int(self.token)

    def next(self) -> int:
        """Decode one token greedily; returns it. Resets (re-prefills) when the cache is full."""
        if self.position >= self.max_len:
            self.reset()
        with torch.inference_mode():
            out = self.step(
                self.token,
                **{self.cache_keyword: self.cache},
                use_cache=True,
                cache_position=torch.tensor([self.position]),
                logits_to_keep=1,
            )
        self.position += 1
        self.token = step_tokens(out)  # as GreedyDecoder picks it
        return int(self.token)

    def generate(self, n: int) -> list[int]:
        """``n`` greedy tokens after a fresh prefill."""
        self.reset()
        return [self.next() for _ in range(n)]


def room_for(decoder: Stepper, tokens: int) -> None:
    """Re-prefill ``decoder`` if ``tokens`` more steps would fill its cache (a prefill must not land
    inside a timed span)."""
    if decoder.position + tokens > decoder.max_len:
        decoder.reset()


def time_tokens(
    decoders: Mapping[K, Stepper],
    *,
    rounds: int,
    tokens: int,
    warmup: int = 3,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[K, float]:
    """Per decoder, ms/token: ``timing.interleaved_min`` of ``tokens`` greedy steps, over ``rounds``
    rounds that each visit every decoder in turn, by ``clock`` (seconds; wall time by default)."""
    seconds = interleaved_min(
        {key: decoder.next for key, decoder in decoders.items()},
        rounds=rounds,
        number=tokens,
        warmup=warmup,
        before=lambda key: room_for(decoders[key], tokens),
        clock=clock,
    )
    return {key: s * 1e3 for key, s in seconds.items()}
