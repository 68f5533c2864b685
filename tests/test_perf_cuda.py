"""perf.cuda without a GPU: the CUDA floor on fake CUDA tensors, the table, the no-GPU exit."""

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from perf.cuda import CudaInt4FloorLinear, CudaInt8FloorLinear, cuda_floor_model, format_table, main
from subclasses import Int4WeightOnlyConfig, Int4WeightTensor, Int8WeightOnlyConfig, quantize_
from subclasses.kernels.int4_packing import cpu_layout


@pytest.mark.parametrize(
    "config,floor", [(Int4WeightOnlyConfig(128), CudaInt4FloorLinear), (Int8WeightOnlyConfig(), CudaInt8FloorLinear)]
)
def test_cuda_floor_shares_inner_tensors_and_runs_on_fake_cuda(config, floor):
    cpu_layout()
    with FakeTensorMode():
        layers = [
            nn.Linear(256, 128, bias=False, dtype=torch.bfloat16),
            nn.ReLU(),
            nn.Linear(128, 64, bias=False, dtype=torch.bfloat16),
        ]
        model = quantize_(nn.Sequential(*layers), config).to("cuda:0")
        floored = cuda_floor_model(model)
        assert [type(m) for m in floored] == [floor, nn.ReLU, floor]
        first = floored[0]
        inner = model[0].weight.inner_tensors()
        assert all(any(b is t for t in inner) for b in first.buffers())
        y = floored(torch.randn(1, 256, dtype=torch.bfloat16, device="cuda:0"))
        assert y.shape == (1, 64) and y.dtype == torch.bfloat16 and y.device.type == "cuda"


def test_cuda_int4_floor_refuses_a_cpu_packed_weight():
    w = Int4WeightTensor.from_float(torch.randn(64, 128, dtype=torch.bfloat16), 128)
    with pytest.raises(ValueError, match="packing='cpu'"):
        CudaInt4FloorLinear(w)


def test_format_table_ratios():
    rows = [
        {"workload": "W2", "format": "int4", "model": m, "mode": mode, "us": us}
        for m, times in {"bf16": (100, 110), "floor": (50, 60), "ours unwrapped": (70, 61.8)}.items()
        for mode, us in zip(("eager", "compiled"), times)
    ]
    table = format_table(rows).splitlines()
    assert table[0].startswith("| workload | format | model | eager (us) | compiled (us) |")
    assert table[-1] == "| W2 | int4 | ours unwrapped | 70.0 | 61.8 | 0.56 | 1.03 |"


def test_main_without_a_gpu_says_so(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main([]) == 0
    assert "no CUDA GPU here" in capsys.readouterr().out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (sm80+ for the int4 kernel)")
def test_gpu_table_has_every_variant_and_mode():
    from perf.cuda import CUDA_MODES, cuda_table

    rows = cuda_table(["W2 512-1024-1024"], ["int4", "int8"])
    got = {(r["format"], r["model"], r["mode"]) for r in rows}
    for fmt in ("int4", "int8"):
        for model in ("bf16", "floor", "ours wrapped", "ours unwrapped"):
            for mode in CUDA_MODES:
                assert (fmt, model, mode) in got
    assert all(r["us"] > 0 for r in rows)
