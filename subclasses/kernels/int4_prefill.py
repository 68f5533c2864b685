"""The int4 prefill path (M > 1 activation rows): on AVX2 the integer GEMM ``unwrap_cpu::int4_gemm``
(see compute_dtype.py) for every M; elsewhere the int4 kernel for small M and, above it, a dequantize of the
packed weight in one fused pass, then a high-precision GEMM.

The CPU int4 kernel (``_weight_int4pack_mm_for_cpu``) is a decode kernel: its time grows linearly
with the activation rows M, while a bf16 GEMM barely does. Above a crossover M it is faster to
dequantize the whole weight (fixed cost) and call ``torch.mm``. ``PREFILL_CROSSOVER`` records the
crossover measured on the project's CPU; ``perf/crossover.py`` re-measures it.
"""

from __future__ import annotations

import functools
import types
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .compute_dtype import prefill_compute_dtype, prefill_int8
from .int4_gemv import int4_gemm, int4_gemv
from .int4_packing import affine_dequantize, dequantize_codes, traced_cpu_layout, unpack_cpu

# Crossover by shape class, measured with ``python -m perf.crossover`` (2 threads, bf16,
# group_size 128, the project's 2-core AVX512/AMX Xeon, torch 2.13, eager with the compiled
# dequantize below, min over 9 interleaved rounds; 2026-11-22, another 2-thread job running).
# Rows: (largest weight numel N*K of the class, largest M for which the int4 kernel still wins).
# Representative shapes 1024x1024 / 2048x2048 / 4096x4096; kernel vs dequantize+mm, ms:
#   1024^2: M=32 0.38 vs 0.43, M=48 0.59 vs 0.51 -> 37
#   2048^2: M=64 3.6 vs 3.9,  M=96 5.5 vs 4.7  -> 73
#   4096^2: M=96 18.9 vs 26.6 (no crossing up to 96; a fresh 32 MiB dequantize buffer page-faults
#           ~10 ms per call) -> 96, the largest M measured
PREFILL_CROSSOVER: tuple[tuple[float, int], ...] = (
    (1 << 20, 37),
    (1 << 23, 73),
    (float("inf"), 96),
)
# int4_linear sends M <= PREFILL_MIN_ROWS straight to the kernel (its one comparison on the decode
# path). 1, not the smallest crossover: under torch.compile a dynamic M is known to be >= 2, so
# "M <= 1" installs no guard, and every M >= 2 shares one graph (see int4_prefill_mm).
PREFILL_MIN_ROWS: int = 1


def crossover_rows(n: int, k: int) -> int:
    """The largest activation row count M for which the int4 kernel beats dequantize + GEMM."""
    numel = n * k
    for max_numel, rows in PREFILL_CROSSOVER:
        if numel <= max_numel:
            return rows
    return PREFILL_CROSSOVER[-1][1]


