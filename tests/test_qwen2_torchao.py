"""transformers' Qwen2 (tiny) quantized with torchao, converted with subclasses.from_torchao or only
unwrapped: the same greedy tokens, eager and unwrapped + compiled."""

import copy

import pytest
import torch

from tests.optional import import_or_fail_in_ci

import_or_fail_in_ci("transformers", "hf")
import_or_fail_in_ci("torchao", "torchao")
from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig  # noqa: E402
from torchao.quantization import quantize_ as torchao_quantize_  # noqa: E402

from perf.qwen import Decoder, build_qwen2  # noqa: E402
from subclasses import Int4WeightTensor, from_torchao  # noqa: E402
from tests.conftest import QWEN2_ONE_LAYER  # noqa: E402
from unwrap import unwrap  # noqa: E402


@pytest.fixture(scope="module")
def torchao_qwen2():
    model = build_qwen2(QWEN2_ONE_LAYER)
    torchao_quantize_(model, PrototypeInt4WeightOnlyConfig(group_size=128))
    return model


def test_converted_qwen2_generates_the_same_tokens(torchao_qwen2):
    expected = Decoder(torchao_qwen2, max_len=32).generate(12)
    converted = copy.deepcopy(torchao_qwen2)
    summary = from_torchao(converted, strict=True)
    linears = 7 + 1  # q, k, v, o, gate, up, down of the one layer, and lm_head
    assert len(summary.converted) == linears and not summary.left
    assert type(converted.model.layers[0].self_attn.q_proj.weight) is Int4WeightTensor
    assert Decoder(converted, max_len=32).generate(12) == expected
    unwrap(converted)
    compiled = torch.compile(converted, fullgraph=True)
    assert Decoder(converted, compiled, max_len=32).generate(12) == expected


def test_unwrapped_qwen2_generates_the_same_tokens(torchao_qwen2):
    # not converted: the lean linear declared for Int4OpaqueTensor (3-D inputs, q/k/v biases)
    expected = Decoder(torchao_qwen2, max_len=32).generate(12)
    unwrapped = unwrap(copy.deepcopy(torchao_qwen2))
    assert type(unwrapped.model.layers[0].self_attn.q_proj).forward is not torch.nn.Linear.forward
    assert Decoder(unwrapped, max_len=32).generate(12) == expected
