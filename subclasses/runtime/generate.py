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

import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

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
    when transformers made the cache (it is left unused). Anything but a ``StaticCache`` that holds
    ``needed`` slots for ``batch`` rows raises."""
    from transformers import StaticCache

    cache = model_kwargs.get("cache", model_kwargs.get("past_key_values"))
    if cache is None or not getattr(cache, "_is_user_defined", False):
        return None
    if not isinstance(cache, StaticCache):
        raise ValueError(f"custom_generate=GreedyDecoder needs a StaticCache; got a {type(cache).__name__}")
    size = cache.get_max_length()
    if size < needed:
        raise ValueError(
            f"the StaticCache holds {size} tokens; prompt + max_new_tokens - 1 = {needed} do not fit "
            f"(lower max_new_tokens or pass a larger cache)"
        )
    if cache.is_initialized and cache.layers[0].keys.shape[0] != batch:
        raise ValueError(f"the StaticCache was made for batch {cache.layers[0].keys.shape[0]}; got batch {batch}")
    return cache


def split_at_top_k(processors: Any) -> tuple[Any, Any] | None:
    """``(head, tail)`` of a ``LogitsProcessorList`` split after its first top-k warper, when every
    processor after it only looks at the values (temperature, top-k, top-p, min-p): the tail then
    gives the same result on the top-k survivors alone as on the whole vocabulary, whose other
    entries are -inf (zero probability). None when the list has no such split."""
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        MinPLogitsWarper,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    kinds = [type(p) for p in processors]
    if TopKLogitsWarper not in kinds:
        return None
    cut = kinds.index(TopKLogitsWarper) + 1
    value_only = (TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper, MinPLogitsWarper)
    if processors[cut - 1].filter_value != float("-inf") or any(kind not in value_only for kind in kinds[cut:]):
        return None
    return LogitsProcessorList(processors[:cut]), LogitsProcessorList(processors[cut:])


def sample(ids: torch.Tensor, logits: torch.Tensor, split: tuple[Any, Any]) -> torch.Tensor:
    """One token per row drawn as ``softmax(processors(ids, logits))`` gives it, the processors split by
    ``split_at_top_k``: the tail runs on the top-k survivors only (top-p sorts ~50 values instead of the
    whole vocabulary: ~5 ms a token on a 49k vocabulary, more than the rest of sampling)."""
    head, tail = split
    scores = head(ids, logits)
    kept = int(scores.isfinite().sum(-1).max())  # top-k keeps every tie of the k-th value: maybe > k
    values, indices = scores.topk(kept, dim=-1)
    values = tail(ids, values)
    picked = torch.multinomial(nn.functional.softmax(values, dim=-1), num_samples=1)
    return indices.gather(-1, picked).squeeze(1)


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
) -> Any:
    """Generate after ``input_ids`` [batch, T] as transformers' ``_sample`` does, the prompt through
    ``model`` and each next token through ``step`` (same arguments), into ``cache`` (a ``StaticCache``
    of at least ``generation_config.max_length - 1`` slots, emptied first). Returns the sequences
    [batch, T + new] (a ``LongTensor``), or a ``GenerateDecoderOnlyOutput`` with the scores and logits
    asked for when ``generation_config.return_dict_in_generate``."""
    from transformers.generation.utils import GenerateDecoderOnlyOutput

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
    pad_finished = any(hasattr(criteria, "eos_token_id") for criteria in stopping_criteria)
    if pad_finished and pad is None:
        raise ValueError("stopping at eos_token_id needs a pad_token_id for the finished rows; got None")
    unfinished = torch.ones(batch, dtype=torch.long)
    split = split_at_top_k(logits_processor) if config.do_sample and not want_scores else None

    cache.reset()
    common: dict[str, Any] = {"past_key_values": cache, "use_cache": True, "logits_to_keep": 1}
    prefill: dict[str, Any] = {}
    mask = positions = None
    if attention_mask is not None and not bool(attention_mask.all()):
        # Left padding: the mask spans every cache slot (a fixed shape for the compiled step);
        # positions count only the real tokens, as transformers' own generate counts them.
        mask = torch.zeros(batch, size, dtype=attention_mask.dtype)
        mask[:, :length] = attention_mask
        positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
        prefill = {"attention_mask": mask, "position_ids": positions}
        positions = positions[:, -1:]
    out = model(input_ids, cache_position=torch.arange(length), **common, **prefill)
    ids, position = input_ids, length
    while True:
        logits = out.logits[:, -1].to(copy=True, dtype=torch.float32)
        if want_logits:
            raw_logits += (logits,)
        if split is not None:
            tokens = sample(ids, logits, split)
        else:
            next_scores = logits_processor(ids, logits)
            if want_scores:
                scores += (next_scores,)
            if config.do_sample:
                tokens = torch.multinomial(nn.functional.softmax(next_scores, dim=-1), num_samples=1).squeeze(1)
            else:
                tokens = next_scores.argmax(-1)
        if pad_finished:
            tokens = tokens * unfinished + pad * (1 - unfinished)
        ids = torch.cat([ids, tokens[:, None]], dim=-1)
        if streamer is not None:
            streamer.put(tokens.cpu())
        unfinished = unfinished & ~stopping_criteria(ids, scores if want_scores else None)
        if unfinished.max() == 0:
            break
        if position >= size:  # only a StoppingCriteriaList without transformers' max_length gets here
            raise ValueError(f"generation passed the cache's {size} slots; set max_new_tokens or max_length")
        kwargs: dict[str, Any] = {}
        if mask is not None and positions is not None:
            mask[:, position] = 1
            positions = positions + 1
            kwargs = {"attention_mask": mask, "position_ids": positions}
        out = step(tokens[:, None], cache_position=torch.tensor([position]), **common, **kwargs)
        position += 1
    if streamer is not None:
        streamer.end()
    if not config.return_dict_in_generate:
        return ids
    return GenerateDecoderOnlyOutput(
        sequences=ids, scores=scores if want_scores else None, logits=raw_logits if want_logits else None
    )


__all__ = ["check_request", "decode", "sample", "split_at_top_k", "streamer_of_generate", "user_cache"]
