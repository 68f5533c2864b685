"""Checkpoints of quantized weights: one portable form for torch.save and for safetensors.

A quantized weight is written in its *portable* form: its inner tensors and metadata, with int4
codes in the canonical packing (``int4_packing.pack_canonical``), never in the CPU kernel's
ISA-dependent layout. Loading validates that form against the weight's shape and dtype and packs
it for the kernel of the device it lands on, so a checkpoint written on one machine gives the same
outputs on any other.

- ``torch.save``: ``QuantizedWeight.__reduce_ex__`` pickles ``(wrapper args, portable state)``
  through torch's own rebuild functions; ``__setstate__`` validates and repacks. Every format is
  registered with ``torch.serialization.add_safe_globals`` when its class is defined, so
  ``torch.load(..., weights_only=True)`` loads it and executes no other code.
- safetensors: ``flatten_state_dict`` / ``unflatten_state_dict`` (the torchao / Hugging Face
  convention: inner tensors as ``"{key}:{inner}"``, metadata ``dict[str, str]`` holding JSON).
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from typing import Any

import torch

from .base import FLOAT_DTYPES, FORMATS, QuantizedWeight
from .int4_cuda import canonical_bytes
from .int4_tensor import GROUP_SIZES, Int4WeightTensor, Packing, packing_for
from .int8_tensor import Int8WeightTensor

FORMAT_VERSION = 1
# safetensors metadata keys (values are strings, as safetensors requires)
VERSION_KEY = "unwrap_format_version"
QUANTIZED_KEY = "unwrap_quantized"
SEPARATOR = ":"  # "{key}:{inner}" cannot clash with a state_dict key, which joins names with "."
_DTYPES = {str(dtype).removeprefix("torch."): dtype for dtype in FLOAT_DTYPES}


def portable(weight: QuantizedWeight) -> QuantizedWeight:
    """``weight`` in the form a checkpoint stores: int4 in the canonical packing, others as is."""
    if isinstance(weight, Int4WeightTensor) and weight.packing != Packing.CANONICAL:
        packed = canonical_bytes(weight.codes())  # = int4_packing.pack_canonical; also runs on fake CUDA
        return Int4WeightTensor(
            packed, weight.scale_and_zero, weight.group_size, Packing.CANONICAL, tuple(weight.shape), weight.dtype
        )
    return weight


def localized(weight: QuantizedWeight) -> QuantizedWeight:
    """``weight`` in the form its device's kernel takes (int4 on CPU: the local CPU packing)."""
    if isinstance(weight, Int4WeightTensor) and weight.packing != packing_for(weight.device):
        return Int4WeightTensor.from_codes(weight.codes(), weight.scale_and_zero, weight.group_size, weight.dtype)
    return weight


def portable_state(weight: QuantizedWeight) -> dict[str, Any]:
    """The pickled state of ``weight``: format version, portable inner tensors and attributes."""
    form = portable(weight)
    state: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "tensors": dict(zip(form.tensor_data_names, form.inner_tensors())),
        "attributes": dict(zip(form.tensor_attribute_names, form.attributes()[: len(form.tensor_attribute_names)])),
    }
    if weight.__dict__.get("_is_param"):
        state["parameter"] = True  # an nn.Parameter of a wrapper subclass is the subclass + this flag
    return state


def reduce_weight(weight: QuantizedWeight) -> tuple:
    """``__reduce_ex__`` of a quantized weight: torch's allowlisted rebuild functions only."""
    wrapper_args = (
        type(weight), weight.dtype, tuple(weight.size()), weight.stride(), weight.storage_offset(),
        weight.layout, weight.device, weight.requires_grad,
    )  # fmt: skip
    return (
        torch._tensor._rebuild_from_type_v2,
        (torch._utils._rebuild_wrapper_subclass, type(weight), wrapper_args, portable_state(weight)),
    )


def restore_state(weight: QuantizedWeight, state: Any) -> None:
    """``__setstate__``: fill the bare wrapper torch.load made from a validated, localized state."""
    cls = type(weight)
    where = f"{cls.__name__} of shape {tuple(weight.shape)}"
    if not isinstance(state, dict) or not {"format_version", "tensors", "attributes"} <= state.keys():
        raise ValueError(f"{where}: corrupt checkpoint state (expected a dict with format_version, tensors, attributes)")
    _check_version(state["format_version"], where)
    built = build(cls, state["tensors"], state["attributes"], tuple(weight.shape), weight.dtype, where)
    if built.device != weight.device:
        raise ValueError(f"{where}: inner tensors were loaded on {built.device} but the weight on {weight.device}")
    QuantizedWeight.__init__(weight, *built.inner_tensors(), *built.attributes())
    if state.get("parameter"):
        weight._is_param = True


