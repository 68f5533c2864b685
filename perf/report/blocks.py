"""The report's data: a ``Block`` (one workload in one format) of ``Row`` s (one model variant each)."""

from __future__ import annotations

from dataclasses import dataclass, field

# The mode key of the headline's rows: each engine's one time, measured the way that engine is meant to run.
HEADLINE_MODE = "headline"


@dataclass
class Row:
    """One model variant: time per mode (None: not measured), guards of the default compile,
    kernel-only time of its kernels called directly (None: not applicable), and for LLMs the time
    to first token per mode (ms, a prefill of the block's ``prefill_tokens``)."""

    variant: str
    times: dict[str, float | None] = field(default_factory=dict)
    guards: int | None = None
    kernel: float | None = None
    note: str = ""
    ttft: dict[str, float | None] = field(default_factory=dict)

    def best(self) -> tuple[str, float] | None:
        """(mode, time) of the fastest measured mode; None when none was measured."""
        measured = [(t, m) for m, t in self.times.items() if t is not None]
        if not measured:
            return None
        t, mode = min(measured)
        return mode, t


@dataclass
class Block:
    """One workload in one format: a table of rows, in ``unit`` per forward (or per token)."""

    workload: str
    format: str
    unit: str
    modes: tuple[str, ...]
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    prefill_tokens: int | None = None  # LLMs: prompt length of the rows' ``ttft`` (None: not measured)

    def row(self, variant: str) -> Row | None:
        return next((r for r in self.rows if r.variant == variant), None)

    def fastest(self) -> tuple[Row, str, float] | None:
        """Our variant and mode with the lowest time: what a user of this library should run."""
        best = [(b[1], b[0], r) for r in self.rows if r.variant.startswith("ours") and (b := r.best())]
        if not best:
            return None
        t, mode, row = min(best, key=lambda b: b[0])
        return row, mode, t
