"""Built-in workloads and their variants (bf16, the floor, ours wrapped and unwrapped)."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from subclasses import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

from .floor import floor_model

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
