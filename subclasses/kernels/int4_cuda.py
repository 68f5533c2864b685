"""Int4 on CUDA: the tinygemm kernel (``aten._weight_int4pack_mm``) and its packed layout.

The kernel (``aten/src/ATen/native/cuda/int4mm.cu`` as read upstream; the uint8 packing input
dates from torch 2.5; NVIDIA sm80+) takes
bf16 activations x [M, K] (2-D, contiguous), the weight packed by ``aten._convert_weight_to_int4pack``
from the canonical uint8 [N, K/2] bytes (``q[:, ::2] << 4 | q[:, 1::2]``) into int32
[N/8, K/(inner_k_tiles*16), 32, inner_k_tiles/2], a group size of 32/64/128/256 and the bf16
``scale_and_zero`` [K/g, N, 2] that the CPU kernel takes too; dequant ``(q - 8) * scale + zero``.

Constraints, read from the kernel's checks: ``inner_k_tiles`` in {2, 4, 8}; K a multiple of
``inner_k_tiles * 16``; ``scale_and_zero.size(1) == 8 * ceil(N / 8)``; x bf16 only.
Padding is therefore never needed for the weights ``Int4WeightTensor`` accepts: K is a multiple
of the group size (so of 32) and we pick the largest ``inner_k_tiles`` that divides K (8 for every
K % 128 == 0, i.e. all common model shapes); N is a multiple of 16. No weight is padded and no
activation is padded per call (the activation pad is what made int4 slower than bf16 in the
original report).
"""

from __future__ import annotations

import functools

import torch

from .int4_packing import dense, pack_canonical
from .linear_io import as_kernel_input, as_linear_output

N_TILE = 8  # rows of the weight per packed tile (kNTileSizeTensor)
K_TILE = 16  # input features per k-tile (kKTileSize)
INNER_K_TILES = (8, 4, 2)  # what the kernel accepts, fastest (widest loads) first


def tinygemm_supported(device: torch.device) -> bool:
    """Whether the tinygemm kernel runs on this CUDA device: NVIDIA sm80+ (its body is compiled
    only for those; ROCm builds use another lane layout). Without a CUDA build (fake CUDA tensors
    in tests) only the kernel's meta function exists, and support is assumed."""
    if not torch.cuda.is_available():
        return True
    return _capable(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _capable(index: int) -> bool:
    return torch.version.hip is None and torch.cuda.get_device_capability(index) >= (8, 0)


def inner_k_tiles_for(k: int) -> int:
    """The largest ``inner_k_tiles`` the kernel accepts for in_features ``k`` without padding.

    ValueError if ``k`` is not a positive multiple of 32 (no group size allows that).
    """
    for tiles in INNER_K_TILES:
        if k > 0 and k % (tiles * K_TILE) == 0:
            return tiles
    raise ValueError(f"in_features={k} must be a positive multiple of 32 for the CUDA int4 kernel")


def check_tinygemm_shape(n: int, k: int) -> int:
    """Validate an [n, k] weight for the CUDA kernel; returns its ``inner_k_tiles``."""
    if n <= 0 or n % N_TILE:
        raise ValueError(f"out_features={n} must be a positive multiple of {N_TILE} for the CUDA int4 kernel")
    return inner_k_tiles_for(k)


def pack_tinygemm(q: torch.Tensor) -> torch.Tensor:
    """Codes q [N, K] in 0..15 -> the CUDA kernel's int32 layout, on q's (CUDA) device."""
    n, k = q.shape
    tiles = check_tinygemm_shape(n, k)
    return torch._convert_weight_to_int4pack(pack_canonical(q), tiles)


# The layout, written out (checked on CPU against a loop transcribed from the CUDA packing kernel,
# and on a GPU against the op). Within a tile of 8 rows x (inner_k_tiles*16) columns, element
# (row r, column 32*j + 16*a + 8*b + 2*c + e) goes to lane t = 4*r + c, int32 j, nibble 4*e + 2*a + b.
def _codes_as_lanes(q: torch.Tensor, tiles: int) -> torch.Tensor:
    """uint8 [N, K] -> nibbles [N/8, K/(tiles*16), 32 lanes, tiles/2, 8 nibbles]."""
    n, k = q.shape
    v = q.reshape(n // N_TILE, N_TILE, k // (tiles * K_TILE), tiles // 2, 2, 2, 4, 2)
    # dims: tile_n, r, tile_k, j, a, b, c, e -> tile_n, tile_k, r, c, j, e, a, b
    v = v.permute(0, 2, 1, 6, 3, 7, 4, 5)
    return v.reshape(n // N_TILE, k // (tiles * K_TILE), 32, tiles // 2, 8)


def pack_tinygemm_reference(q: torch.Tensor) -> torch.Tensor:
    """Pure-torch equivalent of ``pack_tinygemm`` on any device (little-endian int32): what
    ``to_torchao`` packs with on a machine without CUDA."""
    n, k = q.shape
    nibbles = _codes_as_lanes(q.to(torch.uint8), check_tinygemm_shape(n, k))
    low, high = nibbles.unflatten(-1, (4, 2)).unbind(-1)  # byte i holds nibble 2i (low), 2i+1 (high)
    return dense(low | (high << 4)).view(torch.int32).squeeze(-1)


def unpack_tinygemm(packed: torch.Tensor) -> torch.Tensor:
    """The CUDA kernel's int32 [N/8, K/(t*16), 32, t/2] -> codes uint8 [N, K] in 0..15."""
    tile_n, tile_k, lanes, half_tiles = packed.shape
    tiles = half_tiles * 2
    n, k = tile_n * N_TILE, tile_k * tiles * K_TILE
    data = dense(packed).view(torch.uint8).view(tile_n, tile_k, lanes, half_tiles, 4)
    nibbles = torch.stack([data & 15, data >> 4], dim=-1).reshape(tile_n, tile_k, lanes, half_tiles, 8)
    v = nibbles.reshape(tile_n, tile_k, N_TILE, 4, half_tiles, 2, 2, 2)  # tile_n, tile_k, r, c, j, e, a, b
    v = v.permute(0, 2, 1, 4, 6, 7, 3, 5)  # -> tile_n, r, tile_k, j, a, b, c, e
    return v.reshape(n, k)


def tinygemm_linear(
    x: torch.Tensor, packed: torch.Tensor, group_size: int, scale_and_zero: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``F.linear`` for an int4 weight in the CUDA tinygemm packing (``check_activation`` ran, no
    gradient is needed).

    The kernel is bf16-only: fp16/fp32 weights (and so activations) are computed in bf16 — x and
    ``scale_and_zero`` are cast per call and the result cast back. Keep the model in bf16 for speed.
    """
    if not x.is_cuda:
        raise ValueError(
            f"activation on {x.device} but the int4 weight is packed for CUDA ({packed.device}); "
            "move the input to the weight's device"
        )
    x2d = as_kernel_input(x)
    if x2d.shape[0] == 0:  # the kernel would launch an empty grid
        return as_linear_output(x2d.new_empty((0, packed.shape[0] * N_TILE)), x, bias)
    if x.dtype == torch.bfloat16:
        out = torch._weight_int4pack_mm(x2d, packed, group_size, scale_and_zero)
    else:
        out = torch._weight_int4pack_mm(x2d.to(torch.bfloat16), packed, group_size, scale_and_zero.to(torch.bfloat16))
        out = out.to(x.dtype)
    return as_linear_output(out, x, bias)
