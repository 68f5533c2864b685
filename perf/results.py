"""``python -m perf.results``: docs/results.md measured again, every table on it, by one command.

The page is a list of sections, each one perf command. Every section is rerun in a fresh process (its own
Inductor and kernel state, as a user's first run), in order, one at a time, and stamped with the machine,
threads, torch version, date, command, how long it took and the load average when it started (a timing is
only worth its idle machine). ``--only`` reruns some sections and keeps the rest of the page as it is.
The whole page takes ~35 minutes on a 2-core machine; the llama.cpp sections need ``make llama``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .harness.tables import Stamp

PAGE = Path(__file__).resolve().parent.parent / "docs" / "results.md"


@dataclass(frozen=True)
class Section:
    """One heading of the results page: what its table shows and the perf command that measures it."""

    title: str
    about: str  # how to read the table; the numbers themselves come from the command
    line: str  # the command after ``python -m``
    threads: int = 2
    needs: tuple[str, ...] = ()  # modules the command cannot measure without
    markdown: bool = True  # the command prints Markdown (else its text goes in a code block)

    @property
    def argv(self) -> list[str]:
        return shlex.split(self.line)

    @property
    def command(self) -> str:
        return f"python -m {self.line}"


LLAMA = ("llama_cpp",)
SECTIONS = (
    Section(
        "The overhead report",
        "What `make report` prints: SmolLM2-135M decode ms/token and 512-token time to first token for bf16, ours, "
        "torchao and llama.cpp, then the W1 workload (8 int4 layers 256x256) in every mode: bf16, the floor (the "
        "kernel called on plain tensors), our weights wrapped (tensor subclass) and unwrapped (`unwrap`), in "
        "brackets the ratio to the floor in the same mode. `python -m perf --full` measures every workload, "
        "model and format.",
        "perf --threads 2",
        needs=LLAMA,
    ),
    Section(
        "Decode: where the time goes",
        "One SmolLM2-135M int4 token, split by a profiler into the quantized GEMVs, the vocabulary matrix, "
        "attention, Dynamo's guards and the rest, in each way of running it.",
        "perf.decode_profile --model smollm2 --threads 2 --modes eager,compiled,decode,decode+dynamo",
    ),
    Section(
        "Decode against llama.cpp",
        "SmolLM2-135M ms/token, ours (`compile_for_decode`, the default int4 config) and llama.cpp on GGUF files "
        "of the same weights, interleaved in one process; the first line is llama.cpp's build.",
        "perf.decode_vs_llama --threads 2 --types Q4_0,Q4_1,Q8_0",
        needs=LLAMA,
        markdown=False,
    ),
    Section(
        "Decode against llama.cpp at 1024 tokens of context",
        "The same, each step attending a 1024-token prompt: attention's share of the token grows with it.",
        "perf.decode_vs_llama --threads 2 --types Q4_0 --context 1024",
        needs=LLAMA,
        markdown=False,
    ),
    Section(
        "Decode against llama.cpp on Qwen2.5-0.5B's shapes",
        "Random weights with Qwen2.5-0.5B's shapes, converted to GGUF by llama.cpp's own converter "
        "(`perf.same_weights`) and quantized by its quantizer; ours quantizes the same bf16 weights.",
        "perf.decode_vs_llama --model qwen2 --threads 2 --types Q4_0,Q8_0",
        needs=LLAMA,
        markdown=False,
    ),
    Section(
        "Prompt against llama.cpp",
        "Time to evaluate a 512-token prompt of SmolLM2-135M, ours (`compile_for_decode`'s prompt pass; with "
        "the AVX2 integer GEMM where it runs, and with the dequantize + fp32 GEMM path) and llama.cpp (Q4_0 "
        "made by its quantizer, and the shipped Q4_1), interleaved.",
        "perf.bench_prompt --threads 2 --types Q4_0,Q4_1",
        needs=LLAMA,
    ),
    Section(
        "Prompt against llama.cpp on Qwen2.5-0.5B's shapes",
        "The same on the converted Qwen2.5-0.5B-shaped weights (no bf16 model: a bf16 prompt of that size "
        "takes minutes on a CPU without native bf16).",
        "perf.bench_prompt --model qwen2 --threads 2 --types Q4_0",
        needs=LLAMA,
    ),
    Section(
        "The seed's request against llama.cpp",
        "A whole request on the converted Qwen2.5-0.5B-shaped weights, the workload the library was started "
        "for: a 1024-token prompt, then 128 greedy tokens, seconds, ours (`compile_for_decode`) and llama.cpp.",
        "perf.bench_request --threads 2",
        needs=LLAMA,
    ),
    Section(
        "Prefill",
        "One 2048x2048 layer at M = 512 (a prompt) in every format and mode, interleaved: ms, in brackets the "
        "ratio to bf16 in the same mode. The first line says which kernels ran.",
        "perf.bench_prefill --threads 2",
    ),
    Section(
        "Generate",
        "SmolLM2-135M int4 through `model.generate` (greedy and sampling, with a streamer) against the library's "
        "own greedy loop, ms/token.",
        "perf.bench_generate --threads 2",
    ),
    Section(
        "Generate, batch 4",
        "Qwen2 with Qwen2.5-0.5B's shapes: four left-padded prompts through `model.generate` against batch 1.",
        "perf.bench_generate --threads 2 --batch 4",
    ),
    Section(
        "The int4 one-row kernel",
        "Each GEMV of a token, cold (enough weight copies that none is in cache), µs, and the bandwidth it "
        "reaches against the machine's read bandwidth.",
        "perf.bench_gemv --threads 2",
    ),
    Section(
        "Accuracy",
        "SmolLM2-135M: perplexity on the shipped text, KL divergence of the next-token distribution to bf16's, "
        "and each layer's output SQNR, per quantization algorithm and group size; then the same matrices "
        "quantized from weights that were never 4-bit.",
        "perf.accuracy --group-sizes 32 64 128 --algorithms tinygemm mse hqq --max-tokens 1024",
    ),
    Section(
        "The one-row kernel's numerics",
        "SmolLM2-135M decoded token by token with our one-row kernel and with aten's int4 kernel.",
        "perf.gemv_numerics 160",
        markdown=False,
    ),
    Section(
        "Quantize time",
        "`quantize_` of Qwen2.5-0.5B's shapes with each scale and zero algorithm.",
        "perf.qparams_time --threads 2",
        markdown=False,
    ),
    Section(
        "GGUF import",
        "Loading SmolLM2's GGUF with `load_gguf` against transformers' own GGUF loader: seconds, peak memory, "
        "bf16 perplexity.",
        "perf.gguf_import --perplexity",
        markdown=False,
    ),
    Section(
        "Tensor parallel",
        "Qwen2 tiny decode ms/token at TP=1 and TP=2 (two processes, gloo, one thread each).",
        "perf --tp 2 --threads 1 --only tiny",
        threads=1,
    ),
)

HEADER = """# Results

