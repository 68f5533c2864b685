"""Unwrap tensor-subclass parameters into plain tensors, so compiled graphs take plain inputs."""

from .linear import declared_linear, register_linear
from .register import SubclassSpec, rewrap, unwrap, unwrap_tensor_subclass_parameters

__all__ = [
    "unwrap",
    "rewrap",
    "unwrap_tensor_subclass_parameters",
    "SubclassSpec",
    "declared_linear",
    "register_linear",
]
