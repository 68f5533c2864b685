"""Fast greedy decoding of a transformers causal LM on CPU under ``torch.compile``.

Three things make transformers' compiled decode slower than its eager decode on CPU (measured on
SmolLM2-135M, see docs/decoding.md):

- its SDPA integration takes a grouped-KV shortcut for a one-token query (the query reshaped to
  [batch, kv_heads, groups, head_dim], K/V left as they are) only when *not* compiling; compiled, it
  expands K and V to every query head first. ``ATTENTION`` ("unwrap_sdpa") is transformers' SDPA with
  the shortcut kept under compile: the same ops as its eager path, so the same numbers;
- a static cache attends all of its slots (masked, not shortened): size it to what the generation
  needs (prompt + new tokens), not to the model's context;
- Dynamo evaluates thousands of guards per call (~5k for a 30-layer model), most of them on the
  modules' attributes and parameters; for a frozen inference model they can be skipped
  (``torch.compiler.skip_guard_on_all_nn_modules_unsafe``).

``compile_for_decode(model, max_len)`` does all three and returns a ``GreedyDecoder``; it also fuses
the int4 q/k/v and gate/up projections (``decode_fusion``), and a one-token query of ``ATTENTION`` runs
``unwrap_cpu::decode_attention``, which attends only the slots the mask allows (when the kernel is built). Needs transformers
(the ``hf`` extra); importing this module does not import it.
"""

from __future__ import annotations

import functools
import logging
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..kernels.int4_gemv import greedy_tokens
from .caches import cache_keyword, copy_cache, given_cache, static_cache
from .decode_fusion import fuse_decode_projections

logger = logging.getLogger(__name__)

ATTENTION = "unwrap_sdpa"


def gqa_sdpa_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """transformers' ``sdpa_attention_forward``, except that a one-token query with grouped K/V heads
    and a mask always takes its grouped-KV shortcut (transformers takes it in eager only). Any other
    call is transformers' own function."""
    from transformers.integrations.sdpa_attention import pack_gqa, sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    shortcut = (
        query.shape[2] == 1
        and groups > 1
        and attention_mask is not None
        and kwargs.get("position_bias") is None
        and kwargs.get("softcap") is None
        and not kwargs.get("output_attentions", False)
    )
    if not shortcut:  # no mask: transformers uses enable_gqa, compiled or not
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs)
    if attention_mask is not None and _decode_kernel_applies(query, key, value, attention_mask, dropout):
        scale = query.shape[-1] ** -0.5 if scaling is None else scaling
        return torch.ops.unwrap_cpu.decode_attention.default(query, key, value, attention_mask, scale), None
    out = nn.functional.scaled_dot_product_attention(
        pack_gqa(query, groups),
        key,
        value,
        attn_mask=pack_gqa(attention_mask, groups),
        dropout_p=dropout,
        scale=scaling,
        is_causal=False,
    )
    out = out.reshape(out.shape[0], -1, 1, value.shape[-1]).transpose(1, 2).contiguous()
    return out, None


def _decode_kernel_applies(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, dropout: float
) -> bool:
    """Whether ``unwrap_cpu::decode_attention`` takes this one-token call: CPU, batch 1, one mask row
    for every head, a head_dim it vectorizes, no dropout, the kernel built."""
    from ..kernels.int4_gemv import traced_kernel_available

    return (
        query.device.type == "cpu"
        and query.shape[0] == 1
        and dropout == 0.0
        and query.shape[-1] % 16 == 0
        and query.shape[-1] <= 256
        and query.dtype == key.dtype == value.dtype
        and mask.numel() == key.shape[2]
        and (mask.dtype in (torch.bool, torch.float32) or mask.dtype == query.dtype)
        and key.stride(-1) == 1
        and value.stride(-1) == 1
        and query.stride(-1) == 1
        and traced_kernel_available()
    )


def step_tokens(out: Any) -> torch.Tensor:
    """The greedy token of each row ([batch, 1]) after a one-token step that returned ``out``: the tokens a
    packaged step computed with its logits (``StepLogits.greedy_tokens``), else ``greedy_tokens`` of the
    last logits. The same tokens either way."""
    tokens = getattr(out, "greedy_tokens", None)
    return greedy_tokens(out.logits[:, -1]) if tokens is None else tokens


# the attention implementations ``ATTENTION`` replaces (transformers' SDPA), or itself
REPLACED_ATTENTION = ("sdpa", ATTENTION)


