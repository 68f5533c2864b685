"""Quantized weight tensor subclasses, torchao-style ``quantize_``, checkpoints and the decode path.

The parts, each importing only those listed before it:

- ``kernels``: byte layouts and ops (the C++ int4 GEMV, prefill, qparams search; CUDA calls)
- ``formats``: the tensor subclasses (``QuantizedWeight``, int4, int8, int8 dynamic)
- ``runtime``: the compiled decode step (``subclasses.decode``) and tensor parallelism
- ``quantize``: ``quantize_`` and its configs, GPTQ calibration
- ``io``: checkpoints, transformers (``subclasses.hf``), GGUF (``load_gguf``), torchao
"""

import sys

from .formats.base import QuantizedWeight
from .formats.int4 import Int4WeightTensor, Packing
from .formats.int8 import Int8WeightTensor
from .formats.int8_dynamic import Int8DynamicActivationInt8WeightTensor
from .io import (
    mark_transformers_model,
    torchao_linear,  # noqa: F401 - declares lean linears for torchao's tensors to unwrap (no torchao import)
)
from .io.serialization import flatten_state_dict, load_checkpoint, save_checkpoint, unflatten_state_dict
from .io.torchao import (
    ConversionSummary,
    TorchaoConversionError,
    from_torchao,
    load_torchao_state_dict,
    to_torchao,
)
from .quantize.api import (
    Int4WeightOnlyConfig,
    Int8DynamicActivationInt8WeightConfig,
    Int8WeightOnlyConfig,
    QuantizeSummary,
    quantize_,
    register_quantized_model_hook,
)

register_quantized_model_hook(mark_transformers_model)

# The flat module paths of earlier releases (``import subclasses.int4_tensor``, plain-pickle checkpoints)
for _old, _new in {
    "int4_tensor": "formats.int4",
    "int8_tensor": "formats.int8",
    "int8_dynamic_tensor": "formats.int8_dynamic",
    "base": "formats.base",
    "quant_api": "quantize.api",
    "serialization": "io.serialization",
    "torchao_interop": "io.torchao",
    "tensor_parallel": "runtime.tensor_parallel",
}.items():
    sys.modules.setdefault(f"{__name__}.{_old}", sys.modules[f"{__name__}.{_new}"])

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
    "register_quantized_model_hook",
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
        from .io.gguf import load_gguf

        return load_gguf
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
