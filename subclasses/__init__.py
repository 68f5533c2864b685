"""Affine-quantized weight tensor subclasses and torchao-style ``quantize_``."""

from .base import QuantizedWeight
from .int4_tensor import Int4WeightTensor, Packing
from .int8_dynamic_tensor import Int8DynamicActivationInt8WeightTensor
from .int8_tensor import Int8WeightTensor
from .quant_api import (
    Int4WeightOnlyConfig,
    Int8DynamicActivationInt8WeightConfig,
    Int8WeightOnlyConfig,
    quantize_,
)
from . import tensor_parallel  # registers the ops DTensor needs on every format
from .serialization import flatten_state_dict, load_checkpoint, save_checkpoint, unflatten_state_dict

__all__ = [
    "QuantizedWeight",
    "Int4WeightTensor",
    "Int8WeightTensor",
    "Int8DynamicActivationInt8WeightTensor",
    "Packing",
    "Int4WeightOnlyConfig",
    "Int8WeightOnlyConfig",
    "Int8DynamicActivationInt8WeightConfig",
    "quantize_",
    "flatten_state_dict",
    "unflatten_state_dict",
    "save_checkpoint",
    "load_checkpoint",
]
