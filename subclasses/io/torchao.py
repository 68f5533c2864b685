"""Conversion both ways between torchao 0.18's weight-only tensors and ours, where the math is the same.

| torchao | ours | what is carried |
|---|---|---|
| ``Int4OpaqueTensor`` (CPU, ``PrototypeInt4WeightOnlyConfig``) | ``Int4WeightTensor`` | ``qdata`` *is* our CPU ``packed`` (both come from ``aten._convert_weight_to_int4pack_for_cpu``); ``scale_and_zero`` as is |
| ``Int4TilePackedTo4dTensor`` (CUDA, ``Int4WeightOnlyConfig(int4_packing_format="tile_packed_to_4d")``) | ``Int4WeightTensor`` | the 4-bit codes (unpacked, torchao's padding cut off, repacked for the weight's device); ``scale_and_zero`` cut to [K/g, N, 2] |
| weight-only ``Int8Tensor`` (``Int8WeightOnlyConfig``), per row or per tensor, zero point 0 | ``Int8WeightTensor`` | ``qdata`` as is; the scale in the weight's dtype (torchao keeps it in fp32 but its linear multiplies by ``scale.to(activation dtype)``, so nothing its outputs use is lost) |

Anything else (DA8W4, an ``act_pre_scale`` from AWQ/SmoothQuant, dynamic
activation quantization, group-wise int8, a non-zero int8 zero point) is refused with the reason.
torchao is optional: this module imports it only inside ``to_torchao``/``load_torchao_state_dict``;
torchao's tensors are recognised by class name and module.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..formats.base import FLOAT_DTYPES, QuantizedWeight
from ..formats.int4 import GROUP_SIZES, Int4WeightTensor, Packing
from ..formats.int8 import Int8WeightTensor
from ..kernels.int4_cuda import pack_tinygemm, pack_tinygemm_reference, unpack_tinygemm

INT4_OPAQUE = "Int4OpaqueTensor"
INT4_TILE_PACKED = "Int4TilePackedTo4dTensor"
INT8 = "Int8Tensor"
CONVERTIBLE = (INT4_OPAQUE, INT4_TILE_PACKED, INT8)
SAFETENSORS_CONVERTIBLE = (INT4_TILE_PACKED, INT8)  # torchao 0.18 saves no Int4OpaqueTensor to safetensors
TILE_K_PAD = 1024  # torchao pads in_features of Int4TilePackedTo4dTensor to a multiple of this


class TorchaoConversionError(ValueError):
    """A tensor that cannot be converted without changing its math; the message says why."""


def is_torchao_tensor(tensor: object) -> bool:
    """Whether ``tensor`` is one of torchao's tensor subclasses (by its class's module; no import)."""
    return isinstance(tensor, torch.Tensor) and type(tensor).__module__.split(".")[0] == "torchao"


def _find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - n % k


def _int4_group_size(t: Any, shape: tuple[int, int], dtype: torch.dtype) -> int:
    """Checks shared by both int4 tensors; returns the group size."""
    block = list(t.block_size)
    if len(block) != 2 or block[0] != 1 or block[1] not in GROUP_SIZES:
        raise TorchaoConversionError(f"block_size {block} is not group-wise [1, g] with g in {GROUP_SIZES}")
    if getattr(t, "act_pre_scale", None) is not None:
        raise TorchaoConversionError("it carries an act_pre_scale (AWQ/SmoothQuant); our int4 linear has none")
    reason = Int4WeightTensor.unsupported_reason(torch.empty(shape, dtype=dtype, device="meta"), block[1])
    if reason is not None:
        raise TorchaoConversionError(reason)
    return block[1]


def _from_int4_opaque(t: Any) -> Int4WeightTensor:
    n, k = t.shape
    if t.act_mapping_type is not None:
        raise TorchaoConversionError(
            f"it is int8-dynamic-activation int4 (act_mapping_type={t.act_mapping_type!r}, DA8W4); only the "
            "weight-only (tinygemm) Int4OpaqueTensor converts"
        )
    sz = t.scale_and_zero
    group_size = _int4_group_size(t, (n, k), sz.dtype)
    if t.qdata.dtype != torch.uint8 or tuple(t.qdata.shape) != (n, k // 2) or t.qdata.device.type != "cpu":
        raise TorchaoConversionError(
            f"qdata {t.qdata.dtype} {tuple(t.qdata.shape)} on {t.qdata.device} is not the CPU kernel's uint8 [{n}, {k // 2}]"
        )
    if tuple(sz.shape) != (k // group_size, n, 2):
        raise TorchaoConversionError(f"scale_and_zero shape {tuple(sz.shape)} is not [{k // group_size}, {n}, 2]")
    # The same op packed both, so torchao's qdata is our CPU packing byte for byte.
    return Int4WeightTensor(t.qdata, sz, group_size, Packing.CPU, (n, k), sz.dtype)


def _from_int4_tile_packed(t: Any) -> Int4WeightTensor:
    n, k = t.shape
    group_size = _int4_group_size(t, (n, k), torch.bfloat16)
    qdata, sz = t.qdata, t.scale_and_zero
    k_pad = _find_multiple(k, TILE_K_PAD)
    if qdata.dtype != torch.int32 or qdata.dim() != 4 or qdata.shape[3] != 4 or qdata.shape[1] * 8 * 16 != k_pad:
        raise TorchaoConversionError(
            f"qdata {qdata.dtype} {tuple(qdata.shape)} is not the tinygemm layout with inner_k_tiles=8 of a "
            f"weight padded to in_features={k_pad}"
        )
    if sz.dtype != torch.bfloat16:
        raise TorchaoConversionError(f"scale_and_zero is {sz.dtype}; Int4TilePackedTo4dTensor is bf16")
    if not n <= qdata.shape[0] * 8 < n + 16 or sz.dim() != 3 or sz.shape[0] * group_size != k_pad or sz.shape[1] < n:
        raise TorchaoConversionError(
            f"qdata {tuple(qdata.shape)} / scale_and_zero {tuple(sz.shape)} do not fit shape ({n}, {k})"
        )
    codes = unpack_tinygemm(qdata)[:n, :k]
    return Int4WeightTensor.from_codes(codes, sz[: k // group_size, :n].contiguous(), group_size, torch.bfloat16)


def _from_int8(t: Any) -> Int8WeightTensor:
    if t.qdata.dim() != 2 or t.qdata.dtype != torch.int8:
        raise TorchaoConversionError(f"qdata must be int8 2-D, got {t.qdata.dtype} {tuple(t.qdata.shape)}")
    n, k = t.qdata.shape
    if t.act_quant_kwargs is not None or t.act_quant_scale is not None:
        raise TorchaoConversionError(
            "its activations are quantized at run time (act_quant_kwargs set: torchao's "
            "Int8DynamicActivationInt8WeightConfig); only the weight-only Int8Tensor converts"
        )
    if t.act_pre_scale is not None:
        raise TorchaoConversionError("it carries an act_pre_scale (AWQ/SmoothQuant); our int8 linear has none")
    if t.dtype not in FLOAT_DTYPES:
        raise TorchaoConversionError(f"dtype {t.dtype} is not one of {FLOAT_DTYPES}")
    block = list(t.block_size)
    if block not in ([1, k], [n, k]):
        raise TorchaoConversionError(
            f"block_size {block} is group-wise; ours is one scale per output channel ([1, {k}])"
        )
    if t.zero_point is not None and bool(t.zero_point.ne(0).any()):
        raise TorchaoConversionError("its zero_point is not 0 (asymmetric); ours is symmetric")
    if t.scale.numel() not in (1, n):
        raise TorchaoConversionError(f"scale shape {tuple(t.scale.shape)} is neither per row [{n}, 1] nor per tensor")
    scale = t.scale.reshape(-1).expand(n).to(t.dtype).contiguous()
    return Int8WeightTensor(t.qdata, scale, (n, k), t.dtype)


_FROM = {INT4_OPAQUE: _from_int4_opaque, INT4_TILE_PACKED: _from_int4_tile_packed, INT8: _from_int8}


def from_torchao_tensor(tensor: torch.Tensor) -> QuantizedWeight:
    """Our weight with the same codes and scales as torchao's ``tensor``.

    TorchaoConversionError (a ValueError) naming the reason when the math differs or the class is
    not one we convert (see the module's table).
    """
    name = type(tensor).__name__
    if not is_torchao_tensor(tensor) or name not in _FROM:
        raise TorchaoConversionError(f"{name} has no equivalent here; convertible: {', '.join(CONVERTIBLE)}")
    return _FROM[name](tensor)


def _tile_packed_pad(dtype: torch.dtype) -> torch.Tensor:
    """The (scale, zero) torchao's ``Int4TilePackedTo4dTensor.from_hp`` gives a padded (all-zero)
    group: its tinygemm qparams clamp the scale at ``finfo(dtype).tiny``; zero = 8 * scale."""
    tiny = torch.finfo(dtype).tiny
    return torch.tensor([tiny, 8 * tiny], dtype=dtype)


def to_torchao_tensor(weight: QuantizedWeight) -> torch.Tensor:
    """torchao's tensor for our ``weight`` (the inverse of ``from_torchao_tensor``): an int4 weight
    on CPU becomes ``Int4OpaqueTensor``, one in the CUDA layout ``Int4TilePackedTo4dTensor`` (bf16
    only), an ``Int8WeightTensor`` a weight-only ``Int8Tensor``. Needs torchao."""
    from torchao.prototype.quantization.int4 import Int4OpaqueTensor
    from torchao.quantization import Int4TilePackedTo4dTensor, Int8Tensor

    n, k = weight.outer_shape
    if type(weight) is Int8WeightTensor:
        zero = torch.zeros(n, 1, dtype=torch.int8, device=weight.qdata.device)
        scale = weight.scale.to(torch.float32).unsqueeze(1)  # torchao keeps fp32 [N, 1]; exact widening
        return Int8Tensor(weight.qdata, scale, [1, k], weight.outer_dtype, zero_point=zero)
    if type(weight) is not Int4WeightTensor:
        raise TorchaoConversionError(f"{type(weight).__name__} has no torchao equivalent with the same math")
    g = weight.group_size
    if weight.packing == Packing.CPU:
        return Int4OpaqueTensor(weight.packed, weight.scale_and_zero, [1, g], torch.Size((n, k)))
    if weight.packing != Packing.CUDA_TINYGEMM:
        raise TorchaoConversionError(
            f"an int4 weight packed {weight.packing!r} (on {weight.device}) has no torchao kernel; move it to CPU or CUDA"
        )
    if weight.outer_dtype != torch.bfloat16:
        raise TorchaoConversionError(f"Int4TilePackedTo4dTensor is bf16 only, the weight is {weight.outer_dtype}")
    n_pad, k_pad = _find_multiple(n, 8), _find_multiple(k, TILE_K_PAD)
    codes = torch.zeros(n_pad, k_pad, dtype=torch.uint8, device=weight.packed.device)
    codes[:n, :k] = weight.codes()
    sz = _tile_packed_pad(torch.bfloat16).to(weight.scale_and_zero.device).expand(k_pad // g, n_pad, 2).clone()
    sz[: k // g, :n] = weight.scale_and_zero
    pack = pack_tinygemm if codes.is_cuda else pack_tinygemm_reference
    qdata = pack(codes)
    if qdata.shape[3] != 4:  # our packer picks inner_k_tiles by K; K_pad % 1024 == 0 always gives 8
        raise AssertionError(f"unexpected tinygemm layout {tuple(qdata.shape)}")
    return Int4TilePackedTo4dTensor(qdata, sz, [1, g], torch.Size((n, k)))


@dataclass
class ConversionSummary:
    """What ``from_torchao``/``to_torchao`` did: ``converted[fqn]`` = "Old -> New",
    ``left[fqn]`` = why a tensor subclass stayed as it was."""

    converted: dict[str, str] = field(default_factory=dict)
    left: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"converted {len(self.converted)}, left {len(self.left)}"]
        lines += [f"  {fqn}: {what}" for fqn, what in self.converted.items()]
        lines += [f"  left {fqn}: {why}" for fqn, why in self.left.items()]
        return "\n".join(lines)


def _convert_model(model: nn.Module, pick, convert, strict: bool) -> ConversionSummary:
    """Replace every parameter ``pick`` accepts by ``convert(param)`` in place; a tied parameter
    is converted once and the one new Parameter assigned to every user."""
    for fqn, module in model.named_modules():
        if "_unwrapped" in module.__dict__:
            raise ValueError(
                f"module {fqn or type(module).__name__!r} is unwrapped; call unwrap.rewrap(model) first (and unwrap again after)"
            )
    users: dict[int, list[tuple[nn.Module, str, str]]] = {}
    for fqn, module in model.named_modules(remove_duplicate=False):
        for name, param in module._parameters.items():
            if param is not None and pick(param):
                users.setdefault(id(param), []).append((module, name, f"{fqn}.{name}" if fqn else name))
    summary = ConversionSummary()
    for entries in users.values():
        module, name, first = entries[0]
        old = module._parameters[name]
        fqns = sorted({fqn for _, _, fqn in entries})
        try:
            new = nn.Parameter(convert(old.data if type(old) is nn.Parameter else old), requires_grad=False)
        except TorchaoConversionError as error:
            for fqn in fqns:
                summary.left[fqn] = f"{type(old).__name__}: {error}"
            continue
        for module, name, _ in entries:
            module._parameters[name] = new
        for fqn in fqns:
            summary.converted[fqn] = f"{type(old).__name__} -> {type(new).__name__}"
    if strict and summary.left:
        raise TorchaoConversionError("not converted: " + "; ".join(f"{k} ({v})" for k, v in summary.left.items()))
    return summary


def from_torchao(model: nn.Module, *, strict: bool = False) -> ConversionSummary:
    """Convert, in place, every torchao weight of ``model`` that has an equivalent here (see the
    module's table) to ours; tied weights stay tied. Others stay torchao's and are listed in the
    summary's ``left`` with the reason (``strict=True``: TorchaoConversionError instead). Call it on a
    wrapped model (``unwrap.rewrap`` an unwrapped one first), then ``unwrap(model)`` as usual."""
    return _convert_model(model, is_torchao_tensor, from_torchao_tensor, strict)


def to_torchao(model: nn.Module, *, strict: bool = False) -> ConversionSummary:
    """The reverse of ``from_torchao``: every ``Int4WeightTensor``/``Int8WeightTensor`` of ``model``
    becomes torchao's tensor with the same codes and scales, in place. Needs torchao."""
    return _convert_model(model, lambda p: isinstance(p, QuantizedWeight), to_torchao_tensor, strict)


def load_torchao_state_dict(
    state_dict: Mapping[str, Any], metadata: Mapping[str, str] | None = None
) -> dict[str, torch.Tensor]:
    """A torchao checkpoint as a state_dict of our weights, for ``model.load_state_dict`` on a model
    quantized with our matching config (same group size).

    ``state_dict``: what ``torch.load`` returns for a torchao checkpoint (torchao tensor objects),
    or, with ``metadata``, the flat tensors of a torchao safetensors file (transformers'
    ``TorchAoConfig`` ``save_pretrained``: ``safe_open(path).metadata()``). Plain tensors pass
    through. A key whose tensor cannot be converted, or whose entries are missing, raises
    ValueError naming the key.
    """
    if metadata is not None:
        state_dict = _unflatten_torchao(state_dict, metadata)
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if is_torchao_tensor(value):
            try:
                value = from_torchao_tensor(value)
            except TorchaoConversionError as error:
                raise ValueError(f"torchao checkpoint entry {key!r} ({type(value).__name__}): {error}") from None
        out[key] = value
    return out


def _unflatten_torchao(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """torchao's safetensors layout (``{module}._{name}_{inner}`` + JSON metadata) back to tensors,
    with our checks first: torchao's own unflatten skips incomplete entries silently."""
    from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict

    if "tensor_names" not in metadata:
        raise ValueError("metadata has no 'tensor_names': not a torchao safetensors checkpoint")
    for name in json.loads(metadata["tensor_names"]):
        entry = json.loads(metadata.get(name, "null") or "null")
        kind = entry.get("_type") if isinstance(entry, dict) else None
        if kind == "Tensor":
            if name not in tensors:
                raise ValueError(f"torchao checkpoint entry {name!r}: its tensor is missing")
            continue
        if kind not in SAFETENSORS_CONVERTIBLE:
            raise ValueError(
                f"torchao checkpoint entry {name!r} has type {kind!r}; convertible from safetensors: "
                f"{', '.join(SAFETENSORS_CONVERTIBLE)}"
            )
        module, attr = name.rsplit(".", 1) if "." in name else ("", name)
        prefix = f"{module}._{attr}_" if module else f"_{attr}_"
        missing = [inner for inner in entry.get("_tensor_data_names", []) if prefix + inner not in tensors]
        if missing:
            raise ValueError(f"torchao checkpoint entry {name!r} ({kind}) lacks {missing}")
    result, leftover = unflatten_tensor_state_dict(dict(tensors), dict(metadata))
    return {**leftover, **result}
