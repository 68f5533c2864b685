"""Loading a torchao checkpoint into our formats (subclasses.load_torchao_state_dict)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from subclasses import Int4WeightOnlyConfig, Int8WeightOnlyConfig, from_torchao, load_torchao_state_dict, quantize_
from tests.optional import import_or_fail_in_ci

import_or_fail_in_ci("torchao", "torchao")
safetensors_torch = import_or_fail_in_ci("safetensors.torch", "hf")
from safetensors import safe_open  # noqa: E402
from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig  # noqa: E402
from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict  # noqa: E402
from torchao.quantization import Int8DynamicActivationInt8WeightConfig as TorchaoInt8Dynamic  # noqa: E402
from torchao.quantization import Int8WeightOnlyConfig as TorchaoInt8WeightOnly  # noqa: E402
from torchao.quantization import quantize_ as torchao_quantize_  # noqa: E402

from tests.subclasses.test_torchao_interop import tile_packed_like_torchao  # noqa: E402


def bf16_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 64, bias=False)).to(torch.bfloat16)


def run(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return m(x)


@pytest.mark.parametrize("unwrapped", [False, True])
def test_torch_save_of_a_torchao_int4_model_loads_into_ours(tmp_path, unwrapped, aten_int4_kernels):
    from unwrap import unwrap

    theirs = bf16_model()
    torchao_quantize_(theirs, PrototypeInt4WeightOnlyConfig(group_size=64))
    torch.save(theirs.state_dict(), tmp_path / "torchao.pt")
    state = load_torchao_state_dict(torch.load(tmp_path / "torchao.pt", weights_only=True))
    torch.manual_seed(1)  # other weights until loaded
    ours = quantize_(
        nn.Sequential(nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 64, bias=False)).to(torch.bfloat16),
        Int4WeightOnlyConfig(group_size=64),
    )
    assert not torch.equal(
        run(ours, torch.ones(1, 256, dtype=torch.bfloat16)), run(theirs, torch.ones(1, 256, dtype=torch.bfloat16))
    )
    if unwrapped:
        ours = unwrap(ours)
    ours.load_state_dict(state)
    x = torch.randn(2, 256, dtype=torch.bfloat16)
    assert torch.equal(run(ours, x), run(theirs, x))


def save_torchao_safetensors(state_dict: dict, path) -> tuple[dict, dict]:
    tensors, metadata = flatten_tensor_state_dict(state_dict)
    safetensors_torch.save_file(tensors, str(path), metadata=metadata)
    with safe_open(str(path), "pt") as f:
        return safetensors_torch.load_file(str(path)), f.metadata()


def test_safetensors_int8_checkpoint_loads_into_ours(tmp_path):
    theirs = bf16_model()
    torchao_quantize_(theirs, TorchaoInt8WeightOnly())
    tensors, metadata = save_torchao_safetensors(theirs.state_dict(), tmp_path / "m.safetensors")
    state = load_torchao_state_dict(tensors, metadata)
    assert set(state) == set(theirs.state_dict())
    ours = quantize_(bf16_model(), Int8WeightOnlyConfig())
    ours.load_state_dict(state)
    converted = copy.deepcopy(theirs)
    from_torchao(converted, strict=True)
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    assert torch.equal(run(ours, x), run(converted, x))
    assert torch.equal(ours[0].weight.qdata, theirs[0].weight.qdata)


def test_safetensors_tile_packed_checkpoint_loads_into_ours_on_cpu(tmp_path):
    bf16 = bf16_model()
    state = {
        "0.weight": tile_packed_like_torchao(bf16[0].weight.detach(), 128),
        "0.bias": bf16[0].bias.detach(),
        "2.weight": tile_packed_like_torchao(bf16[2].weight.detach(), 128),
    }
    tensors, metadata = save_torchao_safetensors(state, tmp_path / "m.safetensors")
    ours = quantize_(bf16_model(), Int4WeightOnlyConfig(group_size=128, qparams_algorithm="tinygemm"))
    expected = copy.deepcopy(ours)  # our quantization of the same weights: the same tinygemm math
    ours.load_state_dict(load_torchao_state_dict(tensors, metadata))
    for i in (0, 2):
        assert torch.equal(ours[i].weight.codes(), expected[i].weight.codes())
        assert torch.equal(ours[i].weight.scale_and_zero, expected[i].weight.scale_and_zero)


def test_bad_entries_name_the_key(tmp_path):
    theirs = bf16_model()
    torchao_quantize_(theirs, TorchaoInt8WeightOnly())
    tensors, metadata = save_torchao_safetensors(theirs.state_dict(), tmp_path / "m.safetensors")
    missing = {k: v for k, v in tensors.items() if k != "2._weight_scale"}
    with pytest.raises(ValueError, match=r"'2\.weight' \(Int8Tensor\) lacks \['scale'\]"):
        load_torchao_state_dict(missing, metadata)
    entry = json.loads(metadata["0.weight"])
    entry["_type"] = "Float8Tensor"
    with pytest.raises(ValueError, match=r"'0\.weight' has type 'Float8Tensor'"):
        load_torchao_state_dict(tensors, {**metadata, "0.weight": json.dumps(entry)})
    with pytest.raises(ValueError, match="tensor_names"):
        load_torchao_state_dict(tensors, {"format": "pt"})
    no_bias = {k: v for k, v in tensors.items() if k != "0.bias"}
    with pytest.raises(ValueError, match=r"'0\.bias': its tensor is missing"):
        load_torchao_state_dict(no_bias, metadata)
    dynamic = bf16_model()
    torchao_quantize_(dynamic, TorchaoInt8Dynamic())
    with pytest.raises(ValueError, match=r"'0\.weight' \(Int8Tensor\): its activations are quantized at run time"):
        load_torchao_state_dict(dynamic.state_dict())