def use_gqa_decode_attention(model: nn.Module) -> nn.Module:
    """Register ``ATTENTION`` with transformers (attention and mask) and switch ``model`` to it, in
    place; returns the model. The model must use SDPA attention now (its default on CPU)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    current = getattr(model.config, "_attn_implementation", None)
    if current not in REPLACED_ATTENTION:
        raise ValueError(f"the grouped-KV decode attention replaces 'sdpa'; this model uses {current!r}")
    AttentionInterface.register(ATTENTION, gqa_sdpa_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
    model.set_attn_implementation(ATTENTION)  # type: ignore[operator]  # a transformers PreTrainedModel
    return model


def frozen_model_guards(entries: list) -> list[bool]:
    """A ``guard_filter_fn``: drop the guards on modules, their attributes and parameters, and on module
    globals (``G[...]``: transformers' functions and attention registry, this library's constants): the
    model and the code it runs are frozen, nothing reassigns them while it decodes. Keep those on the
    inputs, the cache and the global state (grad mode, default device...). The globals' ~200 guards
    are ~80 us of a SmolLM2 token's ~250 us of guard evaluation (-3 % per token)."""
    keep = torch.compiler.skip_guard_on_all_nn_modules_unsafe(entries)
    return [kept and not entry.name.startswith("G[") for entry, kept in zip(entries, keep, strict=True)]


