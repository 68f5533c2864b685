"""Adding a format touches one file: a toy format defined here, with nothing else changed, works
with quantize_, checkpoints (torch.save and safetensors), unwrap, torch.compile and export.
Also: checkpoints written by an earlier version of the package still load."""

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from subclasses import load_checkpoint, quantize_, save_checkpoint
from subclasses.formats.base import QuantizedWeight, check_activation, weight_reason
from unwrap import unwrap

DATA = Path(__file__).parent.parent / "data"


class PerTensorInt8(QuantizedWeight):
    """Toy format: int8 codes [N, K] and one fp32 scale for the whole tensor.

    Inner tensors: qdata int8 [N, K]; scale fp32 []. Metadata: shape, dtype.
    """

    tensor_data_names = ("qdata", "scale")
    tensor_attribute_names = ()

    def __init__(self, qdata: torch.Tensor, scale: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype) -> None:
        super().__init__(shape, dtype)
        self.qdata, self.scale = qdata, scale

    @classmethod
    def from_float(cls, weight: torch.Tensor) -> "PerTensorInt8":
        scale = weight.abs().amax().float().clamp(min=1e-8) / 127
        qdata = torch.round(weight.float() / scale).clamp(-127, 127).to(torch.int8)
        return cls(qdata, scale, tuple(weight.shape), weight.dtype)

    @classmethod
    def portable_inner_shapes(cls, shape, dtype, attributes):
        return {"qdata": (tuple(shape), torch.int8), "scale": ((), torch.float32)}

    def dequantize(self) -> torch.Tensor:
        return (self.qdata.float() * self.scale).to(self.outer_dtype)


def per_tensor_linear(x: torch.Tensor, weight: PerTensorInt8, bias: torch.Tensor | None = None) -> torch.Tensor:
    check_activation(x, weight)
    return F.linear(x, weight.dequantize(), bias)


PerTensorInt8.function_table[F.linear] = per_tensor_linear


@dataclass(frozen=True)
class PerTensorInt8Config:
    def unsupported_reason(self, weight: torch.Tensor) -> str | None:
        return weight_reason(weight)

    def quantize(self, weight: torch.Tensor) -> QuantizedWeight:
        return PerTensorInt8.from_float(weight)


def toy_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16)).to(torch.bfloat16)
    return quantize_(model, PerTensorInt8Config())


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_toy_format_round_trips_checkpoints(tmp_path, suffix):
    model = toy_model()
    assert isinstance(model[0].weight, PerTensorInt8)
    path = tmp_path / f"toy{suffix}"
    save_checkpoint(model.state_dict(), path)
    loaded = load_checkpoint(path)
    for key, value in model.state_dict().items():
        assert type(loaded[key]) is type(value)
        assert torch.equal(
            loaded[key].dequantize() if isinstance(value, QuantizedWeight) else loaded[key],
            value.dequantize() if isinstance(value, QuantizedWeight) else value,
        )


def test_toy_format_checkpoint_is_validated(tmp_path):
    state = toy_model().state_dict()
    from subclasses import flatten_state_dict, unflatten_state_dict

    tensors, metadata = flatten_state_dict(state)
    tensors["0.weight:qdata"] = tensors["0.weight:qdata"][:8]
    with pytest.raises(
        ValueError, match=r"'0.weight': inner tensor 'qdata' must be \(64, 32\) torch.int8, got \(8, 32\)"
    ):
        unflatten_state_dict(tensors, metadata)


@pytest.mark.parametrize("unwrapped", [False, True])
def test_toy_format_eager_compiled_exported(unwrapped):
    model = toy_model()
    x = torch.randn(3, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        expected = F.linear(
            F.relu(F.linear(x, model[0].weight.dequantize(), model[0].bias)),
            model[2].weight.dequantize(),
            model[2].bias,
        )
        if unwrapped:
            unwrap(model)
            assert "weight__qdata" in dict(model[0].named_parameters())
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(x), expected)
        torch.testing.assert_close(compiled(torch.cat([x, x])), torch.cat([expected, expected]))
        exported = torch.export.export(model, (x,))
        torch.testing.assert_close(exported.module()(x), expected)


def checkpoint_model() -> nn.Module:
    """The model tests/data/v1_three_formats.* were saved from (by unwrap 0.x, before the format
    classes got typed constructors and their own checkpoint hooks): one weight per format."""
    from subclasses import (
        Int4WeightOnlyConfig,
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
    )

    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 48), nn.Linear(48, 16)).to(torch.bfloat16)
    quantize_(model, Int4WeightOnlyConfig(group_size=32), filter_fn=lambda m, n: n == "0")
    quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda m, n: n == "1")
    return quantize_(model, Int8DynamicActivationInt8WeightConfig(), filter_fn=lambda m, n: n == "2")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_checkpoints_of_the_previous_version_load(suffix, aten_int4_kernels):
    """Bit for bit: the stored output was computed with aten's int4 kernel (M = 3), as the fixture runs."""
    io = torch.load(DATA / "v1_three_formats_io.pt", weights_only=True)
    model = checkpoint_model()
    model.load_state_dict(load_checkpoint(DATA / f"v1_three_formats{suffix}"))
    with torch.no_grad():
        torch.testing.assert_close(model(io["x"]), io["y"], rtol=0, atol=0)
