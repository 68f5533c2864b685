"""The report's outputs: a Markdown table per block (text or a stamped Markdown page), JSON, a bar chart."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from typing import Any

from ..harness.tables import Stamp, markdown_table
from ..modes import MODE_TITLES
from .blocks import HEADLINE_MODE as MODE
from .blocks import Block


def _ratio(a: float | None, b: float | None) -> str:
    return "" if a is None or b is None or b == 0 else f"{a / b:.2f}"


def _num(t: float) -> str:
    """Three significant digits, without exponents (1840, not 1.84e+03)."""
    return f"{t:.0f}" if abs(t) >= 100 else f"{t:.3g}"


def _cell(t: float | None, floor: float | None) -> str:
    if t is None:
        return "-"
    ratio = _ratio(t, floor)
    return f"{_num(t)} ({ratio})" if ratio else _num(t)


def _best_time(block: Block, variant: str) -> float | None:
    row = block.row(variant)
    best = row.best() if row else None
    return best[1] if best else None


def format_block(block: Block, stamp: Stamp | None = None) -> str:
    """A Markdown table: each time with its ratio to the floor in the same mode, the time to first
    token with its ratio to bf16 (LLMs with ``prefill_tokens``), the guards of the default compile,
    kernel-only time, host overhead (best − kernel), best ÷ bf16's best; under its heading, the
    ``stamp`` line when given."""
    floor, bf16 = block.row("floor"), block.row("bf16")
    # compile_for_decode prefills in eager: its time to first token is the eager column's
    ttft_modes = tuple(m for m in block.modes if m != "decode") if block.prefill_tokens else ()
    head = [
        "variant",
        *(MODE_TITLES[m] for m in block.modes),
        *(f"TTFT {MODE_TITLES[m]}" for m in ttft_modes),
        "guards",
        "kernel",
        "overhead",
        "best/bf16",
        "best/floor",
    ]
    ttft_title = (
        f"; TTFT: ms to the first token of a {block.prefill_tokens}-token prompt, in brackets: ratio to bf16"
        if ttft_modes
        else ""
    )
    bf16_best, floor_best = _best_time(block, "bf16"), _best_time(block, "floor")
    rows = []
    for row in block.rows:
        best = row.best()
        best_t = best[1] if best else None
        rows.append(
            [
                row.variant,
                *(_cell(row.times.get(m), floor.times.get(m) if floor else None) for m in block.modes),
                *(_cell(row.ttft.get(m), bf16.ttft.get(m) if bf16 else None) for m in ttft_modes),
                str(row.guards) if row.guards is not None else "-",
                _num(row.kernel) if row.kernel is not None else "-",
                _num(best[1] - row.kernel) if best and row.kernel is not None else "-",
                _ratio(best_t, bf16_best),
                _ratio(best_t, floor_best),
            ]
        )
    title = (
        f"{block.workload}, {block.format} ({block.unit}; in brackets: ratio to the floor in the same mode{ttft_title})"
    )
    # a column no row has a number in (e.g. kernel-only time for a whole LLM) is left out
    keep = [0, *(i for i in range(1, len(head)) if any(row[i] not in ("-", "") for row in rows))]
    head, rows = [head[i] for i in keep], [[row[i] for i in keep] for row in rows]
    lines = [markdown_table(head, rows, title=title, stamp=stamp.line() if stamp else None)]
    fastest = block.fastest()
    if fastest:
        row, mode, t = fastest
        versus = f", {t / bf16_best:.2f}x bf16's best" if bf16_best else ""
        lines += ["", f"Fastest: **{row.variant}, {MODE_TITLES[mode]}**: {_num(t)} {block.unit}{versus}."]
    lines += [f"Note: {note}" for note in block.notes]
    lines += [f"Note: {row.variant}: {row.note}" for row in block.rows if row.note]
    return "\n".join(lines)


def format_headline(block: Block, stamp: Stamp | None = None) -> str:
    """The headline table (``headline.measure_headline``): per engine, how it runs, decode ms/token and the
    time to the first token, each with its ratio to bf16's."""
    bf16 = block.row("bf16")
    base = (bf16.times.get(MODE), bf16.ttft.get(MODE)) if bf16 else (None, None)
    head = [
        "engine",
        "how it runs",
        "decode ms/token",
        "÷ bf16",
        f"ms to first token ({block.prefill_tokens}-token prompt)",
        "÷ bf16",
    ]
    rows = [
        [
            row.variant,
            row.note,
            _cell(row.times.get(MODE), None),
            _ratio(row.times.get(MODE), base[0]),
            _cell(row.ttft.get(MODE), None),
            _ratio(row.ttft.get(MODE), base[1]),
        ]
        for row in block.rows
    ]
    title = f"{block.workload}, greedy, batch 1 (÷ bf16: the ratio to bf16's time; lower is faster)"
    lines = [markdown_table(head, rows, title=title, stamp=stamp.line() if stamp else None)]
    return "\n".join([*lines, *(f"Note: {note}" for note in block.notes)])