def dequantize_kn(
    packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int, dtype: torch.dtype, n: int, k: int
) -> torch.Tensor:
    """The dequantized weight, transposed: [K, N] contiguous, from the CPU kernel's packing.

    Written so that inductor emits one vectorized loop (each packed byte is read in its stored
    order, scale and zero [K/g, N] contiguous are read along N; a stride-2 read of
    ``scale_and_zero`` would make inductor give up vectorizing): no intermediates, no transpose copy.
    Needs N to be a multiple of the layout's block rows (see ``supports_fast_dequantize``).
    """
    rows, pairing = traced_cpu_layout()
    # packed is [N/rows, K, rows/2] bytes; each byte holds two output rows of one column.
    p = packed.view(n // rows, k // group_size, group_size, rows // 2).permute(1, 2, 0, 3)
    if pairing == "half":  # byte j holds rows j (low nibble) and j + rows/2 (high nibble)
        p, shape = p.unsqueeze(3), (k // group_size, 1, n // rows, 2, rows // 2)
        shifts = torch.tensor([0, 4], dtype=torch.uint8, device=packed.device).view(2, 1)
    else:  # "adjacent": byte j holds rows 2j (low) and 2j + 1 (high)
        p, shape = p.unsqueeze(4), (k // group_size, 1, n // rows, rows // 2, 2)
        shifts = torch.tensor([0, 4], dtype=torch.uint8, device=packed.device)
    q = (p >> shifts) & 15  # [K/g, g, N/rows, pair dims...]
    return affine_dequantize(q, scale.view(shape), zero.view(shape), dtype).reshape(k, n)


def supports_fast_dequantize(n: int) -> bool:
    return n % traced_cpu_layout()[0] == 0


@torch.library.custom_op("unwrap_int4::split_scale_and_zero", mutates_args=())
def split_scale_and_zero(scale_and_zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[K/g, N, 2] -> contiguous scale and zero [K/g, N]. An opaque op so that inductor copies
    them out once instead of fusing a stride-2 read into the dequantize loop (which it then
    leaves unvectorized: ~3x slower)."""
    return scale_and_zero[..., 0].contiguous(), scale_and_zero[..., 1].contiguous()


@split_scale_and_zero.register_fake
def _(scale_and_zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    shape = scale_and_zero.shape[:-1]
    return scale_and_zero.new_empty(shape), scale_and_zero.new_empty(shape)


# Weights with fewer elements dequantize eagerly (a 512x512 one in ~0.1 ms): not worth a compile.
COMPILE_MIN_NUMEL = 1 << 18


class CompiledDequantize:
    """``dequantize_kn`` compiled for one weight shape and dtype (one fused kernel instead of ~6
    elementwise passes: ~4x faster at 2048x2048; static shapes: the dynamic-shape version is not
    vectorized by Inductor).

    Each instance compiles its own copy of the function's code, so Dynamo's cache and recompile
    limit are per shape, never shared by all weights; and it is called with detached tensors, so a
    weight that is an ``nn.Parameter`` is never guarded on by identity (under Inductor freezing
    Dynamo guards parameters by id: one recompile per weight). If compiling fails (no C++
    compiler), it warns and runs eagerly from then on: that shape only, never silently."""

    def __init__(self, name: str) -> None:
        code = dequantize_kn.__code__.replace(co_name=name)
        function = types.FunctionType(code, dequantize_kn.__globals__, name)
        self.run: Callable[..., torch.Tensor] = torch.compile(function, dynamic=False, fullgraph=True)
        self.compiled = True

    def __call__(self, packed: torch.Tensor, *args: Any) -> torch.Tensor:
        if not self.compiled:
            return dequantize_kn(packed, *args)
        try:
            return self.run(packed.detach(), *args)
        except Exception as error:  # a backend failure: keep working, slower, and say so
            warnings.warn(f"compiling the int4 dequantize failed ({error!r}); running it eagerly", stacklevel=3)
            self.compiled = False
            return dequantize_kn(packed, *args)


@functools.cache
def compiled_dequantize(n: int, k: int, group_size: int, dtype: torch.dtype) -> CompiledDequantize:
    """The one ``CompiledDequantize`` of an [n, k] weight with ``group_size`` producing ``dtype``."""
    return CompiledDequantize(f"dequantize_kn_{n}x{k}_g{group_size}_{str(dtype).removeprefix('torch.')}")


def eager_dequantize_kn(
    packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int, dtype: torch.dtype, n: int, k: int
) -> torch.Tensor:
    """``dequantize_kn`` outside a compiled graph: compiled once per weight shape (``compiled_dequantize``)
    for large weights, eager for small ones."""
    if packed.numel() * 2 < COMPILE_MIN_NUMEL:  # small: eager costs little, compiling seconds
        return dequantize_kn(packed, scale, zero, group_size, dtype, n, k)
    return compiled_dequantize(n, k, group_size, dtype)(packed, scale, zero, group_size, dtype, n, k)


def prefill_mm(
    x2d: torch.Tensor, packed: torch.Tensor, scale_and_zero: torch.Tensor, group_size: int, n: int, k: int
) -> torch.Tensor:
    """``x2d @ W^T`` via a fused dequantize (inlined under torch.compile, cached-compiled in eager)
    and ``torch.mm``; x2d is [M, K], the result [M, N] in x2d's dtype. The GEMM runs in
    ``prefill_compute_dtype`` (fp32 for bf16 activations on CPUs without native bf16)."""
    compute = prefill_compute_dtype(x2d.dtype)
    if not supports_fast_dequantize(n):  # a partial last block: the generic (slower) unpack
        w_kn = dequantize_codes(unpack_cpu(packed), scale_and_zero, group_size, compute).t()
    else:
        scale, zero = split_scale_and_zero(scale_and_zero)
        dequantize = dequantize_kn if torch.compiler.is_compiling() else eager_dequantize_kn
        w_kn = dequantize(packed, scale, zero, group_size, compute, n, k)
    return torch.mm(x2d.to(compute), w_kn).to(x2d.dtype)


def int8_gemm_applies(x2d: torch.Tensor, group_size: int, n: int) -> bool:
    """Whether ``int4_gemm`` takes this product: the CPU's choice (``prefill_int8``), full 32-row
    packed blocks and whole 32-feature blocks per group (``n``, ``group_size`` are ints: no guard)."""
    return n % 32 == 0 and group_size % 32 == 0 and prefill_int8(x2d.dtype)


def mm_by_rows(
    x2d: torch.Tensor, packed: torch.Tensor, scale_and_zero: torch.Tensor, group_size: int, n: int, k: int
) -> torch.Tensor:
    """``x2d @ W^T``: the int4 kernel up to the crossover row count of an [n, k] weight,
    dequantize + GEMM above it (the integer GEMM for any M > 1 where it applies). M must be known."""
    if x2d.shape[0] == 1:
        return int4_gemv(x2d, packed, group_size, scale_and_zero)
    if int8_gemm_applies(x2d, group_size, n):
        return int4_gemm(x2d, packed, group_size, scale_and_zero)
    if x2d.shape[0] <= crossover_rows(n, k):
        return torch._weight_int4pack_mm_for_cpu(x2d, packed, group_size, scale_and_zero)
    return prefill_mm(x2d, packed, scale_and_zero, group_size, n, k)


@torch.library.custom_op("unwrap_int4::mm_by_rows", mutates_args=())
def mm_by_rows_at_run_time(
    x2d: torch.Tensor, packed: torch.Tensor, scale_and_zero: torch.Tensor, group_size: int, n: int, k: int
) -> torch.Tensor:
    """``mm_by_rows`` as one opaque op, for graphs compiled or exported with a symbolic M: the
    choice is made when M is known, so one graph serves every M. (A ``torch.cond`` in the graph
    failed whenever the weight's inner sizes were symbolic too, as under ``dynamic=True`` or
    ``torch.export``; and inductor mis-lowers the int4 kernel inside a cond branch.)"""
    return mm_by_rows(x2d, packed, scale_and_zero, group_size, n, k)


@mm_by_rows_at_run_time.register_fake
def _(
    x2d: torch.Tensor, packed: torch.Tensor, scale_and_zero: torch.Tensor, group_size: int, n: int, k: int
) -> torch.Tensor:
    return x2d.new_empty(x2d.shape[0], n)


def int4_prefill_mm(
    x2d: torch.Tensor, packed: torch.Tensor, scale_and_zero: torch.Tensor, group_size: int, n: int, k: int
) -> torch.Tensor:
    """``x2d @ W^T`` for x2d [M, K] and an [n, k] int4 weight in the CPU packing: the int4 kernel
    up to the weight's crossover, dequantize + GEMM above it.

    Traced with a symbolic M (``dynamic=True``, a recompile after a second batch size,
    ``mark_dynamic``/``mark_unbacked``, export with dynamic dims) the choice is one opaque op
    decided at run time: a Python branch would guard on M and split prompt lengths into one graph
    per side of every crossover. With a static M the chosen path is traced into the graph (the
    dequantize fused by inductor). ``n``, ``k`` are the weight's metadata (ints), never the
    inner tensors' sizes, which may be symbolic under ``dynamic=True`` and export.
    """
    m, rows = x2d.shape[0], crossover_rows(n, k)
    # statically_known_true installs no guard: a symbolic M answers False to both.
    if statically_known_true(m == 1):  # decode of a 3-D x, or with a bias
        return int4_gemv(x2d, packed, group_size, scale_and_zero)
    if int8_gemm_applies(x2d, group_size, n):  # every M > 1 (an unbacked M of 1 too: correct, 8-bit x)
        return int4_gemm(x2d, packed, group_size, scale_and_zero)
    if statically_known_true(m <= rows):
        return torch._weight_int4pack_mm_for_cpu(x2d, packed, group_size, scale_and_zero)
    if statically_known_true(m > rows):
        return prefill_mm(x2d, packed, scale_and_zero, group_size, n, k)
    return mm_by_rows_at_run_time(x2d, packed, scale_and_zero, group_size, n, k)
