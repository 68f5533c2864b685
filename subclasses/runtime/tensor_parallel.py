"""Tensor parallelism: quantized weights as the local tensors of DTensors (``torch.distributed.tensor``).

``parallelize_module`` with ``ColwiseParallel`` / ``RowwiseParallel`` cuts each weight with
``torch.chunk`` (``aten.split``), ``to_local()`` views it, and ``F.linear`` on DTensors reaches the
local tensors as ``aten.linear`` (under ``inference_mode``) or decomposed into ``aten.t`` then
``aten.mm`` / ``aten.addmm`` / ``aten.matmul``. Every format gets those ops here: a cut is the
format's ``narrow_shard`` (whole groups and channels, else ValueError), ``t()`` is a
``TransposedWeight`` that exists only until the product that consumes it, and every product is the
format's own ``F.linear`` (its kernel). Nothing else of a format changes.
"""

from __future__ import annotations

import sys
from fnmatch import fnmatch
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import return_and_correct_aliasing

from ..formats.base import FORMATS, QuantizedWeight, aten


def _slice(func, args, kwargs):
    weight: QuantizedWeight = args[0]
    given = {**dict(zip(("dim", "start", "end", "step"), args[1:])), **kwargs}
    dim, step = given.get("dim", 0) % 2, given.get("step", 1)
    if step != 1:
        raise ValueError(f"{type(weight).__name__} can be sliced with step 1 only, got step={step}")
    start, end, _ = slice(given.get("start"), given.get("end")).indices(weight.outer_shape[dim])
    out = weight.narrow_shard(dim, start, max(end - start, 0))
    out.is_cut_copy = True  # copy_ into it raises: the write would be lost
    return return_and_correct_aliasing(func, args, kwargs, out)


def _split(func, args, kwargs):
    weight: QuantizedWeight = args[0]
    split_size = args[1] if len(args) > 1 else kwargs["split_size"]
    dim = (args[2] if len(args) > 2 else kwargs.get("dim", 0)) % 2
    size = weight.outer_shape[dim]
    out = [weight.narrow_shard(dim, start, min(split_size, size - start)) for start in range(0, size, split_size)]
    for piece in out:
        piece.is_cut_copy = True
    return return_and_correct_aliasing(func, args, kwargs, out)


def _view(func, args, kwargs):
    # DTensor.to_local() returns local.view_as(local): the same shape is all a weight can be viewed as.
    weight: QuantizedWeight = args[0]
    if tuple(args[1]) != tuple(weight.outer_shape):
        raise NotImplementedError(
            f"{type(weight).__name__} of shape {tuple(weight.outer_shape)} cannot be viewed as {tuple(args[1])}"
        )
    out = weight.rebuild([t.view(t.shape) for t in weight.inner_tensors()])
    return return_and_correct_aliasing(func, args, kwargs, out)


def _linear_op(func, args, kwargs):
    # DTensor runs F.linear as aten.linear on the local tensors: the format's own F.linear.
    x, weight = args[0], args[1]
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    return type(weight).function_table[F.linear](x, weight, bias)


def _is_pinned(func, args, kwargs):
    # torch.distributed.checkpoint records it for every tensor it saves.
    return all(t.is_pinned() for t in args[0].inner_tensors())


def _transpose(func, args, kwargs):
    return TransposedWeight(args[0])


def _no_empty_like(func, args, kwargs):
    # distribute_tensor(src_data_rank=0), the default of parallelize_module, scatters from rank 0
    # into an empty_like buffer; a quantized weight cannot go through c10d as one tensor.
    raise NotImplementedError(
        f"{type(args[0]).__name__} does not implement {func}: to shard quantized weights, call "
        "parallelize_module(..., src_data_rank=None) (every rank holds the same model and cuts its "
        "own shard) or subclasses.runtime.tensor_parallel.parallelize"
    )


# On the base (a format defined later copies its table) and on every format defined already, so the
# order of imports does not matter.
_FORMATS: list[type[QuantizedWeight]] = [QuantizedWeight, *FORMATS.values()]
for _cls in _FORMATS:
    _cls.dispatch_table.update(
        {
            aten.slice.Tensor: _slice,
            aten.split.Tensor: _split,
            aten.linear.default: _linear_op,
            aten.t.default: _transpose,
            aten.view.default: _view,
            aten.is_pinned.default: _is_pinned,
            aten.empty_like.default: _no_empty_like,
        }
    )