def _own_code(fn: Callable) -> Callable:
    """``fn`` with a code object of its own: Dynamo caches compiled code per code object, so a step
    compiled for one model is never tried (or counted against the recompile limit) on another."""
    code = fn.__code__.replace(co_name=f"decode_step_{id(fn):x}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


# Inductor options of the decode step: the C++ wrapper (kernels and custom ops called from C++, not from
# a Python function of ~1,400 statements per token: ~10 % of a SmolLM2 token, for ~35 s more of first
# compile, once per model and shape in Inductor's cache); no size/alignment asserts on every input and
# custom-op result (a call each, hundreds per token; Dynamo's guards check the inputs already); the
# step's elementwise kernels (a few thousand elements: norms, rotary, SiLU) on one thread below 4096
# elements per thread, not split at Inductor's default 512 (a fork/join costs more than the work: -3 %
# of a SmolLM2 token on 2 cores).
STEP_OPTIONS: dict[str, Any] = {
    "cpp_wrapper": True,
    "size_asserts": False,
    "alignment_asserts": False,
    "cpp.min_chunk_size": 4096,
}


def compile_decode_step(
    model: nn.Module, *, skip_module_guards: bool = True, freeze: bool = True, **compile_kwargs: Any
) -> Callable:
    """``model``'s forward compiled for one-token steps (``fullgraph``, static shapes, Inductor's C++
    wrapper: ``options={"cpp_wrapper": False}`` compiles faster and runs slower), guards on the model
    skipped unless ``skip_module_guards=False``. Call it like the model.

    ``freeze=True`` compiles with Inductor's freezing: parameters become constants of the graph, so
    a call no longer gathers hundreds of weight tensors in Python (~0.5 ms per token at 30 layers).
    Treat the weights as fixed once compiled: the constants are the parameters themselves, but
    Inductor may fold work on them at compile time (build a new step after changing weights)."""

    def step(*args: object, **kwargs: object) -> object:
        return model(*args, **kwargs)

    options = {**STEP_OPTIONS, **(compile_kwargs.pop("options", None) or {})}
    if skip_module_guards:
        options.setdefault("guard_filter_fn", frozen_model_guards)
    compile_kwargs.setdefault("fullgraph", True)
    compile_kwargs.setdefault("dynamic", False)
    compiled = torch.compile(_own_code(step), options=options, **compile_kwargs)
    return FrozenStep(compiled) if freeze else compiled


class FrozenStep:
    """A compiled step whose traces run with Inductor's freezing on.

    Dynamo reads ``torch._inductor.config.freezing`` while it traces (``is_parameter_freezing``),
    not from ``options=``; so the first call for each new set of input shapes (the only calls that
    can trace) runs inside ``config.patch(freezing=True)``, and every other call touches no global
    config. Shapes are those of the tensor arguments and the cache's length.

    Freezing also makes the ``StaticCache``'s tensors constants of a trace (transformers marks them
    static addresses, which Dynamo does not guard): a trace reads the cache it was traced with, so
    another cache of the same shapes raises here rather than decoding from the first one's tensors."""

    def __init__(self, compiled: Callable) -> None:
        self.compiled = compiled
        self.traced: dict[tuple, Any] = {}  # shapes -> the cache the trace was made with

    def __call__(self, *args: object, **kwargs: object) -> object:
        values = (*args, *kwargs.values())
        shapes = tuple(v.shape for v in values if isinstance(v, torch.Tensor))
        cache = given_cache(kwargs)
        key = (shapes, cache.get_max_length() if hasattr(cache, "get_max_length") else None)
        if key in self.traced:
            if self.traced[key] is not cache:
                raise ValueError(
                    f"this frozen step was traced over another cache of {key[1]} slots for these shapes, whose "
                    "tensors it reads as constants; decode through that cache, or build the step with freeze=False"
                )
            return self.compiled(*args, **kwargs)
        with torch._inductor.config.patch(freezing=True):
            out = self.compiled(*args, **kwargs)
        self.traced[key] = cache
        return out


class GreedyDecoder:
    """Greedy generation with a ``StaticCache`` of ``max_len`` slots: the prompt in eager (any length,
    nothing to recompile), each next token through ``step`` (a compiled one-token forward).

    Also transformers' ``custom_generate``: ``model.generate(ids, custom_generate=decoder, ...)`` runs
    ``generate.decode`` (sampling, logits processors, stopping criteria, left-padded batches) through
    the same step, with a cache sized to the request (prompt + new tokens), kept for later calls."""

    # Caches kept per (batch, slots): Dynamo's recompile limit (8) bounds the step's traces anyway.
    MAX_CACHES = 8

    def __init__(self, model: nn.Module, max_len: int, step: Callable | None = None) -> None:
        if max_len < 2:
            raise ValueError(f"max_len (prompt + new tokens the cache holds) must be at least 2, got {max_len}")
        self.model, self.max_len = model, max_len
        self.step = model if step is None else step
        self.cache = static_cache(model.config, max_len)
        self.cache_keyword = cache_keyword(model)
        self.caches: dict[tuple[int, int], Any] = {(1, max_len): self.cache}

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | None = None) -> torch.Tensor:
        """``input_ids`` [1, T] followed by up to ``max_new_tokens`` greedy tokens (stops after
        ``eos_token_id``), as [1, T + new]. T + max_new_tokens must fit in ``max_len``."""
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ValueError(f"input_ids must be [1, T] (batch 1), got shape {tuple(input_ids.shape)}")
        length = input_ids.shape[1]
        if length + max_new_tokens > self.max_len:
            raise ValueError(
                f"prompt ({length}) + max_new_tokens ({max_new_tokens}) exceeds the cache's max_len ({self.max_len})"
            )
        self.cache.reset()
        out = self.model(
            input_ids,
            **{self.cache_keyword: self.cache},
            use_cache=True,
            cache_position=torch.arange(length),
            logits_to_keep=1,
        )
        tokens = [greedy_tokens(out.logits[:, -1])]
        for position in range(length, length + max_new_tokens - 1):
            if eos_token_id is not None and int(tokens[-1]) == eos_token_id:
                break
            out = self.step(
                tokens[-1],
                **{self.cache_keyword: self.cache},
                use_cache=True,
                cache_position=torch.tensor([position]),
                logits_to_keep=1,
            )
            tokens.append(step_tokens(out))
        return torch.cat([input_ids, *tokens], dim=1)

    def cache_for(self, batch: int, slots: int) -> Any:
        """The ``static_cache`` of ``slots`` slots for ``batch`` rows, made on first request and kept."""
        key = (batch, slots)
        if key not in self.caches:
            if len(self.caches) >= self.MAX_CACHES:
                self.caches.pop(next(iter(self.caches)))
            self.caches[key] = static_cache(self.model.config, slots)
        return self.caches[key]

    def __call__(
        self,
        model: nn.Module,
        input_ids: torch.Tensor,
        logits_processor: Any,
        stopping_criteria: Any,
        generation_config: Any,
        synced_gpus: bool = False,
        streamer: Any = None,
        **model_kwargs: Any,
    ) -> Any:
        """transformers' ``custom_generate`` callable (``generate`` calls it with what it prepared).
        A ``streamer=`` given to ``generate`` gets the prompt (from transformers), each token, then ``end()``.
        ``prompt_lookup_num_tokens=k`` (greedy, batch 1) decodes through ``prompt_lookup``."""
        from .generate import check_request, decode, streamer_of_generate, user_cache
        from .prompt_lookup import decode_with_lookup, uses_prompt_lookup

        if model is not self.model:
            raise ValueError(
                f"this decoder was compiled for another model; got a {type(model).__name__} it does not own"
            )
        check_request(generation_config, model_kwargs, input_ids)
        batch, slots = input_ids.shape[0], generation_config.max_length
        given = user_cache(model_kwargs, batch, slots - 1)
        # A step reads one cache per shape (FrozenStep): decode into the decoder's own cache of the size
        # given, and leave its state in the given cache after.
        cache = self.cache_for(batch, slots if given is None else given.get_max_length())
        if streamer is None:
            streamer = streamer_of_generate()
        with torch.inference_mode():  # as generate(): the same compiled traces, the cache's inference tensors
            if uses_prompt_lookup(generation_config, input_ids, model_kwargs.get("attention_mask")):
                loop: Callable[..., Any] = decode_with_lookup
            else:  # the plain loop, which also takes a padded batch's mask and positions
                loop = functools.partial(
                    decode,
                    attention_mask=model_kwargs.get("attention_mask"),
                    position_ids=model_kwargs.get("position_ids"),
                )
            out = loop(
                self.model,
                self.step,
                cache,
                input_ids,
                logits_processor=logits_processor,
                stopping_criteria=stopping_criteria,
                generation_config=generation_config,
                streamer=streamer,
            )
            if given is not None:
                copy_cache(cache, given)
        if isinstance(out, torch.Tensor):
            return out.clone()  # a normal tensor: callers may edit it in place outside inference mode
        out.sequences = out.sequences.clone()
        return out


