"""The models every benchmark and the report build: the weight formats and their configs, the
synthetic workloads W1 and W2, transformers' Qwen2 with random weights (tiny and 0.5B shapes) and
SmolLM2-135M's real weights (``perf.real_model``), each beside its floor and our variants."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from subclasses import (
    Int4WeightOnlyConfig,
    Int8DynamicActivationInt8WeightConfig,
    Int8WeightOnlyConfig,
    quantize_,
)
from subclasses.quantize.api import WeightConfig

from ..floor import CPU_LINEARS_ND, floor_model

# Format name -> its config class. "int4" and "int8" (weight-only) have a floor and are the report's
# formats; "int8-dyn" (int8 activations too) is in the prefill benchmark.
FORMATS: dict[str, type[WeightConfig]] = {
    "int4": Int4WeightOnlyConfig,
    "int8": Int8WeightOnlyConfig,
    "int8-dyn": Int8DynamicActivationInt8WeightConfig,
}
REPORT_FORMATS = ("int4", "int8")
# int4 group size of the synthetic workloads and the random-weight Qwen2 rows (numbers comparable
# with earlier runs); a real model gets the library's default config.
REPORT_GROUP_SIZE = 128


def config(fmt: str, group_size: int | None = None) -> WeightConfig:
    """The config of ``fmt`` (a key of ``FORMATS``): the library's default, or int4 with ``group_size``
    (the other formats have no group size: ignored)."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {tuple(FORMATS)}, got {fmt!r}")
    if fmt == "int4" and group_size is not None:
        return Int4WeightOnlyConfig(group_size=group_size)
    return FORMATS[fmt]()


def report_config(fmt: str) -> WeightConfig:
    """``config(fmt)`` with the report's int4 group size (``REPORT_GROUP_SIZE``)."""
    return config(fmt, REPORT_GROUP_SIZE)


def quantized(model: nn.Module, fmt: str, group_size: int | None = None) -> nn.Module:
    """``model`` quantized in place with ``config(fmt, group_size)`` and ``unwrap``-ped (warnings of the
    layers left in high precision silenced)."""
    from unwrap import unwrap

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return unwrap(quantize_(model, config(fmt, group_size)))


def stack_w1() -> nn.Sequential:
    """W1: 8 linear layers 256 -> 256, host-bound at batch 1."""
    return nn.Sequential(*(nn.Linear(256, 256, bias=False) for _ in range(8))).to(torch.bfloat16)


def two_layer_w2() -> nn.Sequential:
    """W2: the reported two-layer model, 512 -> 1024 -> 1024."""
    return nn.Sequential(nn.Linear(512, 1024, bias=False), nn.Linear(1024, 1024, bias=False)).to(torch.bfloat16)


WORKLOADS: dict[str, tuple[Callable[[], nn.Module], int]] = {
    "W1 8x256": (stack_w1, 256),
    "W2 512-1024-1024": (two_layer_w2, 512),
}


def workload_model(workload: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """The bf16 model of ``workload`` (eval mode, weights drawn from ``seed``) and a batch-1 input."""
    make, in_features = WORKLOADS[workload]
    torch.manual_seed(seed)
    return make().eval(), torch.randn(1, in_features, dtype=torch.bfloat16)


def build_variants(workload: str, fmt: str, seed: int = 0) -> tuple[dict[str, nn.Module], torch.Tensor]:
    """bf16, floor, ours wrapped and ours unwrapped models with the same weights, and an input."""
    from unwrap import unwrap

    bf16, x = workload_model(workload, seed)
    wrapped = quantize_(copy.deepcopy(bf16), report_config(fmt))
    unwrapped = unwrap(copy.deepcopy(wrapped))
    return {"bf16": bf16, "floor": floor_model(wrapped), "ours wrapped": wrapped, "ours unwrapped": unwrapped}, x


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
REAL_MODELS = ("SmolLM2 135M",)
LLMS = ("Qwen2 tiny", "Qwen2 0.5B", *REAL_MODELS)  # the report's transformers models


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


def build_llm(name: str) -> tuple[nn.Module, Any]:
    """The bf16 transformers model the report calls ``name`` (one of ``LLMS``, or a key of
    ``QWEN2_SHAPES``) and its tokenizer: SmolLM2 with its real weights and tokenizer
    (``perf.real_model``), a Qwen2 shape with random weights and None."""
    if name in REAL_MODELS:
        from ..real_model import load_smollm2

        return load_smollm2()
    if name not in QWEN2_SHAPES:
        raise ValueError(f"model must be one of {(*QWEN2_SHAPES, *REAL_MODELS)}, got {name!r}")
    return build_qwen2(QWEN2_SHAPES[name]), None


def floor_model_nd(quantized: nn.Module) -> nn.Module:
    """``floor.floor_model`` with the floor modules for transformers linears (N-D input, bias)."""
    return floor_model(quantized, CPU_LINEARS_ND)


def qwen2_variants(
    bf16: nn.Module, fmt: str, config: WeightConfig | None = None
) -> tuple[dict[str, nn.Module], list[str]]:
    """floor / ours wrapped / ours unwrapped copies of a transformers ``bf16`` model quantized with
    ``fmt`` (``config``: another config of that format, e.g. the library default instead of the
    report's group 128), and the warnings ``quantize_`` gave (layers it left in high precision)."""
    from unwrap import unwrap

    if fmt not in REPORT_FORMATS:
        raise ValueError(f"format must be one of {list(REPORT_FORMATS)}, got {fmt!r}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wrapped = quantize_(copy.deepcopy(bf16), config or report_config(fmt))
    floor = floor_model_nd(wrapped)
    unwrapped = unwrap(copy.deepcopy(wrapped))
    notes = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    return {"floor": floor, "ours wrapped": wrapped, "ours unwrapped": unwrapped}, notes
