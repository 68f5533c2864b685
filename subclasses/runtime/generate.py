"""The decoding loop behind ``model.generate(..., custom_generate=decoder)``.

transformers' ``generate`` prepares everything (the generation config, its ``LogitsProcessorList`` and
``StoppingCriteriaList``, the attention mask and position ids) and then calls ``custom_generate`` with
them in place of its own loop. ``decode`` is that loop for a ``GreedyDecoder``: the prompt runs once in
eager, every next token through the decoder's compiled one-token step over a ``StaticCache``, and each
token is chosen as transformers' ``_sample`` chooses it (processors, argmax or ``torch.multinomial``,
finished rows padded with ``pad_token_id``).

Left-padded batches keep one ``[batch, cache length]`` attention mask whose slot ``t`` is set when
position ``t`` is written: the step sees tensors of fixed shapes, so it compiles once per batch and
cache size rather than once per token.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..kernels.int4_gemv import greedy_tokens
from .caches import cache_keyword, given_cache

# transformers' cache implementations this loop stands in for: it always decodes through a StaticCache.
STATIC_OR_DEFAULT = (None, "static", "dynamic")


def streamer_of_generate() -> Any:
    """The ``streamer`` given to the ``GenerationMixin.generate`` call that is running us, or None.

    transformers (5.x) streams the prompt, then passes a ``custom_generate`` callable only the arguments
    its signature adds to ``_sample``'s, which drops ``streamer``: the tokens would never reach it. So it
    is read from generate's frame (tests.test_generate checks that every token arrives)."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "generate" and frame.f_globals.get("__name__") == "transformers.generation.utils":
            return frame.f_locals.get("streamer")
        frame = frame.f_back  # type: ignore[assignment]
    return None


def check_request(config: Any, model_kwargs: dict[str, Any], input_ids: torch.Tensor) -> None:
    """Raise a ``ValueError`` naming the value for what the loop does not do: outputs it does not
    compute, a cache other than transformers' default or a ``StaticCache``, a padded batch without its
    attention mask, right padding."""
    batch = input_ids.shape[0]
    for name in ("output_attentions", "output_hidden_states"):
        if getattr(config, name, False):
            raise ValueError(f"custom_generate=GreedyDecoder does not return {name.split('_', 1)[1]}; got {name}=True")
    if config.use_cache is False:
        raise ValueError("custom_generate=GreedyDecoder decodes through its static cache; got use_cache=False")
    if config.cache_implementation not in STATIC_OR_DEFAULT:
        raise ValueError(
            f"custom_generate=GreedyDecoder decodes through a StaticCache; got cache_implementation="
            f"{config.cache_implementation!r} (use None or 'static')"
        )
    mask = model_kwargs.get("attention_mask")
    if mask is not None and bool((mask[:, -1] == 0).any()):  # the next token would follow a pad
        rows = (mask[:, -1] == 0).nonzero().flatten().tolist()
        raise ValueError(f"rows {rows} are right-padded; pad on the left (tokenizer(..., padding_side='left'))")
    # transformers drops an all-ones mask before calling us, so a batch without one is fine unless its
    # rows hold the pad token: then they are padded and the mask that says where is missing.
    pad = config._pad_token_tensor
    if batch > 1 and mask is None and pad is not None and bool((input_ids == pad).any()):
        raise ValueError(
            f"a batch of {batch} prompts holding pad_token_id {int(pad)} needs their attention_mask; got None"
        )


