"""The int4 decode (M = 1) kernel: ``unwrap_cpu::int4_gemv``, a small C++ op (csrc/int4_gemv.cpp).

Why: at M = 1 a linear should run at memory bandwidth. ``aten._weight_int4pack_mm_for_cpu`` spends
~2x the CPU time per weight of this kernel and ran at 1.2-2.1x the bytes / bandwidth floor on an
AVX512 machine where this one ran at 1.0-1.2x on large weights (``python -m perf.bench_gemv``).
The op reads the same packed bytes (aten's CPU packing, unchanged: checkpoints and every other
path are untouched), which depends on torch's CPU capability, so the capability picks the kernel:
AVX512 (with VNNI and VBMI; csrc/int4_gemv.cpp) or AVX2 (with FMA and F16C; csrc/int4_gemv_avx2.cpp).
Both round activations to 15 bits per 32 features and sum q * x exactly in integers (VNNI
``vpdpbusd``; AVX2 ``vpmaddubsw``), the rest is fp32: bf16/fp16 outputs match aten's kernel to their
rounding. (8-bit activations, llama.cpp's choice, ran no faster on AVX2 and lost ~15 dB.)

The same library holds the decode step's other ops: ``unwrap_cpu::int4_gemv_cat`` (several weights of
one input in one call, ``int4_gemv_cat`` below; used by ``decode_fusion``) and
``unwrap_cpu::decode_attention`` (csrc/decode_attention.cpp; used by ``decode.gqa_sdpa_attention``), and on
AVX2 the several-row product ``unwrap_cpu::int4_gemm`` (csrc/int4_gemm_avx2.cpp: 8-bit activations x the
4-bit codes in integer arithmetic; ``int4_gemm`` below; the prompt path, see compute_dtype.py).

It is compiled at first use with ``torch.utils.cpp_extension.load`` (~30-60 s, cached under
``TORCH_EXTENSIONS_DIR``, ~/.cache/torch_extensions by default). Where it cannot be used (capability
DEFAULT, e.g. ``ATEN_CPU_CAPABILITY=default``; an AVX512 CPU without VNNI/VBMI; no compiler;
``UNWRAP_INT4_GEMV=0``) ``int4_gemv`` runs the aten kernel instead.
"""

from __future__ import annotations

import ctypes
import functools
import os
import warnings
from pathlib import Path

import torch
from torch.fx.experimental.symbolic_shapes import guard_or_false

from .cpp_build import build_library
from .int4_packing import dequantize_codes, pack_cpu
from .traced import traced_constant

SOURCES = [
    Path(__file__).parent / "csrc" / name
    for name in ("int4_gemv.cpp", "int4_gemv_avx2.cpp", "int4_gemm_avx2.cpp", "decode_attention.cpp", "greedy.cpp")
]
ENV_SWITCH = "UNWRAP_INT4_GEMV"  # "0": never build or use the C++ op


