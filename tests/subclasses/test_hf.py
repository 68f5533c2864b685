"""save_pretrained / from_pretrained of quantized transformers models (subclasses.hf), on a tiny Qwen2."""

import importlib
import json
import os
import warnings

import pytest
import torch


def require(name):
    """The optional package ``name``: CI installs every extra, so there a missing one fails the test."""
    if os.environ.get("CI") == "true":
        return importlib.import_module(name)
    return pytest.importorskip(name, reason="the 'hf' extra (make test installs it)")


transformers = require("transformers")
safetensors = require("safetensors")

from perf.qwen import QWEN2_SHAPES, build_qwen2  # noqa: E402
from subclasses import (  # noqa: E402
    Int4WeightOnlyConfig,
    Int4WeightTensor,
    Int8DynamicActivationInt8WeightConfig,
    Int8DynamicActivationInt8WeightTensor,
    Int8WeightOnlyConfig,
    Int8WeightTensor,
    QuantizedWeight,
    quantize_,
)
from subclasses.hf import UnwrapConfig  # noqa: E402
from unwrap import unwrap  # noqa: E402

FORMATS = {
    "int4": (Int4WeightOnlyConfig(group_size=32), UnwrapConfig("int4", group_size=32), Int4WeightTensor),
    "int8": (Int8WeightOnlyConfig(), UnwrapConfig("int8"), Int8WeightTensor),
    "int8_dynamic": (
        Int8DynamicActivationInt8WeightConfig(),
        UnwrapConfig("int8_dynamic"),
        Int8DynamicActivationInt8WeightTensor,
    ),
}
IDS = torch.randint(0, QWEN2_SHAPES["Qwen2 tiny"]["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory):
    """A bf16 Qwen2 checkpoint (tied embeddings) as save_pretrained writes it."""
    path = tmp_path_factory.mktemp("qwen2_bf16")
    build_qwen2(QWEN2_SHAPES["Qwen2 tiny"]).save_pretrained(path)
    return path


def load(path, **kwargs):
    return transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs)


def quantized_after_load(bf16_dir, fmt):
    model = load(bf16_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # every layer quantized, the tied vocabulary matrix once
        quantize_(model, FORMATS[fmt][0])
    assert isinstance(model.lm_head.weight, QuantizedWeight) and model.lm_head.weight is model.model.embed_tokens.weight
    return model


@pytest.fixture(scope="module")
def reference(bf16_dir):
    """Per format, the checkpoint quantized after loading: built once, only read by the tests."""
    return {fmt: quantized_after_load(bf16_dir, fmt) for fmt in FORMATS}


def logits(model):
    with torch.inference_mode():
        return model(IDS).logits


def assert_same_weights(a, b):
    sd_a, sd_b = a.state_dict(), b.state_dict()
    assert list(sd_a) == list(sd_b)
    for key, x in sd_a.items():
        y = sd_b[key]
        assert type(x) is type(y), key
        if isinstance(x, QuantizedWeight):
            assert x.__tensor_flatten__()[1] == y.__tensor_flatten__()[1], key
            x, y = x.dequantize(), y.dequantize()
        assert x.dtype == y.dtype and torch.equal(x, y), key


@pytest.mark.parametrize("unwrapped", [False, True], ids=["wrapped", "unwrapped"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_save_pretrained_then_from_pretrained_gives_identical_logits(bf16_dir, reference, fmt, unwrapped, tmp_path):
    source = quantized_after_load(bf16_dir, fmt)
    expected = logits(source)
    if unwrapped:
        unwrap(source)
    source.save_pretrained(tmp_path, max_shard_size="1MB" if unwrapped else "50GB")  # sharded, or not

    config = json.loads((tmp_path / "config.json").read_text())
    want = {"quant_method": "unwrap", "weight": fmt, "modules_to_not_convert": None}
    assert {k: config["quantization_config"][k] for k in want} == want
    keys = set()
    for path in tmp_path.glob("*.safetensors"):
        with safetensors.safe_open(path, "pt") as f:
            keys |= set(f.keys())
    assert (len(list(tmp_path.glob("*.safetensors"))) > 1) == unwrapped
    inner = ("packed", "scale_and_zero") if fmt == "int4" else ("qdata", "scale")
    assert {f"model.layers.0.mlp.down_proj.weight:{name}" for name in inner} <= keys  # our portable form
    assert "lm_head.weight" not in keys  # tied: stored once, as transformers does

    loaded = load(tmp_path)
    weight = loaded.model.layers[3].self_attn.q_proj.weight
    assert type(weight) is FORMATS[fmt][2] and not weight.requires_grad
    if fmt == "int4":
        assert weight.packing == "cpu"  # packed for the local kernel
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(logits(loaded), expected)
    assert_same_weights(loaded, reference[fmt])


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantize_on_load_equals_quantize_after_load(bf16_dir, reference, fmt, tmp_path):
    on_load = load(bf16_dir, quantization_config=FORMATS[fmt][1])
    after_load = reference[fmt]
    assert_same_weights(on_load, after_load)
    assert on_load.lm_head.weight is on_load.model.embed_tokens.weight
    assert torch.equal(logits(on_load), logits(after_load))

    on_load.save_pretrained(tmp_path)  # and it saves and loads like the other
    assert torch.equal(logits(load(tmp_path)), logits(after_load))
    # loaded in another dtype, the quantized weights follow the rest of the model
    as_fp32 = load(tmp_path, dtype=torch.float32)
    assert as_fp32.model.layers[0].mlp.up_proj.weight.dtype == torch.float32
    assert as_fp32(IDS).logits.dtype == torch.float32


def test_quantize_on_load_keeps_what_the_config_cannot_take_and_says_so(tmp_path):
    # hidden 80: the attention projections (K = 80) split into no group size (not even the fallback
    # 32); down_proj (K = 128) does
    shapes = dict(hidden_size=80, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256)  # fmt: skip
    build_qwen2(shapes).save_pretrained(tmp_path)
    with pytest.warns(
        UserWarning,
        match=r"model.layers.0.self_attn.q_proj.weight \(in_features=80 must be divisible by group_size=64\)",
    ):
        model = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path, quantization_config=UnwrapConfig("int4", group_size=64)
        )
    layer = model.model.layers[0]
    assert (
        type(layer.self_attn.q_proj.weight) is torch.nn.Parameter
        and layer.self_attn.q_proj.weight.dtype == torch.bfloat16
    )
    assert type(layer.mlp.down_proj.weight) is Int4WeightTensor
    with pytest.warns(UserWarning):
        after = quantize_(load(tmp_path), Int4WeightOnlyConfig(group_size=64))
    assert_same_weights(model, after)


def test_unwrap_config_rejects_unknown_format_and_group_size():
    with pytest.raises(ValueError, match=r"weight must be one of \['int4', 'int8', 'int8_dynamic'\], got 'int3'"):
        UnwrapConfig("int3")
    with pytest.raises(ValueError, match="group_size must be one of"):
        UnwrapConfig("int4", group_size=48)


def test_checkpoint_without_our_metadata_is_a_clear_error(bf16_dir, tmp_path):
    model = quantized_after_load(bf16_dir, "int8")
    model.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    tensors = safetensors.torch.load_file(path)
    safetensors.torch.save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model.safetensors: safetensors metadata 'unwrap_quantized' is missing"):
        load(tmp_path)


def test_inner_tensors_off_alignment_are_copied_before_the_kernel_sees_them():
    # transformers memory-maps safetensors, so inner tensors can start anywhere; torch 2.13's CPU
    # int8 kernel segfaults on qdata 8 bytes off 64 (M > 1). Loading copies them to aligned memory.
    from subclasses import flatten_state_dict, unflatten_state_dict

    weight = Int8WeightTensor.from_float(torch.randn(256, 256, dtype=torch.bfloat16))
    tensors, metadata = flatten_state_dict({"w": weight})
    buffer = torch.empty(256 * 256 + 64, dtype=torch.int8)
    offset = 8 - buffer.data_ptr() % 64 if buffer.data_ptr() % 64 <= 8 else 72 - buffer.data_ptr() % 64
    misaligned = buffer[offset : offset + 256 * 256].view(256, 256)
    misaligned.copy_(tensors["w:qdata"])
    assert misaligned.data_ptr() % 64 == 8
    loaded = unflatten_state_dict({**tensors, "w:qdata": misaligned}, metadata)["w"]
    assert loaded.qdata.data_ptr() % 64 == 0
    x = torch.randn(24, 256, dtype=torch.bfloat16)
    assert torch.equal(torch.nn.functional.linear(x, loaded), torch.nn.functional.linear(x, weight))