def user_cache(model_kwargs: dict[str, Any], batch: int, needed: int) -> Any:
    """The ``StaticCache`` the caller passed to ``generate`` (``cache=`` / ``past_key_values=``), or None
    when transformers made the cache (it is left unused). Anything but a ``StaticCache`` of full
    (not sliding-window) layers that holds ``needed`` slots for ``batch`` rows raises."""
    from transformers import StaticCache

    cache = given_cache(model_kwargs)
    if cache is None or not getattr(cache, "_is_user_defined", False):
        return None
    if not isinstance(cache, StaticCache):
        raise ValueError(f"custom_generate=GreedyDecoder needs a StaticCache; got a {type(cache).__name__}")
    sliding = [i for i, is_sliding in enumerate(cache.is_sliding) if is_sliding]
    if sliding:
        raise ValueError(
            f"the StaticCache's layers {sliding} are sliding-window layers, whose token count the compiled step "
            "would trace anew at every token; pass no cache (the decoder makes its own) or "
            "subclasses.decode.static_cache(config, max_len)"
        )
    size = cache.get_max_length()
    if size < needed:
        raise ValueError(
            f"the StaticCache holds {size} tokens; prompt + max_new_tokens - 1 = {needed} do not fit "
            f"(lower max_new_tokens or pass a larger cache)"
        )
    if cache.is_initialized and cache.layers[0].keys.shape[0] != batch:
        raise ValueError(f"the StaticCache was made for batch {cache.layers[0].keys.shape[0]}; got batch {batch}")
    return cache


def split_at_top_k(processors: Any) -> tuple[Processors, Processors, int] | None:
    """``(head, tail, k)``: a ``LogitsProcessorList`` split where its run of value-only warpers
    (temperature, top-k, top-p, min-p, each filtering to -inf) begins, when that run is the end of
    the list, holds a top-k warper (``k`` its count) and has nothing but temperature before it.
    The tail then gives the same probabilities on the largest ``k`` (and any ties) of the head's
    scores as on the whole vocabulary, whose other entries it sets to -inf (zero probability):
    temperature keeps the order, and after top-k the others only see the survivors. None when the
    list has no such split."""
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        MinPLogitsWarper,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    value_only = (TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper, MinPLogitsWarper)
    kinds = [type(p) for p in processors]
    start = len(kinds)
    while start > 0 and kinds[start - 1] in value_only:
        start -= 1
    tail = list(processors[start:])
    if TopKLogitsWarper not in kinds[start:]:
        return None
    cut = kinds.index(TopKLogitsWarper, start)
    if any(kind is not TemperatureLogitsWarper for kind in kinds[start:cut]):
        return None
    if any(getattr(p, "filter_value", float("-inf")) != float("-inf") for p in tail):
        return None
    return (
        Processors(LogitsProcessorList(processors[:start])),
        Processors(LogitsProcessorList(tail)),
        processors[cut].top_k,
    )


# Top-k candidates taken past k: ties at the k-th value (frequent in bf16 logits) stay in the slice.
TIE_MARGIN = 16


