"""A real decoder LLM no one here wrote: transformers' Qwen2, random weights, greedy decoding with a
static KV cache; next-token latency for bf16, our quantized weights and the floor."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import torch
from torch import nn

from subclasses import quantize_

from .floor import CPU_LINEARS_ND, floor_model
from .workloads import CONFIGS

# Qwen2.5-0.5B's shapes; "tiny" is host-bound (its kernels take microseconds).
QWEN2_SHAPES: dict[str, dict[str, int]] = {
    "Qwen2 0.5B": dict(
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
    ),
    "Qwen2 tiny": dict(
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=4096,
    ),
}


def build_qwen2(shapes: dict[str, int], seed: int = 0) -> nn.Module:
    """A bf16 ``Qwen2ForCausalLM`` with tied input/output embeddings and random weights: every
    matrix normal(0, ``initializer_range``), biases zero, norms one (transformers' init, drawn once
    and in bf16: torch's default init followed by transformers' took ~13 s at 0.5B, this ~3 s)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from transformers.initialization import no_init_weights

    config = Qwen2Config(**shapes, tie_word_embeddings=True, max_position_embeddings=4096)
    default_dtype = torch.get_default_dtype()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.set_default_dtype(torch.bfloat16)
            with no_init_weights():  # also skips tying: tie_weights() below
                model = Qwen2ForCausalLM(config)
        finally:
            torch.set_default_dtype(default_dtype)
    model.tie_weights()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():  # a tied weight is listed once
            if param.dim() >= 2:
                param.normal_(0.0, config.initializer_range, generator=generator)
            elif name.endswith("bias"):
                param.zero_()
    return model.to(torch.bfloat16).eval()  # the buffers (rotary inv_freq) too, as before


def floor_model_nd(quantized: nn.Module) -> nn.Module:
    """``floor.floor_model`` with the floor modules for transformers linears (N-D input, bias)."""
    return floor_model(quantized, CPU_LINEARS_ND)


def qwen2_variants(bf16: nn.Module, fmt: str, config: object | None = None) -> tuple[dict[str, nn.Module], list[str]]:
    """floor / ours wrapped / ours unwrapped copies of ``bf16`` quantized with ``fmt`` (``config``:
    another config of that format, e.g. the library default instead of the report's group 128), and the
    warnings ``quantize_`` gave (layers it left in high precision)."""
    from unwrap import unwrap

    if fmt not in CONFIGS:
        raise ValueError(f"format must be one of {sorted(CONFIGS)}, got {fmt!r}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wrapped = quantize_(copy.deepcopy(bf16), config or CONFIGS[fmt]())
    floor = floor_model_nd(wrapped)
    unwrapped = unwrap(copy.deepcopy(wrapped))
    notes = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    return {"floor": floor, "ours wrapped": wrapped, "ours unwrapped": unwrapped}, notes


class Decoder:
    """Greedy decoding with a ``StaticCache``: a prefill of a fixed prompt through ``prefill`` (the
    model itself by default, or a compiled version), then one-token steps through ``step`` (the
    model, or its compiled version) at increasing cache positions."""

    def __init__(
        self,
        model: nn.Module,
        step: Callable | None = None,
        *,
        max_len: int = 256,
        prompt_len: int = 8,
        prefill: Callable | None = None,
    ) -> None:
        from transformers import StaticCache

        self.model, self.step = model, (model if step is None else step)
        self.prefill = model if prefill is None else prefill
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        self.max_len, self.prompt_len = max_len, prompt_len
        with torch.inference_mode():  # the cache allocates its tensors on first use: do that in eager, or a
            model(
                torch.zeros(1, 1, dtype=torch.long),
                past_key_values=self.cache,
                use_cache=True,  # compiled
                cache_position=torch.tensor([0]),
                logits_to_keep=1,
            )  # prefill recompiles on its 2nd call
        self.reset()

    def reset(self) -> int:
        """Empty the cache and prefill a fixed prompt (token ids 1..prompt_len, modulo the
        vocabulary); returns the first generated token. Timing it gives the time to first token."""
        prompt = (torch.arange(1, self.prompt_len + 1) % self.model.config.vocab_size).unsqueeze(0)
        with torch.inference_mode():  # the cache's tensors are inference tensors
            self.cache.reset()
            out = self.prefill(
                prompt,
                past_key_values=self.cache,
                use_cache=True,
                cache_position=torch.arange(self.prompt_len),
                logits_to_keep=1,
            )
        self.position = self.prompt_len
        self.token = out.logits[:, -1].argmax(-1, keepdim=True)
        return int(self.token)

    def next(self) -> int:
        """Decode one token greedily; returns it. Resets (re-prefills) when the cache is full."""
        if self.position >= self.max_len:
            self.reset()
        with torch.inference_mode():
            out = self.step(
                self.token,
                past_key_values=self.cache,
                use_cache=True,
                cache_position=torch.tensor([self.position]),
                logits_to_keep=1,
            )
        self.position += 1
        self.token = out.logits[:, -1].argmax(-1, keepdim=True)
        return int(self.token)

    def generate(self, n: int) -> list[int]:
        """``n`` greedy tokens after a fresh prefill."""
        self.reset()
        return [self.next() for _ in range(n)]
