"""The overhead report: table, JSON, CLI options, kernel-only chains, a real (eager) measurement."""

import json
import sys

import pytest
import torch

from perf.__main__ import main, parse_args
from perf.harness.models import build_variants
from perf.modes import kernel_chain, prepare, torchao_available
from perf.report import Block, Row, format_block, measure_workload, to_json, write_plot


def sample_block():
    return Block(
        "W1 8x256",
        "int4",
        "us",
        ("eager", "compiled", "aoti"),
        [
            Row("bf16", {"eager": 200.0, "compiled": 250.0, "aoti": 160.0}, guards=129, kernel=150.0),
            Row("floor", {"eager": 60.0, "compiled": 80.0, "aoti": 50.0}, guards=161, kernel=45.0),
            Row("ours wrapped", {"eager": 90.0, "compiled": 100.0, "aoti": None}, guards=169, kernel=45.0),
            Row("ours unwrapped", {"eager": 66.0, "compiled": 84.0, "aoti": 48.0}, guards=160, kernel=45.0),
        ],
        notes=["a note"],
    )


def test_table_shows_ratios_overhead_and_the_fastest_way():
    text = format_block(sample_block())
    lines = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert "| 66 (1.10) | 84 (1.05) | 48 (0.96) | 160 | 45 | 3 | 0.30 | 0.96 |" in lines["ours unwrapped"]
    assert "| 100 (1.25) | - | 169 |" in lines["ours wrapped"]  # AOTI not measured for wrapped
    assert "Fastest: **ours unwrapped, AOTInductor**: 48 us, 0.30x bf16's best." in text
    assert "Note: a note" in text


def test_json_is_plain_data_with_best_and_fastest():
    data = json.loads(json.dumps(to_json([sample_block()], {"torch": "x", "threads": 2})))
    block = data["blocks"][0]
    assert block["fastest"] == {"variant": "ours unwrapped", "mode": "aoti", "time": 48.0}
    row = block["rows"][2]
    assert row["variant"] == "ours wrapped" and row["times"]["aoti"] is None
    assert (row["best_mode"], row["best"], row["guards"], row["kernel"]) == ("eager", 90.0, 169, 45.0)


@pytest.mark.parametrize("fmt", ["int4", "int8"])
def test_kernel_chain_computes_what_the_model_computes(fmt):
    models, x = build_variants("W2 512-1024-1024", fmt)
    with torch.inference_mode():
        assert torch.equal(kernel_chain(models["floor"])(x), models["floor"](x))
        assert torch.equal(kernel_chain(models["bf16"])(x), models["bf16"](x))
    assert kernel_chain(models["ours wrapped"]) is None  # its weights are subclasses: no direct chain


def test_measure_workload_eager_rows():
    lines = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 threads on a busy 2-core runner can be 10x slower
    try:
        block = measure_workload("W1 8x256", "int8", ("eager",), quick=True, progress=lines.append)
    finally:
        torch.set_num_threads(threads)
    # torchao's row is there whenever torchao is (the 'torchao' extra; its API broke it once, in 0.18)
    torchao = ["torchao"] if torchao_available() else []
    assert [r.variant for r in block.rows] == ["bf16", "floor", "ours wrapped", "ours unwrapped", *torchao]
    assert all(r.times["eager"] > 0 and r.kernel > 0 for r in block.rows[:4])
    assert all(r.times["eager"] > 0 for r in block.rows)
    assert any("ours unwrapped" in line for line in lines)


def test_prepare_compiled_counts_guards_and_rejects_unknown_modes():
    models, x = build_variants("W1 8x256", "int4")
    fn, guards = prepare(models["floor"], (x,), "compiled")
    with torch.inference_mode():
        assert torch.equal(fn(), models["floor"](x))
    assert guards > 0
    with pytest.raises(ValueError, match="mode must be one of"):
        prepare(models["floor"], (x,), "jit")


def test_cli_rejects_bad_options(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--threads", "0"])
    assert "--threads must be a positive integer, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--format", "int3"])


def test_plot_without_matplotlib_says_how_to_get_it(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    assert main(["--plot", str(tmp_path / "a.png"), "--quick"]) == 2
    assert "pip install 'unwrap[plot]'" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="needs matplotlib"):
        write_plot(str(tmp_path / "a.png"), [sample_block()])