def top_k_probabilities(
    ids: torch.Tensor, logits: torch.Tensor, split: tuple[Processors, Processors, int]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``softmax(processors(ids, logits))`` on the candidates that can get any probability:
    ``(probs, indices)`` [batch, k + ``TIE_MARGIN``], the processors split by ``split_at_top_k`` and the
    tail run on the head's largest scores only (top-p sorts ~66 values instead of the whole
    vocabulary: milliseconds a token on a 49k vocabulary). When the slice's last entry survives the
    tail (more ties at the k-th value than the margin), the tail runs on the whole vocabulary and
    ``indices`` is None."""
    head, tail, k = split
    scores = head(ids, logits)
    width = min(k + TIE_MARGIN, scores.shape[-1])
    values, indices = scores.topk(width, dim=-1)
    values = tail(ids, values)
    if width < scores.shape[-1] and not bool(torch.isneginf(values[:, -1]).all()):
        return nn.functional.softmax(tail(ids, scores), dim=-1), None
    return nn.functional.softmax(values, dim=-1), indices


def sample(ids: torch.Tensor, logits: torch.Tensor, split: tuple[Processors, Processors, int]) -> torch.Tensor:
    """One token per row drawn from ``top_k_probabilities``."""
    probs, indices = top_k_probabilities(ids, logits, split)
    picked = torch.multinomial(probs, num_samples=1)
    return (picked if indices is None else indices.gather(-1, picked)).squeeze(1)


class Processors:
    """A ``LogitsProcessorList`` called without its signature inspection of every processor at every
    token (tens of µs each): checked once here. A list whose processors need more arguments than
    ``(ids, scores)`` is called as itself, so it raises as transformers does."""

    def __init__(self, processors: Any) -> None:
        self.processors = processors
        self.plain = all(len(inspect.signature(p.__call__).parameters) <= 2 for p in processors)

    def __call__(self, ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if not self.plain:
            return self.processors(ids, scores)
        for processor in self.processors:
            scores = processor(ids, scores)
        return scores

    def __len__(self) -> int:
        return len(self.processors)


class Stops:
    """A ``StoppingCriteriaList`` read once: transformers' max-length and eos criteria become a
    length and a set of ids checked in Python (``int`` compares at batch 1), the others are called
    as usual."""

    def __init__(self, criteria: Any, batch: int) -> None:
        from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria

        self.max_length = min((c.max_length for c in criteria if isinstance(c, MaxLengthCriteria)), default=None)
        eos = [c.eos_token_id.flatten() for c in criteria if isinstance(c, EosTokenCriteria)]
        self.eos = torch.cat(eos) if eos else None
        self.eos_ids = set(self.eos.tolist()) if self.eos is not None else set()
        self.others = [c for c in criteria if not isinstance(c, (EosTokenCriteria, MaxLengthCriteria))]
        self.batch = batch

    def finished(self, tokens: torch.Tensor | int, ids: torch.Tensor, scores: Any) -> torch.Tensor | bool:
        """Which rows stop after ``tokens`` (the last column of ``ids``; an int at batch 1 will do): a
        bool at batch 1, else a bool tensor [batch]. The max length is the caller's."""
        if self.batch == 1:
            if self.eos is not None and int(tokens) in self.eos_ids:
                return True
            return any(bool(c(ids, scores)[0]) for c in self.others)
        assert isinstance(tokens, torch.Tensor)
        done = torch.isin(tokens, self.eos) if self.eos is not None else torch.zeros(self.batch, dtype=torch.bool)
        for criteria in self.others:
            done = done | criteria(ids, scores)
        return done


