"""How int4 scales and zeros are chosen: "tinygemm" is torchao's math bit for bit; "mse" and "clip"
never do worse than it on any group, and their weights behave like any other (kernel, checkpoints, unwrap)."""

import importlib
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import subclasses.kernels.int4_qparams as int4_qparams
from subclasses import Int4WeightOnlyConfig, Int4WeightTensor, load_checkpoint, quantize_, save_checkpoint
from subclasses.formats.int4 import quantize_int4
from subclasses.kernels.int4_qparams import group_squared_error
from tests.conftest import sqnr
from unwrap import unwrap

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
SEARCHES = ["mse", "clip"]


def require(module: str):
    """Import an optional package: skip locally when it is missing, fail in CI (CI=true)."""
    if os.environ.get("CI") == "true":
        return importlib.import_module(module)
    return pytest.importorskip(module)


def per_group_error(w: torch.Tensor, weight: Int4WeightTensor) -> torch.Tensor:
    """Squared error per row and group of the weight as the kernel sees it (fp32 dequantize)."""
    deq = weight.to(torch.float32).dequantize()
    n, k = w.shape
    return (deq.double() - w.double()).square().view(n, -1, weight.group_size).sum(-1)


def heavy_tailed(n: int, k: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """Student-t (3 degrees of freedom) weights with a few large outliers, like real LLM weights."""
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=generator) / torch.rand(n, k, generator=generator).clamp(min=0.05).sqrt()
    w.view(-1)[torch.randint(0, n * k, (max(1, n * k // 500),), generator=generator)] *= 20
    return (w * 0.02).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size", [32, 64, 128, 256])
def test_tinygemm_is_bit_identical_to_torchao(dtype, group_size):
    qp = require("torchao.quantization.quant_primitives")
    w = heavy_tailed(48, 512, seed=group_size, dtype=dtype)
    w[0, :group_size] = 0.5  # a constant group: the eps clamp
    block = (1, group_size)
    # torchao 0.18's CPU int4 (Int4OpaqueTensor.from_hp, algorithm TINYGEMM): the same arguments
    scale, zero = qp._choose_qparams_affine_tinygemm(
        w, qp.MappingType.ASYMMETRIC, block, torch.int32, 0, 15, 1e-6, None, w.dtype
    )
    codes = qp._quantize_affine_tinygemm(w, block, scale, zero, torch.int32, 0, 15)
    q, our_scale, our_zero = quantize_int4(w, group_size, "tinygemm")
    assert torch.equal(q, codes.to(torch.uint8))
    assert torch.equal(our_scale, scale.view(48, -1)) and torch.equal(our_zero, zero.view(48, -1))
    for weight in (
        Int4WeightTensor.from_float(w, group_size, "tinygemm"),
        Int4WeightOnlyConfig(group_size, qparams_algorithm="tinygemm").quantize(w),
    ):
        assert torch.equal(weight.codes(), codes.to(torch.uint8))
        assert torch.equal(weight.scale_and_zero, torch.stack([scale, zero], -1).view(48, -1, 2).transpose(0, 1))


@settings(max_examples=40)
@given(
    algorithm=st.sampled_from(SEARCHES),
    kind=st.sampled_from(["normal", "heavy", "outlier_channels", "uniform", "few_values"]),
    dtype=st.sampled_from(DTYPES),
    group_size=st.sampled_from([32, 64, 128, 256]),
    rows=st.sampled_from([16, 32, 48]),
    groups=st.integers(1, 4),
    seed=st.integers(0, 2**16),
    magnitude=st.sampled_from([1e-3, 0.02, 1.0, 30.0]),
)
def test_search_never_increases_a_groups_squared_error(
    algorithm, kind, dtype, group_size, rows, groups, seed, magnitude
):
    k = group_size * groups
    generator = torch.Generator().manual_seed(seed)
    if kind == "normal":
        w = torch.randn(rows, k, generator=generator)
    elif kind == "heavy":
        w = heavy_tailed(rows, k, seed, torch.float32) * 50
    elif kind == "outlier_channels":  # a few input channels 30x larger in every row, as in real LLMs
        w = torch.randn(rows, k, generator=generator)
        w[:, torch.randint(0, k, (3,), generator=generator)] *= 30
        w[0] = 0  # all-zero groups
        w[-1, :group_size] = -1.5  # a constant group
    elif kind == "uniform":
        w = torch.rand(rows, k, generator=generator) + 3  # far from zero: zero must be in the float domain
    else:  # a handful of distinct values (incl. constant groups): least squares may be exact
        w = torch.randint(0, 3, (rows, k), generator=generator).float()
    w = (w * magnitude).to(dtype)
    minmax = per_group_error(w, Int4WeightTensor.from_float(w, group_size, "tinygemm"))
    ours = Int4WeightTensor.from_float(w, group_size, algorithm)
    error = per_group_error(w, ours)
    assert (error <= minmax).all(), (error - minmax).max()
    scale, zero = ours.scale_and_zero.transpose(0, 1).unbind(-1)  # what the selection measured
    torch.testing.assert_close(group_squared_error(w, ours.codes(), scale, zero, group_size), error, rtol=1e-9, atol=0)


@pytest.mark.parametrize("algorithm", SEARCHES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size", [32, 128])
def test_search_is_clearly_better_than_min_max(algorithm, dtype, group_size):
    generator = torch.Generator().manual_seed(group_size)
    for w in (torch.randn(64, 1024, generator=generator).to(dtype), heavy_tailed(64, 1024, seed=1, dtype=dtype)):
        minmax = per_group_error(w, Int4WeightTensor.from_float(w, group_size, "tinygemm")).sum()
        ours = per_group_error(w, Int4WeightTensor.from_float(w, group_size, algorithm)).sum()
        assert ours < 0.9 * minmax, (ours / minmax).item()  # measured 0.62-0.85


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size", [64, 128])
def test_clip_has_a_lower_plain_error_than_mse_off_a_4_bit_grid(dtype, group_size):
    """ "clip" minimises the plain squared error, "mse" an importance-weighted one: on weights that were
    never quantized, "clip" leaves less plain error in total (each search keeps min-max where it is worse)."""
    w = heavy_tailed(128, 1024, seed=7, dtype=dtype)
    mse = per_group_error(w, Int4WeightTensor.from_float(w, group_size, "mse")).sum()
    clip = per_group_error(w, Int4WeightTensor.from_float(w, group_size, "clip")).sum()
    assert clip < 0.98 * mse, (clip / mse).item()  # a margin far above rounding (float64 sums of fp32 errors)


def _eager(w: torch.Tensor, group_size: int, q, scale, zero, algorithm: str = "mse"):
    """``_mse_chunk`` on the whole weight: the search's definition."""
    groups, codes = w.reshape(-1, group_size), q.reshape(-1, group_size)
    out = int4_qparams._mse_chunk(groups, codes, scale.view(-1), zero.view(-1), int4_qparams.SEARCHES[algorithm])
    return out[0].view(q.shape), out[1].view(scale.shape), out[2].view(zero.shape)


@pytest.mark.parametrize("algorithm", SEARCHES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size", [32, 64, 128, 256])
def test_kernel_is_bit_identical_to_the_eager_search(algorithm, dtype, group_size):
    """The C++ search returns exactly the eager code's codes, scales and zeros, whatever the
    number of threads: a weight quantizes the same with and without a compiler, on any machine."""
    if not int4_qparams.kernel_available():  # no compiler: fail in CI, skip locally
        if os.environ.get("CI") == "true":
            pytest.fail("the int4 mse C++ search did not build")
        pytest.skip("the int4 mse C++ search did not build")
    rows = 16 * 3 + 5  # blocks of 16 groups when group_size == K, and a partial one
    for w in (
        heavy_tailed(rows, 4 * group_size, seed=group_size, dtype=dtype),
        torch.randn(rows, 2 * group_size).to(dtype),
    ):
        w[1, :group_size] = 0.25  # a constant group
        w[2, :group_size] = 0  # an all-zero group
        w[3, :group_size] = torch.arange(group_size) % 3 + 3.0  # few distinct values, far from zero
        q, scale, zero = quantize_int4(w, group_size, "tinygemm")
        expected = _eager(w, group_size, q, scale, zero, algorithm)
        threads = torch.get_num_threads()
        try:
            for n in (1, 2):
                torch.set_num_threads(n)
                for a, b in zip(int4_qparams.mse_qparams(w, group_size, q, scale, zero, algorithm), expected):
                    assert torch.equal(a, b)
        finally:
            torch.set_num_threads(threads)
        assert not torch.equal(expected[0], q)  # the search did choose


@pytest.mark.parametrize("algorithm", SEARCHES)
def test_without_the_kernel_the_eager_search_runs_the_same_on_any_thread_count(monkeypatch, algorithm):
    w = heavy_tailed(32, 256, seed=4, dtype=torch.bfloat16)
    q, scale, zero = quantize_int4(w, 32, "tinygemm")
    monkeypatch.setattr(int4_qparams, "_CHUNK_ELEMENTS", 1 << 10)  # several chunks, the last one partial
    monkeypatch.setattr(int4_qparams, "kernel_available", lambda: False)
    expected = _eager(w, 32, q, scale, zero, algorithm)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            result = int4_qparams.mse_qparams(w, 32, q, scale, zero, algorithm)
            assert all(torch.equal(a, b) for a, b in zip(result, expected))
    finally:
        torch.set_num_threads(threads)


def test_a_failing_build_warns_and_the_eager_search_runs(monkeypatch, tmp_path):
    monkeypatch.setattr(int4_qparams, "SOURCE", tmp_path / "missing.cpp")
    monkeypatch.setattr(int4_qparams, "_loaded", lambda: False)
    int4_qparams.kernel_available.cache_clear()
    try:
        with pytest.warns(UserWarning, match="building the int4 mse search failed"):
            assert not int4_qparams.kernel_available()
        assert not int4_qparams.kernel_available()  # once: the answer is kept
        w = torch.randn(32, 64, dtype=torch.bfloat16)
        q, scale, zero = quantize_int4(w, 32, "tinygemm")
        result = int4_qparams.mse_qparams(w, 32, q, scale, zero)
        assert all(torch.equal(a, b) for a, b in zip(result, _eager(w, 32, q, scale, zero)))
    finally:
        int4_qparams.kernel_available.cache_clear()


def test_config_default_and_bad_algorithm():
    assert Int4WeightOnlyConfig().qparams_algorithm == "mse"
    assert Int4WeightOnlyConfig(qparams_algorithm="tinygemm").qparams_algorithm == "tinygemm"
    assert Int4WeightOnlyConfig(qparams_algorithm="clip").qparams_algorithm == "clip"
    with pytest.raises(ValueError, match="qparams_algorithm must be one of .*got 'hqq'"):
        Int4WeightOnlyConfig(qparams_algorithm="hqq")
    with pytest.raises(ValueError, match="qparams_algorithm"):
        Int4WeightTensor.from_float(torch.randn(16, 64), 32, "minmax")
    w = torch.zeros(16, 64)
    with pytest.raises(ValueError, match="algorithm must be one of \\('mse', 'clip'\\), got 'tinygemm'"):
        int4_qparams.mse_qparams(w, 32, *quantize_int4(w, 32), algorithm="tinygemm")


def _model(dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 64, bias=False)).to(dtype)
    with torch.no_grad():
        model[0].weight.copy_(heavy_tailed(128, 256, seed=5, dtype=dtype))
    return model


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_mse_weights_round_trip_through_checkpoints_and_unwrap(tmp_path, suffix):
    model = quantize_(_model(), Int4WeightOnlyConfig(group_size=64, qparams_algorithm="mse"))
    reference = quantize_(_model(), Int4WeightOnlyConfig(group_size=64, qparams_algorithm="tinygemm"))
    assert not torch.equal(model[0].weight.codes(), reference[0].weight.codes())  # "mse" did choose
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    expected = model(x)
    path = str(tmp_path / f"model{suffix}")
    save_checkpoint(model.state_dict(), path)
    # load into a model quantized the other way: every inner tensor comes from the file
    fresh = unwrap(reference)
    fresh.load_state_dict(load_checkpoint(path))
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        if isinstance(a, Int4WeightTensor):
            assert torch.equal(a.codes(), b.codes()) and torch.equal(a.scale_and_zero, b.scale_and_zero)
        else:
            assert torch.equal(a, b)
    assert torch.equal(fresh(x), expected)
    ref = F.linear(F.relu(F.linear(x, model[0].weight.dequantize(), model[0].bias)), model[2].weight.dequantize())
    assert sqnr(ref, expected) > 38


def test_quantize_with_mse_is_closer_to_the_float_model():
    x = torch.randn(16, 256, dtype=torch.bfloat16)
    expected = _model()(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every layer quantizes
        outputs = {
            algorithm: quantize_(_model(), Int4WeightOnlyConfig(32, qparams_algorithm=algorithm))(x)
            for algorithm in ("tinygemm", "mse", "clip")
        }
    assert sqnr(expected, outputs["mse"]) > sqnr(expected, outputs["tinygemm"]) + 0.5
    assert sqnr(expected, outputs["clip"]) > sqnr(expected, outputs["tinygemm"]) + 0.5


def test_fake_and_meta_weights_run_the_eager_search(monkeypatch):
    """A fake or meta tensor has no data: only shapes come back (the C++ op would read garbage)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    monkeypatch.setattr(int4_qparams, "kernel_available", lambda: pytest.fail("the C++ op was asked"))
    with FakeTensorMode():
        weight = Int4WeightTensor.from_float(torch.randn(64, 256, dtype=torch.bfloat16), 64, "mse")
    assert weight.shape == (64, 256) and weight.scale_and_zero.shape == (4, 64, 2)
    w = torch.empty(32, 64, device="meta", dtype=torch.bfloat16)
    meta = int4_qparams.mse_qparams(w, 32, *quantize_int4(w, 32))
    assert meta[0].shape == (32, 64) and meta[0].device.type == "meta"
