"""unwrap on torchao 0.18's tensors: the lean linear declared for their class (subclasses/io/torchao_linear.py)
calls the kernel with no __torch_function__, and the compiled model's guards stay within the floor's
+ 1 per layer + 8 (also after subclasses.from_torchao)."""

from __future__ import annotations

import re
from collections import Counter

import pytest
import torch
from torch._inductor.utils import run_and_get_code

from perf.modes import fresh_caller
from perf.timing import compile_counting_guards
from tests.conftest import sqnr
from tests.optional import import_or_fail_in_ci

import_or_fail_in_ci("torchao", "torchao")
from perf.bench_torchao import cached_variants as torchao_variants  # noqa: E402 - built once per group

GLOBAL_GUARDS = 8  # as tests/perf/test_bench_overhead.py: guards paid once, whatever the layer count
KERNEL_CALL = r"(torch\.ops\.[\w.]+|extern_kernels\.\w+|cpp_fused_\w+|aten\.\w+)\("  # calls in Inductor's code


def run(model, x):
    with torch.inference_mode():
        return model(x)


@pytest.mark.parametrize("fmt", ["int4", "int8"])
def test_unwrapped_torchao_calls_the_kernel_without_torch_function(fmt, monkeypatch):
    models, x = torchao_variants("W1 8x256", fmt)
    torchao, unwrapped = models["torchao"], models["torchao unwrapped"]
    cls = type(torchao[0].weight)
    assert type(unwrapped).__name__ == "Sequential" and type(unwrapped[0]).__name__ == "UnwrappedLinear"
    reference = run(torchao, x)
    run(unwrapped, x)  # the first call works out, once per weight, what the kernel call needs
    seen = []
    original = cls.__dict__.get("__torch_function__", None)

    def counting(klass, func, types, args=(), kwargs=None):
        seen.append(func)
        return cls.__mro__[1].__torch_function__.__func__(klass, func, types, args, kwargs)

    monkeypatch.setattr(cls, "__torch_function__", classmethod(counting))
    out = run(unwrapped, x)
    assert seen == []  # not F.linear, not even a Tensor property of torchao's weight (~2 us each)
    run(torchao, x)
    assert torch.nn.functional.linear in seen  # the counter does see torchao's own path
    monkeypatch.undo()
    assert cls.__dict__.get("__torch_function__", None) is original
    # int4, one row: our M = 1 GEMV; int8: the int8pack kernel (torchao's compiled linear); both
    # close to torchao's eager, not bit-identical (tests/subclasses/test_torchao_linear.py)
    assert sqnr(reference, out) > (30 if fmt == "int4" else 40)


@pytest.mark.parametrize("fmt", ["int4", "int8"])
@pytest.mark.parametrize("workload", ["W1 8x256", "W2 512-1024-1024"])
def test_compiled_guards_within_the_floor_plus_one_per_layer(workload, fmt, aten_int4_kernels):
    models, x = torchao_variants(workload, fmt)
    layers = len(models["floor"])
    reference = run(models["torchao unwrapped"], x)  # eager: torchao's int4 bit for bit; int8, see above
    guards, calls = {}, {}
    runs = [("floor", {}), ("torchao unwrapped", {}), ("torchao converted", {}), ("frozen", {"freezing": True})]
    for name, options in runs:
        variant = "torchao unwrapped" if name == "frozen" else name
        compiled, counts = compile_counting_guards(fresh_caller(models[variant]))
        with torch.inference_mode(), torch._inductor.config.patch(options):  # Dynamo reads freezing too
            out, code = run_and_get_code(compiled, x)
        calls[name] = Counter(re.findall(KERNEL_CALL, "\n".join(code)))
        guards[name] = sum(counts)
        if variant != "floor":
            assert torch.equal(out, reference), name  # the same kernels on the same bytes
    assert calls["torchao converted"] == calls["floor"], calls  # the floor's graph: its kernels, nothing else
    # unwrapped int8: the floor's kernels, and one fused fp32 -> bf16 conversion of each layer's scale
    # (torchao keeps it in fp32; the kernel takes the activation dtype) ...
    kernels = {k: v for k, v in calls["torchao unwrapped"].items() if fmt == "int4" or not k.startswith("cpp_fused")}
    assert kernels == calls["floor"], calls
    if fmt == "int8":
        assert sum(v for k, v in calls["torchao unwrapped"].items() if k.startswith("cpp_fused")) == layers, calls
    # ... which freezing folds at compile time: then the floor's graph exactly
    assert calls["frozen"] == calls["floor"], calls
    for variant in ("torchao unwrapped", "torchao converted", "frozen"):
        # unwrapped int8: no guard on torchao's all-zero zero_point, which the linear never reads
        assert guards[variant] <= guards["floor"] + layers + GLOBAL_GUARDS, guards
