"""SmolLM2 int4 (the default config) decoded token by token (M = 1, so every linear runs the decode
kernel): perplexity and logits with ``unwrap_cpu::int4_gemv`` vs aten's int4 kernel, same model.

Run: ``python -m perf.gemv_numerics [tokens]`` (default 160; ~2 s per token per path on a busy
2-core machine). Needs the real model (``perf.real_model``) and the built kernel.
"""

from __future__ import annotations

import math
import sys
from unittest import mock

import torch

import subclasses.kernels.int4_gemv as gemv
from subclasses import Int4WeightOnlyConfig, quantize_

from .real_model import eval_token_ids, load_smollm2


def decode_nll(model: torch.nn.Module, ids: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Perplexity of ids[1:] fed one token at a time through a DynamicCache, and the logits [T, V]."""
    from transformers import DynamicCache

    from subclasses.runtime.caches import cache_keyword

    cache, nll, logits = DynamicCache(), 0.0, []
    keyword = cache_keyword(model)
    with torch.inference_mode():
        for t in range(ids.numel() - 1):
            out = model(ids[t : t + 1].view(1, 1), **{keyword: cache}, use_cache=True).logits[0, -1].float()
            nll -= out.log_softmax(-1)[ids[t + 1]].item()
            logits.append(out)
    return math.exp(nll / (ids.numel() - 1)), torch.stack(logits)


def main(tokens: int = 160) -> None:
    if not gemv.kernel_available():
        raise SystemExit("unwrap_cpu::int4_gemv is not available here: nothing to compare")
    torch.set_num_threads(2)
    model, tokenizer = load_smollm2(torch.bfloat16)
    quantize_(model, Int4WeightOnlyConfig())
    ids = eval_token_ids(tokenizer).view(-1)[: tokens + 1]
    ours, ours_logits = decode_nll(model, ids)
    with mock.patch.object(gemv, "traced_kernel_available", return_value=False):
        aten, aten_logits = decode_nll(model, ids)
    sqnr = 20 * torch.log10(aten_logits.norm() / (aten_logits - ours_logits).norm()).item()
    agree = (aten_logits.argmax(-1) == ours_logits.argmax(-1)).float().mean().item()
    print(
        f"{tokens} tokens decoded at M = 1: perplexity ours {ours:.4f}, aten {aten:.4f} ({(ours / aten - 1) * 100:+.2f} %); "
        f"logits SQNR ours vs aten {sqnr:.1f} dB; argmax agree {agree * 100:.1f} %"
    )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 160)
