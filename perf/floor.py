"""The floor: plain modules calling the same kernels as our quantized weights, nothing else.

gpt-fast style: buffers, the kernel's C binding, no subclass, no checks. ``floor_model`` swaps
a quantized model's linears for these; a table says which module stands in for which format on
which path (2-D CPU benchmarks, N-D CPU for transformers models, CUDA).
"""

from __future__ import annotations

import copy
from typing import ClassVar

import torch
from torch import nn

from subclasses import Int4WeightTensor, Int8WeightTensor
from subclasses.kernels.int4_gemv import int4_mm_for_cpu


class FloorLinear(nn.Module):
    """A floor module: a quantized weight's inner tensors as buffers, its kernel called on them."""

    takes_bias: ClassVar[bool] = False  # whether it stands in for a linear with a bias
    bias: torch.Tensor | None

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()


class Int4FloorLinear(FloorLinear):
    """CPU int4, 2-D input, no bias: the kernels our int4 weight calls (``int4_mm_for_cpu``: the int4
    GEMV at M = 1, ``_weight_int4pack_mm_for_cpu`` above) on plain buffers."""

    packed: torch.Tensor
    scale_and_zero: torch.Tensor

    def __init__(self, weight: Int4WeightTensor, bias: torch.Tensor | None = None) -> None:
        super().__init__(weight)
        self.register_buffer("packed", weight.packed)
        self.register_buffer("scale_and_zero", weight.scale_and_zero)
        self.group_size = weight.group_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int4_mm_for_cpu(x, self.packed, self.group_size, self.scale_and_zero)  # ours' kernels


class Int8FloorLinear(FloorLinear):
    """CPU int8, 2-D input, no bias: ``_weight_int8pack_mm`` on plain buffers."""

    qdata: torch.Tensor
    scale: torch.Tensor

    def __init__(self, weight: Int8WeightTensor, bias: torch.Tensor | None = None) -> None:
        super().__init__(weight)
        self.register_buffer("qdata", weight.qdata)
        self.register_buffer("scale", weight.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch._weight_int8pack_mm(x, self.qdata, self.scale)


class Int4FloorLinearND(Int4FloorLinear):
    """The floor for a transformers linear: any leading dims, optional bias."""

    takes_bias = True

    def __init__(self, weight: Int4WeightTensor, bias: torch.Tensor | None = None) -> None:
        super().__init__(weight)
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = int4_mm_for_cpu(x.reshape(-1, x.shape[-1]), self.packed, self.group_size, self.scale_and_zero)
        out = out.view(*x.shape[:-1], out.shape[-1])
        return out if self.bias is None else out + self.bias


class Int8FloorLinearND(Int8FloorLinear):
    """As ``Int4FloorLinearND``, for int8 weights."""

    takes_bias = True

    def __init__(self, weight: Int8WeightTensor, bias: torch.Tensor | None = None) -> None:
        super().__init__(weight)
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), self.qdata, self.scale)
        out = out.view(*x.shape[:-1], out.shape[-1])
        return out if self.bias is None else out + self.bias


class CudaInt4FloorLinear(Int4FloorLinear):
    """gpt-fast's int4 linear: plain buffers, 2-D bf16 input, the tinygemm kernel's C binding."""

    def __init__(self, weight: Int4WeightTensor, bias: torch.Tensor | None = None) -> None:
        if weight.packing != "cuda_tinygemm":
            raise ValueError(f"the CUDA int4 floor needs a weight packed for CUDA, got packing={weight.packing!r}")
        super().__init__(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch._weight_int4pack_mm(x, self.packed, self.group_size, self.scale_and_zero)


class CudaInt8FloorLinear(Int8FloorLinear):
    """gpt-fast's int8 linear: ``F.linear(x, q.to(x.dtype)) * scale`` on plain buffers."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.qdata.to(x.dtype)) * self.scale


FloorTable = dict[type, type[FloorLinear]]
CPU_LINEARS: FloorTable = {Int4WeightTensor: Int4FloorLinear, Int8WeightTensor: Int8FloorLinear}
CPU_LINEARS_ND: FloorTable = {Int4WeightTensor: Int4FloorLinearND, Int8WeightTensor: Int8FloorLinearND}
CUDA_LINEARS: FloorTable = {Int4WeightTensor: CudaInt4FloorLinear, Int8WeightTensor: CudaInt8FloorLinear}


def floor_model(quantized: nn.Module, linears: FloorTable = CPU_LINEARS) -> nn.Module:
    """A copy of ``quantized`` (wrapped, not unwrapped) whose quantized ``nn.Linear`` layers are
    the floor modules ``linears`` names for their weight's format, sharing its inner tensors (a
    linear with a bias only where that module takes one); every other module is shared as is."""
    model = copy.copy(quantized)
    model._modules = dict(quantized._modules)
    for name, child in quantized.named_children():
        floor = linears.get(type(getattr(child, "weight", None)))
        if isinstance(child, nn.Linear) and floor is not None and (child.bias is None or floor.takes_bias):
            bias = None if child.bias is None else child.bias.detach()
            model._modules[name] = floor(child.weight, bias)
        else:
            model._modules[name] = floor_model(child, linears)
    return model
