"""Kernels and byte layouts: int4 packing, the C++ ops (``csrc/``, built at first use), CUDA calls.

Owns every ``torch.ops.unwrap_*`` op, its build and its pure-PyTorch fallback, and how int4 scales and
zeros are searched. Imports torch only: the formats call into it, never the other way round.
"""
