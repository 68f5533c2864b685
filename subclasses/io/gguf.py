"""Import a llama.cpp GGUF file as a transformers model whose Q4_0 / Q4_1 weights are our int4 weights.

GGUF's Q4_0 (``w = d * (q - 8)``) and Q4_1 (``w = d * q + m``) store blocks of 32 weights along a
row: one fp16 ``d`` (and ``m``) and 32 4-bit codes. Our ``Int4WeightTensor`` with group size 32
computes ``(q - 8) * scale + zero``; so the codes are taken as they are, ``scale = d`` and

- Q4_0: ``zero = -0.0`` (``x + -0.0 == x`` for every float x, signed zeros included);
- Q4_1: ``zero = m + 8 * d``, rounded once to the model's dtype.

In float32 the product ``(q - 8) * d`` is exact (an 11-bit fp16 mantissa times a 4-bit code), so
``dequantize()`` equals llama.cpp's / transformers' float32 values bit for bit whenever
``m + 8 * d`` is itself exact in float32 (true unless m and d are ~2^13 apart; measured on the
shipped SmolLM2 file: every block). In bfloat16 ``d`` and ``zero`` are rounded to 8 bits.

Every other block type (Q8_0, K-quants, ...) is dequantized to float32 by ``gguf`` (what transformers
does) and kept in ``dtype``, named in one warning: our int8 is per row, so a 32-block Q8_0 does not fit
it exactly; ``quantize_(model, config)`` afterwards quantizes just those (it skips quantized weights).
Embeddings always stay in ``dtype`` (quantized embeddings are not built yet).
"""

from __future__ import annotations

import importlib
import mmap
import os
import struct
import warnings
from math import prod
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from ..formats.base import FLOAT_DTYPES
from ..formats.int4 import Int4WeightTensor

GROUP = 32  # elements per Q4_0 / Q4_1 block
Q4_0, Q4_1 = 2, 3  # ggml type ids
_Q4_LAYOUT = {Q4_0: (18, False), Q4_1: (20, True)}  # block bytes, has m
_FLOAT_TYPES = (0, 1, 30)  # F32, F16, BF16: values, not blocks
_CHUNK_ELEMENTS = 1 << 20  # dequantize this many elements at a time
_GGUF_VERSIONS = (2, 3)
_ARCHITECTURE_KEY = "general.architecture"
# GGUF metadata value types: fixed-size scalars (struct format), 8 = string, 9 = array
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


class TensorInfo(NamedTuple):
    name: str
    shape: tuple[int, ...]  # torch order (GGUF lists the fastest-moving dimension first)
    ggml_type: int
    start: int  # absolute file offset of the data
    nbytes: int


class GgufFile(NamedTuple):
    path: str
    architecture: str
    tensors: tuple[TensorInfo, ...]


def _require(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"load_gguf needs {module!r}: pip install 'unwrap[real]' (transformers, gguf, accelerate)"
        ) from error


class _Reader:
    """Sequential little-endian reads from a memory-mapped file; a read past the end names what it read."""

    def __init__(self, path: str) -> None:
        self.path, self.pos = path, 0
        with open(path, "rb") as f:  # mmap: struct reads from it are fast (np.memmap's are not)
            self.blob = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if os.path.getsize(path) else b""

    def unpack(self, fmt: str, what: str) -> tuple:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.blob):
            raise ValueError(f"{self.path}: truncated GGUF file: it ends at byte {len(self.blob)} inside {what}")
        values = struct.unpack_from(fmt, self.blob, self.pos)
        self.pos += size
        return values

    def string(self, what: str) -> str:
        (length,) = self.unpack("<Q", what)
        if self.pos + length > len(self.blob):
            raise ValueError(f"{self.path}: truncated GGUF file: it ends at byte {len(self.blob)} inside {what}")
        text = bytes(self.blob[self.pos : self.pos + length]).decode("utf-8", errors="replace")
        self.pos += length
        return text

    def value(self, value_type: int, what: str) -> Any:
        """One metadata value; arrays (the vocabulary...) are skipped: None."""
        if value_type in _SCALARS:
            return self.unpack(_SCALARS[value_type], what)[0]
        if value_type == 8:
            return self.string(what)
        if value_type == 9:
            element_type, count = self.unpack("<IQ", what)
            if element_type in _SCALARS:
                self.unpack(f"<{count}{_SCALARS[element_type][1]}", what)
            elif element_type == 8:  # strings: skip them by their lengths
                for _ in range(count):
                    (length,) = self.unpack("<Q", what)
                    self.pos += length
                if self.pos > len(self.blob):
                    raise ValueError(
                        f"{self.path}: truncated GGUF file: it ends at byte {len(self.blob)} inside {what}"
                    )
            else:
                for _ in range(count):
                    self.value(element_type, what)
            return None
        raise ValueError(f"{self.path}: {what} has unknown GGUF value type {value_type}")


