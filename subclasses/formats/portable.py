"""The portable form of a quantized weight: what a checkpoint holds, for every format.

Each format says what its portable form is through three hooks on its class (see
``base.QuantizedWeight``): ``portable()`` (e.g. int4 in the canonical packing, never the CPU
kernel's ISA-dependent layout), ``localized()`` (back to the form its device's kernel takes) and
``portable_inner_shapes()`` (what a checkpoint's inner tensors must look like). This module
holds the format-independent part: the pickled state, its validation and the rebuild.
It imports no format (and not ``base``): the class of a weight is all it needs.
"""

from __future__ import annotations

from typing import Any

import torch

from .checks import FLOAT_DTYPES

FORMAT_VERSION = 1
# torch's allocators align to at least this; a memory-mapped file (transformers reads safetensors
# that way) does not, and the CPU int8 kernel segfaults on qdata 8 bytes off (torch 2.13, M > 1).
_ALIGNMENT = 64


def portable_state(weight: Any) -> dict[str, Any]:
    """The pickled state of a quantized ``weight``: format version, portable inner tensors and attributes."""
    form = weight.portable()
    state: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "tensors": dict(zip(form.tensor_data_names, form.inner_tensors())),
        "attributes": {name: getattr(form, name) for name in form.tensor_attribute_names},
    }
    if weight.__dict__.get("_is_param"):
        state["parameter"] = True  # an nn.Parameter of a wrapper subclass is the subclass + this flag
    return state


def reduce_weight(weight: Any) -> tuple:
    """``__reduce_ex__`` of a quantized weight: torch's allowlisted rebuild functions only."""
    wrapper_args = (
        type(weight), weight.dtype, tuple(weight.size()), weight.stride(), weight.storage_offset(),
        weight.layout, weight.device, weight.requires_grad,
    )  # fmt: skip
    return (
        torch._tensor._rebuild_from_type_v2,
        (torch._utils._rebuild_wrapper_subclass, type(weight), wrapper_args, portable_state(weight)),
    )


def restore_state(weight: Any, state: Any) -> None:
    """``__setstate__``: torch.load made ``weight`` a bare wrapper; it takes the fields of the
    weight ``build`` makes from the validated, localized ``state``."""
    cls = type(weight)
    where = f"{cls.__name__} of shape {tuple(weight.shape)}"
    if not isinstance(state, dict) or not {"format_version", "tensors", "attributes"} <= state.keys():
        raise ValueError(
            f"{where}: corrupt checkpoint state (expected a dict with format_version, tensors, attributes)"
        )
    check_version(state["format_version"], where)
    built = build(cls, state["tensors"], state["attributes"], tuple(weight.shape), weight.dtype, where)
    if built.device != weight.device:
        raise ValueError(f"{where}: inner tensors were loaded on {built.device} but the weight on {weight.device}")
    weight.take_fields(built)
    if state.get("parameter"):
        weight._is_param = True


def build(
    cls: Any,
    tensors: dict[str, torch.Tensor],
    attributes: dict[str, Any],
    shape: tuple[int, ...],
    dtype: torch.dtype,
    where: str,
) -> Any:
    """A ``cls`` weight from its portable form, validated and packed for its device's kernel.

    ``where`` names the weight in errors (the state_dict key when known). Raises ValueError if
    the names, shapes, dtypes or devices of the inner tensors or the attributes do not match.
    """
    if not isinstance(tensors, dict) or set(tensors) != set(cls.tensor_data_names):
        got: object = sorted(tensors) if isinstance(tensors, dict) else type(tensors).__name__
        raise ValueError(f"{where}: {cls.__name__} needs inner tensors {list(cls.tensor_data_names)}, got {got}")
    if not isinstance(attributes, dict) or set(attributes) != set(cls.tensor_attribute_names):
        got = sorted(attributes) if isinstance(attributes, dict) else type(attributes).__name__
        raise ValueError(f"{where}: {cls.__name__} needs attributes {list(cls.tensor_attribute_names)}, got {got}")
    if len(shape) != 2 or not all(isinstance(d, int) and d > 0 for d in shape) or dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"{where}: a quantized weight needs a 2-D shape and a dtype in {FLOAT_DTYPES}, got {shape}, {dtype}"
        )
    try:
        expected = cls.portable_inner_shapes(shape, dtype, attributes)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None
    for name, (want_shape, want_dtype) in expected.items():
        t = tensors[name]
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != want_shape or t.dtype != want_dtype:
            got = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{where}: inner tensor {name!r} must be {want_shape} {want_dtype}, got {got}")
    devices = {t.device for t in tensors.values()}
    if len(devices) != 1:
        raise ValueError(f"{where}: inner tensors are on different devices {sorted(map(str, devices))}")
    inner = [_aligned(tensors[name]) for name in cls.tensor_data_names]
    attrs = [attributes[name] for name in cls.tensor_attribute_names]
    return cls(*inner, *attrs, shape, dtype).localized()


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a contiguous copy of it when it is not contiguous or not aligned as the kernels need."""
    if t.is_contiguous() and (t.device.type == "meta" or t.data_ptr() % _ALIGNMENT == 0):
        return t
    return t.clone(memory_format=torch.contiguous_format)


def check_version(version: Any, where: str) -> None:
    """ValueError unless ``version`` is the checkpoint format this version of unwrap reads."""
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{where}: checkpoint format version {version!r}, this version of unwrap reads {FORMAT_VERSION}; "
            "save it again with a matching version"
        )
