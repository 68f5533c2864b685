import pytest
import torch
import torch.nn.functional as F
from torch import nn

from subclasses import Int4WeightOnlyConfig, Int4WeightTensor, Int8WeightOnlyConfig, Int8WeightTensor, quantize_
from tests.conftest import sqnr

CONFIGS = {"int4": (Int4WeightOnlyConfig(), Int4WeightTensor), "int8": (Int8WeightOnlyConfig(), Int8WeightTensor)}


def two_layer(dtype=torch.bfloat16):
    return nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 1024)).to(dtype)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_quantize_replaces_linear_weights(name):
    config, cls = CONFIGS[name]
    model = two_layer()
    quantize_(model, config)
    for layer in (model[0], model[2]):
        assert type(layer.weight) is nn.Parameter or isinstance(layer.weight, cls)
        assert isinstance(layer.weight, cls) and isinstance(layer.weight, nn.Parameter)
        assert not layer.weight.requires_grad


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_compiled_quantized_model_matches_eager(name):
    model = quantize_(two_layer(), CONFIGS[name][0])
    x = torch.randn(4, 512, dtype=torch.bfloat16)
    with torch.inference_mode():
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager, rtol=2e-2, atol=2e-2)
    assert sqnr(eager, compiled) > 35


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_subclass_built_inside_fullgraph_region(name):
    config, cls = CONFIGS[name]
    weight = config.quantize(torch.randn(256, 256, dtype=torch.bfloat16))
    inner, attrs = weight.inner_tensors(), weight.attributes()

    def build_and_run(x, *tensors):
        return F.linear(x, cls(*tensors, *attrs))

    x = torch.randn(2, 256, dtype=torch.bfloat16)
    eager = build_and_run(x, *inner)
    compiled = torch.compile(build_and_run, fullgraph=True, backend="inductor")(x, *inner)
    assert sqnr(eager, compiled) > 35


def test_unsupported_layers_stay_high_precision_with_warning():
    model = nn.Sequential(nn.Linear(100, 64), nn.Linear(64, 20)).bfloat16()
    with pytest.warns(UserWarning, match=r"0\.weight .*divisible by group_size.*1\.weight .*multiple of 16"):
        quantize_(model, Int4WeightOnlyConfig(group_size=32))
    assert type(model[0].weight) is nn.Parameter and type(model[1].weight) is nn.Parameter
    with pytest.raises(ValueError, match=r"0\.weight"):
        quantize_(nn.Sequential(nn.Linear(100, 64)), Int4WeightOnlyConfig(group_size=32), strict=True)


def test_bad_group_size_is_value_error():
    with pytest.raises(ValueError, match="group_size must be one of"):
        Int4WeightOnlyConfig(group_size=100)


class TiedLM(nn.Module):
    def __init__(self, vocab=256, dim=128):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head2 = nn.Linear(dim, vocab, bias=False)
        self.head2.weight = self.head.weight  # shared by two linears

    def forward(self, ids):
        h = self.proj(self.embed(ids))
        return self.head(h) + self.head2(h)


def test_weight_shared_by_linears_is_quantized_once():
    model = TiedLM().bfloat16()
    quantize_(model, Int8WeightOnlyConfig())
    assert model.head.weight is model.head2.weight
    assert isinstance(model.head.weight, Int8WeightTensor)
    assert len(list(model.parameters())) == len({id(p) for p in model.parameters()})


def test_weight_shared_with_rejected_module_stays_shared_in_high_precision():
    model = TiedLM().bfloat16()
    model.embed.weight = model.head.weight
    linears_only = lambda module, fqn: isinstance(module, nn.Linear)  # noqa: E731
    with pytest.warns(UserWarning, match="shared with a module the filter rejects"):
        quantize_(model, Int8WeightOnlyConfig(), linears_only)
    assert model.embed.weight is model.head.weight is model.head2.weight
    assert type(model.head.weight) is nn.Parameter
    assert isinstance(model.proj.weight, Int8WeightTensor)


def test_quantizing_twice_leaves_weights_alone():
    model = quantize_(two_layer(), Int8WeightOnlyConfig())
    before = model[0].weight
    quantize_(model, Int4WeightOnlyConfig())
    assert model[0].weight is before


def test_module_dtype_and_device_moves():
    model = quantize_(two_layer(), Int4WeightOnlyConfig())
    model.half()
    assert model[0].weight.dtype == torch.float16 and isinstance(model[0].weight, Int4WeightTensor)
    x = torch.randn(2, 512, dtype=torch.float16)
    with torch.no_grad():
        out = model(x)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
