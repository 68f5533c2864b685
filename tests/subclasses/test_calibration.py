"""quantize_(..., calibration=batches): GPTQ for int4 and int8 — closer outputs on data like the
calibration's, ordinary quantized weights (checkpoints, unwrap), clear errors for bad batches."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from subclasses import (
    Int4WeightOnlyConfig,
    Int4WeightTensor,
    Int8DynamicActivationInt8WeightConfig,
    Int8WeightOnlyConfig,
    Int8WeightTensor,
    load_checkpoint,
    quantize_,
    save_checkpoint,
)
from tests.conftest import sqnr
from unwrap import rewrap, unwrap


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 128), nn.GELU(), nn.Linear(128, 64)).to(torch.bfloat16)


def _inputs(batches: int, seed: int) -> list[torch.Tensor]:
    """Inputs whose channels differ in scale and are correlated (near rank 32), as real activations are."""
    generator = torch.Generator().manual_seed(0)
    scales = torch.exp(torch.randn(256, generator=generator))
    basis = torch.randn(32, 256, generator=generator) / 32**0.5
    data = torch.Generator().manual_seed(seed)
    return [
        ((torch.randn(32, 32, generator=data) @ basis + 0.1 * torch.randn(32, 256, generator=data)) * scales).to(
            torch.bfloat16
        )
        for _ in range(batches)
    ]


@pytest.mark.parametrize(
    "config",
    [
        Int4WeightOnlyConfig(32),
        Int4WeightOnlyConfig(64, qparams_algorithm="tinygemm"),
        Int8WeightOnlyConfig(),
        Int8DynamicActivationInt8WeightConfig(),
    ],
    ids=repr,
)
def test_gptq_is_closer_on_held_out_data(config):
    calibration, held_out = _inputs(4, seed=1), torch.cat(_inputs(2, seed=2))
    expected = _model()(held_out)
    plain = quantize_(_model(), config)
    calibrated = quantize_(_model(), config, calibration=calibration)
    assert type(calibrated[0].weight) is type(plain[0].weight)
    assert "GPTQ calibration (2 layers)" in calibrated.quantize_summary.config
    # the first layer's output with each weight as the kernel sees it (w8a8's own activation rounding aside)
    first = [F.linear(held_out, m[0].weight.dequantize(), m[0].bias) for m in (plain, calibrated)]
    reference = _model()[0](held_out)
    assert sqnr(reference, first[1]) > sqnr(reference, first[0]) + 1.0  # measured: +4-7 dB
    if not isinstance(config, Int8DynamicActivationInt8WeightConfig):  # its activation error dominates
        gain = sqnr(expected, calibrated(held_out)) - sqnr(expected, plain(held_out))
        assert gain > 1.0, gain  # measured: int4 +6-7 dB, int8 +4 dB


def test_calibrated_weights_round_trip_through_checkpoints_and_unwrap(tmp_path):
    model = quantize_(_model(), Int4WeightOnlyConfig(32), calibration=_inputs(2, seed=1))
    x = _inputs(1, seed=3)[0]
    expected = model(x)
    path = str(tmp_path / "model.safetensors")
    save_checkpoint(model.state_dict(), path)
    fresh = quantize_(_model(), Int4WeightOnlyConfig(32))  # uncalibrated: every tensor comes from the file
    fresh.load_state_dict(load_checkpoint(path))
    assert isinstance(fresh[0].weight, Int4WeightTensor)
    assert torch.equal(fresh[0].weight.codes(), model[0].weight.codes())
    assert torch.equal(fresh(x), expected)
    unwrap(fresh)
    assert not any(isinstance(p, Int4WeightTensor) for p in fresh.parameters())
    assert torch.equal(fresh(x), expected)  # plain tensors, the same kernel
    rewrap(fresh)
    assert isinstance(fresh[0].weight, Int4WeightTensor)


def test_only_linears_see_calibration_and_others_quantize_as_usual():
    model = nn.Sequential(nn.Embedding(64, 256), nn.Linear(256, 128)).to(torch.bfloat16)
    ids = [torch.randint(0, 64, (2, 16)) for _ in range(2)]
    quantize_(model, Int8WeightOnlyConfig(), calibration=ids)
    assert isinstance(model[0].weight, Int8WeightTensor) and isinstance(model[1].weight, Int8WeightTensor)
    assert "(1 layers)" in model.quantize_summary.config


def test_bad_calibration_is_refused_with_the_value_named():
    config = Int4WeightOnlyConfig(32)
    with pytest.raises(TypeError, match="calibration must be a list .* got Tensor"):
        quantize_(_model(), config, calibration=torch.randn(4, 256))
    with pytest.raises(ValueError, match="calibration is empty"):
        quantize_(_model(), config, calibration=[])
    with pytest.raises(
        ValueError, match=r"calibration batch 1 \(shape \(4, 100\), dtype torch.bfloat16\) cannot run the model"
    ):
        quantize_(
            _model(),
            config,
            calibration=[torch.randn(4, 256, dtype=torch.bfloat16), torch.randn(4, 100, dtype=torch.bfloat16)],
        )
    with pytest.raises(ValueError, match="calibration batch 0 .*dtype torch.float32"):
        quantize_(_model(), config, calibration=[torch.randn(4, 256)])
    with pytest.raises(TypeError, match="calibration batch 0 must be a tensor, a tuple/list or a dict .* got str"):
        quantize_(_model(), config, calibration=["hello"])
    model = _model()
    with pytest.raises(ValueError):
        quantize_(model, config, calibration=[])
    assert not isinstance(model[0].weight, Int4WeightTensor)  # nothing quantized on a refusal