@functools.cache
def kernel_available() -> bool:
    """Whether ``unwrap_cpu::int4_gemv`` is loaded (built on first call) with a kernel for this
    process's packing: torch's CPU capability (``ATEN_CPU_CAPABILITY`` can lower it) AVX512 with
    VNNI and VBMI, or AVX2 with FMA and F16C; not switched off by ``UNWRAP_INT4_GEMV=0``; a working
    compiler. A failed build warns once and answers False from then on."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return False
    capability = torch.backends.cpu.get_cpu_capability()
    # VBMI has no torch query: the library's own check (int4_gemv_kernel) decides that one.
    if capability not in ("AVX512", "AVX2") or (capability == "AVX512" and not torch.cpu._is_vnni_supported()):
        return False
    if not hasattr(torch.ops.unwrap_cpu, "int4_gemv"):  # else loaded by another copy of this module
        if not build_library(
            "unwrap_int4_gemv", SOURCES, ["-O3"], "the int4 GEMV kernel", "using aten's int4 kernel at M = 1"
        ):
            return False
        _register_fake()
    return kernel_isa() != "none" and _agrees_with_aten()


def kernel_isa() -> str:
    """The loaded library's kernel for this process's packing: "avx512", "avx2", or "none"."""
    return str(torch.ops.unwrap_cpu.int4_gemv_kernel())


def _agrees_with_aten() -> bool:
    """Check the kernel once against aten's on every packing case it reads (full blocks, a
    partial one) in the running capability's packing, which torch does not promise to keep."""
    generator = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (64 + 32 + 16, 128), generator=generator)
    scale_and_zero = torch.rand(128 // 32, q.shape[0], 2, generator=generator)
    x = torch.randn(1, 128, generator=generator)
    packed = pack_cpu(q)
    ours = torch.ops.unwrap_cpu.int4_gemv(x, packed, 32, scale_and_zero)
    expected = torch._weight_int4pack_mm_for_cpu(x, packed, 32, scale_and_zero)
    if not (ours - expected).norm() <= 1e-4 * expected.norm():  # a layout error is ~100 %, rounding ~1e-5
        warnings.warn(
            f"the int4 GEMV kernel ({kernel_isa()}) disagrees with aten's on this machine's packing; using aten's",
            stacklevel=3,
        )
        return False
    return True


@functools.cache
def int8_gemm_available() -> bool:
    """Whether ``unwrap_cpu::int4_gemm`` runs here: the library loaded with its AVX2 kernel (CPU
    capability AVX2) and the GEMM agreeing with the exact product of its rounded activations."""
    return kernel_available() and kernel_isa() == "avx2" and _gemm_agrees_with_reference()


def _gemm_agrees_with_reference() -> bool:
    """Check the GEMM once against the dequantized weight times its own 8-bit rounding of x (per 32
    features, scale = the block's largest |x| / 127): equal up to fp32 summation order."""
    generator = torch.Generator().manual_seed(0)
    n, k, group_size = 64, 128, 64
    q = torch.randint(0, 16, (n, k), generator=generator)
    scale_and_zero = torch.rand(k // group_size, n, 2, generator=generator)
    x = torch.randn(3, k, generator=generator)
    amax = x.view(3, k // 32, 32).abs().amax(-1, keepdim=True)  # the kernel's arithmetic, op for op
    x_rounded = (torch.round(x.view(3, k // 32, 32) * (torch.full_like(amax, 127) / amax)) * (amax / 127)).view(3, k)
    w = dequantize_codes(q, scale_and_zero, group_size, torch.float32)
    expected = x_rounded @ w.T
    ours = torch.ops.unwrap_cpu.int4_gemm(x, pack_cpu(q), group_size, scale_and_zero)
    if not (ours - expected).norm() <= 1e-5 * expected.norm():  # a layout error is ~100 %, fp32 sums ~1e-7
        warnings.warn(
            "the int4 GEMM kernel disagrees with its reference on this machine's packing; "
            "prompts use the dequantize + GEMM path",
            stacklevel=3,
        )
        return False
    return True


@traced_constant
def traced_kernel_available() -> bool:
    """``kernel_available()`` for code that torch.compile traces (building and loading a library is
    not traceable; its self-check runs real tensors)."""
    return kernel_available()


def int4_gemv(x: torch.Tensor, packed: torch.Tensor, group_size: int, scale_and_zero: torch.Tensor) -> torch.Tensor:
    """``x @ W^T`` for a contiguous x [1, K] (the caller checks M == 1) and an int4 weight in the
    CPU packing: [1, N] in x's dtype, through the C++ op when it is available, aten's int4 kernel
    otherwise."""
    # fp32 activations keep aten's kernel: its fp32 result is exact to ~125 dB, ours ~85-90 dB.
    # The op takes N (packed's rows) in multiples of 16 only; any other N keeps aten's too.
    if x.dtype != torch.float32 and packed.shape[0] % 16 == 0 and traced_kernel_available():
        return torch.ops.unwrap_cpu.int4_gemv.default(x, packed, group_size, scale_and_zero)
    return torch._weight_int4pack_mm_for_cpu(x, packed, group_size, scale_and_zero)


def int4_mm_for_cpu(
    x2d: torch.Tensor, packed: torch.Tensor, group_size: int, scale_and_zero: torch.Tensor
) -> torch.Tensor:
    """``x2d @ W^T`` for a contiguous x2d [M, K]: ``int4_gemv`` for one row, aten's int4 kernel for
    more (a dynamic M, under compile, takes aten's: no guard on it)."""
    kernel = int4_gemv if guard_or_false(x2d.shape[0] == 1) else torch._weight_int4pack_mm_for_cpu
    return kernel(x2d, packed, group_size, scale_and_zero)


def int4_gemv_cat(
    x: torch.Tensor, packed: list[torch.Tensor], group_size: int, scale_and_zero: list[torch.Tensor]
) -> torch.Tensor:
    """``x @ [W_0; W_1; ...]^T`` [1, sum N_i] for int4 weights of the same K, group size and dtype
    (a fused q/k/v or gate/up projection): one call, one activation quantization, the result of
    each weight's rows equal to ``int4_gemv``'s. Callers check ``kernel_available()`` first."""
    return torch.ops.unwrap_cpu.int4_gemv_cat.default(x, packed, group_size, scale_and_zero)


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(-1, keepdim=True)`` for logits [B, V] (int64 [B, 1], the same answer: the first of
    equal maxima, a row's first NaN): through ``unwrap_cpu::argmax_rows`` on CPU where the library is
    loaded (csrc/greedy.cpp: 10.6 us over 49152 bf16 logits on a 2-core AVX2 EPYC, aten's 223 us), else in
    fp32 (aten's argmax over bf16 is ~3x slower than a copy to fp32 and its argmax, 68 us)."""
    if logits.device.type == "cpu" and logits.dim() == 2 and logits.shape[1] > 0 and traced_kernel_available():
        if logits.dtype in (torch.float32, torch.bfloat16, torch.float16) and logits.stride(1) == 1:
            return torch.ops.unwrap_cpu.argmax_rows.default(logits)
    return logits.float().argmax(-1, keepdim=True)


def int4_gemm(x: torch.Tensor, packed: torch.Tensor, group_size: int, scale_and_zero: torch.Tensor) -> torch.Tensor:
    """``x @ W^T`` for a contiguous x [M, K] and an int4 weight in the AVX2 packing with N a multiple
    of 32 and ``group_size`` of 32: x rounded to 8 bits per 32 features (llama.cpp's Q8_0), the
    products summed exactly in integers, scaled in fp32. Callers check ``int8_gemm_available()``."""
    return torch.ops.unwrap_cpu.int4_gemm.default(x, packed, group_size, scale_and_zero)


# The ops' C entry points (csrc/aoti_shim.h) as an AOTInductor package's code declares them.
_C_SHIMS = {
    "int4_gemv": "AOTITorchError aoti_torch_cpu_int4_gemv(AtenTensorHandle x, AtenTensorHandle packed, "
    "int64_t group_size, AtenTensorHandle scale_and_zero, AtenTensorHandle* out)",
    "int4_gemv_cat": "AOTITorchError aoti_torch_cpu_int4_gemv_cat(AtenTensorHandle x, const AtenTensorHandle* packed, "
    "int64_t packed_count, int64_t group_size, const AtenTensorHandle* scale_and_zero, int64_t scale_and_zero_count, "
    "AtenTensorHandle* out)",
    "int4_gemm": "AOTITorchError aoti_torch_cpu_int4_gemm(AtenTensorHandle x, AtenTensorHandle packed, "
    "int64_t group_size, AtenTensorHandle scale_and_zero, AtenTensorHandle* out)",
    "decode_attention": "AOTITorchError aoti_torch_cpu_decode_attention(AtenTensorHandle q, AtenTensorHandle k, "
    "AtenTensorHandle v, AtenTensorHandle mask, double scale, AtenTensorHandle* out)",
    "argmax_rows": "AOTITorchError aoti_torch_cpu_argmax_rows(AtenTensorHandle logits, AtenTensorHandle* out)",
}


@functools.cache
def package_c_shims() -> dict[torch._ops.OpOverload, list[str]]:
    """Inductor's ``aot_inductor.custom_ops_to_c_shims`` for this library's ops: an AOTInductor package
    built with it calls their C entry points directly, not through the proxy executor (which boxes every
    argument: ~0.7 us more per call in a two-op probe package; 151 calls per SmolLM2 token). The package's
    code finds the entry points when it loads, in this process: the first call makes the library's symbols
    global. Empty where the library is not loaded."""
    if not kernel_available():
        return {}
    path = next((p for p in torch.ops.loaded_libraries if Path(p).stem == "unwrap_int4_gemv"), None)
    if path is None:
        return {}
    ctypes.CDLL(path, mode=os.RTLD_GLOBAL | os.RTLD_NOLOAD)  # the loaded library, its symbols now global
    return {getattr(torch.ops.unwrap_cpu, name).default: [declaration] for name, declaration in _C_SHIMS.items()}


def _register_fake() -> None:
    # The ops' schemas come with the library; their shape functions are declared here once loaded.
    @torch.library.register_fake("unwrap_cpu::int4_gemv")
    def _(x: torch.Tensor, packed: torch.Tensor, group_size: int, scale_and_zero: torch.Tensor) -> torch.Tensor:
        return x.new_empty(x.shape[0], packed.shape[0])

    @torch.library.register_fake("unwrap_cpu::int4_gemv_cat")
    def _(x: torch.Tensor, packed: list[torch.Tensor], group_size: int, scale_and_zero: list) -> torch.Tensor:
        return x.new_empty(x.shape[0], sum(p.shape[0] for p in packed))

    @torch.library.register_fake("unwrap_cpu::int4_gemm")
    def _(x: torch.Tensor, packed: torch.Tensor, group_size: int, scale_and_zero: torch.Tensor) -> torch.Tensor:
        return x.new_empty(x.shape[0], packed.shape[0])

    @torch.library.register_fake("unwrap_cpu::argmax_rows")
    def _(logits: torch.Tensor) -> torch.Tensor:
        return logits.new_empty(logits.shape[0], 1, dtype=torch.long)

    @torch.library.register_fake("unwrap_cpu::decode_attention")
    def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
        return q.new_empty(1, 1, q.shape[1], q.shape[3])
