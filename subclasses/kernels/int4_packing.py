"""Int4 byte layouts (the canonical, portable form and the CPU kernel's ISA-dependent form) and
the affine math of dequantization.

Canonical: uint8 [N, K/2], byte = q[:, 2i] << 4 | q[:, 2i+1] (the CUDA tinygemm input convention).

CPU (``aten._convert_weight_to_int4pack_for_cpu``): uint8 [N, K/2] whose bytes depend on the CPU's
instruction set. Rows are cut into blocks of ``block`` rows (the last block takes the remainder);
each block is stored as [K, rows/2] bytes, and each byte holds two rows of the same column:
"half" pairs row j with j + rows/2, "adjacent" pairs 2j with 2j+1 (low nibble first). Measured on
torch 2.13 and checked against the kernel at first use (see ``cpu_layout``).
"""

from __future__ import annotations

import functools

import torch

from .traced import traced_constant

# capability -> (rows per full block, pairing inside a full block); remainder blocks are adjacent.
CPU_LAYOUTS: dict[str, tuple[int, str]] = {
    "AVX512": (64, "half"),
    "AVX2": (32, "half"),
    "DEFAULT": (32, "adjacent"),
}


EPS = 1e-6  # the smallest scale a group gets (a constant group would divide by zero)


def pack_canonical(q: torch.Tensor) -> torch.Tensor:
    """int [N, K] in 0..15 -> canonical uint8 [N, K/2], contiguous. Written without Python
    indexing and ``.contiguous()``, which fail on fake CUDA tensors in a CPU-only build (where the
    CUDA packing's tests run this)."""
    n, k = q.shape
    high, low = q.to(torch.uint8).reshape(n, k // 2, 2).unbind(-1)
    return dense((high << 4) | low)


def dense(t: torch.Tensor) -> torch.Tensor:
    """``t.contiguous()`` by way of ``clone`` (same result; also runs on fake CUDA tensors)."""
    return t if t.is_contiguous() else t.clone(memory_format=torch.contiguous_format)


def unpack_canonical(packed: torch.Tensor) -> torch.Tensor:
    """Canonical uint8 [N, K/2] -> uint8 [N, K] in 0..15."""
    return torch.stack([packed >> 4, packed & 15], dim=-1).view(packed.shape[0], -1)


def pack_cpu(q: torch.Tensor) -> torch.Tensor:
    """int [N, K] in 0..15 -> the local CPU kernel's uint8 [N, K/2]."""
    # Probe the layout now, eagerly: every later reader of these bytes (dequantize, the prefill
    # path) may run under export or Dynamo tracing, where the probe's ops would be traced.
    cpu_layout()
    return _convert_for_cpu(q)


def _convert_for_cpu(q: torch.Tensor) -> torch.Tensor:
    # inner_k_tiles does not change the CPU layout; 1 is the value every K accepts.
    return torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)


def _unpack_blocks(packed: torch.Tensor, rows: int, pairing: str, k: int) -> torch.Tensor:
    nibbles = packed.reshape(-1, k, rows // 2)
    low, high = nibbles & 15, nibbles >> 4
    if pairing == "half":
        blocks = torch.cat([low, high], dim=-1)
    else:
        blocks = torch.stack([low, high], dim=-1).reshape(-1, k, rows)
    return blocks.transpose(1, 2).reshape(-1, k)


def _unpack_with(packed: torch.Tensor, block: int, pairing: str) -> torch.Tensor:
    n, k = packed.shape[0], packed.shape[1] * 2
    full = n - n % block
    parts = []
    if full:
        parts.append(_unpack_blocks(packed[:full], block, pairing, k))
    if n % block:
        parts.append(_unpack_blocks(packed[full:], n % block, "adjacent", k))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


@functools.cache
def cpu_layout() -> tuple[int, str]:
    """The local CPU kernel's (block rows, pairing), verified once against the packing op."""
    capability = torch.backends.cpu.get_cpu_capability()
    layout = CPU_LAYOUTS.get(capability)
    probe = torch.randint(0, 16, (64 + 32 + 16, 64), generator=torch.Generator().manual_seed(0))
    if layout is None or not torch.equal(_unpack_with(_convert_for_cpu(probe), *layout), probe.to(torch.uint8)):
        raise NotImplementedError(
            f"unknown int4 CPU packing for CPU capability {capability!r} (torch {torch.__version__}); "
            f"known: {sorted(CPU_LAYOUTS)}"
        )
    return layout


@traced_constant
def traced_cpu_layout() -> tuple[int, str]:
    """``cpu_layout()`` for code that torch.compile traces (the cached probe is not traceable and
    would break the graph; it runs real tensors)."""
    return cpu_layout()


def unpack_cpu(packed: torch.Tensor) -> torch.Tensor:
    """The local CPU kernel's uint8 [N, K/2] -> uint8 [N, K] in 0..15."""
    return _unpack_with(packed, *traced_cpu_layout())


def dequantize_codes(
    q: torch.Tensor, scale_and_zero: torch.Tensor, group_size: int, dtype: torch.dtype
) -> torch.Tensor:
    """The [N, K] weight from codes q [N, K] and scale_and_zero [K/g, N, 2]: ``(q - 8) * scale + zero``."""
    n, k = q.shape
    scale_and_zero = scale_and_zero.transpose(0, 1).unsqueeze(2)  # [N, K/g, 1, 2]
    return affine_dequantize(
        q.view(n, k // group_size, group_size), scale_and_zero[..., 0], scale_and_zero[..., 1], dtype
    ).view(n, k)


def affine_dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(q - 8) * scale + zero`` computed in fp32 and rounded to ``dtype`` once: what inductor
    computes for the same expression (it upcasts bf16/fp16 math), so eager and compiled
    dequantizations (embeddings, prefill) agree bit for bit; the int4 kernels work in fp32 too."""
    return ((q.to(torch.float32) - 8) * scale.to(torch.float32) + zero.to(torch.float32)).to(dtype)


def gather_cpu_rows(packed: torch.Tensor, rows: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Codes of the weight rows ``rows`` (int64 [T]) from the CPU kernel's packing: uint8 [T, K].

    Reads only those rows' bytes (an embedding lookup must not unpack the whole vocabulary): row r
    sits in a block of ``size`` rows starting at ``start``, stored [K, size/2] bytes; its nibble is
    at byte ``pos`` of each column, high nibble when ``high``."""
    block, pairing = traced_cpu_layout()
    full = n - n % block
    in_full = rows < full
    j = torch.where(in_full, rows % block, rows - full)  # index inside its block
    half = torch.where(in_full, block // 2, (n % block) // 2)
    if pairing == "half":  # full blocks pair j with j + size/2; the remainder block is adjacent
        pos = torch.where(in_full, j % half.clamp(min=1), j // 2)
        high = torch.where(in_full, j >= half, j % 2 == 1)
    else:
        pos, high = j // 2, j % 2 == 1
    columns = torch.arange(k, device=packed.device)
    index = ((rows - j) * (k // 2) + pos).unsqueeze(1) + columns * half.unsqueeze(1)
    return (packed.reshape(-1)[index] >> (high.to(torch.uint8) * 4).unsqueeze(1)) & 15
