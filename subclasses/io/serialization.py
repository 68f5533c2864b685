"""Checkpoints of quantized weights: one portable form for torch.save and for safetensors.

A quantized weight is written in its *portable* form (each format's ``portable()``): its inner
tensors and metadata, e.g. int4 codes in the canonical packing, never in the CPU kernel's
ISA-dependent layout. Loading validates that form against the weight's shape and dtype and packs
it for the kernel of the device it lands on, so a checkpoint written on one machine gives the same
outputs on any other.

- ``torch.save``: ``QuantizedWeight.__reduce_ex__`` pickles ``(wrapper args, portable state)``
  through torch's own rebuild functions; ``__setstate__`` validates and repacks (``portable``). Every format is
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

from ..formats.base import FLOAT_DTYPES, FORMATS, QuantizedWeight
from ..formats.portable import FORMAT_VERSION, build, check_version, portable_state

# safetensors metadata keys (values are strings, as safetensors requires)
VERSION_KEY = "unwrap_format_version"
QUANTIZED_KEY = "unwrap_quantized"
SEPARATOR = ":"  # "{key}:{inner}" cannot clash with a state_dict key, which joins names with "."
_DTYPES = {str(dtype).removeprefix("torch."): dtype for dtype in FLOAT_DTYPES}


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
    check_version(_parse_version(metadata.get(VERSION_KEY)), "safetensors metadata")
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
        inner = {name[len(prefix) :]: t for name, t in tensors.items() if name.startswith(prefix)}
        used.update(prefix + name for name in inner)
        out[key] = build(cls, inner, attributes, shape, dtype, repr(key))
    stray = [key for key in tensors if SEPARATOR in key and key not in used]
    if stray:
        raise ValueError(
            f"tensors {stray} look like inner tensors of quantized weights but the metadata does not describe them"
        )
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
