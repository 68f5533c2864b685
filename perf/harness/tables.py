"""The one Markdown table writer of perf's reports, and the stamp that says where a table was measured."""

from __future__ import annotations

import datetime
import platform
import shlex
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch


def markdown_table(
    head: Sequence[str], rows: Iterable[Sequence[object]], *, title: str | None = None, stamp: str | None = None
) -> str:
    """A Markdown table (cells as ``str`` gives them), under ``title`` (a heading line, "### ..." unless
    it starts with "#" already) and ``stamp`` (a line of its own) when given."""
    lines = []
    if title is not None:
        lines += [title if title.startswith("#") else f"### {title}", ""]
    if stamp is not None:
        lines += [stamp, ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo's "model name"; else what ``platform`` says)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    """CPU model and the vector ISA torch dispatches its CPU kernels to (``get_cpu_capability``)."""
    return f"{cpu_model()} ({torch.backends.cpu.get_cpu_capability()})"


def kernels() -> str:
    """Which int4 kernels this process runs: the one-row (decode) GEMV and the prompt's compute dtype."""
    from subclasses.kernels.compute_dtype import describe_prefill
    from subclasses.kernels.int4_gemv import kernel_available, kernel_isa

    gemv = f"unwrap_cpu::int4_gemv ({kernel_isa()})" if kernel_available() else "aten's _weight_int4pack_mm_for_cpu"
    return f"int4 one-row GEMV: {gemv}; {describe_prefill(torch.bfloat16)}"


@dataclass(frozen=True)
class Stamp:
    """Where and how a table was measured: machine, torch threads, torch version, date, command."""

    threads: int
    machine: str = field(default_factory=machine)
    torch: str = torch.__version__
    date: str = field(default_factory=lambda: datetime.date.today().isoformat())
    command: str = field(default_factory=lambda: shlex.join(["python", "-m", "perf", *sys.argv[1:]]))

    def line(self) -> str:
        return f"_{self.machine}, {self.threads} thread(s), torch {self.torch}, {self.date}; `{self.command}`_"
