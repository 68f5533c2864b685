"""The report's quality lines for a real model: perplexity (also of the other ways to quantize),
weight bytes and a greedy sample, bf16 beside the quantized format."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch

from ..harness.models import config

SAMPLE_PROMPT = "The capital of France is"


def quality_notes(
    bf16: torch.nn.Module,
    quantized: torch.nn.Module,
    fmt: str,
    tokenizer: Any,
    *,
    cache: dict[str, tuple[float, int, str]],
) -> list[str]:
    """Perplexity on the shipped text, weight bytes and 12 greedy tokens, bf16 beside ``fmt`` (the
    floor and ours unwrapped hold the same weights as ours wrapped: same numbers)."""
    from subclasses.quantize.api import model_bytes

    from ..real_model import eval_token_ids, perplexity

    ids = eval_token_ids(tokenizer)
    prompt = tokenizer(SAMPLE_PROMPT, return_tensors="pt").input_ids

    def measure(model: torch.nn.Module) -> tuple[float, int, str]:
        with torch.inference_mode():
            sample = model.generate(prompt, max_new_tokens=12, do_sample=False)  # type: ignore[operator]
        text = tokenizer.decode(sample[0, prompt.shape[1] :], skip_special_tokens=True)
        return perplexity(model, ids), model_bytes(model), text

    if "bf16" not in cache:
        cache["bf16"] = measure(bf16)
    cache[fmt] = measure(quantized)
    (ppl_ref, bytes_ref, text_ref), (ppl, size, text) = cache["bf16"], cache[fmt]
    others = ", ".join(
        f"{label} {value:.2f} ({value / ppl_ref - 1:+.1%})"
        for label, value in other_algorithms(bf16, fmt, tokenizer, ids).items()
    )
    return [
        f"perplexity on perf/data/eval_text.txt ({ids.shape[1]} tokens, 512-token windows): bf16 {ppl_ref:.2f}, "
        f"{fmt} {ppl:.2f} ({ppl / ppl_ref - 1:+.1%})" + (f"; other algorithms: {others}" if others else ""),
        f"weight bytes: bf16 {bytes_ref / 2**20:.1f} MiB, {fmt} {size / 2**20:.1f} MiB ({size / bytes_ref:.2f}x)",
        f"greedy {SAMPLE_PROMPT!r} -> bf16: {text_ref!r}; {fmt}: {text!r}",
    ]


def other_algorithms(bf16: torch.nn.Module, fmt: str, tokenizer: Any, ids: torch.Tensor) -> dict[str, float]:
    """Perplexity of ``fmt`` quantized the other ways (the default config is the row itself): int4
    with the qparams algorithm that is not the default ("mse" or min-max "tinygemm"), and with GPTQ
    on perf/data/calibration_text.txt; int8 with GPTQ."""
    from subclasses import Int4WeightOnlyConfig, quantize_

    from .. import real_model

    calibration = real_model.calibration_batches(tokenizer)
    ways: dict[str, tuple[Any, list[torch.Tensor] | None]] = {f"{fmt} + GPTQ": (config(fmt), calibration)}
    if fmt == "int4":
        default = Int4WeightOnlyConfig().qparams_algorithm
        other = "mse" if default == "tinygemm" else "tinygemm"
        ways = {f"int4 {other}": (Int4WeightOnlyConfig(qparams_algorithm=other), None), **ways}
    out = {}
    for label, (way, batches) in ways.items():
        model = copy.deepcopy(bf16)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_(model, way, calibration=batches)
        out[label] = real_model.perplexity(model, ids)
        del model
    return out