def test_a_torchao_row_appears_when_torchao_is_importable(monkeypatch):
    import copy

    import perf.report.synthetic as synthetic

    monkeypatch.setattr(synthetic, "torchao_available", lambda: True)
    monkeypatch.setattr(synthetic, "torchao_model", lambda bf16, fmt: copy.deepcopy(bf16))  # a stand-in
    block = synthetic.measure_workload("W2 512-1024-1024", "int4", ("eager",), quick=True, progress=lambda m: None)
    assert [r.variant for r in block.rows][-1] == "torchao" and block.rows[-1].times["eager"] > 0
    assert "| torchao |" in format_block(block)


def test_llm_block_has_time_to_first_token_next_to_decode(monkeypatch):
    pytest.importorskip("transformers", reason="the 'hf' extra")
    import perf.harness.decode as decode
    import perf.harness.models as models
    import perf.report.llm as llm

    monkeypatch.setitem(
        models.QWEN2_SHAPES,
        "Qwen2 test",
        dict(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=256,
        ),
    )
    monkeypatch.setattr(decode, "compile_forward", lambda model, counts: counts.append(7) or model)  # eager: fast
    monkeypatch.setattr(llm, "torchao_available", lambda: False)  # TTFT is what this checks
    decode_models = []  # compile_for_decode's column: an eager stand-in (tests/test_decode.py compiles it)
    monkeypatch.setattr(llm, "decode_decoder", lambda model: decode_models.append(model) or decode.Decoder(model))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:  # 64 rows: above the int4 crossover, so ours prefills through dequantize + mm
        [block] = llm.measure_llm("Qwen2 test", ["int4"], quick=True, progress=lambda m: None, prefill_tokens=64)
    finally:
        torch.set_num_threads(threads)
    assert block.prefill_tokens == 64 and [r.variant for r in block.rows] == [
        "bf16",
        "floor",
        "ours wrapped",
        "ours unwrapped",
    ]
    for row in block.rows:
        assert row.times["eager"] > 0 and row.ttft["eager"] > 0
        assert (row.ttft["compiled"] is None) == (row.variant in ("ours wrapped", "floor"))  # eager only
        assert (row.times["decode"] is None) == (row.variant not in ("bf16", "ours unwrapped"))
    assert len(decode_models) == 2
    text = format_block(block)
    assert "| variant | eager | compiled | compile_for_decode | TTFT eager | TTFT compiled | guards |" in text
    assert "TTFT: ms to the first token of a 64-token prompt, in brackets: ratio to bf16" in text
    data = json.loads(json.dumps(to_json([block], {})))["blocks"][0]
    assert data["prefill_tokens"] == 64 and data["rows"][0]["ttft"]["compiled"] > 0
    assert to_json([sample_block()], {})["blocks"][0]["prefill_tokens"] is None


def test_full_measures_everything_and_excludes_the_subsets(capsys):
    assert parse_args(["--full"]).full
    for subset in (["--quick"], ["--only", "W1"], ["--no-llm"]):
        with pytest.raises(SystemExit):
            parse_args(["--full", *subset])
        assert "--full measures everything" in capsys.readouterr().err


def test_markdown_page_stamps_every_table():
    from perf.harness.tables import Stamp
    from perf.report import format_report

    stamp = Stamp(2, machine="Some CPU (AVX512)", torch="2.x", date="2025-01-02", command="python -m perf --markdown")
    text = format_report([sample_block(), sample_block()], {"torch": "2.x", "threads": 2}, stamp)
    assert text.startswith("# unwrap overhead report\n")
    line = "_Some CPU (AVX512), 2 thread(s), torch 2.x, 2025-01-02; `python -m perf --markdown`_"
    assert text.count(line) == 2
    heading = text.index("### W1 8x256, int4")
    assert text[heading:].split("\n")[2] == line and "| variant |" in text[heading:].split("\n")[4]
    assert line not in format_report([sample_block()], {"torch": "2.x", "threads": 2})  # plain text: no stamps


def test_machine_names_the_cpu_and_torch_s_isa():
    from perf.harness.tables import machine

    assert machine().endswith(f"({torch.backends.cpu.get_cpu_capability()})")
