"""torchao-style configs and ``quantize_``."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import nn

from .base import QuantizedWeight
from .int4_tensor import GROUP_SIZES, Int4WeightTensor
from .int8_dynamic_tensor import Int8DynamicActivationInt8WeightTensor
from .int8_tensor import Int8WeightTensor
from .tensor_parallel import local_weight, quantize_dtensor

FilterFn = Callable[[nn.Module, str], bool]


class WeightConfig(Protocol):
    def unsupported_reason(self, weight: torch.Tensor) -> str | None: ...
    def quantize(self, weight: torch.Tensor) -> QuantizedWeight: ...


@dataclass(frozen=True)
class Int4WeightOnlyConfig:
    """Int4 weight-only, group-wise asymmetric (tinygemm math); see ``Int4WeightTensor``."""

    group_size: int = 128

    def __post_init__(self) -> None:
        if self.group_size not in GROUP_SIZES:
            raise ValueError(f"group_size must be one of {GROUP_SIZES}, got {self.group_size}")

    def unsupported_reason(self, weight: torch.Tensor) -> str | None:
        return Int4WeightTensor.unsupported_reason(weight, self.group_size)

    def quantize(self, weight: torch.Tensor) -> QuantizedWeight:
        return Int4WeightTensor.from_float(weight, self.group_size)


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


def _is_linear(module: nn.Module, fqn: str) -> bool:
    return isinstance(module, nn.Linear)


def quantize_(
    model: nn.Module,
    config: WeightConfig,
    filter_fn: FilterFn | None = None,
    *,
    strict: bool = False,
) -> nn.Module:
    """Replace, in place, the ``weight`` of every module ``filter_fn(module, fqn)`` accepts
    (default: every ``nn.Linear``) by a quantized weight built by ``config``.

    The new weights are ``nn.Parameter(requires_grad=False)``. A Parameter shared by several
    modules (tied weights) is quantized once and the one quantized Parameter is assigned to all of
    them; if some of its users are not accepted by ``filter_fn`` it stays in high precision.
    Weights the config cannot take (shape, dtype) stay in high precision and are named in one
    warning, or raise ValueError when ``strict=True``. Already-quantized weights are left as is.
    Returns ``model``.
    """
    accept = filter_fn or _is_linear
    users: dict[int, list[tuple[nn.Module, str, bool]]] = {}
    seen: set[tuple[int, str]] = set()
    for fqn, module in model.named_modules(remove_duplicate=False):
        for name, param in module._parameters.items():
            if param is None or (id(module), name) in seen:
                continue
            seen.add((id(module), name))
            accepted = name == "weight" and accept(module, fqn)
            users.setdefault(id(param), []).append((module, f"{fqn}.{name}" if fqn else name, accepted))

    skipped: list[str] = []
    for entries in users.values():
        if not any(accepted for _, _, accepted in entries):
            continue
        module, fqn, _ = entries[0]
        weight = module.weight
        local = local_weight(weight)  # a DTensor (tensor parallel) is quantized shard by shard
        if isinstance(local, QuantizedWeight):
            continue
        names = ", ".join(f for _, f, _ in entries)
        if not all(accepted for _, _, accepted in entries):
            skipped.append(f"{names} (shared with a module the filter rejects)")
            continue
        reason = config.unsupported_reason(local)
        if reason is not None:
            skipped.append(f"{names} ({reason})")
            continue
        value = config.quantize(weight) if local is weight else quantize_dtensor(weight, config)
        quantized = nn.Parameter(value, requires_grad=False)
        for module, _, _ in entries:
            module.weight = quantized
    if skipped:
        message = f"{type(config).__name__} left these weights in high precision: " + "; ".join(skipped)
        if strict:
            raise ValueError(message)
        warnings.warn(message, stacklevel=2)
    return model
