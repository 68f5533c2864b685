"""Benchmarks and the overhead report: bf16 vs the floor vs our quantized weights."""