class TransposedWeight(torch.Tensor):
    """``weight.t()`` of a quantized weight: shape [in_features, out_features], as DTensor's
    ``F.linear`` decomposition asks for it. ``mm(x, w.t())``, ``matmul(x, w.t())`` and
    ``addmm(bias, x, w.t())`` call the weight's own ``F.linear`` (its kernel); ``.t()`` gives the
    weight back. Nothing else is defined."""

    weight: QuantizedWeight
    __torch_function__ = torch._C._disabled_torch_function_impl  # type: ignore[assignment]

    @staticmethod
    def __new__(cls, weight: QuantizedWeight) -> TransposedWeight:
        n, k = weight.outer_shape
        return torch.Tensor._make_wrapper_subclass(
            cls, (k, n), strides=(1, k), dtype=weight.outer_dtype, device=weight.device, requires_grad=False
        )

    def __init__(self, weight: QuantizedWeight) -> None:
        self.weight = weight

    def __repr__(self) -> str:  # type: ignore[override]
        return f"TransposedWeight({self.weight!r})"

    def __tensor_flatten__(self) -> tuple[list[str], None]:
        return ["weight"], None

    @staticmethod
    def __tensor_unflatten__(inner: dict, meta: Any, outer_size: Any, outer_stride: Any) -> TransposedWeight:
        return TransposedWeight(inner["weight"])

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if func in (aten.mm.default, aten.matmul.default) and type(args[1]) is cls and type(args[0]) is not cls:
            return _linear(args[0], args[1].weight, None)
        if (
            func is aten.addmm.default
            and type(args[2]) is cls
            and type(args[1]) is not cls
            and kwargs.get("beta", 1) == 1
            and kwargs.get("alpha", 1) == 1
        ):
            return _linear(args[1], args[2].weight, args[0])
        if func is aten.t.default:  # an alias, not the weight itself: t() is a view
            return aten.alias.default(args[0].weight)
        if func in (aten.detach.default, aten.alias.default):
            return TransposedWeight(func(args[0].weight))
        raise NotImplementedError(
            f"{cls.__name__} does not implement {func}: only x @ w.t() (mm, matmul, addmm: a linear "
            "layer) is defined; call .dequantize() on the weight first"
        )


def _linear(x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    out = type(weight).function_table[F.linear](x, weight, None)
    return out if bias is None else out + bias  # addmm broadcasts a [N] or [M, N] bias


def dtensor_class() -> Any:
    """``DTensor`` if ``torch.distributed.tensor`` is imported (else no tensor can be one)."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def local_weight(weight: Any) -> Any:
    """The local tensor of a DTensor, else ``weight`` itself."""
    dtensor = dtensor_class()
    return weight.to_local() if dtensor is not None and isinstance(weight, dtensor) else weight


def quantize_dtensor(weight: Any, config: Any) -> torch.Tensor:
    """Shard-then-quantize: quantize a DTensor weight (sharded over a 1-D mesh, or replicated)
    shard by shard and return a DTensor of the same placements whose local tensor is quantized:
    the very tensor quantizing first and sharding after gives. Formats whose scale covers a
    whole row (int8) take the row's absolute maximum over the mesh when rows are cut (Shard(1))."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    mesh, placements = weight.device_mesh, tuple(weight.placements)
    if mesh.ndim != 1 or not isinstance(placements[0], (Shard, Replicate)):
        raise ValueError(
            f"quantize_ takes DTensor weights sharded or replicated over a 1-D mesh, got {placements} on {mesh}"
        )
    local = weight.to_local()
    kwargs = {}
    if placements[0] == Shard(1) and getattr(config, "scale_covers_row", False):
        kwargs["amax"] = weight.detach().abs().amax(dim=1).full_tensor()  # all-reduce max
    quantized = config.quantize(local, **kwargs)
    return DTensor.from_local(quantized, mesh, placements, run_check=False, shape=weight.shape, stride=weight.stride())


def _matches(fqn: str, pattern: str) -> bool:
    """``parallelize_module``'s plan keys: dotted paths whose atoms are fnmatch patterns."""
    names, atoms = fqn.split("."), pattern.split(".")
    return len(names) == len(atoms) and all(fnmatch(n, a) for n, a in zip(names, atoms))


def _sharded_dim(style: Any) -> int | None:
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    if isinstance(style, ColwiseParallel):
        return 0  # out_features
    if isinstance(style, RowwiseParallel):
        return 1  # in_features
    return None


def check_plan(model: nn.Module, plan: dict[str, Any], world_size: int) -> None:
    """ValueError naming the layer and the sizes if ``plan`` would cut a quantized weight of
    ``model`` where its format cannot be cut (int4: inside a group, or to rows not a multiple of
    16). Chunks follow ``torch.chunk``, as DTensor's ``Shard`` does."""
    for fqn, module in model.named_modules():
        if not isinstance(module, nn.Linear) or not isinstance(local_weight(module.weight), QuantizedWeight):
            continue
        weight, local = module.weight, local_weight(module.weight)
        for pattern, style in plan.items():
            dim = _sharded_dim(style)
            if dim is None or not _matches(fqn, pattern):
                continue
            size = weight.shape[dim]
            chunk = -(-size // world_size)
            for start in range(0, size, chunk):
                error = local.cut_error(dim, start, min(chunk, size - start))
                if error is not None:
                    raise ValueError(f"{fqn} ({type(style).__name__} over {world_size} ranks): {error}")


def parallelize(model: nn.Module, mesh: Any, plan: dict[str, Any]) -> nn.Module:
    """``parallelize_module(model, mesh, plan, src_data_rank=None)`` after ``check_plan``: every
    rank holds the same (quantized) model and keeps its own shard. Returns ``model``."""
    from torch.distributed.tensor.parallel import parallelize_module

    check_plan(model, plan, mesh.size())
    return parallelize_module(model, mesh, plan, src_data_rank=None)


def local_weight_bytes(model: nn.Module) -> int:
    """Bytes of the quantized weights this rank holds (the inner tensors of the local shards),
    wrapped or ``unwrap``ped; a weight shared by several modules counts once."""
    seen: set[int] = set()
    total = 0
    for value in model.state_dict(keep_vars=True).values():
        local = local_weight(value)
        if isinstance(local, QuantizedWeight) and local.inner_tensors()[0].data_ptr() not in seen:
            seen.add(local.inner_tensors()[0].data_ptr())
            total += sum(t.numel() * t.element_size() for t in local.inner_tensors())
    return total