def read_gguf(path: str | os.PathLike) -> GgufFile:
    """Parse and check a GGUF file's header and tensor table without reading tensor data.

    ValueError, naming the field or tensor, for: not GGUF, an unsupported version, a truncated
    header, a tensor of a ggml type ``gguf`` does not know, or tensor data past the end of the file.
    """
    gguf = _require("gguf")
    path = os.fspath(path)
    reader = _Reader(path)
    magic = bytes(reader.blob[:4])
    if magic != b"GGUF":
        raise ValueError(f"{path}: not a GGUF file (starts with {magic!r}, not b'GGUF')")
    reader.pos = 4
    version, tensor_count, kv_count = reader.unpack("<IQQ", "the header")
    if version not in _GGUF_VERSIONS:
        raise ValueError(f"{path}: GGUF version {version}; supported: {_GGUF_VERSIONS}")
    metadata: dict[str, Any] = {}
    for i in range(kv_count):
        key = reader.string(f"metadata key #{i}")
        (value_type,) = reader.unpack("<I", f"metadata field {key!r}")
        metadata[key] = reader.value(value_type, f"metadata field {key!r}")
    entries = []
    for i in range(tensor_count):
        name = reader.string(f"tensor info #{i}")
        (n_dims,) = reader.unpack("<I", f"tensor info of {name!r}")
        dims = reader.unpack(f"<{n_dims}Q", f"tensor info of {name!r}")
        ggml_type, offset = reader.unpack("<IQ", f"tensor info of {name!r}")
        entries.append((name, tuple(reversed(dims)), ggml_type, offset))
    alignment = metadata.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT)
    data_start = -(-reader.pos // alignment) * alignment
    tensors = []
    for name, shape, ggml_type, offset in entries:
        try:
            qtype = gguf.GGMLQuantizationType(ggml_type)
        except ValueError:
            raise ValueError(
                f"{path}: tensor {name!r} has ggml type {ggml_type}, unknown to gguf {getattr(gguf, '__version__', '')}"
            ) from None
        block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
        if shape and shape[-1] % block:
            raise ValueError(
                f"{path}: tensor {name!r} of type {qtype.name} has rows of {shape[-1]}, not a multiple of {block}"
            )
        nbytes = prod(shape) // block * block_bytes
        start = data_start + offset
        if start + nbytes > len(reader.blob):
            raise ValueError(
                f"{path}: truncated GGUF file: tensor {name!r} ({qtype.name}, shape {shape}) needs bytes "
                f"{start}..{start + nbytes}, the file has {len(reader.blob)}"
            )
        tensors.append(TensorInfo(name, shape, ggml_type, start, nbytes))
    architecture = metadata.get(_ARCHITECTURE_KEY)
    if not isinstance(architecture, str):
        raise ValueError(f"{path}: metadata field {_ARCHITECTURE_KEY!r} is missing or not a string")
    return GgufFile(path, architecture, tuple(tensors))


def tensor_bytes(file: GgufFile, info: TensorInfo) -> np.ndarray:
    """The raw bytes of one tensor, uint8 [*shape[:-1], bytes per row], memory-mapped (not read yet)."""
    blob = np.memmap(file.path, mode="r", dtype=np.uint8, offset=info.start, shape=(info.nbytes,))
    rows = prod(info.shape[:-1]) if len(info.shape) > 1 else 1
    return blob.reshape(*info.shape[:-1], info.nbytes // rows)


def int4_from_q4(blocks: np.ndarray, ggml_type: int, shape: tuple[int, ...], dtype: torch.dtype,
                 rows: torch.Tensor | None = None) -> Int4WeightTensor:  # fmt: skip
    """An ``Int4WeightTensor`` (group 32) holding Q4_0 / Q4_1 ``blocks`` (uint8 [N, K/32 * block bytes])
    exactly: the same codes, ``scale = d``, ``zero = m + 8 d`` (Q4_1) or ``-0.0`` (Q4_0), see the module
    docstring. ``rows`` reorders the output rows (transformers' un-permutation of llama's q/k)."""
    n, k = shape
    block_bytes, has_min = _Q4_LAYOUT[ggml_type]
    raw = torch.from_numpy(np.array(blocks, copy=True)).view(n, k // GROUP, block_bytes)
    if rows is not None:
        raw = raw[rows]
    d = raw[..., 0:2].contiguous().view(torch.float16).squeeze(-1).float()  # [N, K/32]
    qs = raw[..., 4:20] if has_min else raw[..., 2:18]
    # byte j of a block holds element j (low nibble) and element j + 16 (high nibble)
    q = torch.cat([qs & 15, qs >> 4], dim=-1).reshape(n, k)
    if has_min:
        m = raw[..., 2:4].contiguous().view(torch.float16).squeeze(-1).float()
        zero = m + 8 * d
    else:
        zero = torch.full_like(d, -0.0)
    scale_and_zero = torch.stack([d, zero], dim=-1).to(dtype).transpose(0, 1).contiguous()  # [K/32, N, 2]
    return Int4WeightTensor.from_codes(q, scale_and_zero, GROUP, dtype)


def load_gguf(path: str | os.PathLike, dtype: torch.dtype = torch.bfloat16) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` from a llama.cpp GGUF file: a transformers causal LM (config and tokenizer
    read by transformers from the same file) whose Q4_0 / Q4_1 linear weights are ``Int4WeightTensor``
    (group 32) holding the file's codes and scales exactly; other tensors dequantized to ``dtype`` (see
    the module docstring). The model is built on the meta device and filled one tensor at a time from
    the memory-mapped file: no float32 copy of the model is ever made. Tied embeddings stay tied.

    Needs transformers, gguf and accelerate (the ``real`` extra). Raises ValueError naming the field
    or tensor for a truncated or corrupt file, an unknown tensor type, an architecture transformers
    cannot load from GGUF, or a tensor whose shape does not fit the model.
    """
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"load_gguf: dtype must be one of {FLOAT_DTYPES}, got {dtype}")
    file = read_gguf(path)
    transformers = _require("transformers")
    _require("accelerate")
    from transformers.modeling_gguf_pytorch_utils import (
        GGUF_SUPPORTED_ARCHITECTURES,
        TENSOR_PROCESSORS,
        LlamaTensorProcessor,
        TensorProcessor,
    )

    if file.architecture not in GGUF_SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"{file.path}: metadata field {_ARCHITECTURE_KEY!r} is {file.architecture!r}, an architecture "
            f"transformers {transformers.__version__} cannot load from GGUF; known: {sorted(GGUF_SUPPORTED_ARCHITECTURES)}"
        )
    processor_class = TENSOR_PROCESSORS.get(file.architecture, TensorProcessor)
    if processor_class not in (TensorProcessor, LlamaTensorProcessor):
        raise ValueError(
            f"{file.path}: architecture {file.architecture!r} needs transformers' {processor_class.__name__}, which "
            "load_gguf does not reproduce on quantized blocks; use from_pretrained(..., gguf_file=...) instead"
        )
    folder, name = os.path.split(os.path.abspath(file.path))
    config = transformers.AutoConfig.from_pretrained(folder, gguf_file=name)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model: Any = _empty_model(transformers, config, dtype)  # a transformers PreTrainedModel
    processor = processor_class(config=config.to_dict())
    names = _gguf_names(file, model, config)

    high_precision, unused = [], []
    for info in file.tensors:
        key = names.get(info.name)
        if key is None:
            unused.append(info.name)
            continue
        module_name, _, attribute = key.rpartition(".")
        module = model.get_submodule(module_name)
        expected = tuple(getattr(module, attribute).shape)
        if info.shape != expected:
            raise ValueError(
                f"{file.path}: tensor {info.name!r} has shape {info.shape}, the model's {key} needs {expected}"
            )
        raw = tensor_bytes(file, info)
        rows = _row_order(processor, info) if len(info.shape) == 2 else None
        linear = isinstance(module, nn.Linear) and attribute == "weight"
        if (
            linear
            and info.ggml_type in _Q4_LAYOUT
            and Int4WeightTensor.unsupported_reason(torch.empty(info.shape, device="meta", dtype=dtype), GROUP) is None
        ):
            value = nn.Parameter(int4_from_q4(raw, info.ggml_type, info.shape, dtype, rows), requires_grad=False)
        else:
            value = nn.Parameter(_dequantized(file, info, raw, dtype, rows))
            if info.ggml_type not in _FLOAT_TYPES:
                high_precision.append(f"{info.name} ({_type_name(info.ggml_type)})")
        setattr(module, attribute, value)
    model.tie_weights()
    missing = [key for key, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise ValueError(f"{file.path}: no tensor in the file for {missing}")
    if high_precision:
        warnings.warn(
            f"load_gguf kept these GGUF tensors dequantized in {dtype} (no exact int4 form): {', '.join(high_precision)}; "
            "quantize_(model, config) quantizes the linear ones among them",
            stacklevel=2,
        )
    if unused:
        warnings.warn(f"load_gguf: the model has no place for these GGUF tensors: {unused}", stacklevel=2)
    return model.eval(), tokenizer


def _empty_model(transformers: Any, config: Any, dtype: torch.dtype) -> nn.Module:
    """The causal LM of ``config``: parameters on the meta device, buffers (rotary tables) computed."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)


def _gguf_names(file: GgufFile, model: nn.Module, config: Any) -> dict[str, str]:
    """``{gguf tensor name: model parameter name}``, by gguf's own name table for the file's
    architecture (transformers' ``get_gguf_hf_weights_map`` does the same, rebuilding the table once
    per submodule: ~400 times here)."""
    gguf = _require("gguf")
    arch = next((key for key, value in gguf.MODEL_ARCH_NAMES.items() if value == file.architecture), None)
    if arch is None:
        raise ValueError(f"{file.path}: metadata field {_ARCHITECTURE_KEY!r} is {file.architecture!r}, unknown to gguf")
    table = gguf.get_tensor_name_map(arch, config.get_text_config().num_hidden_layers)
    names: dict[str, str] = {}
    for key in model.state_dict():
        base, dot, suffix = key.rpartition(".")
        if suffix not in ("weight", "bias"):
            base, dot, suffix = key, "", ""
        parts = base.split(".")
        for i in range(len(parts)):  # "model.layers.0.mlp.up_proj", then "layers.0.mlp.up_proj", ...
            gguf_name = table.get_name(".".join(parts[i:]))
            if gguf_name is not None:
                names.setdefault(gguf_name + dot + suffix, key)
                break
    return names


def _dequantized(
    file: GgufFile, info: TensorInfo, raw: np.ndarray, dtype: torch.dtype, rows: torch.Tensor | None
) -> torch.Tensor:
    """The tensor as transformers computes it (``gguf``'s float32 dequantization, then the processor's
    row order), cast to ``dtype``; dequantized a few MB at a time, so no float32 copy of it exists."""
    gguf = _require("gguf")
    qtype = gguf.GGMLQuantizationType(info.ggml_type)
    out = torch.empty(info.shape, dtype=dtype)
    out_rows, raw_rows = out.view(-1, info.shape[-1]), raw.reshape(-1, raw.shape[-1])
    step = max(1, _CHUNK_ELEMENTS // info.shape[-1])
    for start in range(0, out_rows.shape[0], step):
        try:
            chunk = gguf.quants.dequantize(raw_rows[start : start + step], qtype)
        except NotImplementedError as error:
            raise ValueError(
                f"{file.path}: tensor {info.name!r}: gguf cannot dequantize {qtype.name} ({error})"
            ) from None
        out_rows[start : start + step] = torch.from_numpy(np.array(chunk, dtype=np.float32))
    return out if rows is None else out[rows]


def _type_name(ggml_type: int) -> str:
    return _require("gguf").GGMLQuantizationType(ggml_type).name


def _row_order(processor: Any, info: TensorInfo) -> torch.Tensor | None:
    """The output-row permutation transformers' tensor processor applies to this weight (llama's
    q/k un-permutation), found by running it on the row indices; None when it keeps the order."""
    n = info.shape[0]
    order = processor.process(weights=np.arange(n).reshape(n, 1), name=info.name).weights
    order = torch.from_numpy(np.ascontiguousarray(order)).reshape(-1)
    if order.shape != (n,) or not torch.equal(order.sort().values, torch.arange(n)):
        raise ValueError(
            f"tensor {info.name!r}: transformers' {type(processor).__name__} does not just reorder its rows"
        )
    return None if torch.equal(order, torch.arange(n)) else order
