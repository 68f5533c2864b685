"""Int8 weight-only on CUDA: cuBLAS on the widened codes, the per-channel scale on the output.

``aten._weight_int8pack_mm`` has a CUDA kernel since torch 2.9 (so on the GPU machines' 2.11), but
it gives each output element to one thread that walks K alone, in fp32, with uncoalesced weight
reads (``aten/src/ATen/native/cuda/int8mm.cu``; a rewrite is still open upstream): a poor GEMV.
We compute ``(x @ q.T) * scale`` instead: the codes widened to x's dtype (exact: |q| <= 128),
one cuBLAS GEMM, the scale applied to the [M, N] output rather than to the [N, K] weight. Under
``torch.compile`` with ``torch._inductor.config.coordinate_descent_tuning = True`` Inductor turns a
one-row product into a single fused reduction reading the int8 weight once (gpt-fast's setting).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .linear_io import add_bias


def int8_cuda_linear(
    x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``F.linear`` for an int8 weight (codes ``qdata`` [N, K], ``scale`` [N]) on a GPU
    (``check_activation`` already ran: x has the weight's dtype).

    fp16 activations take ``F.linear`` with the dequantized weight: the unscaled ``x @ q.T`` grows
    like 127 * |x| * sqrt(K) and would overflow fp16 (max 65504) on real activations.
    """
    if x.dtype == torch.float16:
        return F.linear(x, qdata.to(x.dtype) * scale.unsqueeze(1), bias)
    out = F.linear(x, qdata.to(x.dtype)) * scale
    return add_bias(out, bias)
