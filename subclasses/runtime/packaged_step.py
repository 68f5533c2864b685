"""The one-token decode step as an AOTInductor package: no Dynamo, no guards, no Python between kernels.

``compile_decode_step``'s step goes through Dynamo at every token: guard evaluation (~0.2 ms on
SmolLM2), the bytecode that gathers the cache's tensors, AOTAutograd's runtime wrapper. ``PackagedStep``
runs the same computation (the model as ``compile_for_decode`` prepared it, the step's Inductor options,
freezing) as one call into a package that ``torch.export`` and AOTInductor built for the cache's shape:
-8 to -15 % of a SmolLM2 token (docs/decoding.md). It takes the calls a package can answer exactly (one
token per row of the cache's batch, no mask, no position ids, grad off) and hands every other call to
the Dynamo step it wraps: a left-padded batch, a prompt-lookup verification, a model that does not export.

The cache stays the caller's ``StaticCache``: the package's cache buffers are bound to its tensors
(``load_constants(..., user_managed=True)``, no copy) and written in place, so the prompt (eager) and
the Dynamo step share it. Each (batch, slots) builds a package of its own on first use (SmolLM2: ~20 s of
export + ~45 s of compile; the Dynamo step's first compile is ~100 s) holding a copy of the frozen weights.
Its weights are bound the same way to one more copy, in huge pages (``huge_pages``: ~5 % of a SmolLM2
token), which all of a step's packages share.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from ..kernels.int4_gemv import greedy_tokens, package_c_shims
from .caches import CACHE_KEYWORDS, allocated_static_cache, cache_keyword, given_cache
from .huge_pages import in_huge_pages

logger = logging.getLogger(__name__)


class StepLogits(NamedTuple):
    """What a packaged step returns: the logits, as the model's output names them, and the greedy token of
    each row (``greedy_tokens`` of the last logits, [batch, 1]), computed in the package while the logits
    are still in cache (read through ``decode.step_tokens``; outside, after a token's weights streamed
    through the caches, the same argmax took ~0.14 ms of a SmolLM2 token)."""

    logits: torch.Tensor
    greedy_tokens: torch.Tensor


class CacheAsBuffers(nn.Module):
    """``model``'s one-token forward over ``cache`` with the cache's tensors as buffers, the shape
    ``torch.export`` can trace (strict export follows the tensors by identity into the cache object)."""

    def __init__(self, model: nn.Module, cache: Any) -> None:
        super().__init__()
        self.model, self.cache, self.cache_keyword = model, cache, cache_keyword(model)
        for name, tensor in cache_tensors(cache).items():
            self.register_buffer(name, tensor, persistent=False)

    def forward(self, input_ids: torch.Tensor, cache_position: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Each layer writes at its own token count: set it from the position, not from the count the
        # export saw (freezing would fold a buffer that is only read into a constant).
        for layer in self.cache.layers:
            layer.cumulative_length.copy_(cache_position[0])
        out = self.model(
            input_ids,
            **{self.cache_keyword: self.cache},
            cache_position=cache_position,
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits, greedy_tokens(out.logits[:, -1])


def layer_tensors(cache: Any) -> list[torch.Tensor]:
    """The tensors of a ``StaticCache`` a package reads and writes, in order: each layer's keys, values and
    token count."""
    return [tensor for layer in cache.layers for tensor in (layer.keys, layer.values, layer.cumulative_length)]


def cache_tensors(cache: Any) -> dict[str, torch.Tensor]:
    """``layer_tensors(cache)`` by the buffer names a package knows them by."""
    names = ("keys", "values", "length")
    return {f"{names[i % 3]}_{i // 3}": tensor for i, tensor in enumerate(layer_tensors(cache))}


def build_package(model: nn.Module, batch: int, slots: int, options: dict[str, Any]) -> Any:
    """``model``'s one-token step for ``batch`` rows over a ``static_cache`` of ``slots`` slots, exported
    and compiled by AOTInductor with Inductor ``options`` and freezing, this library's ops called through
    their C entry points (``package_c_shims``); the loaded package (its cache buffers still the export's
    own: bind them with ``load_constants``)."""
    # Outside inference mode (decoding runs inside it): the export's cache and inputs are normal tensors.
    with torch.inference_mode(False), torch.no_grad():
        cache = allocated_static_cache(model, slots, batch)
        example = (torch.zeros(batch, 1, dtype=torch.long), torch.tensor([0]))
        exported = torch.export.export(CacheAsBuffers(model, cache), example, strict=True)
    with tempfile.TemporaryDirectory(prefix="unwrap-step-") as folder:
        configs = {**options, "freezing": True, "aot_inductor.custom_ops_to_c_shims": package_c_shims()}
        path = torch._inductor.aoti_compile_and_package(
            exported, package_path=os.path.join(folder, "step.pt2"), inductor_configs=configs
        )
        return torch._inductor.aoti_load_package(path)


class Package:
    """A loaded package and the cache its buffers are bound to now; ``weights`` (by the package's constant
    names), where given, replace the package's own copies of them."""

    def __init__(self, runner: Any, weights: dict[str, torch.Tensor] | None = None) -> None:
        self.runner = runner
        self.bound: list[torch.Tensor] = []
        if weights:
            runner.load_constants(weights, check_full_update=False, user_managed=True)

    def run(self, input_ids: torch.Tensor, cache_position: torch.Tensor, cache: Any) -> StepLogits:
        tensors = layer_tensors(cache)
        if len(tensors) != len(self.bound) or any(a is not b for a, b in zip(tensors, self.bound)):
            self.runner.load_constants(cache_tensors(cache), check_full_update=False, user_managed=True)
            self.bound = tensors
        # the loader directly: AOTICompiledModel.__call__ parses the call's pytree specs at every call
        return StepLogits(*self.runner.loader.boxed_run([input_ids, cache_position]))


