"""unwrap on torchao 0.18's tensors: their declared linear is called directly, and the compiled
model's guards stay within the floor's + 1 per layer + 8 (also after subclasses.from_torchao)."""

from __future__ import annotations

import re
from collections import Counter

import pytest
import torch
from torch._inductor.utils import run_and_get_code

from perf.modes import fresh_caller
from perf.timing import compile_counting_guards
from tests.optional import import_or_fail_in_ci

import_or_fail_in_ci("torchao", "torchao")
from perf.bench_torchao import cached_variants as torchao_variants  # noqa: E402 - built once per group

GLOBAL_GUARDS = 8  # as tests/perf/test_bench_overhead.py: guards paid once, whatever the layer count
KERNEL_CALL = r"(torch\.ops\.[\w.]+|extern_kernels\.\w+|cpp_fused_\w+|aten\.\w+)\("  # calls in Inductor's code


def run(model, x):
    with torch.inference_mode():
        return model(x)


@pytest.mark.parametrize("fmt", ["int4", "int8"])
def test_unwrapped_torchao_calls_its_linear_without_torch_function(fmt, monkeypatch):
    models, x = torchao_variants("W1 8x256", fmt)
    torchao, unwrapped = models["torchao"], models["torchao unwrapped"]
    cls = type(torchao[0].weight)
    assert type(unwrapped).__name__ == "Sequential" and type(unwrapped[0]).__name__ == "UnwrappedLinear"
    reference = run(torchao, x)
    seen = []
    original = cls.__dict__.get("__torch_function__", None)

    def counting(klass, func, types, args=(), kwargs=None):
        seen.append(func)
        return cls.__mro__[1].__torch_function__.__func__(klass, func, types, args, kwargs)

    monkeypatch.setattr(cls, "__torch_function__", classmethod(counting))
    assert torch.equal(run(unwrapped, x), reference)
    assert torch.nn.functional.linear not in seen, seen
    run(torchao, x)
    assert torch.nn.functional.linear in seen  # the counter does see torchao's own path
    monkeypatch.undo()
    assert cls.__dict__.get("__torch_function__", None) is original


@pytest.mark.parametrize("fmt", ["int4", "int8"])
@pytest.mark.parametrize("workload", ["W1 8x256", "W2 512-1024-1024"])
def test_compiled_guards_within_the_floor_plus_one_per_layer(workload, fmt, aten_int4_decode):
    models, x = torchao_variants(workload, fmt)
    layers = len(models["floor"])
    reference = run(models["torchao"], x)
    guards, calls = {}, {}
    for variant in ("floor", "torchao unwrapped", "torchao converted"):
        compiled, counts = compile_counting_guards(fresh_caller(models[variant]))
        with torch.inference_mode():
            out, code = run_and_get_code(compiled, x)
        calls[variant] = Counter(re.findall(KERNEL_CALL, "\n".join(code)))
        guards[variant] = sum(counts)
        if variant != "floor":
            if fmt == "int4":  # the same kernel on the same bytes
                assert torch.equal(out, reference), variant
            else:  # torchao's int8 math (bf16 mm, then the scale) fused by Inductor, or our kernel
                torch.testing.assert_close(out, reference, rtol=0.02, atol=0.02)
    assert calls["torchao converted"] == calls["floor"], calls  # the floor's graph: its kernels, nothing else
    assert guards["torchao converted"] <= guards["floor"] + layers + GLOBAL_GUARDS, guards
    # torchao's Int8Tensor has a third inner tensor (an all-zero zero_point), one more graph input
    # per layer than the floor's two: Dynamo checks it like any input (W2 int8: 73 vs 61 + 2 + 8).
    extra_inputs = len(models["torchao unwrapped"][0]._unwrapped["weight"].paths()) - len(list(models["floor"][0].buffers()))
    assert guards["torchao unwrapped"] <= guards["floor"] + layers * (1 + extra_inputs) + GLOBAL_GUARDS, guards