def build(
    cls: type[QuantizedWeight],
    tensors: dict[str, torch.Tensor],
    attributes: dict[str, Any],
    shape: tuple[int, ...],
    dtype: torch.dtype,
    where: str,
) -> QuantizedWeight:
    """A ``cls`` weight from its portable form, validated and packed for its device's kernel.

    ``where`` names the weight in errors (the state_dict key when known). Raises ValueError if
    the names, shapes, dtypes or devices of the inner tensors or the attributes do not match.
    """
    if not isinstance(tensors, dict) or set(tensors) != set(cls.tensor_data_names):
        got = sorted(tensors) if isinstance(tensors, dict) else type(tensors).__name__
        raise ValueError(f"{where}: {cls.__name__} needs inner tensors {list(cls.tensor_data_names)}, got {got}")
    if not isinstance(attributes, dict) or set(attributes) != set(cls.tensor_attribute_names):
        got = sorted(attributes) if isinstance(attributes, dict) else type(attributes).__name__
        raise ValueError(f"{where}: {cls.__name__} needs attributes {list(cls.tensor_attribute_names)}, got {got}")
    if len(shape) != 2 or not all(isinstance(d, int) and d > 0 for d in shape) or dtype not in FLOAT_DTYPES:
        raise ValueError(f"{where}: a quantized weight needs a 2-D shape and a dtype in {FLOAT_DTYPES}, got {shape}, {dtype}")
    for name, (want_shape, want_dtype) in _expected_inner(cls, shape, dtype, attributes, where).items():
        t = tensors[name]
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != want_shape or t.dtype != want_dtype:
            got = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{where}: inner tensor {name!r} must be {want_shape} {want_dtype}, got {got}")
    devices = {t.device for t in tensors.values()}
    if len(devices) != 1:
        raise ValueError(f"{where}: inner tensors are on different devices {sorted(map(str, devices))}")
    inner = [_aligned(tensors[name]) for name in cls.tensor_data_names]
    attrs = [attributes[name] for name in cls.tensor_attribute_names]
    return localized(cls(*inner, *attrs, shape, dtype))


