"""The decode-step C++ ops beside the int4 GEMV: ``unwrap_cpu::int4_gemv_cat`` (several int4
weights of one input in one call), ``unwrap_cpu::decode_attention`` (one query token over the
allowed slots of a K/V cache) and ``unwrap_cpu::argmax_rows`` (the greedy token), against their
references; and their C entry points in an AOTInductor package."""

from __future__ import annotations

import zipfile

import pytest
import torch
import torch.nn.functional as F

from subclasses.kernels.int4_gemv import int4_gemv_cat
from tests.conftest import sqnr
from tests.subclasses.test_int4_gemv import DTYPES, MIN_SQNR, reference, require_kernel, weight_of

# (N of each weight, K): SmolLM2's q/k/v and gate/up, a partial 64-row block inside the list.
CAT_CASES = [((576, 192, 192), 576), ((1536, 1536), 576), ((64, 80, 128), 256)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("ns, k", CAT_CASES)
def test_gemv_cat_equals_separate_gemvs(ns, k, dtype):
    """Each weight's rows of the fused call are exactly its own GEMV's, and near the reference."""
    require_kernel()
    weights = [weight_of(n, k, 32, dtype) for n in ns]
    x = torch.randn(1, k, dtype=dtype)
    fused = int4_gemv_cat(x, [w.packed for w in weights], 32, [w.scale_and_zero for w in weights])
    separate = [torch.ops.unwrap_cpu.int4_gemv(x, w.packed, 32, w.scale_and_zero) for w in weights]
    assert fused.shape == (1, sum(ns)) and fused.dtype == dtype
    assert torch.equal(fused, torch.cat(separate, dim=1))
    for out, w in zip(fused.split(list(ns), dim=1), weights, strict=True):
        assert sqnr(reference(x, w), out) > MIN_SQNR[dtype]


def test_gemv_cat_rejects_bad_input_and_traces():
    require_kernel()
    a, b = weight_of(64, 256, 64, torch.bfloat16), weight_of(64, 128, 64, torch.bfloat16)
    x = torch.randn(1, 256, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"packed must be a contiguous uint8 \[N, K/2\] with K = 256"):
        int4_gemv_cat(x, [a.packed, b.packed], 64, [a.scale_and_zero, b.scale_and_zero])
    with pytest.raises(RuntimeError, match="one scale_and_zero per packed weight"):
        int4_gemv_cat(x, [a.packed], 64, [])
    torch.library.opcheck(
        torch.ops.unwrap_cpu.int4_gemv_cat.default,
        (x, [a.packed, a.packed], 64, [a.scale_and_zero, a.scale_and_zero]),
        test_utils=("test_schema", "test_faketensor"),
    )


def cache_case(dtype: torch.dtype, heads: int, kv_heads: int, length: int, filled: int, d: int = 64, seed: int = 0):
    """q [1, heads, 1, d]; k, v [1, kv_heads, length, d] whose slots from ``filled`` on hold NaN
    (an unfilled cache slot must never be read); the bool mask of the first ``filled`` slots."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, heads, 1, d, generator=g).to(dtype)
    k, v = (torch.randn(1, kv_heads, length, d, generator=g).to(dtype) for _ in range(2))
    k[:, :, filled:], v[:, :, filled:] = float("nan"), float("nan")
    mask = (torch.arange(length) < filled).view(1, 1, 1, length)
    return q, k, v, mask


def attention_reference(q, k, v, mask, scale):
    """fp64 softmax attention over the mask's slots, as [1, 1, heads, d]."""
    groups = q.shape[1] // k.shape[1]
    keep = mask.reshape(-1)
    k, v = (t[:, :, keep].double().repeat_interleave(groups, dim=1) for t in (k, v))
    out = F.scaled_dot_product_attention(q.double(), k, v, scale=scale)
    return out.transpose(1, 2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "heads, kv_heads, length, filled",
    # the kernel's own loop; the last two: aten's flash on AVX512, then on every ISA (past both thresholds)
    [(9, 3, 256, 1), (9, 3, 256, 37), (14, 2, 64, 64), (4, 4, 300, 290), (16, 4, 4096, 4000)],
)
def test_decode_attention_matches_reference_and_reads_only_allowed_slots(dtype, heads, kv_heads, length, filled):
    require_kernel()
    q, k, v, mask = cache_case(dtype, heads, kv_heads, length, filled)
    out = torch.ops.unwrap_cpu.decode_attention(q, k, v, mask, 0.125)
    assert out.shape == (1, 1, heads, 64) and out.dtype == dtype and out.is_contiguous()
    assert not out.isnan().any()  # the NaN slots past ``filled`` were skipped
    expected = attention_reference(q, k, v, mask, 0.125)
    assert sqnr(expected, out) > MIN_SQNR[dtype]
    if filled > 1 and dtype != torch.float32:  # SDPA on the same (finite) slots, same dtype: no better
        theirs = F.scaled_dot_product_attention(
            q, k[:, :, :filled], v[:, :, :filled], scale=0.125, enable_gqa=True
        ).transpose(1, 2)
        assert sqnr(expected, out) > sqnr(expected, theirs) - 1.0


# the kernel's own loop; aten's flash on AVX512; aten's flash on every ISA
@pytest.mark.parametrize("heads, kv_heads, length, filled", [(9, 3, 64, 40), (9, 3, 128, 120), (16, 4, 4096, 4000)])
def test_decode_attention_takes_additive_masks(heads, kv_heads, length, filled):
    """A float mask: -inf slots skipped, finite values added to the scores (as SDPA does)."""
    require_kernel()
    q, k, v, mask = cache_case(torch.bfloat16, heads, kv_heads, length, filled)
    bias = torch.zeros(1, 1, 1, length).masked_fill(~mask, float("-inf"))
    bias[..., 3] = -2.0
    bias[..., 5] = float("-inf")  # a hole: skipped by the loop, masked in flash
    ours = torch.ops.unwrap_cpu.decode_attention(q, k, v, bias, 0.125)
    assert not ours.isnan().any()  # nothing after the last allowed slot is read
    finite = slice(0, filled)
    theirs = F.scaled_dot_product_attention(
        q.double(),
        k[:, :, finite].double().repeat_interleave(heads // kv_heads, 1),
        v[:, :, finite].double().repeat_interleave(heads // kv_heads, 1),
        attn_mask=bias[..., finite].double(),
        scale=0.125,
    ).transpose(1, 2)
    assert sqnr(theirs, ours) > MIN_SQNR[torch.bfloat16]
    assert torch.equal(ours, torch.ops.unwrap_cpu.decode_attention(q, k, v, bias.bfloat16(), 0.125))


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_decode_attention_splits_slots_across_threads(threads):
    """Enough work splits the slots into one part per thread (at least 16 slots a part), each part's
    softmax merged with the others': the same answer at any thread count, holes in the mask included,
    and a NaN in a query head still reaches that head's output (a merge must not drop it)."""
    require_kernel()
    q, k, v, mask = cache_case(torch.bfloat16, 9, 3, 256, 200)  # 9 * 200 * 64 multiply-adds: past the threshold
    mask[..., 17] = False
    q[0, 4, 0, 7] = float("nan")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = torch.ops.unwrap_cpu.decode_attention(q, k, v, mask, 0.125)
    finally:
        torch.set_num_threads(previous)
    heads = [0, 1, 2, 3, 5, 6, 7, 8]  # every head but the NaN one
    assert out[0, 0, 4].isnan().all() and not out[0, 0, heads].isnan().any()
    expected = attention_reference(q, k, v, mask, 0.125)
    assert sqnr(expected[:, :, heads], out[:, :, heads]) > MIN_SQNR[torch.bfloat16]


def test_decode_attention_rejects_bad_input_and_traces():
    require_kernel()
    q, k, v, mask = cache_case(torch.bfloat16, 9, 3, 32, 8)
    with pytest.raises(RuntimeError, match=r"q must be \[1, H, 1, D\]"):
        torch.ops.unwrap_cpu.decode_attention(q.expand(1, 9, 2, 64), k, v, mask, 0.125)
    with pytest.raises(RuntimeError, match="with H_kv dividing H=9"):
        torch.ops.unwrap_cpu.decode_attention(q, k[:, :2], v[:, :2], mask, 0.125)
    with pytest.raises(RuntimeError, match="mask must be one row of L=32"):
        torch.ops.unwrap_cpu.decode_attention(q, k, v, mask.expand(1, 9, 1, 32), 0.125)
    with pytest.raises(RuntimeError, match="head_dim=40 must be a multiple of 16"):
        torch.ops.unwrap_cpu.decode_attention(q[..., :40], k[..., :40], v[..., :40], mask, 0.125)
    k, v = k.nan_to_num(), v.nan_to_num()  # opcheck compares against itself
    torch.library.opcheck(
        torch.ops.unwrap_cpu.decode_attention.default,
        (q, k, v, mask, 0.125),
        test_utils=("test_schema", "test_faketensor"),
    )


def test_package_calls_the_ops_c_entry_points(tmp_path):
    """An AOTInductor package built with ``package_c_shims`` calls every op of the library through its C
    entry point (none through the proxy executor) and gives the ops' own results."""
    require_kernel()
    from subclasses.kernels.int4_gemv import int8_gemm_available, package_c_shims

    a, b = weight_of(64, 256, 32, torch.bfloat16), weight_of(96, 256, 32, torch.bfloat16)
    q, k, v, mask = cache_case(torch.bfloat16, heads=4, kv_heads=2, length=16, filled=9)
    gemm = int8_gemm_available()

    class Ops(torch.nn.Module):
        def forward(self, x, rows, q, k, v, mask):
            outs = [
                torch.ops.unwrap_cpu.int4_gemv_cat(x, [a.packed, b.packed], 32, [a.scale_and_zero, b.scale_and_zero]),
                torch.ops.unwrap_cpu.int4_gemv(x, b.packed, 32, b.scale_and_zero),
                torch.ops.unwrap_cpu.decode_attention(q, k, v, mask, 0.125),
            ]
            if gemm:
                outs.append(torch.ops.unwrap_cpu.int4_gemm(rows, a.packed, 32, a.scale_and_zero))
            return [*outs, torch.ops.unwrap_cpu.argmax_rows(outs[0])]

    g = torch.Generator().manual_seed(0)
    inputs = (torch.randn(1, 256, generator=g).bfloat16(), torch.randn(5, 256, generator=g).bfloat16(), q, k, v, mask)
    path = torch._inductor.aoti_compile_and_package(
        torch.export.export(Ops(), inputs),
        package_path=str(tmp_path / "ops.pt2"),
        inductor_configs={"aot_inductor.custom_ops_to_c_shims": package_c_shims()},
    )
    with zipfile.ZipFile(path) as package:
        code = "".join(package.read(name).decode() for name in package.namelist() if name.endswith("wrapper.cpp"))
    names = ["int4_gemv_cat", "int4_gemv", "decode_attention", "argmax_rows"] + (["int4_gemm"] if gemm else [])
    assert all(f"aoti_torch_cpu_{name}(" in code for name in names)
    assert "proxy_executor_call_function(" not in code
    for packaged, eager in zip(torch._inductor.aoti_load_package(path)(*inputs), Ops()(*inputs), strict=True):
        assert torch.equal(packaged, eager)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [1, 7, 8, 1001, 49152])
def test_greedy_tokens_answer_as_argmax(dtype, vocab):
    """``greedy_tokens`` is ``argmax(-1, keepdim=True)``: random rows, ties at the maximum (the first
    wins), a NaN (the first NaN wins), a row of -inf, rows of a wider tensor (stride > V)."""
    require_kernel()
    from subclasses.kernels.int4_gemv import greedy_tokens

    g = torch.Generator().manual_seed(vocab)
    wide = torch.randn(6, vocab + 5, generator=g).to(dtype)
    logits = wide[:, :vocab]
    logits[1] = logits[1].round()  # many equal values, the maximum among them
    logits[2, vocab // 2 :] = float("nan")
    logits[2, -1] = float("inf")
    logits[3] = float("-inf")
    logits[4, vocab // 3], logits[4, -1] = 1e4, 1e4  # the maximum twice
    expected = logits.argmax(-1, keepdim=True)
    assert torch.equal(greedy_tokens(logits), expected)
    assert torch.equal(torch.ops.unwrap_cpu.argmax_rows(logits), expected)


def test_argmax_rows_rejects_bad_input_and_traces():
    require_kernel()
    with pytest.raises(RuntimeError, match=r"logits must be \[B, V\] with V > 0 and unit stride in V"):
        torch.ops.unwrap_cpu.argmax_rows(torch.randn(4, 8).t())
    with pytest.raises(RuntimeError, match="logits dtype must be float32, bfloat16 or float16, got Long"):
        torch.ops.unwrap_cpu.argmax_rows(torch.zeros(2, 8, dtype=torch.long))
    torch.library.opcheck(
        torch.ops.unwrap_cpu.argmax_rows.default, (torch.randn(2, 100),), test_utils=("test_schema", "test_faketensor")
    )
