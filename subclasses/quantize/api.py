"""torchao-style configs and ``quantize_``."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import torch
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from ..formats.base import QuantizedWeight
from ..formats.int4 import GROUP_SIZES, Int4WeightTensor
from ..formats.int8 import Int8WeightTensor
from ..formats.int8_dynamic import Int8DynamicActivationInt8WeightTensor
from ..kernels.compute_dtype import describe_prefill
from ..kernels.int4_qparams import DEFAULT_QPARAMS_ALGORITHM, check_qparams_algorithm
from ..runtime.tensor_parallel import local_weight, quantize_dtensor

FilterFn = Callable[[nn.Module, str], bool]
logger = logging.getLogger("subclasses")


class WeightConfig(Protocol):
    def unsupported_reason(self, weight: torch.Tensor) -> str | None: ...
    def quantize(self, weight: torch.Tensor) -> QuantizedWeight: ...


FALLBACK_GROUP_SIZE = 32


@dataclass(frozen=True)
class Int4WeightOnlyConfig:
    """Int4 weight-only, group-wise asymmetric; see ``Int4WeightTensor``. ``qparams_algorithm``
    chooses scales and zeros: "mse" (default: least importance-weighted squared weight error, never
    worse than min-max per group, deterministic; ~2x min-max's quantize time) or "tinygemm" (torchao's
    min-max math, bit-identical); see ``int4_qparams``.

    The default group size is 32, not torchao's 128: on a real model (SmolLM2-135M, docs/accuracy.md "The real
    model") every layer then quantizes (its 576-input projections take neither 128 nor, without a
    ~50 % perplexity loss, 64) and perplexity stays within ~6 % of bf16's (group 128 where it fits:
    +23 %), for ~10 % more weight bytes than 128. A weight whose in_features is not a multiple of
    ``group_size`` gets group size 32 (see ``group_size_for``), shown in the summary of
    ``quantize_``; ``quantize_(..., strict=True)`` refuses instead."""

    group_size: int = 32
    qparams_algorithm: str = DEFAULT_QPARAMS_ALGORITHM

    def __post_init__(self) -> None:
        if self.group_size not in GROUP_SIZES:
            raise ValueError(f"group_size must be one of {GROUP_SIZES}, got {self.group_size}")
        check_qparams_algorithm(self.qparams_algorithm)

    def group_size_for(self, in_features: int) -> int:
        """``group_size`` if it divides ``in_features``, else 32 (``group_size`` itself when 32
        does not divide it either: every supported size is a multiple of 32, so then none fits).

        Why 32 and not the largest size that divides: measured on SmolLM2-135M's real weights
        (docs/accuracy.md), its 576-input layers at group 64 raise perplexity by ~50 %, at
        group 32 by ~6 %; 32 is also the block of GGUF's Q4 formats these models often come from."""
        if in_features % self.group_size == 0:
            return self.group_size
        return FALLBACK_GROUP_SIZE if in_features % FALLBACK_GROUP_SIZE == 0 else self.group_size

    def strict_reason(self, weight: torch.Tensor) -> str | None:
        """Why ``quantize_(..., strict=True)`` refuses ``weight``: the configured group size does not fit."""
        if weight.dim() == 2 and weight.shape[1] % self.group_size:
            return f"in_features={weight.shape[1]} must be divisible by group_size={self.group_size}"
        return None

    def unsupported_reason(self, weight: torch.Tensor) -> str | None:
        group_size = self.group_size_for(weight.shape[-1]) if weight.dim() == 2 else self.group_size
        return Int4WeightTensor.unsupported_reason(weight, group_size)

    def quantize(self, weight: torch.Tensor) -> QuantizedWeight:
        return Int4WeightTensor.from_float(weight, self.group_size_for(weight.shape[1]), self.qparams_algorithm)


