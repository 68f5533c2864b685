"""A real transformers model end to end: a CI-sized Qwen2, quantized, unwrapped, compiled."""

import pytest
import torch

pytest.importorskip("transformers", reason="the 'hf' extra (make test installs it)")

from perf.qwen import Decoder, build_qwen2, floor_model_nd  # noqa: E402
from subclasses import Int4WeightOnlyConfig, Int4WeightTensor, Int8WeightOnlyConfig, quantize_  # noqa: E402
from unwrap import unwrap  # noqa: E402

TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
)
CONFIGS = {"int4": Int4WeightOnlyConfig(group_size=32), "int8": Int8WeightOnlyConfig()}


def quantized_qwen2(fmt, filter_fn=None):
    model = build_qwen2(TINY)
    quantize_(model, CONFIGS[fmt], filter_fn)
    return model


def test_tied_embedding_is_quantized_once_and_stays_tied():
    model = quantized_qwen2("int4")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert type(model.lm_head.weight) is Int4WeightTensor
    assert type(model.model.layers[0].mlp.up_proj.weight) is Int4WeightTensor
    unwrap(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert not any(name.startswith("lm_head") for name, _ in model.named_parameters())  # listed once


def test_linears_only_filter_keeps_the_tied_embedding_shared_in_bf16_with_a_warning():
    with pytest.warns(UserWarning, match=r"model.embed_tokens.weight, lm_head.weight \(shared"):
        model = quantized_qwen2("int4", lambda module, fqn: isinstance(module, torch.nn.Linear))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert type(model.lm_head.weight) is torch.nn.Parameter and model.lm_head.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("fmt", sorted(CONFIGS))
def test_unwrapped_compiled_generation_matches_eager(fmt):
    model = quantized_qwen2(fmt)
    eager = Decoder(model, max_len=32).generate(12)
    unwrap(model)
    assert Decoder(model, max_len=32).generate(12) == eager
    compiled = torch.compile(model, fullgraph=True)
    assert Decoder(model, compiled, max_len=32).generate(12) == eager


def test_floor_module_swap_generates_the_same_tokens():
    model = quantized_qwen2("int4")
    floor = floor_model_nd(model)
    assert "FloorLinearND" in type(floor.model.layers[0].self_attn.q_proj).__name__
    assert floor.model.layers[0].self_attn.q_proj.bias is not None  # Qwen2's q/k/v have biases
    assert Decoder(floor, max_len=32).generate(12) == Decoder(model, max_len=32).generate(12)


def test_decoder_rolls_over_when_the_cache_is_full():
    model = build_qwen2(TINY)
    decoder = Decoder(model, max_len=12, prompt_len=8)
    first = decoder.generate(4)
    assert [decoder.next() for _ in range(4)] == first  # full at 12: re-prefilled, same greedy tokens