# torch's allocators align to at least this; a memory-mapped file (transformers reads safetensors
# that way) does not, and the CPU int8 kernel segfaults on qdata 8 bytes off (torch 2.13, M > 1).
_ALIGNMENT = 64


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a contiguous copy of it when it is not contiguous or not aligned as the kernels need."""
    if t.is_contiguous() and (t.device.type == "meta" or t.data_ptr() % _ALIGNMENT == 0):
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _expected_inner(
    cls: type, shape: tuple[int, ...], dtype: torch.dtype, attributes: dict[str, Any], where: str
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Each portable inner tensor's (shape, dtype); checks the attributes on the way."""
    n, k = shape
    if cls is Int4WeightTensor:
        group_size, packing = attributes["group_size"], attributes["packing"]
        if group_size not in GROUP_SIZES or k % group_size or n % 16:
            raise ValueError(
                f"{where}: int4 needs group_size in {GROUP_SIZES} dividing in_features and out_features % 16 == 0, "
                f"got group_size={group_size!r}, shape={shape}"
            )
        if packing != Packing.CANONICAL:
            raise ValueError(f"{where}: int4 checkpoints store packing {Packing.CANONICAL!r}, got {packing!r}")
        return {"packed": ((n, k // 2), torch.uint8), "scale_and_zero": ((k // group_size, n, 2), dtype)}
    if issubclass(cls, Int8WeightTensor):  # int8 dynamic too
        return {"qdata": ((n, k), torch.int8), "scale": ((n,), dtype)}
    return {}  # a format without a rule here: names are checked, shapes are the class's business


def _check_version(version: Any, where: str) -> None:
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{where}: checkpoint format version {version!r}, this version of unwrap reads {FORMAT_VERSION}; "
            "save it again with a matching version"
        )


def flatten_state_dict(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Split a state_dict holding quantized weights into plain tensors and string metadata for
    ``safetensors.torch.save_file(tensors, path, metadata=metadata)``.

    A quantized weight ``key`` becomes its portable inner tensors ``"{key}:{inner}"`` (int4 in the
    canonical packing) and an entry in the JSON of ``metadata["unwrap_quantized"]`` (type, shape,
    dtype, attributes); plain tensors keep their key. Tensors that share memory (tied weights)
    are written as separate copies and non-contiguous ones made contiguous, as safetensors
    requires. Undo with ``unflatten_state_dict``.
    """
    tensors: dict[str, torch.Tensor] = {}
    quantized: dict[str, Any] = {}
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"state_dict[{key!r}] must be a tensor, got {type(value).__name__}")
        if SEPARATOR in key:
            raise ValueError(f"state_dict key {key!r} contains {SEPARATOR!r}, which names inner tensors")
        if isinstance(value, QuantizedWeight):
            state = portable_state(value)
            for name, inner in state["tensors"].items():
                tensors[f"{key}{SEPARATOR}{name}"] = inner
            quantized[key] = {
                "type": type(value).__name__,
                "shape": list(value.shape),
                "dtype": str(value.dtype).removeprefix("torch."),
                "attributes": state["attributes"],
            }
        else:
            tensors[key] = value.detach()
    seen: set[int] = set()
    for key, t in tensors.items():
        pointer = t.untyped_storage().data_ptr()
        if pointer in seen or not t.is_contiguous():
            tensors[key] = t.clone(memory_format=torch.contiguous_format)
        if t.numel():
            seen.add(pointer)
    metadata = {"format": "pt", VERSION_KEY: str(FORMAT_VERSION), QUANTIZED_KEY: json.dumps(quantized)}
    return tensors, metadata


def unflatten_state_dict(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> dict[str, torch.Tensor]:
    """The state_dict ``flatten_state_dict`` was given, from what safetensors loaded
    (``safe_open(...).metadata()`` or the ``metadata`` you saved).

    Quantized weights come back packed for the kernel of the device their tensors were loaded on.
    Everything is validated before anything is returned: a missing, extra or misshapen inner
    tensor, unknown type or bad metadata raises ValueError naming the key. Metadata without
    unwrap's keys (a plain safetensors file) returns ``tensors`` unchanged.
    """
    metadata = metadata or {}
    if VERSION_KEY not in metadata and QUANTIZED_KEY not in metadata:
        return dict(tensors)
    _check_version(_parse_version(metadata.get(VERSION_KEY)), "safetensors metadata")
    try:
        quantized = json.loads(metadata[QUANTIZED_KEY])
    except (KeyError, json.JSONDecodeError) as error:
        raise ValueError(f"safetensors metadata {QUANTIZED_KEY!r} is missing or not JSON: {error}") from None
    if not isinstance(quantized, dict):
        raise ValueError(f"safetensors metadata {QUANTIZED_KEY!r} must be a JSON object")
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for key, entry in quantized.items():
        cls, shape, dtype, attributes = _parse_entry(key, entry)
        if key in tensors:
            raise ValueError(f"{key!r} is both a quantized weight in the metadata and a plain tensor")
        prefix = f"{key}{SEPARATOR}"
        inner = {name[len(prefix):]: t for name, t in tensors.items() if name.startswith(prefix)}
        used.update(prefix + name for name in inner)
        out[key] = build(cls, inner, attributes, shape, dtype, repr(key))
    stray = [key for key in tensors if SEPARATOR in key and key not in used]
    if stray:
        raise ValueError(f"tensors {stray} look like inner tensors of quantized weights but the metadata does not describe them")
    for key, t in tensors.items():
        if SEPARATOR not in key:
            out[key] = t
    return out


def _parse_version(version: str | None) -> Any:
    try:
        return int(version)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return version


def _parse_entry(key: str, entry: Any) -> tuple[type[QuantizedWeight], tuple[int, ...], torch.dtype, dict[str, Any]]:
    if not isinstance(entry, dict) or not {"type", "shape", "dtype", "attributes"} <= entry.keys():
        raise ValueError(f"{key!r}: metadata entry must have type, shape, dtype and attributes, got {entry!r}")
    cls = FORMATS.get(entry["type"])
    if cls is None:
        raise ValueError(f"{key!r}: unknown quantized type {entry['type']!r}; known: {sorted(FORMATS)}")
    dtype = _DTYPES.get(entry["dtype"])
    if dtype is None:
        raise ValueError(f"{key!r}: dtype {entry['dtype']!r} is not one of {sorted(_DTYPES)}")
    shape = entry["shape"]
    if not isinstance(shape, list):
        raise ValueError(f"{key!r}: shape must be a list, got {shape!r}")
    return cls, tuple(shape), dtype, entry["attributes"]


def save_checkpoint(state_dict: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Write ``state_dict`` (quantized or not) to ``path``: safetensors if the name ends in
    ``.safetensors`` (``flatten_state_dict`` + ``save_file``), else ``torch.save``."""
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file

        tensors, metadata = flatten_state_dict(state_dict)
        save_file(tensors, path, metadata=metadata)
    else:
        torch.save(state_dict, path)


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read a checkpoint ``save_checkpoint`` wrote (or ``torch.save``, or a safetensors file), executing no
    code (``weights_only=True``), onto ``device``; int4 comes back packed for its kernel.

    A truncated or corrupt file raises ValueError naming the file; bad content raises ValueError
    naming the key (safetensors) or the weight (torch.save). Nothing is returned on error.
    """
    if str(path).endswith(".safetensors"):
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(path, framework="pt", device=str(device)) as f:
                tensors, metadata = {key: f.get_tensor(key) for key in f.keys()}, f.metadata()
        except SafetensorError as error:
            raise ValueError(f"{path}: not a readable safetensors file (truncated or corrupt?): {error}") from error
        return unflatten_state_dict(tensors, metadata)
    unreadable = f"{path}: not a readable torch.save file (truncated or corrupt?)"
    # torch.load reads a non-zip file as the pre-1.6 format and fails with a misleading message
    if os.path.isfile(path) and not zipfile.is_zipfile(path):
        raise ValueError(f"{unreadable}: not a zip archive")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as error:
        raise ValueError(f"{unreadable}: {error}") from error