def compile_for_decode(
    model: nn.Module, max_len: int, *, packaged: bool = True, **compile_kwargs: Any
) -> GreedyDecoder:
    """The fast way to decode greedily on CPU, in one call: switch ``model`` (in place) to the
    grouped-KV decode attention, and return a ``GreedyDecoder`` with a static cache of ``max_len``
    slots (prompt + new tokens: attention reads every slot) whose one-token step is compiled with
    the model's guards skipped. ``decoder.generate(ids, max_new_tokens)``, or
    ``model.generate(ids, ..., custom_generate=decoder)``; the first call compiles.

    ``packaged=True`` (with Inductor, the default backend): one-token steps without padding run as an
    AOTInductor package per (batch, slots) (``packaged_step.PackagedStep``: no Dynamo or Python per
    token, a copy of the weights per package), other steps through ``torch.compile``;
    ``compile_kwargs`` (``torch.compile``'s, and ``compile_decode_step``'s) shape that compiled step,
    and its Inductor ``options`` the packages too.

    A model whose attention is not SDPA (e.g. Gemma 2's eager attention, for its soft-capping) keeps
    its own; a family whose modules ``decode_fusion`` does not know keeps its separate projections.
    Either way it decodes correctly, and one log line says what was not applied."""
    attention = getattr(model.config, "_attn_implementation", None)
    not_applied = []
    if attention in REPLACED_ATTENTION:
        use_gqa_decode_attention(model)
    else:
        not_applied.append(f"its {attention!r} attention kept (the grouped-KV decode attention replaces 'sdpa')")
    if not fuse_decode_projections(model):
        not_applied.append(
            "its modules keep their own projections (decode_fusion fuses Llama, Qwen2/3, Mistral, Gemma 2/3 ones)"
        )
    if not_applied:
        logger.warning("compile_for_decode(%s): %s", type(model).__name__, "; ".join(not_applied))
    options = {**STEP_OPTIONS, **(compile_kwargs.get("options") or {})}
    step = compile_decode_step(model, **compile_kwargs)
    if packaged and compile_kwargs.get("backend", "inductor") == "inductor":
        from .packaged_step import PackagedStep

        # the wrapper and guards are torch.compile's; a package has neither
        package_options = {k: v for k, v in options.items() if k not in ("cpp_wrapper", "guard_filter_fn")}
        step = PackagedStep(model, step, package_options)
    return GreedyDecoder(model, max_len, step)


__all__ = [
    "ATTENTION",
    "FrozenStep",
    "GreedyDecoder",
    "compile_decode_step",
    "compile_for_decode",
    "frozen_model_guards",
    "gqa_sdpa_attention",
    "static_cache",
    "step_tokens",
    "use_gqa_decode_attention",
]