Every table on this page is measured by `python -m perf.results` (~35 minutes on 2 cores; `--only` reruns
some sections). Each section says its machine and CPU ISA, threads, torch version, date, command, how long it
ran and the load average when it started: timings are only comparable within one table, on an idle machine.
Batch 1, bf16 activations, CPU, unless a section says otherwise. How the numbers are taken:
[Benchmarks](benchmarks.md).
"""


def run(section: Section) -> str:
    """The section's Markdown: its heading, what it shows, the stamp, and what its command printed."""
    load = os.getloadavg()[0]
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", *section.argv], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"`{section.command}` failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    minutes = (time.perf_counter() - start) / 60
    stamp = Stamp(section.threads, command=section.command).line()
    body = as_markdown(done.stdout, section.markdown)
    return f"## {section.title}\n\n{section.about}\n\n{stamp} ({minutes:.1f} min; load average {load:.2f} at the start)\n\n{body}\n"


def as_markdown(output: str, markdown: bool) -> str:
    """A command's output as the body of a section: Markdown with its headings moved under the section's
    (no line of it starts a section) and each line of text a paragraph, or text in a code block."""
    output = output.strip()
    if not markdown:
        return f"```\n{output}\n```"
    lines: list[str] = []
    for line in re.sub(r"^#{1,3} ", "#### ", output, flags=re.M).splitlines():
        # a line of text stays a line (Markdown would join it to the one before), and a table its own block
        if lines and _kind(lines[-1]) and _kind(line) and (_kind(line) != _kind(lines[-1]) or _kind(line) == "text"):
            lines.append("")
        lines.append(line)
    return "\n".join(lines)


def _kind(line: str) -> str:
    """ "" for an empty line, "table" for a table's row, "block" for a heading, list item or fence, else "text"."""
    stripped = line.strip()
    if not stripped:
        return ""
    if stripped.startswith("|"):
        return "table"
    return "block" if stripped.startswith(("#", "- ", "* ", "```")) else "text"


def sections_of(page: str) -> dict[str, str]:
    """The page's sections by title (the text from each "## " heading to the next)."""
    parts = re.split(r"^(?=## )", page, flags=re.M)[1:]
    return {part.splitlines()[0][3:].strip(): part.rstrip() + "\n" for part in parts}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perf.results", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", metavar="TITLES", help="comma-separated substrings of section titles to rerun")
    parser.add_argument("--output", type=Path, default=PAGE, help=f"the page to write (default: {PAGE})")
    parser.add_argument("--list", action="store_true", help="print each section's command and exit")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(f"{s.title}: {s.command}" for s in SECTIONS))
        return 0
    wanted = [w.strip() for w in args.only.split(",")] if args.only else None
    chosen = [s for s in SECTIONS if wanted is None or any(w.lower() in s.title.lower() for w in wanted)]
    if not chosen:
        parser.error(f"--only {args.only!r} matches no section; titles: " + "; ".join(s.title for s in SECTIONS))
    missing = {m for s in chosen for m in s.needs if importlib.util.find_spec(m) is None}
    if missing:
        parser.error(
            f"{', '.join(sorted(missing))} not installed: `make llama` (or leave those sections out with --only)"
        )
    # sections not rerun (yet) keep their text; a heading no section has any more goes
    kept = sections_of(args.output.read_text()) if args.output.exists() else {}
    for section in chosen:
        print(f"{section.title}: {section.command}", file=sys.stderr, flush=True)
        kept[section.title] = run(section)
        # written after every section: a failure later keeps what is measured so far
        page = HEADER + "".join("\n" + kept[s.title] for s in SECTIONS if s.title in kept)
        args.output.write_text(page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