def format_report(blocks: list[Block], meta: dict[str, Any], stamp: Stamp | None = None) -> str:
    """The whole report: a header line with the setup, then one table per block. With ``stamp``, a
    Markdown page (the results page): a title, and each table stamped with where it was measured."""
    setup = f"torch {meta['torch']}, {meta['threads']} thread(s), batch 1, minimum of repeated timings"
    if "kernels" in meta:
        setup += f"; {meta['kernels']}"
    if stamp is None:
        header = f"unwrap overhead report: {setup}"
    else:
        header = f"# unwrap overhead report\n\n{setup}; machine: {stamp.machine}; command: `{stamp.command}`"
    tables = [format_headline(b, stamp) if b.modes == (MODE,) else format_block(b, stamp) for b in blocks]
    return "\n\n".join([header, *tables]) + "\n"


def to_json(blocks: list[Block], meta: dict[str, Any]) -> dict[str, Any]:
    """The report as plain data (documented in docs/benchmarks.md)."""
    out = []
    for block in blocks:
        rows = []
        for row in block.rows:
            best = row.best()
            rows.append({**asdict(row), "best_mode": best[0] if best else None, "best": best[1] if best else None})
        fastest = block.fastest()
        out.append(
            {
                "workload": block.workload,
                "format": block.format,
                "unit": block.unit,
                "modes": list(block.modes),
                "rows": rows,
                "notes": block.notes,
                "prefill_tokens": block.prefill_tokens,
                "fastest": None
                if not fastest
                else {"variant": fastest[0].variant, "mode": fastest[1], "time": fastest[2]},
            }
        )
    return {"meta": meta, "blocks": out}


def write_json(path: str, blocks: list[Block], meta: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(to_json(blocks, meta), f, indent=2, allow_nan=False)


def write_plot(path: str, blocks: list[Block]) -> None:
    """A PNG bar chart: one panel per block, bars per variant and mode (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise SystemExit(
            "--plot needs matplotlib, an optional extra: pip install 'unwrap[plot]' (or pip install matplotlib)"
        ) from error
    fig, axes = plt.subplots(len(blocks), 1, figsize=(10, 3.2 * len(blocks)), squeeze=False)
    for ax, block in zip(axes[:, 0], blocks):
        width = 0.8 / len(block.modes)
        for i, mode in enumerate(block.modes):
            values = [row.times.get(mode) or math.nan for row in block.rows]
            ax.bar([j + i * width for j in range(len(block.rows))], values, width, label=MODE_TITLES[mode])
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(block.rows))], [r.variant for r in block.rows])
        ax.set_title(f"{block.workload}, {block.format}")
        ax.set_ylabel(f"{block.unit} (log scale)")
        ax.set_yscale("log")  # bf16 and the quantized rows differ by up to 10x
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
