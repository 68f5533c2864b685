"""Affine-quantized weight tensor subclasses and torchao-style ``quantize_``."""

from . import (
    tensor_parallel,  # noqa: F401 - registers the ops DTensor needs on every format
    torchao_linear,  # noqa: F401 - declares lean linears for torchao's tensors to unwrap (no torchao import)
)
from .base import QuantizedWeight
from .int4_tensor import Int4WeightTensor, Packing
from .int8_dynamic_tensor import Int8DynamicActivationInt8WeightTensor
from .int8_tensor import Int8WeightTensor
from .quant_api import (
    Int4WeightOnlyConfig,
    Int8DynamicActivationInt8WeightConfig,
    Int8WeightOnlyConfig,
    QuantizeSummary,
    quantize_,
)
from .serialization import flatten_state_dict, load_checkpoint, save_checkpoint, unflatten_state_dict
from .torchao_interop import (
    ConversionSummary,
    TorchaoConversionError,
    from_torchao,
    load_torchao_state_dict,
    to_torchao,
)

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
    "QuantizeSummary",
    "flatten_state_dict",
    "unflatten_state_dict",
    "save_checkpoint",
    "load_checkpoint",
    "from_torchao",
    "to_torchao",
    "load_torchao_state_dict",
    "ConversionSummary",
    "TorchaoConversionError",
    "load_gguf",
]


def __getattr__(name: str):
    # load_gguf needs transformers and gguf: imported on first use, never by `import subclasses`
    if name == "load_gguf":
        from .gguf_import import load_gguf

        return load_gguf
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
