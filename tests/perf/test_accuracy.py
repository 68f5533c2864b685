"""Smoke test of ``python -m perf.accuracy``'s machinery on a tiny random Llama (the real run takes minutes)."""

import importlib
import os

import pytest
import torch

from perf import accuracy
from perf.real_model import perplexity, perplexity_windows


def require(module: str):
    if os.environ.get("CI") == "true":  # CI installs the extras: a missing one is a failure there
        return importlib.import_module(module)
    return pytest.importorskip(module)


def tiny_llama():
    transformers = require("transformers")
    config = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to(torch.bfloat16).eval()


def test_accuracy_table_on_a_tiny_model():
    model = tiny_llama()
    ids = torch.randint(0, 256, (1, 40))
    rows = accuracy.measure(
        model,
        ids,
        accuracy.variants([32, 128], ["tinygemm", "mse"]),
        lambda m, i: perplexity(m, i, window=16),
        layer_tokens=16,
    )
    by_label = {row.label: row for row in rows}
    assert by_label["int4 g32 mse"].quantized == 15 == by_label["int8 weight-only"].quantized  # the tied lm_head too
    assert by_label["int4 g128 mse"].quantized == 15  # groups of 128 where they fit, of 32 elsewhere
    for row in rows:
        assert row.perplexity > 1 and torch.isfinite(torch.tensor(row.perplexity))
        # a KL divergence is >= 0 (the rounding of fp32 log-softmax sums may leave -1e-6), 0 for the model itself
        assert row.kld > -1e-6 and (row.config is not None or row.kld < 1e-6)
    assert by_label["int4 g32 mse"].kld > by_label["int8 weight-only"].kld  # 4 bits are farther than 8
    mse, minmax = by_label["int4 g32 mse"].layers, by_label["int4 g32 tinygemm"].layers
    assert all(mse[name][0] <= minmax[name][0] for name in mse)  # never a worse weight
    table = accuracy.format_table(rows)
    assert (
        table.count("\n") == len(rows) + 1 and "| int4 g32 mse |" in table and "% of 2 (median x" in table
    )  # the 2 down_proj at g128 (the rest falls back to 32)
    labelled = accuracy.format_table(rows, on_grid=32)
    assert "| int4 g32 mse (weights already on a 4-bit grid) |" in labelled and "| int4 g128 mse |" in labelled


def test_matrix_table_on_heavy_tailed_weights():
    w, x = accuracy.heavy_tailed_matrix(64, 256, seed=0, tokens=16)
    assert w.dtype == torch.bfloat16 and x.shape == (16, 256)
    assert torch.equal(w, accuracy.heavy_tailed_matrix(64, 256, seed=0, tokens=16)[0])  # seeded
    # outlier input channels: the largest column norms stand far above the median's
    norms = w.float().norm(dim=0).sort().values
    assert norms[-4] > 4 * norms[128]
    table = accuracy.matrix_table({"m": (w, x)}, [32, 128], ["tinygemm", "clip"]).splitlines()
    assert table[0] == "| matrix | group | tinygemm SQNR dB | clip SQNR dB | best |" and len(table) == 4
    for line in table[2:]:
        cells = line.split(" | ")
        # "clip" never has a worse group than min-max; its output is clearly closer (measured +0.7, +1.1 dB)
        assert float(cells[3]) > float(cells[2])


def test_gptq_rows_use_the_calibration():
    model = tiny_llama()
    calibration = [torch.randint(0, 256, (1, 16)) for _ in range(2)]
    rows = accuracy.measure(
        model,
        torch.randint(0, 256, (1, 24)),
        accuracy.variants([32], ["tinygemm", "gptq"]),
        lambda m, i: perplexity(m, i, window=12),
        layer_tokens=12,
        calibration=calibration,
    )
    by_label = {row.label: row for row in rows}
    assert by_label["int4 g32 mse + GPTQ"].quantized == 15 == by_label["int8 weight-only + GPTQ"].quantized
    gptq, minmax = by_label["int4 g32 mse + GPTQ"].layers, by_label["int4 g32 tinygemm"].layers
    assert gptq.keys() == minmax.keys() and any(gptq[n][0] != minmax[n][0] for n in gptq)
    assert "| int4 g32 mse + GPTQ |" in accuracy.format_table(rows)


def test_hqq_row_needs_and_uses_torchao():
    require("torchao")
    model = tiny_llama()
    rows = accuracy.measure(
        model,
        torch.randint(0, 256, (1, 24)),
        accuracy.variants([32, 128], ["tinygemm", "mse", "hqq"]),
        lambda m, i: perplexity(m, i, window=12),
        layer_tokens=12,
    )
    by_label = {row.label: row for row in rows}
    hqq = by_label["int4 g32 hqq"]
    assert hqq.quantized == 15 == by_label["int4 g128 hqq"].quantized  # like ours: group 32 where 128 does not fit
    assert all(err < 0.1 and out > 10 and g == 32 for err, out, g in hqq.layers.values())
    table = accuracy.format_table(rows).splitlines()
    assert table[0].endswith("| lower weight error than HQQ | higher output SQNR than HQQ |")
    mse_row = next(line for line in table if line.startswith("| int4 g32 mse |"))
    assert mse_row.count("|") == table[0].count("|") and "% of 15 (median x" in mse_row.split("|")[-3]


def test_bad_arguments_are_rejected():
    with pytest.raises(SystemExit):
        accuracy.parse_args(["--algorithms", "minmax"])


def test_report_quality_line_has_the_other_algorithms(monkeypatch):
    from perf import real_model
    from perf.report import quality

    monkeypatch.setattr(real_model, "calibration_batches", lambda tokenizer: [torch.randint(0, 256, (1, 16))])
    model, ids = tiny_llama(), torch.randint(0, 256, (1, 24))
    int4 = quality.other_algorithms(model, "int4", None, ids)
    assert list(int4) == ["int4 tinygemm", "int4 + GPTQ"] and all(v > 1 for v in int4.values())  # "mse" is the default
    assert list(quality.other_algorithms(model, "int8", None, ids)) == ["int8 + GPTQ"]
    from subclasses.formats.base import QuantizedWeight

    assert not any(isinstance(p, QuantizedWeight) for p in model.parameters())  # the bf16 model untouched


@pytest.mark.parametrize("length, sizes", [(1030, [512, 512, 6]), (1025, [512, 512]), (2, [2])])
def test_perplexity_windows_predict_each_token_once(length, sizes):
    """Every token but each window's first (its context) is predicted once; a last window of one token
    (nothing to predict) is not made."""
    ids = torch.arange(length).unsqueeze(0)
    windows = perplexity_windows(ids, 512)
    assert [w.shape[1] for w in windows] == sizes
    assert torch.cat([w[0] for w in windows]).tolist() == list(range(sum(sizes)))
    targets = torch.cat([w[0, 1:] for w in windows]).tolist()
    assert targets == [t for t in range(sum(sizes)) if t % 512 != 0]
