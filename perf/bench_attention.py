"""``python -m perf.bench_attention``: one decode token's attention (one query row over the filled slots
of a K/V cache), ``unwrap_cpu::decode_attention`` against aten's CPU flash kernel over the same slots, in
microseconds per call (warm: the cache in L2/L3), for SmolLM2's heads (9 over 3 K/V) and Qwen2.5-0.5B's
(14 over 2), bf16, head_dim 64. The kernel hands long caches to flash itself past a length per ISA
(csrc/decode_attention.cpp); this shows where that crossover lies on this machine.
"""

from __future__ import annotations

import argparse

import torch

from perf.harness.timing import min_time_us

HEADS = {"SmolLM2-135M": (9, 3), "Qwen2.5-0.5B": (14, 2)}
HEAD_DIM = 64


def attention_us(heads: int, kv_heads: int, filled: int, slots: int) -> tuple[float, float]:
    """(ours, flash) us per call: ``heads`` query heads over the first ``filled`` of ``slots`` cache slots."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, heads, 1, HEAD_DIM, generator=g).bfloat16()
    k, v = (torch.randn(1, kv_heads, slots, HEAD_DIM, generator=g).bfloat16() for _ in range(2))
    mask = (torch.arange(slots) < filled).view(1, 1, 1, slots)
    scale = HEAD_DIM**-0.5
    grouped = q.reshape(1, kv_heads, heads // kv_heads, HEAD_DIM)  # one-token GQA as the kernel hands it to flash
    bias = torch.zeros(1, 1, 1, filled, dtype=torch.bfloat16)
    ours = min_time_us(lambda: torch.ops.unwrap_cpu.decode_attention(q, k, v, mask, scale), number=50, warmup=5)
    flash = min_time_us(
        lambda: torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            grouped, k[:, :, :filled], v[:, :, :filled], 0.0, False, attn_mask=bias, scale=scale
        ),
        number=50,
        warmup=5,
    )
    return ours, flash


def main(argv: list[str] | None = None) -> int:
    from subclasses.kernels.int4_gemv import kernel_available, kernel_isa

    parser = argparse.ArgumentParser(prog="python -m perf.bench_attention", description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lengths", default="16,64,256,1024,2048,4096", help="filled slots, comma-separated")
    args = parser.parse_args(argv)
    lengths = [int(n) for n in args.lengths.split(",")]
    if args.threads < 1 or not lengths or min(lengths) < 1:
        parser.error(f"--threads and every --lengths value must be positive, got {args.threads} and {args.lengths!r}")
    if not kernel_available():
        print("unwrap_cpu::decode_attention is not built here (it needs AVX2 or AVX512)")
        return 2
    torch.set_num_threads(args.threads)
    print(f"{args.threads} thread(s), {kernel_isa()} kernel, bf16, head_dim {HEAD_DIM}; us per call, min of 7")
    for name, (heads, kv_heads) in HEADS.items():
        print(f"{name} ({heads} heads over {kv_heads}):")
        for filled in lengths:
            ours, flash = attention_us(heads, kv_heads, filled, max(lengths))
            print(f"  {filled:6d} slots   ours {ours:8.1f}   flash {flash:8.1f}   flash / ours {flash / ours:5.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
