"""Real-model shapes: int4 group-size fallback, quantized embeddings and the tied vocabulary
matrix, the quantize_ summary."""

from __future__ import annotations

import copy
import io
import logging
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from subclasses import (
    Int4WeightOnlyConfig,
    Int4WeightTensor,
    Int8DynamicActivationInt8WeightConfig,
    Int8WeightOnlyConfig,
    quantize_,
)
from subclasses.quantize.api import model_bytes
from tests.conftest import sqnr
from unwrap import unwrap

BF16 = torch.bfloat16
CONFIGS = {
    "int4": Int4WeightOnlyConfig(group_size=64),
    "int8": Int8WeightOnlyConfig(),
    "w8a8": Int8DynamicActivationInt8WeightConfig(),
}


@pytest.mark.parametrize(
    "configured, in_features, chosen",
    [
        (128, 1536, 128),  # divides: as configured
        (128, 576, 32),  # SmolLM2's projections: 576 = 18 x 32 (64 divides too: 32 is measured better)
        (128, 96, 32),
        (256, 768, 256),
        (256, 640, 32),
        (64, 576, 64),  # divides: as configured
        (32, 576, 32),
        (128, 48, 128),  # nothing divides: unsupported, named below
        (128, 32, 32),  # the smallest layer
    ],
)
def test_int4_group_size_falls_back_to_32(configured, in_features, chosen):
    config = Int4WeightOnlyConfig(group_size=configured)
    assert config.group_size_for(in_features) == chosen
    weight = torch.randn(32, in_features, dtype=BF16)
    if in_features % chosen:
        assert f"in_features={in_features} must be divisible" in config.unsupported_reason(weight)
    else:
        assert config.unsupported_reason(weight) is None
        assert config.quantize(weight).group_size == chosen


def test_default_group_size_is_32():
    assert Int4WeightOnlyConfig().group_size == 32


def test_strict_keeps_the_configured_group_size():
    model = nn.Sequential(nn.Linear(576, 64), nn.Linear(64, 32)).to(BF16)
    with pytest.raises(ValueError, match=r"0\.weight \(in_features=576 must be divisible by group_size=128\)"):
        quantize_(copy.deepcopy(model), Int4WeightOnlyConfig(group_size=128), strict=True)
    quantize_(model, Int4WeightOnlyConfig(group_size=128))  # not strict: falls back, no warning needed
    assert model[0].weight.group_size == 32 and model[1].weight.group_size == 32


def test_unquantizable_layer_is_named_in_one_warning_and_the_summary():
    model = nn.Sequential(nn.Linear(64, 20), nn.Linear(20, 32), nn.Linear(32, 32)).to(BF16)
    with pytest.warns(UserWarning, match="left these weights in high precision") as caught:
        quantize_(model, Int4WeightOnlyConfig())
    assert len(caught) == 1
    summary = model.quantize_summary
    assert set(summary.skipped) == {"0.weight", "1.weight"}
    assert "out_features=20 must be a multiple of 16" in summary.skipped["0.weight"]
    assert summary.quantized == {"Int4WeightTensor g32": ["2.weight"]}


class TiedLM(nn.Module):
    """embed_tokens and lm_head share one weight, as in SmolLM2 and Qwen2."""

    def __init__(self, vocab: int = 256, hidden: int = 128) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)
        self.lm_head.weight = self.embed_tokens.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(torch.relu(self.proj(self.embed_tokens(ids))))


def tied_model(fmt: str) -> nn.Module:
    torch.manual_seed(0)
    model = TiedLM().to(BF16)
    return quantize_(model, CONFIGS[fmt])


