"""``model.generate(..., custom_generate=decoder)``: transformers' generation options on the compiled
decode step of ``compile_for_decode``.

transformers prepares the request as usual (generation config, logits processors, stopping criteria,
attention mask) and hands it to the decoder, which runs the prompt once in eager and every next token
through its compiled one-token step, in the decoder's static cache. Per token it does what transformers'
own sampling loop does: logits processors (temperature, top-k, top-p, min-p, repetition penalty, ...),
sampling or argmax, stopping criteria (``max_new_tokens``, ``eos_token_id`` lists, ``stop_strings``),
the streamer, finished rows padded with ``pad_token_id``. Batches are left-padded prompts: each row's
positions count its own tokens only, and its padding is masked in every step.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from .decode import GreedyDecoder


def _padding_mask(attention_mask: torch.Tensor | None, batch: int, length: int, max_len: int) -> torch.Tensor | None:
    """The request's [batch, length] mask (None: no padding) as [batch, max_len], ones after the prompt:
    one shape for every step, so the compiled step does not recompile as the sequence grows."""
    if attention_mask is None or bool(attention_mask.all()):
        return None
    if tuple(attention_mask.shape) != (batch, length):
        raise ValueError(
            f"attention_mask must be [batch, prompt] = {(batch, length)}, got {tuple(attention_mask.shape)}"
        )
    if bool((attention_mask[:, -1] == 0).any()):
        raise ValueError("right-padded prompts: pad on the left (tokenizer(..., padding_side='left'))")
    mask = attention_mask.new_ones(batch, max_len)
    mask[:, :length] = attention_mask
    return mask


def streamer_of_generate() -> Any:
    """The ``streamer`` given to the ``GenerationMixin.generate`` call that is running us, or None.

    transformers (5.x) streams the prompt, then passes a ``custom_generate`` callable only the arguments
    its own signature adds to ``_sample``'s, which drops ``streamer``: the tokens would never reach it.
    So it is read from generate's frame (a test checks that every token arrives)."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "generate" and frame.f_globals.get("__name__") == "transformers.generation.utils":
            return frame.f_locals.get("streamer")
        frame = frame.f_back  # type: ignore[assignment]
    return None


def check_request(decoder: GreedyDecoder, model: nn.Module, input_ids: torch.Tensor, max_length: int) -> None:
    """ValueError naming the value when the request does not fit the decoder."""
    if model is not decoder.model:
        raise ValueError("custom_generate=decoder must be called on the model compile_for_decode was given")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, T], got shape {tuple(input_ids.shape)}")
    if max_length > decoder.max_len:
        raise ValueError(
            f"prompt ({input_ids.shape[1]}) + max_new_tokens ({max_length - input_ids.shape[1]}) = {max_length} "
            f"exceeds the decoder's cache (compile_for_decode(model, max_len={decoder.max_len}))"
        )


def generate(
    decoder: GreedyDecoder,
    model: nn.Module,
    input_ids: torch.Tensor,
    logits_processor: Any,
    stopping_criteria: Any,
    generation_config: Any,
    streamer: Any = None,
    **model_kwargs: Any,
) -> Any:
    """transformers' sampling loop (``GenerationMixin._sample``) on ``decoder``'s cache and compiled step:
    see the module docstring. Returns the sequences [batch, T + new], or a ``GenerateDecoderOnlyOutput``
    with ``return_dict_in_generate`` (scores and logits when asked for)."""
    from transformers.generation.utils import GenerateDecoderOnlyOutput

    if streamer is None:
        streamer = streamer_of_generate()

    cache = model_kwargs.get("cache", model_kwargs.get("past_key_values"))
    if cache is not None and getattr(cache, "_is_user_defined", False):
        raise ValueError(
            f"custom_generate=decoder uses its own StaticCache; got a {type(cache).__name__} passed in: leave it out"
        )
    batch, length = input_ids.shape
    check_request(decoder, model, input_ids, generation_config.max_length)
    mask = _padding_mask(model_kwargs.get("attention_mask"), batch, length, decoder.max_len)
    cache = decoder.cache_for(batch)
    pads = None if mask is None else length - mask[:, :length].sum(-1)  # per row: its first real token's slot

    def forward(fn: Any, ids: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        # a padded row's positions count its own tokens (its padding, at negative positions, is masked)
        if mask is None or pads is None:
            extra = {}
        else:
            extra = {"attention_mask": mask, "position_ids": (slots - pads[:, None]).clamp(min=0)}
        out = fn(ids, past_key_values=cache, use_cache=True, cache_position=slots[0], logits_to_keep=1, **extra)
        return out.logits[:, -1].to(dtype=torch.float32)

    pad_token_id = generation_config._pad_token_tensor
    pad_finished = any(hasattr(criteria, "eos_token_id") for criteria in stopping_criteria)
    want_scores = generation_config.return_dict_in_generate and generation_config.output_scores
    want_logits = generation_config.return_dict_in_generate and generation_config.output_logits
    scores: list[torch.Tensor] = []
    raw_logits: list[torch.Tensor] = []
    unfinished = torch.ones(batch, dtype=torch.bool)
    with torch.inference_mode():
        cache.reset()
        slots = torch.arange(length).expand(batch, length)
        logits = forward(model, input_ids, slots)
        while True:
            next_scores = logits_processor(input_ids, logits)
            if want_scores:
                scores.append(next_scores)
            if want_logits:
                raw_logits.append(logits)
            if generation_config.do_sample:
                next_tokens = torch.multinomial(torch.softmax(next_scores, dim=-1), num_samples=1).squeeze(1)
            else:
                next_tokens = next_scores.argmax(dim=-1)
            if pad_finished and pad_token_id is not None:
                next_tokens = torch.where(unfinished, next_tokens, pad_token_id)
            input_ids = torch.cat([input_ids, next_tokens[:, None]], dim=-1)
            if streamer is not None:
                streamer.put(next_tokens.cpu())
            unfinished &= ~stopping_criteria(input_ids, tuple(scores) or None)
            if not bool(unfinished.any()):
                break
            slot = torch.full((batch, 1), input_ids.shape[1] - 1)
            logits = forward(decoder.step, next_tokens[:, None], slot)  # one stride every step: no recompile
    if streamer is not None:
        streamer.end()
    if not generation_config.return_dict_in_generate:
        return input_ids
    return GenerateDecoderOnlyOutput(
        sequences=input_ids,
        scores=tuple(scores) if want_scores else None,
        logits=tuple(raw_logits) if want_logits else None,
    )


__all__ = ["check_request", "generate"]
