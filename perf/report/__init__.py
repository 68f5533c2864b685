"""The side-by-side overhead report (``python -m perf``): measure, build the tables, write JSON and a
bar chart.

- ``blocks``: its data (``Block``, ``Row``);
- ``synthetic``: W1 and W2, every variant in every mode;
- ``llm``: the transformers models' decode and time to first token;
- ``quality``: a real model's perplexity, weight bytes and greedy sample;
- ``output``: the tables, JSON and the plot.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

from ..harness.models import WORKLOADS
from ..modes import MODES
from .blocks import Block, Row
from .llm import measure_llm
from .output import format_block, format_report, to_json, write_json, write_plot
from .quality import other_algorithms
from .synthetic import measure_workload


def run_report(
    fmts: list[str], *, quick: bool, llm: list[str], progress: Callable[[str], None], workloads: list[str] | None = None
) -> list[Block]:
    """Measure the built-in workloads (W2, W1; default all) in every mode, then the LLMs, per format."""
    blocks = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # compile/export chatter; quantize_'s notes are kept per block
        for workload in sorted(WORKLOADS if workloads is None else workloads, reverse=True):  # W2 first
            for fmt in fmts:
                blocks.append(measure_workload(workload, fmt, MODES, quick=quick, progress=progress))
        for name in llm:
            blocks.extend(measure_llm(name, fmts, quick=quick, progress=progress))
    return blocks


__all__ = [
    "Block",
    "Row",
    "format_block",
    "format_report",
    "measure_llm",
    "measure_workload",
    "other_algorithms",
    "run_report",
    "to_json",
    "write_json",
    "write_plot",
]
