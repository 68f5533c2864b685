"""The static caches the decode step runs over: transformers' ``StaticCache`` with every layer a full one,
a copy from one such cache into another, and the keyword a model's forward takes its cache by."""

from __future__ import annotations

import inspect
from typing import Any

import torch

# transformers' names for the forward's cache argument, newest first: 5.25 renamed ``past_key_values`` to
# ``cache`` (the old name logs a deprecation and is removed in 5.40); earlier releases take only the old one.
CACHE_KEYWORDS = ("cache", "past_key_values")


def cache_keyword(model: Any) -> str:
    """The keyword ``model.forward`` takes its cache by: "cache" where its signature has it, else
    "past_key_values". Read once per decode loop (a signature costs tens of microseconds), not per token."""
    parameters = inspect.signature(model.forward).parameters
    return next((name for name in CACHE_KEYWORDS if name in parameters), CACHE_KEYWORDS[-1])


def given_cache(kwargs: dict[str, Any]) -> Any:
    """The cache in a forward's keyword arguments, under either of transformers' names; None if absent."""
    return next((kwargs[name] for name in CACHE_KEYWORDS if kwargs.get(name) is not None), None)


def static_cache(config: Any, max_len: int) -> Any:
    """transformers' ``StaticCache`` of ``max_len`` slots with every layer a full ``StaticLayer``, the
    cache a compiled one-token step decodes through. A sliding-window layer (Mistral, Gemma 2/3) counts
    its tokens in a Python int that Dynamo specialises on: a new trace at every token, then the
    recompile limit (an error under ``fullgraph``). Over full layers the window is the attention
    mask's, which transformers builds from the config's ``sliding_window`` either way; the layer holds
    ``max_len`` slots instead of the window's."""
    from transformers import StaticCache
    from transformers.cache_utils import StaticLayer

    cache = StaticCache(config=config, max_cache_len=max_len)
    cache.layers = [
        StaticLayer(max_cache_len=max_len) if sliding else layer
        for layer, sliding in zip(cache.layers, cache.is_sliding)
    ]
    return cache


def allocated_static_cache(model: Any, slots: int, batch: int = 1) -> Any:
    """An empty ``static_cache`` of ``slots`` slots for ``batch`` rows of ``model``, its tensors allocated:
    transformers allocates them at a cache's first update, from the K/V it is given, so one eager token at
    position 0 does it (then ``reset`` empties the cache). Its tensors are inference tensors inside
    ``torch.inference_mode``, normal ones outside."""
    cache = static_cache(model.config, slots)
    with torch.no_grad():
        token = torch.zeros(batch, 1, dtype=torch.long)
        model(
            token, **{cache_keyword(model): cache}, cache_position=torch.tensor([0]), use_cache=True, logits_to_keep=1
        )
    cache.reset()
    return cache


def copy_cache(source: Any, target: Any) -> None:
    """Copy a ``StaticCache``'s tokens into another of the same shapes (allocating its layers if needed)."""
    for have, want in zip(source.layers, target.layers, strict=True):
        if not want.is_initialized:
            want.lazy_initialization(have.keys, have.values)
        want.keys.copy_(have.keys)
        want.values.copy_(have.values)
        want.cumulative_length.copy_(have.cumulative_length)


__all__ = ["CACHE_KEYWORDS", "allocated_static_cache", "cache_keyword", "copy_cache", "given_cache", "static_cache"]
