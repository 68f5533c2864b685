"""Prompt-lookup decoding behind ``model.generate(..., prompt_lookup_num_tokens=k, custom_generate=decoder)``.

Greedy, batch 1. Each iteration drafts up to ``k`` tokens by n-gram lookup in the sequence so far
(transformers' own ``PromptLookupCandidateGenerator``) and verifies them in one forward of ``k + 1``
tokens (the last accepted token, then the draft) through the decoder's compiled step: the longest
prefix of the draft equal to the greedy choice at each position is accepted, plus the greedy choice
after it, as transformers' assisted decoding accepts them. A verification costs more than a one-token
step (its linears run at M = k + 1) but less than k of them, so it pays when the answer copies the
prompt (editing, extraction, code).

The step's shapes stay fixed: a draft shorter than ``k`` is padded to ``k`` with the last token (a
padded position is never accepted), so the verification compiles once; with no draft, or too close
to the cache's end for ``k + 1`` slots, the token goes through the one-token step as in ``decode``.

The tokens are the plain loop's up to rounding: a verification is a forward of ``k + 1`` tokens, whose
int4 linears run the M > 1 kernel (on AVX2 the integer GEMM, activations rounded to 8 bits) instead of
the one-token GEMV, so a position whose top-2 logits are within that rounding may choose the other.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..kernels.int4_gemv import greedy_tokens
from .caches import cache_keyword
from .generate import Processors, Stops, generated

logger = logging.getLogger(__name__)


def uses_prompt_lookup(config: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> bool:
    """Whether ``decode_with_lookup`` runs this request: ``config.prompt_lookup_num_tokens`` set, greedy,
    one unpadded prompt. A batch raises a ``ValueError`` (as transformers' assisted decoding does);
    sampling or a padded prompt falls back to the plain loop with one log line."""
    k = config.prompt_lookup_num_tokens
    if k is None:
        return False
    if k < 1:
        raise ValueError(f"prompt_lookup_num_tokens must be at least 1, got {k}")
    if input_ids.shape[0] > 1:
        raise ValueError(
            f"prompt lookup decoding (prompt_lookup_num_tokens={k}) runs one prompt at a time; "
            f"got a batch of {input_ids.shape[0]}"
        )
    reason = None
    if config.do_sample:
        # transformers samples every verified position, which draws from the same distribution as
        # sampling one token at a time: the plain loop gives what the user asked for.
        reason = "do_sample=True samples one token at a time"
    elif attention_mask is not None and not bool(attention_mask.all()):
        reason = "a padded prompt decodes one token at a time"
    if reason is not None:
        logger.info("prompt_lookup_num_tokens=%d ignored: %s", k, reason)
        return False
    return True


def decode_with_lookup(
    model: nn.Module,
    step: Callable[..., Any],
    cache: Any,
    input_ids: torch.Tensor,
    *,
    logits_processor: Any,
    stopping_criteria: Any,
    generation_config: Any,
    streamer: Any = None,
) -> Any:
    """Greedy prompt-lookup decoding of ``input_ids`` [1, T]: the prompt through ``model``, every
    verification (``k + 1`` tokens) and every lone token through ``step``, into ``cache`` (a
    ``StaticCache`` of at least ``generation_config.max_length - 1`` slots, emptied first). The tokens
    are those of ``generate.decode`` (greedy), up to the kernels' rounding at ``k + 1`` tokens; it
    returns what ``decode`` returns, with ``scores`` / ``logits`` of every emitted token when asked.

    The processors see each verified position with its own prefix (the accepted tokens before it)
    and run once per emitted token, as in the plain loop; the stopping criteria are checked after
    every accepted token, so an eos, a stop string or the length limit inside an accepted run cuts
    it there. The streamer gets each run of accepted tokens ([1, n]), as transformers streams them."""
    from transformers.generation.candidate_generator import PromptLookupCandidateGenerator

    config = generation_config
    k = config.prompt_lookup_num_tokens
    length = input_ids.shape[1]
    size = cache.get_max_length()
    if length >= size:
        raise ValueError(f"the prompt ({length} tokens) leaves no room in a cache of {size} slots")
    want_scores = bool(config.return_dict_in_generate and config.output_scores)
    want_logits = bool(config.return_dict_in_generate and config.output_logits)
    scores: tuple[torch.Tensor, ...] = ()
    raw_logits: tuple[torch.Tensor, ...] = ()
    stops = Stops(stopping_criteria, 1)
    processors = Processors(logits_processor)
    # No logits_processor for the draft: transformers passes it to drop candidates the processors
    # forbid (-inf), at a whole-vocabulary call per candidate; such a candidate is never the argmax
    # of the processed scores, so verification rejects it anyway.
    drafter = PromptLookupCandidateGenerator(
        eos_token_id=config._eos_token_tensor,
        num_output_tokens=k,
        max_matching_ngram_size=config.max_matching_ngram_size or 2,
        max_length=config.max_length,
    )
    total = min(stops.max_length or size + 1, size + 1)
    sequences = input_ids.new_empty(1, max(total, length + 1))
    sequences[:, :length] = input_ids
    # The steps' inputs, fresh tensors of fixed shapes and strides (Dynamo guards on both): the
    # verification's always k + 1 tokens, the one-token step's as decode passes it.
    draft, single = input_ids.new_empty(1, k + 1), input_ids.new_empty(1, 1)
    verify_positions = torch.arange(k + 1)

    cache.reset()
    kwargs: dict[str, Any] = {cache_keyword(model): cache, "use_cache": True, "logits_to_keep": 1}
    out = model(input_ids, cache_position=torch.arange(length), **kwargs)
    if not cache.is_croppable:  # as transformers' assisted decoding, which checks after the prefill too
        raise ValueError("prompt lookup decoding needs a cache it can crop back after a verification")
    candidates: list[int] = []
    position = length
    while True:
        # Rows of out.logits: the choice after the last token, then after each candidate (the padding's
        # rows follow, unread). fp32 as transformers' processors expect (argmax over bf16 is slow on CPU).
        logits = out.logits[0, : len(candidates) + 1].to(copy=True, dtype=torch.float32)
        # Without processors the choices need no prefix: one argmax for every row.
        choices = greedy_tokens(logits).squeeze(1).tolist() if not len(processors) else None
        start, done = position, False
        for row in range(len(candidates) + 1):
            if want_logits:
                raw_logits += (logits[row : row + 1],)
            if choices is None:
                # sequences[:, :position] holds the accepted tokens before this row: its exact prefix
                row_scores = processors(sequences[:, :position], logits[row : row + 1])
                token = int(greedy_tokens(row_scores))
            else:
                row_scores, token = logits[row : row + 1], choices[row]
            if want_scores:
                scores += (row_scores,)
            sequences[0, position] = token
            position += 1
            done = (stops.max_length is not None and position >= stops.max_length) or bool(
                stops.finished(token, sequences[:, :position], scores if want_scores else None)
            )
            if done or row == len(candidates) or token != candidates[row]:
                break
        if streamer is not None:
            streamer.put(sequences[:, start:position].clone())  # not a view of the buffer
        if done:
            break
        if position > size:  # only a StoppingCriteriaList without transformers' max_length gets here
            raise ValueError(f"generation passed the cache's {size} slots; set max_new_tokens or max_length")
        if candidates:
            # A StaticCache writes at its own count of tokens (not at cache_position): count back the
            # verification's tokens that were not kept (the kept ones are the last token and the
            # accepted candidates; the token chosen after them goes in next).
            cache.crop(-(k + 1 - (position - start)))
        # The cache holds position - 1 tokens; sequences[position - 1] goes in next, at that slot.
        # A verification wrote slots up to position - 1 + k, so those past the accepted tokens hold
        # the rejected (or padded) draft's keys and values. They are never read: the next forward
        # starts at the first of them and writes its own tokens' slots, in each layer before that
        # layer's attention runs, and the causal mask lets a query at position p attend slots <= p
        # only, all written by then with accepted tokens; a slot beyond is written again before any
        # query reaches it.
        last = int(sequences[0, position - 1])
        candidates = []
        if position + k <= size:
            proposal, _ = drafter.get_candidates(sequences[:, :position])
            candidates = proposal[0, position:].tolist()
        if candidates:
            draft[0, 0] = last
            draft[0, 1 : 1 + len(candidates)] = proposal[0, position:]
            draft[0, 1 + len(candidates) :] = last
            kwargs["logits_to_keep"] = k + 1
            out = step(draft, cache_position=verify_positions + (position - 1), **kwargs)
        else:
            kwargs["logits_to_keep"] = 1
            single[0, 0] = last
            out = step(single, cache_position=torch.tensor([position - 1]), **kwargs)
    if streamer is not None:
        streamer.end()
    return generated(config, sequences[:, :position], scores, raw_logits)


__all__ = ["decode_with_lookup", "uses_prompt_lookup"]
