"""Re-measure the int4 prefill crossover (``subclasses.kernels.int4_prefill.PREFILL_CROSSOVER``).

For one representative weight per shape class, times the int4 kernel and the prefill path
(compiled dequantize + ``torch.mm``, as eager ``F.linear`` runs it) at several activation row
counts M, interleaved, and reports the largest M for which the kernel still wins (linear
interpolation between the bracketing M). Run: ``python -m perf.crossover [--threads 2]``.
"""

from __future__ import annotations

import argparse
import functools

import torch

from perf.harness.timing import interleaved_min
from subclasses import Int4WeightTensor
from subclasses.kernels.int4_prefill import PREFILL_CROSSOVER, prefill_mm

# (class upper bound on N*K, representative N, K) in the order of PREFILL_CROSSOVER.
SHAPE_CLASSES: tuple[tuple[float, int, int], ...] = (
    (1 << 20, 1024, 1024),
    (1 << 23, 2048, 2048),
    (float("inf"), 4096, 4096),
)
ROWS = (4, 8, 12, 16, 24, 32, 48, 64, 96)


@functools.cache
def _weight(n: int, k: int, group_size: int, dtype: torch.dtype) -> Int4WeightTensor:
    return Int4WeightTensor.from_float(torch.randn(n, k, dtype=dtype), group_size)


def time_paths(
    n: int, k: int, m: int, *, group_size: int = 128, dtype: torch.dtype = torch.bfloat16
) -> tuple[float, float]:
    """(int4 kernel us, dequantize + mm us) for x [m, k] and an int4 weight [n, k]: the minimum
    over interleaved repeats, so that load from other processes hits both paths alike."""
    weight = _weight(n, k, group_size, dtype)
    x = torch.randn(m, k, dtype=dtype)
    packed, scale_and_zero = weight.packed, weight.scale_and_zero

    def kernel_path() -> torch.Tensor:
        return torch._weight_int4pack_mm_for_cpu(x, packed, group_size, scale_and_zero)

    def dequantize_path() -> torch.Tensor:
        return prefill_mm(x, packed, scale_and_zero, group_size, n, k)

    number = max(2, 100 // m)
    best = interleaved_min({"kernel": kernel_path, "dequantize": dequantize_path}, rounds=9, number=number, warmup=1)
    return best["kernel"] * 1e6, best["dequantize"] * 1e6


def crossover(times: dict[int, tuple[float, float]]) -> int:
    """Largest M where the kernel wins, interpolating (kernel - dequant) between measured M."""
    rows = sorted(times)
    diff = {m: times[m][0] - times[m][1] for m in rows}
    if diff[rows[0]] > 0:
        return 1
    for lo, hi in zip(rows, rows[1:]):
        if diff[hi] > 0:  # the dequantize path wins from somewhere in (lo, hi]
            return int(lo + (hi - lo) * -diff[lo] / (diff[hi] - diff[lo]))
    return rows[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    measured = []
    with torch.inference_mode():
        for (bound, n, k), (_, recorded) in zip(SHAPE_CLASSES, PREFILL_CROSSOVER):
            times = {m: time_paths(n, k, m) for m in ROWS}
            for m, (kernel, dequant) in times.items():
                print(f"{n}x{k} M={m:3d}: int4 kernel {kernel / 1e3:7.3f} ms  dequantize+mm {dequant / 1e3:7.3f} ms")
            measured.append((bound, crossover(times)))
            print(f"{n}x{k}: crossover M={measured[-1][1]} (recorded: {recorded})")
    print("PREFILL_CROSSOVER = (")
    for bound, rows in measured:
        limit = 'float("inf")' if bound == float("inf") else f"1 << {int(bound).bit_length() - 1}"
        print(f"    ({limit}, {rows}),")
    print(")")


if __name__ == "__main__":
    main()
