"""Hugging Face transformers integration: ``save_pretrained`` / ``from_pretrained`` of quantized models.

Importing this module imports transformers and registers, through transformers' public extension
points (``register_quantization_config`` / ``register_quantizer``), the quantization method
``"unwrap"``: ``UnwrapConfig`` and its ``UnwrapHfQuantizer``. ``subclasses.quantize_`` imports it by
itself when it is given a transformers model (transformers is then imported already), so

- ``quantize_(model, cfg); model.save_pretrained(dir)`` writes safetensors in our portable flattened
  form (``serialization.flatten_state_dict``: ``"{key}:packed"`` ..., described in the safetensors
  metadata) and ``"quantization_config": {"quant_method": "unwrap", ...}`` in config.json;
- ``AutoModelForCausalLM.from_pretrained(dir)`` rebuilds the quantized weights (validated, packed for
  the local kernel) — ``import subclasses.hf`` first in a fresh process, so the method is known;
- ``from_pretrained(bf16_dir, quantization_config=UnwrapConfig("int4", group_size=32))`` quantizes
  each weight as it is read (transformers loads one tensor at a time when quantizing on load).

``import subclasses`` never imports transformers; only this module does.
"""

from __future__ import annotations

import json
import warnings
from typing import Any, cast

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.core_model_loading import ConversionOps
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.quantizers.quantizers_utils import get_module_from_name, should_convert_module
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..formats.base import QuantizedWeight
from ..formats.portable import build
from ..quantize.api import (
    Int4WeightOnlyConfig,
    Int8DynamicActivationInt8WeightConfig,
    Int8WeightOnlyConfig,
    WeightConfig,
)
from .serialization import QUANTIZED_KEY, SEPARATOR, _parse_entry, flatten_state_dict

QUANT_METHOD = "unwrap"
# UnwrapConfig.weight -> the quantize_ config it stands for
WEIGHT_FORMATS = {
    "int4": Int4WeightOnlyConfig,
    "int8": Int8WeightOnlyConfig,
    "int8_dynamic": Int8DynamicActivationInt8WeightConfig,
}
# every inner tensor name of our formats, as the checkpoint suffixes "weight:{inner}"
_INNER_NAMES = ("packed", "scale_and_zero", "qdata", "scale")


class UnwrapConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a model quantized by this library (``quant_method: "unwrap"``).

    Args:
        weight: ``"int4"`` (``Int4WeightOnlyConfig``), ``"int8"`` (``Int8WeightOnlyConfig``) or
            ``"int8_dynamic"`` (``Int8DynamicActivationInt8WeightConfig``).
        group_size: int4 only (32/64/128/256).
        modules_to_not_convert: module names (or name prefixes) left in high precision when
            quantizing on load.

    A pre-quantized checkpoint is rebuilt from the per-weight description its safetensors metadata
    carries (format, shape, dtype, group size), not from these fields: they say how to quantize on
    load and, after ``quantize_``, which config was applied last.
    """

    def __init__(
        self,
        weight: str = "int4",
        group_size: int = 32,
        modules_to_not_convert: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        if weight not in WEIGHT_FORMATS:
            raise ValueError(f"UnwrapConfig: weight must be one of {sorted(WEIGHT_FORMATS)}, got {weight!r}")
        self.quant_method = QUANT_METHOD
        self.weight = weight
        self.group_size = group_size
        self.modules_to_not_convert = list(modules_to_not_convert) if modules_to_not_convert else None
        self.weight_config()  # validates group_size

    def weight_config(self) -> WeightConfig:
        """The ``quantize_`` config this stands for."""
        if self.weight == "int4":
            return Int4WeightOnlyConfig(group_size=self.group_size)
        return WEIGHT_FORMATS[self.weight]()

    @classmethod
    def from_weight_config(cls, config: WeightConfig) -> UnwrapConfig:
        """The ``UnwrapConfig`` of a ``quantize_`` config; TypeError for one it does not know."""
        for name, config_type in WEIGHT_FORMATS.items():
            if type(config) is config_type:
                if name == "int4":
                    return cls(name, group_size=cast(Int4WeightOnlyConfig, config).group_size)
                return cls(name)
        raise TypeError(
            f"no UnwrapConfig for {type(config).__name__}; known: {sorted(c.__name__ for c in WEIGHT_FORMATS.values())}"
        )


class UnwrapQuantize(ConversionOps):
    """Quantize one high-precision weight as transformers reads it (quantize on load)."""

    def __init__(self, hf_quantizer: UnwrapHfQuantizer) -> None:
        self.hf_quantizer = hf_quantizer

    def convert(
        self, input_dict: dict, model: nn.Module | None = None, full_layer_name: str | None = None, **kwargs: Any
    ) -> dict:
        (value,) = input_dict.values()
        value = value[0] if isinstance(value, list) else value
        assert model is not None and full_layer_name is not None  # transformers passes both
        return {full_layer_name: self.hf_quantizer.quantize_weight(model, full_layer_name, value)}


class UnwrapDeserialize(ConversionOps):
    """Rebuild one quantized weight from its inner tensors (``"{key}:packed"``, ...) and the metadata."""

    def __init__(self, hf_quantizer: UnwrapHfQuantizer) -> None:
        self.hf_quantizer = hf_quantizer

    def convert(
        self, input_dict: dict, model: nn.Module | None = None, full_layer_name: str | None = None, **kwargs: Any
    ) -> dict:
        tensors = {}
        for pattern, values in input_dict.items():
            if len(values) != 1:
                raise ValueError(f"{full_layer_name}: expected one tensor for {pattern!r}, got {len(values)}")
            tensors[pattern.rpartition(SEPARATOR)[2]] = values[0]
        assert model is not None and full_layer_name is not None  # transformers passes both
        return {full_layer_name: self.hf_quantizer.rebuild_weight(model, full_layer_name, tensors)}


class UnwrapHfQuantizer(HfQuantizer):
    """transformers' side of ``UnwrapConfig``: saves our flattened form, rebuilds or quantizes on load."""

    requires_calibration = False
    quantization_config: UnwrapConfig

    def __init__(self, quantization_config: UnwrapConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self.quantized_entries: dict[str, Any] = {}  # checkpoint key -> metadata entry (pre-quantized)
        self.skipped: list[str] = []  # weights quantize on load left in high precision, with the reason

    # -- saving

    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        return True

    def get_state_dict_and_metadata(self, model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The model's state_dict in our portable flattened form (tied duplicates dropped, as
        transformers would: safetensors stores shared memory once) and its safetensors metadata."""
        state_dict = model.state_dict()
        for target, source in getattr(model, "all_tied_weights_keys", {}).items():
            if target in state_dict and source in state_dict and _same_memory(state_dict[target], state_dict[source]):
                del state_dict[target]
        return flatten_state_dict(state_dict)

    # -- loading a pre-quantized checkpoint

    @property
    def serialized_names(self) -> dict[str, list[str]]:
        # "weight" is stored as "weight:packed" + "weight:scale_and_zero" (or ":qdata" + ":scale")
        return {"weight": [f"weight{SEPARATOR}{name}" for name in _INNER_NAMES]} if self.pre_quantized else {}

    def get_load_operations(self) -> dict:
        return {"deserialize": UnwrapDeserialize}

    def _process_model_before_weight_loading(
        self, model: PreTrainedModel, checkpoint_files: list[str] | None = None, **kwargs: Any
    ) -> None:
        # [] rather than None: no default skips (transformers' would keep an untied lm_head in high
        # precision, where quantize_ quantizes it)
        self.modules_to_not_convert = self.get_modules_to_not_convert(
            model, self.quantization_config.modules_to_not_convert or []
        )
        if self.pre_quantized:
            self.quantized_entries = _read_quantized_entries(checkpoint_files or [])

    def rebuild_weight(self, model: nn.Module, key: str, tensors: dict[str, torch.Tensor]) -> nn.Parameter:
        """The quantized Parameter ``key`` from its inner tensors, validated against the metadata, in
        the dtype the model is loaded in (``from_pretrained(..., dtype=...)``)."""
        entry = self.quantized_entries.get(key)
        if entry is None:
            raise ValueError(
                f"{key!r}: the checkpoint has its inner tensors {sorted(tensors)} but its metadata does not describe it"
            )
        cls, shape, dtype, attributes = _parse_entry(key, entry)
        weight = build(cls, tensors, attributes, shape, dtype, repr(key))
        module, name = get_module_from_name(model, key)
        return nn.Parameter(weight.to(getattr(module, name).dtype), requires_grad=False)

    # -- quantizing on load

    def param_needs_quantization(self, model: PreTrainedModel, param_name: str, **kwargs: Any) -> bool:
        """What ``quantize_`` would quantize: an ``nn.Linear``'s or ``nn.Embedding``'s weight,
        outside ``modules_to_not_convert``. A tied target (lm_head) is not loaded: it is tied to
        its quantized source (embed_tokens) after loading, one quantized weight for both."""
        if self.pre_quantized or not should_convert_module(param_name, self.modules_to_not_convert):
            return False
        module, name = get_module_from_name(model, param_name)
        tied_targets = set(getattr(model, "all_tied_weights_keys", {}))
        return isinstance(module, (nn.Linear, nn.Embedding)) and name == "weight" and param_name not in tied_targets

    def get_quantize_ops(self) -> UnwrapQuantize:
        return UnwrapQuantize(self)

    def quantize_weight(self, model: nn.Module, key: str, value: torch.Tensor) -> nn.Parameter:
        """``value`` quantized with the config (in the model's dtype for it); a weight the config
        cannot take stays in high precision and is named in one warning after loading."""
        module, name = get_module_from_name(model, key)
        value = value.to(getattr(module, name).dtype)
        config = self.quantization_config.weight_config()
        reason = config.unsupported_reason(value)
        if reason is not None:
            self.skipped.append(f"{key} ({reason})")
            return nn.Parameter(value, requires_grad=False)
        return nn.Parameter(config.quantize(value), requires_grad=False)

    def _process_model_after_weight_loading(self, model: PreTrainedModel, **kwargs: Any) -> PreTrainedModel:
        if self.skipped:
            warnings.warn(
                f"{self.quantization_config.weight_config()!r} left these weights in high precision: "
                + "; ".join(self.skipped),
                stacklevel=2,
            )
            self.skipped = []
        return model

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        return True


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    if isinstance(a, QuantizedWeight) or isinstance(b, QuantizedWeight):
        if not (isinstance(a, QuantizedWeight) and type(a) is type(b)):
            return False
        assert isinstance(b, QuantizedWeight)
        return all(x.data_ptr() == y.data_ptr() for x, y in zip(a.inner_tensors(), b.inner_tensors()))
    return a.data_ptr() == b.data_ptr() and a.numel() > 0


def _read_quantized_entries(checkpoint_files: list[str]) -> dict[str, Any]:
    """``{key: metadata entry}`` of every quantized weight the safetensors files describe."""
    from safetensors import safe_open

    entries: dict[str, Any] = {}
    for path in checkpoint_files:
        if not str(path).endswith(".safetensors"):
            raise ValueError(f"{path}: an 'unwrap' quantized checkpoint is stored as safetensors")
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
        try:
            entries.update(json.loads(metadata[QUANTIZED_KEY]))
        except (KeyError, json.JSONDecodeError) as error:
            raise ValueError(
                f"{path}: safetensors metadata {QUANTIZED_KEY!r} is missing or not JSON ({error}); "
                "was it written by save_pretrained of an 'unwrap' quantized model?"
            ) from None
    return entries


def attach(model: nn.Module, config: WeightConfig) -> None:
    """Mark a transformers ``model`` quantized by ``quantize_(model, config)`` so that
    ``save_pretrained`` writes our format and ``quantization_config`` (``quantize_`` calls this)."""
    if not isinstance(model, PreTrainedModel) or type(config) not in WEIGHT_FORMATS.values():
        return  # a config of the user's own: no UnwrapConfig describes it
    quantization_config = UnwrapConfig.from_weight_config(config)
    model.config.quantization_config = quantization_config
    model.hf_quantizer = UnwrapHfQuantizer(quantization_config, pre_quantized=True)
    model.quantization_method = QUANT_METHOD


def _register() -> None:
    # Once per process (this module is imported once); another owner of the name is an error.
    if AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) not in (None, UnwrapConfig):
        raise RuntimeError(
            f"the quantization method {QUANT_METHOD!r} is already registered by {AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD]}"
        )
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(UnwrapConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(UnwrapHfQuantizer)


_register()
