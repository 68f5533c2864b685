"""The compile matrix: every format x {wrapped, unwrapped} x every way users compile or export,
each fed one *sequence* of input shapes (decode, a second batch size, a prefill past the int4
crossover, 3-D, a small batch again) through one compiled object; every output is compared with
eager. The graph counts are what docs/limits.md's matrix states.

Heavy modes (``cpp_wrapper``, ``max-autotune-no-cudagraphs``, an AOTInductor package) compile C++ per
graph (~20-60 s each on 2 cores), so they run once on a model that holds every format.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.export import Dim

from subclasses import (
    Int4WeightOnlyConfig,
    Int8DynamicActivationInt8WeightConfig,
    Int8WeightOnlyConfig,
    quantize_,
)
from tests.conftest import sqnr
from unwrap import unwrap

BF16 = torch.bfloat16
K = 256
CONFIGS = {
    "int4": Int4WeightOnlyConfig(group_size=64),
    "int8": Int8WeightOnlyConfig(),
    "w8a8": Int8DynamicActivationInt8WeightConfig(),
}
# M = 1 (decode), 7 (a second batch size: Dynamo recompiles with a dynamic M), 300 (past every
# int4 crossover: the dequantize + GEMM path), 3-D (transformers' layout), M = 3 (back to the
# dynamic graph).
SHAPES = [(1, K), (7, K), (300, K), (2, 5, K), (3, K)]
# dynamic=False compiles one graph per shape, so it runs one shape per path: decode, past the crossover,
# and 3-D (10 rows: the small-M path that M = 7 and M = 3 take).
STATIC_SHAPES = [(1, K), (300, K), (2, 5, K)]
MIN_SQNR = 25.0


def build(formats: tuple[str, ...], *, unwrapped: bool) -> nn.Module:
    """256 -> 192 (bias) -> 48, ReLU between: N = 48 is a partial int4 packing block (generic
    dequantize), N = 192 whole blocks (fused dequantize). With three formats, a 192 -> 192 layer in
    the middle."""
    torch.manual_seed(0)
    sizes = [K, 192, 192, 48] if len(formats) == 3 else [K, 192, 48]
    layers: list[nn.Module] = []
    for i, fmt in enumerate(formats if len(formats) == 3 else formats * 2):
        linear = nn.Linear(sizes[i], sizes[i + 1], bias=i == 0).to(BF16)
        quantize_(linear, CONFIGS[fmt])
        layers += [linear, nn.ReLU()]
    model = nn.Sequential(*layers[:-1]).eval()
    return unwrap(model) if unwrapped else model


def inputs(shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(*shape, generator=generator).to(BF16) for shape in shapes]


class GraphCounter:
    """Graphs Dynamo hands to a backend (one per compile or recompile), whatever the backend."""

    def __enter__(self) -> GraphCounter:
        self.start = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        return self

    @property
    def graphs(self) -> int:
        return torch._dynamo.utils.counters["stats"]["unique_graphs"] - self.start

    def __exit__(self, *exc: object) -> None:
        pass


def mark_unbacked(x: torch.Tensor) -> torch.Tensor:
    for dim in range(x.dim() - 1):  # batch (and sequence): every size but in_features
        torch._dynamo.decorators.mark_unbacked(x, dim)
    return x


def run_compiled(model: nn.Module, xs: list[torch.Tensor], **compile_kwargs: object) -> list[torch.Tensor]:
    compiled = torch.compile(model, **compile_kwargs)
    return [compiled(x) for x in xs]


def run_unbacked(model: nn.Module, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    compiled = torch.compile(model, fullgraph=True)
    return [compiled(mark_unbacked(x.clone())) for x in xs]


def export_by_rank(model: nn.Module, ranks: tuple[int, ...] = (2, 3)) -> dict[int, torch.export.ExportedProgram]:
    """One exported program per input rank: M dynamic for 2-D, batch and sequence for 3-D."""
    examples = {
        2: (torch.randn(5, K, dtype=BF16), {0: Dim("m")}),
        3: (torch.randn(2, 5, K, dtype=BF16), {0: Dim("batch"), 1: Dim("sequence")}),
    }
    return {
        rank: torch.export.export(model, (examples[rank][0],), dynamic_shapes=(examples[rank][1],)) for rank in ranks
    }


def run_exported(model: nn.Module, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    programs = {rank: ep.module() for rank, ep in export_by_rank(model).items()}
    return [programs[x.dim()](x) for x in xs]


def run_aoti(model: nn.Module, xs: list[torch.Tensor], tmp_path) -> list[torch.Tensor]:
    """One AOTInductor package, the 3-D program (batch and sequence dynamic), for every input: a 2-D
    input runs as a batch of one (each package is a C++ build, ~10-20 s on 2 cores; the 2-D program's
    export is the light "export" mode's)."""
    program = export_by_rank(model, (3,))[3]
    path = torch._inductor.aoti_compile_and_package(program, package_path=os.path.join(tmp_path, "model.pt2"))
    runner = torch._inductor.aoti_load_package(path)
    return [runner(x) if x.dim() == 3 else runner(x.unsqueeze(0)).squeeze(0) for x in xs]


Run = Callable[[nn.Module, list[torch.Tensor]], list[torch.Tensor]]
# mode -> (how to run, graphs compiled over its shapes, its shapes)
LIGHT_MODES: dict[str, tuple[Run, int, list[tuple[int, ...]]]] = {
    "eager": (lambda model, xs: [model(x) for x in xs], 0, SHAPES),
    "compile": (lambda model, xs: run_compiled(model, xs), 3, SHAPES),
    "dynamic=True": (lambda model, xs: run_compiled(model, xs, dynamic=True), 3, SHAPES),
    "dynamic=False": (lambda model, xs: run_compiled(model, xs, dynamic=False), 3, STATIC_SHAPES),
    "fullgraph=True": (lambda model, xs: run_compiled(model, xs, fullgraph=True), 3, SHAPES),
    "mark_unbacked": (run_unbacked, 2, SHAPES),
    "export": (run_exported, 0, SHAPES),
}


def check_sequence(model: nn.Module, run: Run, reference: nn.Module, shapes: list[tuple[int, ...]] = SHAPES) -> int:
    """Run ``run`` over the shape sequence; every output matches eager; returns the graph count."""
    xs = inputs(shapes)
    with torch.inference_mode():
        expected = [reference(x) for x in xs]
    # torch.export refuses wrapped subclass parameters under inference_mode ("Cannot set
    # version_counter for inference tensor"); no_grad is how docs/limits.md exports.
    grad_off = torch.no_grad() if run is run_exported else torch.inference_mode()
    with GraphCounter() as counter, grad_off:
        outs = run(model, xs)
    assert len(outs) == len(shapes), len(outs)
    for shape, out, ref in zip(shapes, outs, expected):
        assert out.shape == ref.shape and out.dtype == ref.dtype, shape
        assert torch.isfinite(out).all(), shape
        quality = sqnr(ref, out)
        assert quality >= MIN_SQNR, f"{shape}: SQNR {quality:.1f} dB"
    return counter.graphs


@pytest.mark.parametrize("mode", list(LIGHT_MODES))
@pytest.mark.parametrize("wrapping", ["wrapped", "unwrapped"])
@pytest.mark.parametrize("fmt", list(CONFIGS))
def test_compile_matrix(fmt: str, wrapping: str, mode: str) -> None:
    reference = build((fmt,), unwrapped=False)
    model = copy.deepcopy(reference) if wrapping == "wrapped" else build((fmt,), unwrapped=True)
    run, graphs, shapes = LIGHT_MODES[mode]
    compiled = check_sequence(model, run, reference, shapes)
    assert compiled == graphs, f"{compiled} graphs compiled over {shapes}, expected {graphs}"


HEAVY_MODES = {
    "cpp_wrapper": lambda model, xs, tmp: run_compiled(model, xs, options={"cpp_wrapper": True}),
    "max-autotune-no-cudagraphs": lambda model, xs, tmp: run_compiled(model, xs, mode="max-autotune-no-cudagraphs"),
    "aoti": run_aoti,
}


@pytest.mark.parametrize("mode", list(HEAVY_MODES))
def test_heavy_modes_on_every_format_at_once(mode: str, tmp_path) -> None:
    reference = build(tuple(CONFIGS), unwrapped=False)
    model = build(tuple(CONFIGS), unwrapped=True)
    check_sequence(model, lambda m, xs: HEAVY_MODES[mode](m, xs, tmp_path), reference)
