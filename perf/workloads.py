"""Built-in workloads, and the floor: plain buffers calling the same kernel directly."""

from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn

from subclasses import Int4WeightOnlyConfig, Int4WeightTensor, Int8WeightOnlyConfig, Int8WeightTensor, quantize_
from subclasses.int4_gemv import int4_gemv

CONFIGS: dict[str, Callable[[], object]] = {
    "int4": lambda: Int4WeightOnlyConfig(group_size=128),
    "int8": Int8WeightOnlyConfig,
}


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


class Int4FloorLinear(nn.Module):
    def __init__(self, weight: Int4WeightTensor) -> None:
        super().__init__()
        self.register_buffer("packed", weight.packed)
        self.register_buffer("scale_and_zero", weight.scale_and_zero)
        self.group_size = weight.group_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = int4_gemv if x.shape[0] == 1 else torch._weight_int4pack_mm_for_cpu  # ours' M = 1 kernel too
        return kernel(x, self.packed, self.group_size, self.scale_and_zero)


class Int8FloorLinear(nn.Module):
    def __init__(self, weight: Int8WeightTensor) -> None:
        super().__init__()
        self.register_buffer("qdata", weight.qdata)
        self.register_buffer("scale", weight.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch._weight_int8pack_mm(x, self.qdata, self.scale)


FLOOR_LINEARS: dict[type, type[nn.Module]] = {Int4WeightTensor: Int4FloorLinear, Int8WeightTensor: Int8FloorLinear}


def floor_model(quantized: nn.Module) -> nn.Module:
    """A copy of ``quantized`` with every bias-free quantized nn.Linear swapped for a floor module
    that shares its plain inner tensors (gpt-fast style: 2-D input, kernel C binding, nothing else)."""
    model = copy.copy(quantized)
    model._modules = dict(quantized._modules)
    for name, child in quantized.named_children():
        weight = getattr(child, "weight", None)
        if isinstance(child, nn.Linear) and child.bias is None and type(weight) in FLOOR_LINEARS:
            model._modules[name] = FLOOR_LINEARS[type(weight)](weight)
        else:
            model._modules[name] = floor_model(child)
    return model


def build_variants(workload: str, fmt: str, seed: int = 0) -> tuple[dict[str, nn.Module], torch.Tensor]:
    """bf16, floor, ours wrapped and ours unwrapped models with the same weights, and an input."""
    from unwrap import unwrap

    make, in_features = WORKLOADS[workload]
    torch.manual_seed(seed)
    bf16 = make().eval()
    wrapped = quantize_(copy.deepcopy(bf16), CONFIGS[fmt]())
    unwrapped = unwrap(copy.deepcopy(wrapped))
    models = {"bf16": bf16, "floor": floor_model(wrapped), "ours wrapped": wrapped, "ours unwrapped": unwrapped}
    return models, torch.randn(1, in_features, dtype=torch.bfloat16)
