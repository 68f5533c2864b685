"""What a quantized prefill GEMM (several activation rows: a prompt) computes in on CPU.

A bf16 (or fp16) GEMM is fast only where the CPU has native instructions for it (AVX512-BF16 or AMX;
AVX512-FP16 or AMX-FP16). Elsewhere — every AVX2 laptop, AMD before Zen 4, ``ATEN_CPU_CAPABILITY=avx2``
or ``default`` — it falls to a slow path: measured on an AVX2 EPYC (2 threads, torch 2.13) a bf16
``torch.mm`` of [256, 576] x [576, 1536] takes ~350 ms, the same product in fp32 ~4 ms. There the
prefill dequantizes the weight to fp32 and multiplies in fp32, then casts the result back: more
accurate and ~90x faster. Decode (one activation row) does not go through here.

Faster still, where torch's CPU capability is AVX2 and the C++ library is built: an int4 weight's
GEMM runs as ``unwrap_cpu::int4_gemm`` (``prefill_int8``): the activation rounded to 8 bits per 32
features, as llama.cpp's prompt path, multiplied with the 4-bit codes in integer arithmetic,
~1.4-1.6x faster than dequantize + fp32 GEMM at M = 512 and ~2x faster than aten's int4 kernel at
M = 2-64 on a 2-core AVX2 EPYC (``python -m perf.bench_prompt``). The rounding is the only error:
~45 dB SQNR on Gaussian rows (fp32: ~55 dB against the bf16 model's rounding).

``UNWRAP_PREFILL_DTYPE`` overrides the choice: ``float32`` always computes in fp32 (no int8 GEMM),
``model`` always in the activation's dtype, ``auto`` (the default) decides by the CPU as above.
"""

from __future__ import annotations

import functools
import os

import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily

from .int4_gemv import int8_gemm_available

ENV_OVERRIDE = "UNWRAP_PREFILL_DTYPE"
CHOICES = ("auto", "float32", "model")


@functools.cache
def native_half_precision() -> frozenset[torch.dtype]:
    """The half-precision dtypes this CPU multiplies natively, as torch dispatches to it: none below
    AVX512 (``torch.backends.cpu.get_cpu_capability()`` honours ``ATEN_CPU_CAPABILITY``)."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX512", "AMX"):
        return frozenset()
    native = set()
    if torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported():
        native.add(torch.bfloat16)
    if torch.cpu._is_amx_fp16_supported():
        native.add(torch.float16)
    return frozenset(native)


def prefill_override() -> str:
    """``UNWRAP_PREFILL_DTYPE`` (``auto`` when unset), checked against its allowed values."""
    value = os.environ.get(ENV_OVERRIDE, "auto")
    if value not in CHOICES:
        raise ValueError(f"{ENV_OVERRIDE}={value!r}: expected one of {', '.join(CHOICES)}")
    return value


# A constant to Dynamo: decided once while tracing (no graph break on the CPU queries, no guard on the
# environment); a graph compiled before the override changes keeps the dtype it was traced with.
@torch.compiler.assume_constant_result
def prefill_compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a CPU prefill GEMM with ``dtype`` activations computes in: ``dtype`` itself, or
    float32 for a half-precision dtype this CPU has no native arithmetic for."""
    override = prefill_override()
    if dtype not in (torch.bfloat16, torch.float16) or override == "model":
        return dtype
    if override == "float32" or dtype not in native_half_precision():
        return torch.float32
    return dtype


@torch.compiler.assume_constant_result
def prefill_int8(dtype: torch.dtype) -> bool:
    """Whether an int4 weight's prefill GEMM with ``dtype`` activations runs in 8-bit integers
    (``unwrap_cpu::int4_gemm``): half-precision activations, the override ``auto``, and the kernel
    here (CPU capability AVX2, the library built and self-checked)."""
    if dtype not in (torch.bfloat16, torch.float16) or prefill_override() != "auto":
        return False
    with unset_fake_temporarily():  # its self-check runs real tensors, also when Dynamo asks
        return int8_gemm_available()


def describe_prefill(dtype: torch.dtype) -> str:
    """One line for summaries and reports: what a ``dtype`` model's prompt computes in, and why."""
    if prefill_int8(dtype):
        return "prefill GEMMs in int8 x int4 (unwrap_cpu::int4_gemm, AVX2; fp32 where a shape needs it)"
    compute = prefill_compute_dtype(dtype)
    name = str(compute).removeprefix("torch.")
    capability = torch.backends.cpu.get_cpu_capability()
    if compute == dtype:
        return f"prefill GEMMs in {name} ({capability})"
    return f"prefill GEMMs in {name} ({capability}: no native {str(dtype).removeprefix('torch.')} arithmetic)"
