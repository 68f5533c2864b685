"""Int4 decode GEMVs (M = 1) against the memory-bandwidth floor: weight bytes / read bandwidth.

Run: ``python -m perf.bench_gemv`` (tables) or ``pytest perf/bench_gemv.py --benchmark-only``.

A decode token reads every weight once, from memory: a model's linears (tens to hundreds of MB)
do not fit in the caches. So each shape is timed over enough copies of its weight to exceed the
L3 (``COLD_BYTES``), one call per copy, and the per-token table times all of a model's linears in
model order, as a token would. The floor is the bytes each call must read (packed codes plus
scale_and_zero) divided by the machine's read bandwidth, measured here by reading a buffer far
larger than the L3 with the GEMV's own loads and threads (``read_bandwidth_gbs``). Each call is
timed alone; a sweep's time is the sum of each call's minimum over the rounds (``time_paths``).

Paths: ``aten`` (``torch._weight_int4pack_mm_for_cpu``), ``unwrap`` (``unwrap_cpu::int4_gemv``,
subclasses/kernels/int4_gemv.py, its AVX512 or AVX2 kernel as torch's CPU capability packs; what
``F.linear`` on an int4 weight calls at M = 1 when it is available) and, for reference, ``int8`` (``torch._weight_int8pack_mm`` on the same shapes, twice
the bytes: its own floor is in the ``int8 floor`` column).
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from perf.harness.tables import markdown_table
from perf.harness.timing import interleaved_min
from subclasses.formats.int4 import Int4WeightTensor
from subclasses.kernels.int4_gemv import kernel_available, kernel_isa

DEFAULT_THREADS = 2  # BENCH_THREADS overrides (perf/conftest.py)
GROUP_SIZE = 32  # the default int4 config's
COLD_BYTES = 128 << 20  # per timed sweep: well past the 48 MiB L3 of the project's machine
BANDWIDTH_BYTES = 1 << 30  # the buffer summed to measure read bandwidth


@dataclass(frozen=True)
class Model:
    """The linear shapes of a Llama/Qwen2-style decoder: (N, K) = (out, in) features."""

    hidden: int
    kv: int  # k_proj / v_proj out features (kv heads x head dim)
    intermediate: int
    layers: int
    vocab: int

    def layer_shapes(self) -> list[tuple[str, int, int]]:
        """(name, N, K) of one decoder layer's seven linears, in execution order."""
        h, kv, i = self.hidden, self.kv, self.intermediate
        return [
            ("q_proj", h, h),
            ("k_proj", kv, h),
            ("v_proj", kv, h),
            ("o_proj", h, h),
            ("gate_proj", i, h),
            ("up_proj", i, h),
            ("down_proj", h, i),
        ]

    def shapes(self) -> list[tuple[str, int, int, int]]:
        """(name, N, K, calls per token) of each distinct shape, the vocab matrix (lm_head) last."""
        seen: dict[tuple[int, int], list] = {}
        for name, n, k in self.layer_shapes():
            seen.setdefault((n, k), [name, n, k, 0])
            seen[(n, k)][3] += self.layers
        return [tuple(row) for row in seen.values()] + [("lm_head", self.vocab, self.hidden, 1)]


MODELS = {
    "SmolLM2-135M": Model(hidden=576, kv=192, intermediate=1536, layers=30, vocab=49152),
    "Qwen2-0.5B": Model(hidden=896, kv=128, intermediate=4864, layers=24, vocab=151936),
}