@pytest.mark.parametrize("fmt", list(CONFIGS))
def test_tied_vocabulary_matrix_is_quantized_once_and_serves_both(fmt):
    model = tied_model(fmt)
    weight = model.lm_head.weight
    assert weight is model.embed_tokens.weight and hasattr(weight, "inner_tensors")
    summary = model.quantize_summary
    assert any("embed_tokens.weight, lm_head.weight" in names for names in summary.quantized.values())
    # one storage: the quantized vocabulary matrix is counted (and stored) once
    vocab_bytes = sum(t.untyped_storage().nbytes() for t in weight.inner_tensors())
    proj_bytes = model_bytes(model.proj)
    assert summary.bytes_after == vocab_bytes + proj_bytes
    assert summary.bytes_before == (256 * 128 + 128 * 128 + 128) * 2
    ids = torch.randint(0, 256, (2, 5))
    dense = weight.dequantize()
    with torch.inference_mode():
        torch.testing.assert_close(model.embed_tokens(ids), F.embedding(ids, dense), rtol=0, atol=0)
        hidden = torch.randn(2, 5, 128, dtype=BF16)
        assert sqnr(F.linear(hidden, dense), model.lm_head(hidden)) > 30
    unwrap(model)
    assert sum("embed_tokens" in n for n, _ in model.named_parameters()) == len(weight.inner_tensors())
    assert not any(n.startswith("lm_head.weight") for n, _ in model.named_parameters())  # tied: listed once


@pytest.mark.parametrize("fmt", list(CONFIGS))
@pytest.mark.parametrize("unwrapped", [False, True], ids=["wrapped", "unwrapped"])
def test_embedding_eager_compiled_and_checkpoint(fmt, unwrapped):
    model = tied_model(fmt)
    if unwrapped:
        unwrap(model)
    ids = [torch.randint(0, 256, shape) for shape in [(1, 1), (2, 7)]]
    ids[1][0, 0], ids[1][0, 1] = 0, 255  # the first and last rows
    compiled = torch.compile(model, fullgraph=True)
    with torch.inference_mode():
        expected = [model(i) for i in ids]
        for i, e in zip(ids, expected):
            assert torch.equal(model.embed_tokens(i), F.embedding(i, model.embed_tokens.weight.dequantize()))
            assert sqnr(e, compiled(i)) > 30
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh = tied_model(fmt)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert fresh.lm_head.weight is fresh.embed_tokens.weight
    with torch.inference_mode():
        assert torch.equal(fresh(ids[1]), expected[1])


@pytest.mark.parametrize("fmt", list(CONFIGS))
def test_embedding_after_dtype_and_meta_moves(fmt):
    model = tied_model(fmt)
    ids = torch.randint(0, 256, (2, 3))
    half = copy.deepcopy(model).half()
    assert half.embed_tokens.weight is half.lm_head.weight
    out = half.embed_tokens(ids)
    assert out.dtype == torch.float16
    assert torch.equal(out, F.embedding(ids, half.embed_tokens.weight.dequantize()))
    meta = unwrap(copy.deepcopy(model)).to("meta")
    assert meta.embed_tokens(ids.to("meta")).shape == (2, 3, 128)


def test_embedding_bad_input_is_a_clear_error():
    weight = Int4WeightTensor.from_float(torch.randn(64, 128, dtype=BF16), 64)
    with pytest.raises(TypeError, match="indices must be int32 or int64, got torch.float32"):
        F.embedding(torch.zeros(2), weight)
    with pytest.raises(ValueError, match="max_norm=1.0 renormalizes the weight in place"):
        F.embedding(torch.zeros(2, dtype=torch.long), weight, max_norm=1.0)
    with pytest.raises((IndexError, RuntimeError), match="out of"):
        F.embedding(torch.tensor([64]), weight)


def test_summary_prints_and_logs_once(caplog):
    model = tied_model("int4")
    with caplog.at_level(logging.INFO, logger="subclasses"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # everything quantized: no warning at all
            quantize_(TiedLM().to(BF16), Int4WeightOnlyConfig())
    assert len([r for r in caplog.records if r.name == "subclasses"]) == 1
    text = str(model.quantize_summary)
    assert "3 weight(s) quantized" not in text  # a tied pair is one weight
    assert "2 weight(s) quantized, 0 left in high precision" in text
    assert "Int4WeightTensor g64: 2" in text and "MiB ->" in text