def choose(
    ids: torch.Tensor, logits: torch.Tensor, processors: Any, split: Any, do_sample: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The next token of each row and the processed scores (the raw fp32 logits when sampling went
    through ``split``: the whole-vocabulary scores are never made then)."""
    if split is not None:
        return sample(ids, logits, split), logits
    scores = processors(ids, logits)
    if do_sample:
        return torch.multinomial(nn.functional.softmax(scores, dim=-1), num_samples=1).squeeze(1), scores
    return greedy_tokens(scores).squeeze(1), scores


def generated(
    config: Any, ids: torch.Tensor, scores: tuple[torch.Tensor, ...], logits: tuple[torch.Tensor, ...]
) -> Any:
    """What ``generate`` returns for the sequences ``ids``: ``ids`` itself, or with
    ``config.return_dict_in_generate`` a ``GenerateDecoderOnlyOutput`` with the ``scores`` and the raw
    ``logits`` of every emitted token where ``config`` asked for them (None where not)."""
    from transformers.generation.utils import GenerateDecoderOnlyOutput

    if not config.return_dict_in_generate:
        return ids
    return GenerateDecoderOnlyOutput(
        sequences=ids, scores=scores if config.output_scores else None, logits=logits if config.output_logits else None
    )


def decode(
    model: nn.Module,
    step: Callable[..., Any],
    cache: Any,
    input_ids: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None,
    logits_processor: Any,
    stopping_criteria: Any,
    generation_config: Any,
    streamer: Any = None,
    position_ids: torch.Tensor | None = None,
) -> Any:
    """Generate after ``input_ids`` [batch, T] as transformers' ``_sample`` does, the prompt through
    ``model`` and each next token through ``step`` (same arguments), into ``cache`` (a ``StaticCache``
    of at least ``generation_config.max_length - 1`` slots, emptied first). ``position_ids`` are
    those ``generate`` made for the prompt (counted from the mask's real tokens). Returns the
    sequences [batch, T + new] (a ``LongTensor``), or a ``GenerateDecoderOnlyOutput`` with the
    scores and logits asked for when ``generation_config.return_dict_in_generate``."""
    config = generation_config
    batch, length = input_ids.shape
    size = cache.get_max_length()
    if length >= size:
        raise ValueError(f"the prompt ({length} tokens) leaves no room in a cache of {size} slots")
    want_scores = bool(config.return_dict_in_generate and config.output_scores)
    want_logits = bool(config.return_dict_in_generate and config.output_logits)
    scores: tuple[torch.Tensor, ...] = ()
    raw_logits: tuple[torch.Tensor, ...] = ()
    pad = config._pad_token_tensor
    stops = Stops(stopping_criteria, batch)
    if stops.eos is not None and pad is None:
        raise ValueError("stopping at eos_token_id needs a pad_token_id for the finished rows; got None")
    unfinished = torch.ones(batch, dtype=torch.bool)
    split = split_at_top_k(logits_processor) if config.do_sample and not want_scores else None
    processors = Processors(logits_processor)
    # Every token goes into one buffer (no concatenation per token); the cache holds size tokens,
    # so at most size + 1 are ever made (the last is never fed back).
    total = min(stops.max_length or size + 1, size + 1)
    sequences = input_ids.new_empty(batch, max(total, length + 1))
    sequences[:, :length] = input_ids

    cache.reset()
    kwargs: dict[str, Any] = {cache_keyword(model): cache, "use_cache": True, "logits_to_keep": 1}
    prefill: dict[str, Any] = {}
    mask = positions = None
    if attention_mask is not None and not bool(attention_mask.all()):
        # Left padding: the mask spans every cache slot (a fixed shape for the compiled step);
        # positions count only the real tokens, as transformers' own generate counts them.
        mask = torch.zeros(batch, size, dtype=attention_mask.dtype)
        mask[:, :length] = attention_mask
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        prefill = {"attention_mask": mask, "position_ids": position_ids}
        positions = position_ids[:, -1:].clone()
    out = model(input_ids, cache_position=torch.arange(length), **kwargs, **prefill)
    if mask is not None:
        kwargs["attention_mask"], kwargs["position_ids"] = mask, positions
    position = length
    while True:
        # fp32 as transformers' processors expect (and argmax over bf16 is a slow path on CPU).
        logits = out.logits[:, -1].to(copy=True, dtype=torch.float32)
        ids = sequences[:, :position]
        if want_logits:
            raw_logits += (logits,)
        tokens, next_scores = choose(ids, logits, processors, split, config.do_sample)
        if want_scores:
            scores += (next_scores,)
        if stops.eos is not None and batch > 1:
            tokens = torch.where(unfinished, tokens, pad)
        sequences[:, position] = tokens
        position += 1
        if streamer is not None:
            streamer.put(tokens.cpu())
        if stops.max_length is not None and position >= stops.max_length:
            break
        done = stops.finished(tokens, sequences[:, :position], scores if want_scores else None)
        if isinstance(done, bool):
            if done:
                break
        else:
            unfinished &= ~done
            if not bool(unfinished.any()):
                break
        if position > size:  # only a StoppingCriteriaList without transformers' max_length gets here
            raise ValueError(f"generation passed the cache's {size} slots; set max_new_tokens or max_length")
        if positions is not None and mask is not None:
            mask[:, position - 1] = 1
            positions += 1
        out = step(tokens[:, None], cache_position=torch.tensor([position - 1]), **kwargs)
    if streamer is not None:
        streamer.end()
    return generated(config, sequences[:, :position], scores, raw_logits)


__all__ = [
    "Processors",
    "Stops",
    "check_request",
    "choose",
    "decode",
    "generated",
    "sample",
    "split_at_top_k",
    "streamer_of_generate",
    "top_k_probabilities",
    "user_cache",
]