def read_bandwidth_gbs(nbytes: int = BANDWIDTH_BYTES, chunk: int = 512 << 10, rounds: int = 7) -> float:
    """The machine's read bandwidth in GB/s with torch's current threads, over a buffer of
    ``nbytes`` (>> L3): each ``chunk`` is read alone, and the time is the sum of each chunk's
    minimum over ``rounds`` passes (as ``time_paths`` does; robust on a busy machine). The reader
    is ``unwrap_cpu::read_bytes`` (the GEMV's loads, prefetch and threading) when the kernel is
    built, else ``sum()``. Chunks are GEMV-sized: on the busy 2-core machine, 2-thread calls of
    2 MiB and more stalled ~10 ms each (0.2 GB/s), 512 KiB ones did not (18.7 GB/s)."""
    buffer = torch.ones(nbytes // 8, dtype=torch.int64)
    read = torch.ops.unwrap_cpu.read_bytes.default if kernel_available() else torch.Tensor.sum
    chunks = buffer.split(chunk // 8)
    best = interleaved_min({i: functools.partial(read, part) for i, part in enumerate(chunks)}, rounds=rounds)
    return nbytes / sum(best.values()) / 1e9


def int4_bytes(n: int, k: int, group_size: int = GROUP_SIZE, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes an int4 GEMV must read: the packed codes and scale_and_zero."""
    return n * k // 2 + (k // group_size) * n * 2 * dtype.itemsize


def int8_bytes(n: int, k: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes an int8 weight-only GEMV must read: int8 codes and one scale per row."""
    return n * k + n * dtype.itemsize


@dataclass
class Weight:
    n: int
    k: int
    int4: Int4WeightTensor
    int8: tuple[torch.Tensor, torch.Tensor]


def random_weight(n: int, k: int, group_size: int = GROUP_SIZE, dtype: torch.dtype = torch.bfloat16) -> Weight:
    """Random codes and scales (timing does not depend on values), packed for this CPU."""
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    scale_and_zero = torch.rand(k // group_size, n, 2, dtype=dtype)
    int4 = Int4WeightTensor.from_codes(q, scale_and_zero, group_size, dtype)
    return Weight(n, k, int4, (q.to(torch.int8), torch.rand(n, dtype=dtype)))


def copies(weight: Weight, count: int) -> list[Weight]:
    """``weight`` and ``count - 1`` copies of its tensors (distinct memory, so a sweep is cold)."""
    w = weight.int4
    clone = lambda: Int4WeightTensor(
        w.packed.clone(), w.scale_and_zero.clone(), w.group_size, w.packing, w.outer_shape, w.outer_dtype
    )
    return [weight] + [
        Weight(weight.n, weight.k, clone(), (weight.int8[0].clone(), weight.int8[1].clone())) for _ in range(count - 1)
    ]


def paths() -> dict[str, Callable[[torch.Tensor, Weight], torch.Tensor]]:
    """The GEMVs compared: name -> fn(x [1, K], weight)."""
    table: dict[str, Callable[[torch.Tensor, Weight], torch.Tensor]] = {
        "aten": lambda x, w: torch._weight_int4pack_mm_for_cpu(
            x, w.int4.packed, w.int4.group_size, w.int4.scale_and_zero
        ),
    }
    if kernel_available():
        table["unwrap"] = lambda x, w: torch.ops.unwrap_cpu.int4_gemv.default(
            x, w.int4.packed, w.int4.group_size, w.int4.scale_and_zero
        )
    table["int8"] = lambda x, w: torch._weight_int8pack_mm(x, *w.int8)
    return table


def sweep(
    fn: Callable[[torch.Tensor, Weight], torch.Tensor], weights: list[Weight], inputs: dict[int, torch.Tensor]
) -> None:
    """One call per weight, in order (a token's worth, or a cold pass over copies of one shape)."""
    for w in weights:
        fn(inputs[w.k], w)


def time_paths(weights: list[Weight], rounds: int) -> dict[str, float]:
    """Time of one sweep in us per path: each call is timed alone and the sum is taken over each
    call's minimum across ``rounds`` cold sweeps (paths interleaved each round, after one warm-up
    sweep). On a shared machine a preemption spoils a call, not the sweep: this is robust where the
    min of whole sweeps is not (2 busy cores)."""
    inputs = {w.k: torch.randn(1, w.k, dtype=torch.bfloat16) for w in weights}
    table = paths()
    calls = {
        (name, i): functools.partial(fn, inputs[w.k], w) for name, fn in table.items() for i, w in enumerate(weights)
    }
    with torch.inference_mode():
        best = interleaved_min(calls, rounds=rounds, warmup=1)
    return {name: sum(t for (path, _), t in best.items() if path == name) * 1e6 for name in table}


def copies_for(n: int, k: int) -> int:
    """How many copies of an [n, k] weight make a sweep cold (past ``COLD_BYTES``)."""
    return max(1, -(-COLD_BYTES // int4_bytes(n, k)))


def shape_rows(model: Model, bandwidth: float, rounds: int = 7) -> list[dict[str, Any]]:
    """Per distinct shape: us per call of each path, cold, and the floors."""
    rows = []
    for name, n, k, calls in model.shapes():
        count = copies_for(n, k)
        weights = copies(random_weight(n, k), count)
        times = {p: t / count for p, t in time_paths(weights, rounds).items()}
        rows.append(
            {
                "shape": f"{name} {n}x{k}",
                "calls": calls,
                "floor": int4_bytes(n, k) / bandwidth / 1e3,
                "int8 floor": int8_bytes(n, k) / bandwidth / 1e3,
                **times,
            }
        )
        del weights
    return rows


def token_row(model: Model, bandwidth: float, rounds: int = 5, lm_head: bool = True) -> dict[str, Any]:
    """One token's GEMVs (every decoder linear, in order, plus the vocab matrix): total us per path."""
    shapes = [(n, k) for _ in range(model.layers) for _, n, k in model.layer_shapes()]
    shapes += [(model.vocab, model.hidden)] if lm_head else []
    weights = [random_weight(n, k) for n, k in shapes]
    times = time_paths(weights, rounds)
    return {
        "shape": f"token ({len(shapes)} GEMVs)",
        "calls": 1,
        "floor": sum(int4_bytes(n, k) for n, k in shapes) / bandwidth / 1e3,
        "int8 floor": sum(int8_bytes(n, k) for n, k in shapes) / bandwidth / 1e3,
        **times,
    }


def fused_token_row(model: Model, bandwidth: float, rounds: int = 5) -> dict[str, Any]:
    """One token's GEMVs as ``compile_for_decode`` calls them: per layer q/k/v as one
    ``int4_gemv_cat``, o_proj, gate/up as one, down_proj; then the vocab matrix. Same weights and
    bytes as ``token_row``; only the ``unwrap`` path exists (aten has no fused call)."""
    from subclasses.kernels.int4_gemv import int4_gemv_cat

    layer = dict((name, (n, k)) for name, n, k in model.layer_shapes())
    groups = [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]
    calls = [[random_weight(*layer[name]).int4 for name in group] for _ in range(model.layers) for group in groups]
    calls.append([random_weight(model.vocab, model.hidden).int4])
    inputs = {k: torch.randn(1, k, dtype=torch.bfloat16) for k in (model.hidden, model.intermediate)}
    fns = {
        i: functools.partial(
            int4_gemv_cat, inputs[ws[0].shape[1]], [w.packed for w in ws], GROUP_SIZE, [w.scale_and_zero for w in ws]
        )
        for i, ws in enumerate(calls)
    }
    with torch.inference_mode():
        best = interleaved_min(fns, rounds=rounds, warmup=1)
    nbytes = sum(int4_bytes(*w.shape) for ws in calls for w in ws)
    return {
        "shape": f"token, fused ({len(calls)} calls)",
        "calls": 1,
        "floor": nbytes / bandwidth / 1e3,
        "unwrap": sum(best.values()) * 1e6,
    }


def format_table(title: str, rows: list[dict[str, Any]]) -> str:
    """Markdown table: us per call; ``x floor`` is each int4 path's time over the int4 floor."""
    int4 = [p for p in ("aten", "unwrap") if p in rows[0]]
    head = [
        "shape",
        "calls/token",
        "int4 floor us",
        *[f"{p} us" for p in int4],
        *[f"{p} x floor" for p in int4],
        "int8 us",
        "int8 floor us",
    ]
    cells = [
        [
            r["shape"],
            r["calls"],
            f"{r['floor']:.1f}",
            *[f"{r[p]:.1f}" if p in r else "-" for p in int4],
            *[f"{r[p] / r['floor']:.2f}" if p in r else "-" for p in int4],
            f"{r['int8']:.1f}" if "int8" in r else "-",
            f"{r['int8 floor']:.1f}" if "int8 floor" in r else "-",
        ]
        for r in rows
    ]
    return markdown_table(head, cells, title=title)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m perf.bench_gemv", description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS, help="torch threads (default: 2)")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated: " + ", ".join(MODELS))
    parser.add_argument("--rounds", type=int, default=7, help="timed sweeps per path (min is reported)")
    parser.add_argument("--no-token", action="store_true", help="skip the whole-token sweeps")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    bandwidth = read_bandwidth_gbs()
    kernel = f"{kernel_isa()} kernel" if kernel_available() else "NOT available"
    print(
        f"threads {args.threads}, read bandwidth {bandwidth:.1f} GB/s (read_bandwidth_gbs: {BANDWIDTH_BYTES >> 20} MiB), "
        f"int4 group {GROUP_SIZE}, bf16, CPU capability {torch.backends.cpu.get_cpu_capability()}, unwrap {kernel}\n"
    )
    for name in args.models.split(","):
        model = MODELS[name]
        rows = shape_rows(model, bandwidth, args.rounds)
        if not args.no_token:
            rows.append(token_row(model, bandwidth, max(3, args.rounds // 2)))
            if kernel_available():
                rows.append(fused_token_row(model, bandwidth, max(3, args.rounds // 2)))
        print(format_table(f"{name}: us per GEMV, cold (M = 1)", rows) + "\n")


# pytest-benchmark: one cold sweep over copies of each shape, per path; the read bandwidth.
CASES = [(m, name, n, k) for m, model in MODELS.items() for name, n, k, _ in model.shapes()]


def test_read_bandwidth(benchmark) -> None:
    benchmark.extra_info["gb_per_s"] = benchmark.pedantic(read_bandwidth_gbs, rounds=1)


@pytest.mark.parametrize("path", ["aten", "unwrap"])
@pytest.mark.parametrize("model,name,n,k", CASES, ids=[f"{m}-{name}" for m, name, _, _ in CASES])
def test_gemv(benchmark, model: str, name: str, n: int, k: int, path: str) -> None:
    table = paths()
    if path not in table:
        pytest.skip("the unwrap_cpu::int4_gemv kernel is not available here (see subclasses/kernels/int4_gemv.py)")
    count = copies_for(n, k)
    weights = copies(random_weight(n, k), count)
    inputs = {k: torch.randn(1, k, dtype=torch.bfloat16)}
    benchmark.group = f"gemv {model} {name} {n}x{k} (x{count} copies)"
    benchmark.extra_info.update(bytes_per_sweep=count * int4_bytes(n, k), copies=count)
    with torch.inference_mode():
        benchmark.pedantic(sweep, args=(table[path], weights, inputs), rounds=7, warmup_rounds=1)


if __name__ == "__main__":
    main()
