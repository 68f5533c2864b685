"""torchao users' models beside ours: W1 and W2 quantized with torchao 0.18 (int4: ``Int4OpaqueTensor``
from ``PrototypeInt4WeightOnlyConfig``, group 128; int8: ``Int8WeightOnlyConfig``), batch 1, one thread.

Variants: ``floor`` (plain buffers calling the kernel, sharing the converted weights' tensors),
``ours unwrapped`` (our ``quantize_`` + ``unwrap``), ``torchao`` (as torchao leaves it),
``torchao unwrapped`` (``unwrap`` on torchao's tensors: the forward calls torchao's declared linear)
and ``torchao converted`` (``subclasses.from_torchao`` + ``unwrap``).

Run: ``pytest perf/bench_torchao.py --benchmark-only`` (needs torchao). Groups are
``torchao {workload} {format} {mode}``; ``extra_info`` as in ``bench_overhead``: ``floor_us``,
``ours_us``, ``ratio_to_floor``, ``guards``, ``floor_guards``, ``layers``.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import pytest
import torch
from torch import nn

from perf import bench_overhead
from perf.floor import floor_model
from perf.harness.models import REPORT_FORMATS, WORKLOADS, report_config, workload_model
from perf.modes import torchao_available, torchao_model

VARIANTS = ("floor", "ours unwrapped", "torchao", "torchao unwrapped", "torchao converted")
# "frozen": compiled with Inductor's freezing, which folds the per-call fp32 -> bf16 cast of torchao's
# int8 scale (unwrapped torchao int8 then runs the floor's graph); the floor is compiled the same way.
MODES = ("eager", "compiled", "frozen")
DEFAULT_THREADS = 1
ROUNDS = 20


def torchao_variants(workload: str, fmt: str, seed: int = 0) -> tuple[dict[str, nn.Module], torch.Tensor]:
    """The five variants above, from one bf16 model, and a batch-1 input."""
    from subclasses import from_torchao, quantize_
    from unwrap import unwrap

    bf16, x = workload_model(workload, seed)
    torchao = torchao_model(bf16, fmt)
    converted = copy.deepcopy(torchao)
    summary = from_torchao(converted, strict=True)
    assert not summary.left, summary
    models = {
        "floor": floor_model(converted),
        "ours unwrapped": unwrap(quantize_(copy.deepcopy(bf16), report_config(fmt))),
        "torchao": torchao,
        "torchao unwrapped": unwrap(copy.deepcopy(torchao)),
        "torchao converted": unwrap(copy.deepcopy(converted)),
    }
    return models, x


@functools.cache
def cached_variants(workload: str, fmt: str) -> tuple[dict, torch.Tensor]:
    """``torchao_variants``, built once per process (the benchmark cases and tests share them)."""
    return torchao_variants(workload, fmt)


def run_case(
    benchmark: Any,  # pytest-benchmark's fixture (or a stand-in with extra_info)
    workload: str,
    fmt: str,
    variant: str,
    mode: str,
    *,
    rounds: int = ROUNDS,
    number: int = 200,
) -> dict[str, object]:
    """``bench_overhead.run_case`` on this module's variants."""
    # Built outside inference_mode, as a user builds a model: inference tensors have no version
    # counter, so the lean int8 linear (subclasses/io/torchao_linear.py) could not keep its scale.
    cached_variants(workload, fmt)
    return bench_overhead.run_case(
        benchmark, workload, fmt, variant, mode, rounds=rounds, number=number, variants=cached_variants
    )


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fmt", REPORT_FORMATS)
@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_torchao_overhead(benchmark, workload: str, fmt: str, mode: str, variant: str) -> None:
    if not torchao_available():  # checked here, not at import: importing perf never imports torchao
        pytest.skip("needs torchao (the 'torchao' extra)")
    benchmark.group = f"torchao {workload} {fmt} {mode}"
    run_case(benchmark, workload, fmt, variant, mode)