class PackagedStep:
    """A decode step (called like the model) that answers one-token calls from an AOTInductor package
    of ``model`` per (batch, slots), built on first use, and every other call through ``fallback``
    (``compile_decode_step``'s step). ``options`` are the packages' Inductor options."""

    MAX_PACKAGES = 4  # each holds a copy of the weights

    def __init__(self, model: nn.Module, fallback: Callable[..., Any], options: dict[str, Any]) -> None:
        from transformers import StaticCache
        from transformers.cache_utils import StaticLayer

        self.model, self.fallback, self.options = model, fallback, options
        self.packages: dict[tuple[int, int], Package | None] = {}
        self.huge_page_weights: dict[str, torch.Tensor] | None = None
        self.cache_class, self.layer_class = StaticCache, StaticLayer

    def __call__(self, input_ids: torch.Tensor, **kwargs: Any) -> Any:
        cache = given_cache(kwargs)
        if self.answers(input_ids, cache, kwargs.get("cache_position"), kwargs):
            package = self.package_for(cache)
            if package is not None:
                return package.run(input_ids, kwargs["cache_position"], cache)
        return self.fallback(input_ids, **kwargs)

    def answers(self, input_ids: torch.Tensor, cache: Any, position: Any, kwargs: dict[str, Any]) -> bool:
        """Whether a package computes this call exactly as the model would: one token per row of a
        static cache whose layers are allocated, no mask or position ids, nothing else asked for."""
        extra = set(kwargs) - {*CACHE_KEYWORDS, "cache_position", "use_cache", "logits_to_keep"}
        return (
            not torch.is_grad_enabled()
            and extra <= {"attention_mask", "position_ids"}
            and all(kwargs[name] is None for name in extra)
            and kwargs.get("use_cache", True) is True
            and kwargs.get("logits_to_keep", 0) == 1
            and isinstance(cache, self.cache_class)
            and isinstance(position, torch.Tensor)
            and position.shape == (1,)
            and input_ids.dtype == torch.long
            and input_ids.dim() == 2
            and input_ids.shape[1] == 1
            and all(type(layer) is self.layer_class and layer.is_initialized for layer in cache.layers)
            and input_ids.shape[0] == cache.layers[0].keys.shape[0]
        )

    def package_for(self, cache: Any) -> Package | None:
        """The package for ``cache``'s (batch, slots), built on first use; None where the model does not
        export (logged once, and that shape keeps the fallback)."""
        key = (cache.layers[0].keys.shape[0], cache.get_max_length())
        if key not in self.packages:
            if len(self.packages) >= self.MAX_PACKAGES:
                self.packages.pop(next(iter(self.packages)))
            try:
                runner = build_package(self.model, *key, self.options)
                self.packages[key] = Package(runner, self.weights_for(runner))
            except Exception as error:  # noqa: BLE001 - any export/compile failure: the Dynamo step decodes
                logger.warning(
                    "PackagedStep: %s does not export as an AOTInductor package (%s: %s); its one-token steps "
                    "for batch %d over %d slots run through torch.compile",
                    type(self.model).__name__,
                    type(error).__name__,
                    str(error).splitlines()[0] if str(error) else "",
                    *key,
                )
                self.packages[key] = None
        return self.packages[key]

    def weights_for(self, runner: Any) -> dict[str, torch.Tensor]:
        """The package's weights (constants named ``model.`` + a parameter's or buffer's name in ``self.model``)
        as copies in huge pages, made at the first package and shared by the later ones. A tied weight is one
        constant under its first name, as ``named_parameters`` gives it. Empty where ``in_huge_pages`` makes
        none (the package keeps its own)."""
        if self.huge_page_weights is None:
            tensors = {**dict(self.model.named_parameters()), **dict(self.model.named_buffers())}
            # Plain tensors only: a quantized tensor subclass (a model not unwrapped) is flattened by export into
            # constants of other names, which keep the package's own copies.
            copies = in_huge_pages(
                {
                    f"model.{name}": t
                    for name, t in tensors.items()
                    if not is_traceable_wrapper_subclass(t) and t.device.type == "cpu" and t.is_contiguous()
                }
            )
            self.huge_page_weights = copies or {}
        names = set(runner.get_constant_fqns())
        return {name: copy for name, copy in self.huge_page_weights.items() if name in names}


__all__ = ["CacheAsBuffers", "Package", "PackagedStep", "StepLogits", "build_package", "cache_tensors", "layer_tensors"]
