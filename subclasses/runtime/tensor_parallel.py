"""Tensor parallelism: quantized weights as the local tensors of DTensors (``torch.distributed.tensor``).

``parallelize_module`` with ``ColwiseParallel`` / ``RowwiseParallel`` cuts each weight with
``torch.chunk`` (``aten.split``), ``to_local()`` views it, and ``F.linear`` on DTensors reaches the
local tensors as ``aten.linear`` (under ``inference_mode``) or decomposed into ``aten.t`` then
``aten.mm`` / ``aten.addmm`` / ``aten.matmul``. A cut is the
format's ``narrow_shard`` (whole groups and channels, else ValueError), ``t()`` is a
``TransposedWeight`` that exists only until the product that consumes it, and every product is the
format's own ``F.linear`` (its kernel): those ops are in every format's table
(``subclasses.formats.sharding_ops``). This module plans, checks and quantizes sharded models.
"""

from __future__ import annotations

import sys
from fnmatch import fnmatch
from typing import Any

import torch
from torch import nn

from ..formats.base import QuantizedWeight
from ..formats.sharding_ops import TransposedWeight  # noqa: F401 - part of the tensor-parallel API


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
