"""Before/after of quantizing every layer and the tied vocabulary matrix (the real-models change):
eager greedy decode ms/token, int4, of SmolLM2-135M (real weights) and the Qwen2 0.5B shapes.

``python -m perf.vocab_saving [--threads 2]``. "before": the old default (group 128 where it
fits, so SmolLM2's 576-input layers stay bf16; the embedding and the tied lm_head bf16); then group 128
with the fallback and the vocabulary matrix int4; "after": ``quantize_(model, Int4WeightOnlyConfig())``
(groups of 32 everywhere). Interleaved rounds, minimum.
"""

from __future__ import annotations

import argparse
import copy
import warnings

import torch
from torch import nn

from subclasses import Int4WeightOnlyConfig, quantize_

from .qwen import QWEN2_SHAPES, Decoder, build_qwen2
from .real_model import load_smollm2, smollm2_dir
from .report import interleaved_min_ms_per_token


def linears_only(module: nn.Module, fqn: str) -> bool:
    return isinstance(module, nn.Linear)


def variants(bf16: nn.Module) -> dict[str, nn.Module]:
    g128 = Int4WeightOnlyConfig(group_size=128)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "before" leaves layers in bf16 on purpose
        before = quantize_(copy.deepcopy(bf16), g128, lambda m, fqn: linears_only(m, fqn) and m.in_features % 128 == 0)
        g128_all = quantize_(copy.deepcopy(bf16), g128)
        after = quantize_(copy.deepcopy(bf16), Int4WeightOnlyConfig())
    return {
        "bf16": bf16,
        "before: g128 where it fits, vocab bf16": before,
        "g128 (+ fallback g32), vocab int4": g128_all,
        "after: default g32, vocab int4": after,
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m perf.vocab_saving")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models = {"Qwen2 0.5B": lambda: build_qwen2(QWEN2_SHAPES["Qwen2 0.5B"])}
    if smollm2_dir() is not None:
        models["SmolLM2 135M"] = lambda: load_smollm2()[0]
    for name, build in models.items():
        decoders = {variant: Decoder(model) for variant, model in variants(build()).items()}
        best = interleaved_min_ms_per_token(decoders, rounds=args.rounds, tokens=8)
        for variant, ms in best.items():
            print(f"{name:14s} {variant:40s} {ms:7.2f} ms/token", flush=True)


if __name__ == "__main__":
    main()
