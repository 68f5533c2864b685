"""perf/bench_gemv.py: the shapes and bytes it reports, and one small run of its timing code."""

import pytest

from perf.bench_gemv import (
    MODELS,
    Model,
    copies,
    format_table,
    fused_token_row,
    int4_bytes,
    random_weight,
    read_bandwidth_gbs,
    time_paths,
    token_row,
)
from subclasses.kernels.int4_gemv import kernel_available


def test_shapes_cover_every_linear_of_a_token():
    smol = MODELS["SmolLM2-135M"]
    shapes = smol.shapes()
    assert sum(calls for *_, calls in shapes) == 30 * 7 + 1
    assert shapes[-1] == ("lm_head", 49152, 576, 1)
    assert ("k_proj", 192, 576, 60) in shapes  # k_proj and v_proj share a shape
    assert MODELS["Qwen2-0.5B"].shapes()[-1] == ("lm_head", 151936, 896, 1)


def test_int4_bytes_counts_codes_and_scale_and_zero():
    weight = random_weight(64, 256, group_size=32)
    stored = weight.int4.packed.nbytes + weight.int4.scale_and_zero.nbytes
    assert int4_bytes(64, 256, 32) == stored


def test_one_small_run_times_every_path_and_formats():
    weights = copies(random_weight(128, 256), 3)
    assert all(w.int4.packed.data_ptr() != weights[0].int4.packed.data_ptr() for w in weights[1:])
    times = time_paths(weights, rounds=2)
    assert set(times) == ({"aten", "unwrap", "int8"} if kernel_available() else {"aten", "int8"})
    assert all(t > 0 for t in times.values())
    row = {"shape": "x 128x256", "calls": 1, "floor": 1.0, "int8 floor": 2.0, **times}
    assert "| x 128x256 | 1 | 1.0 |" in format_table("t", [row])
    assert read_bandwidth_gbs(nbytes=4 << 20, chunk=1 << 20, rounds=1) > 0


def test_fused_token_row_reads_the_same_bytes_in_fewer_calls():
    if not kernel_available():
        pytest.skip("int4_gemv_cat needs the C++ kernel (subclasses/kernels/int4_gemv.py)")
    tiny = Model(hidden=128, kv=64, intermediate=256, layers=2, vocab=512)
    fused, separate = fused_token_row(tiny, 10.0, rounds=1), token_row(tiny, 10.0, rounds=1)
    assert fused["shape"] == "token, fused (9 calls)" and separate["shape"] == "token (15 GEMVs)"
    assert fused["floor"] == separate["floor"] and fused["unwrap"] > 0
    assert "| token, fused (9 calls) | 1 |" in format_table("t", [separate, fused])
    assert "| - | " in format_table("t", [separate, fused])
