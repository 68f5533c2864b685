"""``python -m perf.qparams_time``: int4 quantize time by qparams algorithm for one decoder layer of the
Qwen2 0.5B shapes (``perf.qwen.QWEN2_SHAPES``; the model has 24 such layers), interleaved rounds, min."""

from __future__ import annotations

import argparse
import time

import torch

from subclasses import Int4WeightTensor
from subclasses.int4_qparams import QPARAMS_ALGORITHMS

from .qwen import QWEN2_SHAPES


def layer_shapes(name: str = "Qwen2 0.5B") -> list[tuple[int, int]]:
    """(out_features, in_features) of one decoder layer's linears: q, k, v, o, gate, up, down."""
    s = QWEN2_SHAPES[name]
    hidden, inter = s["hidden_size"], s["intermediate_size"]
    kv = hidden // s["num_attention_heads"] * s["num_key_value_heads"]
    return [
        (hidden, hidden),
        (kv, hidden),
        (kv, hidden),
        (hidden, hidden),
        (inter, hidden),
        (inter, hidden),
        (hidden, inter),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perf.qparams_time", description=__doc__.split("\n\n")[0])
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    weights = [(torch.randn(n, k, generator=generator) * 0.02).to(torch.bfloat16) for n, k in layer_shapes()]
    start = time.perf_counter()
    Int4WeightTensor.from_float(weights[4], args.group_size, "mse")  # the first large weight compiles
    print(f"first 'mse' call (compile + one {tuple(weights[4].shape)} weight): {time.perf_counter() - start:.1f} s")
    best = {a: float("inf") for a in QPARAMS_ALGORITHMS}
    for _ in range(args.rounds):
        for algorithm in QPARAMS_ALGORITHMS:
            start = time.perf_counter()
            for w in weights:
                Int4WeightTensor.from_float(w, args.group_size, algorithm)
            best[algorithm] = min(best[algorithm], time.perf_counter() - start)
    layers = QWEN2_SHAPES["Qwen2 0.5B"]["num_hidden_layers"]
    for algorithm, seconds in best.items():
        print(
            f"{algorithm}: {seconds:.2f} s per decoder layer, x{layers} = {seconds * layers:.1f} s "
            f"({seconds / best['tinygemm']:.1f}x tinygemm)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
