"""The CUDA path: what can be checked without a GPU is checked here on CPU (the tinygemm layout
against a transcription of the CUDA packing kernel, padding decisions, device-move bookkeeping on
fake CUDA and meta tensors, the int8 formula); what needs a GPU is marked and skips without one."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from subclasses import (
    Int4WeightOnlyConfig,
    Int4WeightTensor,
    Int8WeightOnlyConfig,
    Int8WeightTensor,
    Packing,
    quantize_,
)
from subclasses.kernels.int4_cuda import (
    K_TILE,
    N_TILE,
    check_tinygemm_shape,
    inner_k_tiles_for,
    pack_tinygemm_reference,
    unpack_tinygemm,
)
from subclasses.kernels.int4_packing import cpu_layout, pack_canonical
from subclasses.kernels.int8_cuda import int8_cuda_linear
from tests.conftest import sqnr
from unwrap import unwrap

CUDA = torch.cuda.is_available()


def tinygemm_packed_shape(n: int, k: int) -> tuple[int, int, int, int]:
    """Shape of the int32 tensor ``_convert_weight_to_int4pack`` returns for an [n, k] weight."""
    tiles = check_tinygemm_shape(n, k)
    return (n // N_TILE, k // (tiles * K_TILE), 32, tiles // 2)


needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (sm80+ for the int4 kernel)")
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def convert_like_cuda_kernel(canonical: torch.Tensor, inner_k_tiles: int) -> torch.Tensor:
    """``matrix_to_m16n8k16_Bint4_layout`` of aten/src/ATen/native/cuda/int4mm.cu, one lane at a time."""
    n, half_k = canonical.shape
    rows = canonical.tolist()
    n_tiles, k_tiles = -(-n // 8), (half_k * 2) // (inner_k_tiles * 16)
    out = torch.zeros(n_tiles, k_tiles, 32, inner_k_tiles // 2, dtype=torch.int64)
    for n_tile in range(n_tiles):
        for k_outer in range(k_tiles):
            for t in range(32):
                for inner in range(0, inner_k_tiles, 2):
                    n0 = n_tile * 8 + t // 4
                    base0 = (k_outer * inner_k_tiles + inner) * 16 // 2
                    ks = [base0 + t % 4, base0 + t % 4 + 4, base0 + 8 + t % 4, base0 + 8 + t % 4 + 4]
                    v = [rows[n0][kk] if n0 < n and kk < half_k else 0 for kk in ks]
                    pack = (
                        (v[3] & 0xF) << 28
                        | (v[2] & 0xF) << 24
                        | (v[1] & 0xF) << 20
                        | (v[0] & 0xF) << 16
                        | (v[3] & 0xF0) << 8
                        | (v[2] & 0xF0) << 4
                        | (v[1] & 0xF0)
                        | (v[0] & 0xF0) >> 4
                    )
                    out[n_tile, k_outer, t, inner // 2] = pack - (1 << 32) if pack >= 1 << 31 else pack
    return out.to(torch.int32)


# --- layout and padding decisions (CPU) ---------------------------------------------------------


@pytest.mark.parametrize("n,k", [(8, 32), (16, 64), (16, 96), (24, 128), (8, 384), (16, 256)])
def test_layout_matches_the_cuda_packing_kernel(n, k):
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    assert torch.equal(pack_canonical(q), (q[:, ::2] << 4) | q[:, 1::2])  # byte = even code << 4 | odd code
    expected = convert_like_cuda_kernel(pack_canonical(q), inner_k_tiles_for(k))
    packed = pack_tinygemm_reference(q)
    assert packed.dtype == torch.int32 and packed.shape == tinygemm_packed_shape(n, k)
    assert torch.equal(packed, expected)


@pytest.mark.parametrize("n,k", [(16, 32), (48, 96), (64, 192), (1024, 512), (32, 4096)])
def test_unpack_inverts_the_layout(n, k):
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    assert torch.equal(unpack_tinygemm(pack_tinygemm_reference(q)), q)


def test_no_weight_or_activation_padding_for_any_supported_k():
    # K is a multiple of the group size (>= 32): the largest inner_k_tiles dividing K always exists.
    for k in range(32, 16384 + 1, 32):
        tiles = inner_k_tiles_for(k)
        assert k % (tiles * 16) == 0
        assert tiles == 8 if k % 128 == 0 else tiles == (4 if k % 64 == 0 else 2)
        assert tinygemm_packed_shape(16, k)[1] * tiles * 16 == k  # packed K == K: nothing padded


@pytest.mark.parametrize("k", [0, 16, 48, 100, 4100])
def test_k_the_kernel_cannot_take_is_a_clear_error(k):
    with pytest.raises(ValueError, match=f"in_features={k} must be a positive multiple of 32"):
        inner_k_tiles_for(k)


@pytest.mark.parametrize("n", [0, 4, 12, 100])
def test_n_the_kernel_cannot_take_is_a_clear_error(n):
    with pytest.raises(ValueError, match=f"out_features={n} must be a positive multiple of 8"):
        check_tinygemm_shape(n, 128)


# --- device moves on fake CUDA tensors (CPU) -----------------------------------------------------


@pytest.fixture
def fake_mode():
    cpu_layout()  # probes real tensors: run it before entering the fake mode
    with FakeTensorMode() as mode:
        yield mode


def _model(config, dtype):
    # bias-free: nn.Module.to swaps plain fake Parameters, which FakeTensorMode's weakrefs refuse
    layers = [nn.Linear(256, 128, bias=False, dtype=dtype), nn.ReLU(), nn.Linear(128, 64, bias=False, dtype=dtype)]
    return quantize_(nn.Sequential(*layers), config)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_to_fake_cuda_repacks_for_tinygemm_and_back(fake_mode, dtype, group_size):
    model = _model(Int4WeightOnlyConfig(group_size), dtype)
    model.to("cuda:0")
    w = model[0].weight
    assert isinstance(w, Int4WeightTensor) and w.packing == Packing.CUDA_TINYGEMM
    assert w.device.type == "cuda" and w.dtype == dtype and w.shape == (128, 256)
    assert w.packed.dtype == torch.int32 and w.packed.shape == tinygemm_packed_shape(128, 256)
    assert w.packed.device.type == "cuda" and w.scale_and_zero.device.type == "cuda"
    assert w.scale_and_zero.shape == (256 // group_size, 128, 2) and w.scale_and_zero.dtype == dtype
    assert model[2].weight.packed.shape == tinygemm_packed_shape(64, 128)
    y = model(torch.randn(3, 5, 256, dtype=dtype, device="cuda:0"))
    assert y.shape == (3, 5, 64) and y.dtype == dtype and y.device.type == "cuda"
    assert model(torch.randn(0, 256, dtype=dtype, device="cuda:0")).shape == (0, 64)
    model.to("cpu")
    w = model[0].weight
    assert w.packing == Packing.CPU and w.device.type == "cpu"
    assert w.packed.dtype == torch.uint8 and w.packed.shape == (128, 128)


def test_int4_bias_on_fake_cuda(fake_mode):
    w = Int4WeightTensor.from_float(torch.randn(64, 128, dtype=torch.bfloat16), 64).to("cuda:0")
    assert w.packing == Packing.CUDA_TINYGEMM
    bias = torch.randn(64, dtype=torch.bfloat16, device="cuda:0")
    y = F.linear(torch.randn(2, 7, 128, dtype=torch.bfloat16, device="cuda:0"), w, bias)
    assert y.shape == (2, 7, 64) and y.dtype == torch.bfloat16


def test_int4_activation_on_cpu_with_a_cuda_weight_is_a_clear_error(fake_mode):
    w = Int4WeightTensor.from_float(torch.randn(64, 128, dtype=torch.bfloat16), 64).to("cuda:0")
    with pytest.raises(ValueError, match="activation on cpu but the int4 weight is packed for CUDA"):
        F.linear(torch.randn(2, 128, dtype=torch.bfloat16), w)


@pytest.mark.parametrize("dtype", DTYPES)
def test_int8_to_fake_cuda_and_back(fake_mode, dtype):
    model = _model(Int8WeightOnlyConfig(), dtype)
    model.to("cuda:0")
    w = model[0].weight
    assert isinstance(w, Int8WeightTensor) and w.qdata.device.type == "cuda" and w.scale.dtype == dtype
    y = model(torch.randn(3, 5, 256, dtype=dtype, device="cuda:0"))
    assert y.shape == (3, 5, 64) and y.dtype == dtype and y.device.type == "cuda"
    model.to("cpu")
    assert model[0].weight.qdata.device.type == "cpu"


@pytest.mark.parametrize("config", [Int4WeightOnlyConfig(128), Int8WeightOnlyConfig()], ids=["int4", "int8"])
def test_unwrapped_model_on_fake_cuda_runs_the_cuda_path(fake_mode, config):
    model = unwrap(_model(config, torch.bfloat16).to("cuda:0"))
    names = dict(model.named_parameters())
    if isinstance(config, Int4WeightOnlyConfig):
        assert names["0.weight__packed"].shape == tinygemm_packed_shape(128, 256)
        assert model[0].weight.packing == Packing.CUDA_TINYGEMM
    y = model(torch.randn(4, 256, dtype=torch.bfloat16, device="cuda:0"))
    assert y.shape == (4, 64) and y.device.type == "cuda"


# --- repacking with real values (CPU) ------------------------------------------------------------


def _tinygemm_on_cpu(w: torch.Tensor, group_size: int) -> tuple[Int4WeightTensor, Int4WeightTensor]:
    """A CPU weight and the same codes in the CUDA layout (still on CPU, as a device move makes it)."""
    cpu = Int4WeightTensor.from_float(w, group_size)
    packed = pack_tinygemm_reference(cpu.codes())
    return cpu, Int4WeightTensor(packed, cpu.scale_and_zero, group_size, Packing.CUDA_TINYGEMM, tuple(w.shape), w.dtype)


@pytest.mark.parametrize("n,k,group_size", [(64, 256, 128), (48, 96, 32), (32, 192, 64)])
def test_tinygemm_packing_dequantizes_and_repacks_exactly(n, k, group_size):
    cpu, gpu_layout = _tinygemm_on_cpu(torch.randn(n, k, dtype=torch.bfloat16), group_size)
    assert torch.equal(gpu_layout.codes(), cpu.codes())
    assert torch.equal(gpu_layout.dequantize(), cpu.dequantize())
    back = gpu_layout.to(torch.float32)  # a conversion on CPU repacks for the CPU kernel
    assert back.packing == Packing.CPU and torch.equal(back.codes(), cpu.codes())
    x = torch.randn(3, k)
    assert sqnr(F.linear(x, cpu.dequantize().float()), F.linear(x, back)) > 35


def test_unwrapped_repack_replaces_plain_tensors_and_getter():
    cpu, gpu_layout = _tinygemm_on_cpu(torch.randn(64, 256, dtype=torch.bfloat16), 128)
    model = nn.Sequential(nn.Linear(256, 64, bias=False, dtype=torch.bfloat16))
    model[0].weight = nn.Parameter(gpu_layout, requires_grad=False)
    unwrap(model)
    assert model[0].weight__packed.dtype == torch.int32
    model.to(torch.float32)  # repacks: int32 [8, 2, 32, 4] -> uint8 [64, 128] in the same Parameter
    packed = dict(model.named_parameters())["0.weight__packed"]
    assert packed.dtype == torch.uint8 and packed.shape == (64, 128)
    assert model[0].weight.packing == Packing.CPU
    x = torch.randn(2, 256)
    assert sqnr(F.linear(x, cpu.dequantize().float()), model(x)) > 35


def test_activation_on_cpu_with_tinygemm_packing_is_a_clear_error():
    _, gpu_layout = _tinygemm_on_cpu(torch.randn(64, 256, dtype=torch.bfloat16), 128)
    with pytest.raises(ValueError, match="move the input to the weight's device"):
        F.linear(torch.randn(2, 256, dtype=torch.bfloat16), gpu_layout)


# --- the meta device -------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [Int4WeightOnlyConfig(128), Int8WeightOnlyConfig()], ids=["int4", "int8"])
def test_wrapped_model_to_meta(config):
    model = _model(config, torch.bfloat16).to("meta")
    w = model[0].weight
    assert w.device.type == "meta" and all(t.device.type == "meta" for t in w.inner_tensors())
    if isinstance(w, Int4WeightTensor):
        assert w.packing == Packing.CANONICAL and w.packed.shape == (128, 128)
    assert model(torch.randn(2, 256, dtype=torch.bfloat16, device="meta")).shape == (2, 64)


def test_unwrapped_model_to_meta():
    model = unwrap(_model(Int4WeightOnlyConfig(128), torch.bfloat16)).to("meta")
    assert model[0].weight.device.type == "meta"
    assert all(t.device.type == "meta" for t in model.parameters())
    assert model(torch.randn(2, 256, dtype=torch.bfloat16, device="meta")).shape == (2, 64)


# --- int8's CUDA formula, evaluated on CPU tensors -----------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int8_cuda_formula_matches_dequantize_reference(dtype):
    w = Int8WeightTensor.from_float(torch.randn(96, 200, dtype=dtype))
    x, bias = torch.randn(2, 3, 200, dtype=dtype), torch.randn(96, dtype=dtype)
    out = int8_cuda_linear(x, w.qdata, w.scale, bias)
    assert out.dtype == dtype and out.shape == (2, 3, 96)
    assert sqnr(F.linear(x, w.dequantize(), bias), out) > 40


def test_int8_cuda_formula_in_fp16_scales_the_weight_first():
    w = Int8WeightTensor.from_float(torch.randn(64, 4096, dtype=torch.float16) * 0.02)
    x = torch.full((1, 4096), 30.0, dtype=torch.float16)  # x @ q.T alone would overflow fp16
    out = int8_cuda_linear(x, w.qdata, w.scale, None)
    assert torch.isfinite(out).all()
    assert torch.equal(out, F.linear(x, w.dequantize()))


# --- on a GPU ------------------------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("n,k", [(16, 32), (48, 96), (64, 192), (1024, 512), (256, 4096)])
def test_gpu_packing_op_matches_our_layout(n, k):
    from subclasses.kernels.int4_cuda import pack_tinygemm

    q = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    packed = pack_tinygemm(q.cuda())
    assert torch.equal(packed.cpu(), pack_tinygemm_reference(q))
    assert torch.equal(unpack_tinygemm(packed).cpu(), q)


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k,group_size", [(256, 512, 128), (48, 96, 32), (64, 192, 64), (1024, 1024, 256)])
def test_gpu_int4_kernel_matches_dequantize_reference(dtype, n, k, group_size):
    w = Int4WeightTensor.from_float(torch.randn(n, k, dtype=dtype, device="cuda"), group_size)
    assert w.packing == Packing.CUDA_TINYGEMM
    for shape in [(1, k), (4, k), (2, 3, k), (0, k)]:
        x = torch.randn(*shape, dtype=dtype, device="cuda")
        bias = torch.randn(n, dtype=dtype, device="cuda")
        out = F.linear(x, w, bias)
        assert out.shape == (*shape[:-1], n) and out.dtype == dtype
        if out.numel():
            assert sqnr(F.linear(x, w.dequantize(), bias), out) > 35


@needs_cuda
@pytest.mark.parametrize("config", [Int4WeightOnlyConfig(128), Int8WeightOnlyConfig()], ids=["int4", "int8"])
@pytest.mark.parametrize("unwrapped", [False, True], ids=["wrapped", "unwrapped"])
def test_gpu_device_round_trip_agrees_with_reference(config, unwrapped):
    model = _model(config, torch.bfloat16)
    reference = [m.weight.dequantize() for m in (model[0], model[2])]
    if unwrapped:
        unwrap(model)
    x = torch.randn(4, 256, dtype=torch.bfloat16)

    def expected(device):
        h = F.relu(F.linear(x.to(device), reference[0].to(device)))
        return F.linear(h, reference[1].to(device))

    model.to("cuda")
    assert sqnr(expected("cuda"), model(x.cuda())) > 30
    model.to("cpu")
    assert sqnr(expected("cpu"), model(x)) > 30
    assert torch.equal(model[0].weight.dequantize(), reference[0])  # the codes survived both moves


@needs_cuda
def test_gpu_compiled_unwrapped_model_matches_eager():
    model = unwrap(_model(Int4WeightOnlyConfig(128), torch.bfloat16).to("cuda"))
    x = torch.randn(1, 256, dtype=torch.bfloat16, device="cuda")
    with torch.inference_mode():
        eager = model(x)
        for mode in ("default", "reduce-overhead"):
            torch._dynamo.reset()
            compiled = torch.compile(model, mode=mode)
            for _ in range(3):
                out = compiled(x)
            assert sqnr(eager, out) > 40


# --- what a compiled CUDA graph contains (export on fake CUDA tensors, CPU) ----------------------


def _graph_ops(model: nn.Module, x: torch.Tensor) -> list[str]:
    """The ops of the exported graph, less export's reads of a wrapped subclass's inner tensors."""
    graph = torch.export.export(model, (x,)).graph
    ops = [str(node.target) for node in graph.nodes if node.op == "call_function"]
    return [op for op in ops if op != "export.access_subclass_inner_tensor.default"]


@pytest.mark.parametrize("config", [Int4WeightOnlyConfig(128), Int8WeightOnlyConfig()], ids=["int4", "int8"])
def test_cuda_graph_of_ours_is_the_floor_graph(fake_mode, config):
    from perf.cuda import cuda_floor_model

    def two_layer():  # the report's W2 shapes, batch 1
        layers = [
            nn.Linear(512, 1024, bias=False, dtype=torch.bfloat16),
            nn.Linear(1024, 1024, bias=False, dtype=torch.bfloat16),
        ]
        return quantize_(nn.Sequential(*layers), config).to("cuda:0")

    x = torch.randn(1, 512, dtype=torch.bfloat16, device="cuda:0")
    floor = _graph_ops(cuda_floor_model(two_layer()), x)
    assert _graph_ops(two_layer(), x) == floor
    assert _graph_ops(unwrap(two_layer()), x) == floor
    if isinstance(config, Int4WeightOnlyConfig):  # just the kernel: no activation pad, no dequantize
        assert floor == ["aten._weight_int4pack_mm.default"] * 2
