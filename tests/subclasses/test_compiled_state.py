"""What the library compiles is scoped to the shapes it serves: no process-wide switch, no
compile per weight, and a global torch config flag set only while a trace runs."""

import warnings

import torch
import torch._dynamo
from torch import nn

from subclasses import Int4WeightOnlyConfig, quantize_
from subclasses.kernels import int4_prefill
from subclasses.kernels.compute_dtype import ENV_OVERRIDE, prefill_compute_dtype
from subclasses.runtime.decode import FrozenStep
from unwrap import unwrap


def _unwrapped_int4(shapes: list[tuple[int, int]]) -> nn.ModuleList:
    torch.manual_seed(0)
    layers = nn.ModuleList(nn.Linear(k, n, bias=False) for n, k in shapes).to(torch.bfloat16)
    quantize_(layers, Int4WeightOnlyConfig(group_size=128))
    return unwrap(layers)


def test_eager_prefill_compiles_one_dequantize_per_shape_never_per_weight(monkeypatch):
    """The dequantize + GEMM path (pinned: where the AVX2 integer GEMM runs it has no dequantize). Ten same-shape and two other-shape unwrapped weights (past Dynamo's recompile limit of 8),
    with Inductor freezing on (under which Dynamo guards parameters by identity): three shapes,
    three compiled graphs; each layer's output is its compiled dequantize times x, and that
    dequantize is the weight's ``dequantize()`` to within one bf16 rounding (Inductor may contract
    ``(q - zero) * scale`` into an FMA: the fp32 value then rounds to the neighbouring bf16, a
    relative difference of at most 2**-7)."""
    monkeypatch.setenv(ENV_OVERRIDE, "float32")
    shapes = [(512, 512)] * 10 + [(1024, 512), (512, 1024)]
    layers = _unwrapped_int4(shapes)
    int4_prefill.compiled_dequantize.cache_clear()
    torch._dynamo.utils.counters.clear()
    torch.manual_seed(1)
    xs = {k: torch.randn(512, k, dtype=torch.bfloat16) for k in (512, 1024)}
    with torch.inference_mode(), torch._inductor.config.patch(freezing=True), warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*running it eagerly")  # no silent or loud fallback
        for layer, (n, k) in zip(layers, shapes, strict=True):
            out = layer(xs[k])
            w = layer.weight
            scale, zero = int4_prefill.split_scale_and_zero(w.scale_and_zero)
            compute = prefill_compute_dtype(torch.bfloat16)  # fp32 on CPUs without native bf16
            w_kn = int4_prefill.eager_dequantize_kn(w.packed, scale, zero, 128, compute, n, k)
            expected = (xs[k].to(compute) @ w_kn).bfloat16()
            torch.testing.assert_close(out, expected, atol=0, rtol=0)  # the same dequantize, the same mm
            torch.testing.assert_close(w_kn.T.bfloat16(), w.dequantize(), atol=0, rtol=2**-7)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 3
    assert int4_prefill.compiled_dequantize.cache_info().currsize == 3


def test_a_failed_dequantize_compile_warns_and_runs_that_shape_eagerly(monkeypatch):
    int4_prefill.compiled_dequantize.cache_clear()

    def failing_compile(fn, **kwargs):
        def run(*args):
            raise RuntimeError("no compiler")

        return run

    monkeypatch.setattr(torch, "compile", failing_compile)
    dequantize = int4_prefill.compiled_dequantize(512, 512, 128, torch.bfloat16)
    monkeypatch.undo()
    layers = _unwrapped_int4([(512, 512)])
    w = layers[0].weight
    scale, zero = int4_prefill.split_scale_and_zero(w.scale_and_zero)
    args = (scale, zero, 128, torch.bfloat16, 512, 512)
    with torch.inference_mode():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = dequantize(w.packed, *args)
        assert any("running it eagerly" in str(c.message) for c in caught)
        torch.testing.assert_close(out, int4_prefill.dequantize_kn(w.packed, *args), atol=0, rtol=0)
        assert not dequantize.compiled  # this shape only: a new one compiles
    int4_prefill.compiled_dequantize.cache_clear()


def test_frozen_step_sets_freezing_only_while_a_new_shape_traces():
    seen = []

    def compiled(tokens: torch.Tensor) -> torch.Tensor:  # stands in for the compiled step
        seen.append(torch._inductor.config.freezing)
        return tokens

    step = FrozenStep(compiled)
    for tokens in (torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(2, 1), torch.zeros(2, 1), torch.zeros(1, 1)):
        step(tokens)
    assert seen == [True, False, True, False, False]
    assert not torch._inductor.config.freezing