@dataclass(frozen=True)
class Int8WeightOnlyConfig:
    """Int8 weight-only, per-output-channel symmetric; see ``Int8WeightTensor``."""

    def unsupported_reason(self, weight: torch.Tensor) -> str | None:
        return Int8WeightTensor.unsupported_reason(weight)

    scale_covers_row = True  # tensor parallel: a row-wise shard needs the whole row's amax

    def quantize(self, weight: torch.Tensor, amax: torch.Tensor | None = None) -> QuantizedWeight:
        return Int8WeightTensor.from_float(weight, amax)


@dataclass(frozen=True)
class Int8DynamicActivationInt8WeightConfig:
    """Int8 per-channel weight, int8 per-token dynamic activation, ``torch._int_mm``; see
    ``Int8DynamicActivationInt8WeightTensor``."""

    def unsupported_reason(self, weight: torch.Tensor) -> str | None:
        return Int8DynamicActivationInt8WeightTensor.unsupported_reason(weight)

    scale_covers_row = True  # tensor parallel: a row-wise shard needs the whole row's amax

    def quantize(self, weight: torch.Tensor, amax: torch.Tensor | None = None) -> QuantizedWeight:
        return Int8DynamicActivationInt8WeightTensor.from_float(weight, amax)


def _is_linear_or_embedding(module: nn.Module, fqn: str) -> bool:
    return isinstance(module, (nn.Linear, nn.Embedding))


