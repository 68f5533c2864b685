"""The shapes every linear kernel shares: a 2-D contiguous input, an output viewed back to the input's
leading dimensions, and a bias added in the activation's dtype."""

from __future__ import annotations

import torch


def add_bias(out: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``out + bias``; a bias of another dtype raises TypeError (plain F.linear refuses it too,
    and adding it would silently promote the output's dtype)."""
    if bias is None:
        return out
    if bias.dtype != out.dtype:
        raise TypeError(f"bias dtype {bias.dtype} does not match the activation dtype {out.dtype}")
    return out + bias


def as_kernel_input(x: torch.Tensor) -> torch.Tensor:
    """The 2-D contiguous view the CPU kernels take; copies only when x is not contiguous."""
    x2d = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    if x2d.is_contiguous() and x2d.stride(-1) == 1:
        return x2d
    # is_contiguous() ignores the strides of empty tensors and of size-1 dimensions, but the
    # kernels check stride(-1) == 1 ([0, K] or [1, 1] slices with step 2 failed); and
    # .contiguous() would return such a tensor as is.
    return x2d.clone(memory_format=torch.contiguous_format)


def as_linear_output(out: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if x.dim() != 2:
        out = out.view(*x.shape[:-1], out.shape[-1])
    return add_bias(out, bias)
