"""``python -m perf.qparams_time``: the whole ``quantize_`` of a Qwen2 0.5B-shaped model (``perf.qwen``,
random bf16 weights: 24 decoder layers and the tied 151936 x 896 embedding, ~494M weights) with int4
``Int4WeightOnlyConfig(group_size, qparams_algorithm=...)`` per algorithm: interleaved rounds, min, and
each algorithm's ratio to min-max ("tinygemm") measured in the same run (the machine may be shared)."""

from __future__ import annotations

import argparse
import copy
import functools
import time

import torch

from subclasses import Int4WeightOnlyConfig, quantize_
from subclasses.kernels.int4_qparams import QPARAMS_ALGORITHMS, kernel_available

from .harness.models import QWEN2_SHAPES, build_qwen2
from .harness.timing import interleaved_min


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perf.qparams_time", description=__doc__.split("\n\n")[0])
    parser.add_argument("--group-size", type=int, default=Int4WeightOnlyConfig().group_size)
    parser.add_argument("--model", default="Qwen2 0.5B", choices=sorted(QWEN2_SHAPES))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    kernel = kernel_available()  # built once per machine (cached), loaded once per process
    print(f"'mse' C++ search {'loaded' if kernel else 'NOT available (eager)'} in {time.perf_counter() - start:.1f} s")
    model = build_qwen2(QWEN2_SHAPES[args.model])
    numel = sum(p.numel() for p in model.parameters() if p.dim() == 2)
    candidate: dict[str, torch.nn.Module] = {}

    def fresh_copy(algorithm: str) -> None:  # untimed: each quantize_ starts from a bf16 copy
        candidate.clear()
        candidate[algorithm] = copy.deepcopy(model)

    def quantize(algorithm: str) -> None:
        quantize_(candidate[algorithm], Int4WeightOnlyConfig(args.group_size, qparams_algorithm=algorithm))

    best = interleaved_min(
        {a: functools.partial(quantize, a) for a in QPARAMS_ALGORITHMS}, rounds=args.rounds, before=fresh_copy
    )
    candidate.clear()
    print(f"quantize_ of {args.model} ({numel / 1e6:.0f}M weights), int4 g{args.group_size}, {args.threads} threads:")
    for algorithm, seconds in best.items():
        print(f"  {algorithm}: {seconds:.1f} s ({seconds / best['tinygemm']:.2f}x tinygemm)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