@dataclass
class QuantizeSummary:
    """What ``quantize_`` did: printable (``print(model.quantize_summary)``), also logged once.

    ``quantized``: a label per format and group size (``"Int4WeightTensor g64"``) -> the weights'
    names; ``skipped``: name -> why it stayed in high precision; bytes: every parameter and buffer
    of the model, each storage counted once (a tied weight once), before and after; ``prefill``:
    the dtype CPU int4 prompt GEMMs compute in here (``subclasses.kernels.compute_dtype``)."""

    config: str
    quantized: dict[str, list[str]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    bytes_before: int = 0
    bytes_after: int = 0
    prefill: str = ""  # what the int4 weights' prompt GEMMs compute in on this CPU, if any are int4

    def __str__(self) -> str:
        count = sum(len(names) for names in self.quantized.values())
        lines = [
            f"quantize_ with {self.config}: {count} weight(s) quantized, {len(self.skipped)} left in high precision"
        ]
        lines += [f"  {label}: {len(names)}" for label, names in self.quantized.items()]
        lines += [f"  high precision: {name} ({why})" for name, why in self.skipped.items()]
        ratio = self.bytes_after / self.bytes_before if self.bytes_before else 1.0
        lines.append(
            f"  weight bytes: {self.bytes_before / 2**20:.1f} MiB -> {self.bytes_after / 2**20:.1f} MiB ({ratio:.2f}x)"
        )
        if self.prefill:
            lines.append(f"  int4 {self.prefill}")
        return "\n".join(lines)


def model_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer (a tensor subclass — ours, a DTensor shard — counted by its
    plain inner tensors), each storage once."""
    seen: set[int] = set()
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        for part in _plain_parts(tensor):
            if part.device.type == "meta":
                continue
            storage = part.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total


def _plain_parts(tensor: torch.Tensor) -> list[torch.Tensor]:
    if not is_traceable_wrapper_subclass(tensor):
        return [tensor]
    names, _ = tensor.__tensor_flatten__()  # type: ignore[attr-defined]
    inner = [getattr(tensor, name) for name in names]
    return [part for t in inner if isinstance(t, torch.Tensor) for part in _plain_parts(t)]


def _label(weight: torch.Tensor) -> str:
    group_size = getattr(weight, "group_size", None)
    return type(weight).__name__ + (f" g{group_size}" if group_size else "")


def quantize_(
    model: nn.Module,
    config: WeightConfig,
    filter_fn: FilterFn | None = None,
    *,
    strict: bool = False,
    calibration: Iterable[Any] | None = None,
) -> nn.Module:
    """Replace, in place, the ``weight`` of every module ``filter_fn(module, fqn)`` accepts
    (default: every ``nn.Linear`` and ``nn.Embedding``) by a quantized weight built by ``config``.

    The new weights are ``nn.Parameter(requires_grad=False)``. A Parameter shared by several
    modules (a tied ``embed_tokens``/``lm_head``) is quantized once and the one quantized Parameter
    is assigned to all of them (the embedding gathers rows, the linear runs the kernel); if some of
    its users are not accepted by ``filter_fn`` it stays in high precision. Weights the config
    cannot take (shape, dtype) stay in high precision and are named in one warning, or raise
    ValueError when ``strict=True`` (which also refuses int4 group-size fallbacks). Already-quantized
    weights are left as is. What was done is ``model.quantize_summary`` (a ``QuantizeSummary``),
    logged once at INFO by the ``subclasses`` logger. Returns ``model``.

    ``calibration``: a few batches of model inputs (each a tensor ``model(batch)``, tuple or dict) for
    data-aware quantization (GPTQ) of the accepted ``nn.Linear`` weights; see ``subclasses.quantize.calibration``.
    """
    accept = filter_fn or _is_linear_or_embedding
    if calibration is not None:
        from .calibration import calibrated

        config = calibrated(model, config, calibration, accept)
    summary = QuantizeSummary(config=repr(config), bytes_before=model_bytes(model))
    users: dict[int, list[tuple[nn.Module, str, bool]]] = {}
    seen: set[tuple[int, str]] = set()
    for fqn, module in model.named_modules(remove_duplicate=False):
        for name, param in module._parameters.items():
            if param is None or (id(module), name) in seen:
                continue
            seen.add((id(module), name))
            accepted = name == "weight" and accept(module, fqn)
            users.setdefault(id(param), []).append((module, f"{fqn}.{name}" if fqn else name, accepted))

    skipped = summary.skipped
    for entries in users.values():
        if not any(accepted for _, _, accepted in entries):
            continue
        module, fqn, _ = entries[0]
        weight = cast(torch.Tensor, module.weight)
        local = local_weight(weight)  # a DTensor (tensor parallel) is quantized shard by shard
        if isinstance(local, QuantizedWeight):
            continue
        names = ", ".join(f for _, f, _ in entries)
        if not all(accepted for _, _, accepted in entries):
            skipped[names] = "shared with a module the filter rejects"
            continue
        strict_reason = getattr(config, "strict_reason", None)
        reason = (strict_reason(local) if strict and strict_reason else None) or config.unsupported_reason(local)
        if reason is not None:
            skipped[names] = reason
            continue
        value = config.quantize(weight) if local is weight else quantize_dtensor(weight, config)
        quantized = nn.Parameter(value, requires_grad=False)
        for module, _, _ in entries:
            module.weight = quantized
        summary.quantized.setdefault(_label(value), []).append(names)
        if isinstance(value, Int4WeightTensor) and value.device.type == "cpu":
            summary.prefill = describe_prefill(value.outer_dtype)
    summary.bytes_after = model_bytes(model)
    if skipped:
        listed = "; ".join(f"{names} ({why})" for names, why in skipped.items())
        message = f"{type(config).__name__} left these weights in high precision: {listed}"
        if strict:
            raise ValueError(message)
        warnings.warn(message, stacklevel=2)
    if summary.quantized:
        for hook in _QUANTIZED_MODEL_HOOKS:
            hook(model, getattr(config, "base", config))
    model.quantize_summary = summary  # type: ignore[assignment]
    logger.info("%s", summary)
    return model


QuantizedModelHook = Callable[[nn.Module, "WeightConfig"], None]
_QUANTIZED_MODEL_HOOKS: list[QuantizedModelHook] = []


def register_quantized_model_hook(hook: QuantizedModelHook) -> None:
    """Call ``hook(model, config)`` after every ``quantize_`` that quantized something.

    How an integration (``subclasses.io.hf``: a transformers model's ``save_pretrained``) learns of a
    quantized model without ``quantize_`` importing it. Registering the same hook twice is a no-op."""
    if hook not in _QUANTIZED_MODEL_HOOKS:
        _QUANTIZED_MODEL_HOOKS.append(hook)
