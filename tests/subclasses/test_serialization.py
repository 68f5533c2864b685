"""Checkpoints: torch.save/torch.load(weights_only=True), safetensors, portable int4, bad input."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

import subclasses.formats.portable as portable
import subclasses.kernels.int4_packing as int4_packing
from subclasses import (
    Int4WeightOnlyConfig,
    Int4WeightTensor,
    Int8WeightOnlyConfig,
    Int8WeightTensor,
    Packing,
    flatten_state_dict,
    load_checkpoint,
    quantize_,
    save_checkpoint,
    unflatten_state_dict,
)
from subclasses.kernels.int4_packing import CPU_LAYOUTS, pack_canonical, pack_cpu
from tests.conftest import sqnr
from tests.subclasses.test_cuda_path import tinygemm_packed_shape
from unwrap import unwrap

REPO = Path(__file__).resolve().parents[2]
WEIGHTS = {
    # 80 rows: one full CPU block plus a remainder block, so every packing path is exercised
    "int4-bf16-g32": lambda: Int4WeightTensor.from_float(torch.randn(80, 128, dtype=torch.bfloat16), 32),
    "int4-fp16-g64": lambda: Int4WeightTensor.from_float(torch.randn(48, 256, dtype=torch.float16), 64),
    "int4-fp32-g128": lambda: Int4WeightTensor.from_float(torch.randn(16, 256, dtype=torch.float32), 128),
    "int8-bf16": lambda: Int8WeightTensor.from_float(torch.randn(40, 24, dtype=torch.bfloat16)),
    "int8-fp32": lambda: Int8WeightTensor.from_float(torch.randn(8, 64, dtype=torch.float32)),
}


def torch_round_trip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def save_safetensors(state_dict, path):
    tensors, metadata = flatten_state_dict(state_dict)
    save_file(tensors, path, metadata=metadata)


def load_safetensors(path, device="cpu"):
    with safe_open(path, framework="pt", device=device) as f:
        return unflatten_state_dict({key: f.get_tensor(key) for key in f.keys()}, f.metadata())


def assert_same_weight(loaded, original):
    assert type(loaded) is type(original)
    assert loaded.shape == original.shape and loaded.dtype == original.dtype
    assert loaded.attributes() == original.attributes()  # int4: packing "cpu" again, same group size
    for a, b in zip(loaded.inner_tensors(), original.inner_tensors()):
        assert torch.equal(a, b)
    x = torch.randn(3, original.shape[1], dtype=original.dtype)
    assert torch.equal(F.linear(x, loaded), F.linear(x, original))


def pack_with_layout(q, block, pairing):
    """Pack codes in one of int4_packing.CPU_LAYOUTS (the inverse of int4_packing._unpack_with)."""
    n, k = q.shape
    q = q.to(torch.uint8)
    parts = []
    full = n - n % block
    for start, count, rows, pair in [(0, full, block, pairing), (full, n % block, n % block, "adjacent")]:
        if count == 0:
            continue
        blocks = q[start : start + count].reshape(-1, rows, k).transpose(1, 2)  # [blocks, K, rows]
        if pair == "half":
            low, high = blocks[..., : rows // 2], blocks[..., rows // 2 :]
        else:
            low, high = blocks[..., 0::2], blocks[..., 1::2]
        parts.append((low | high << 4).reshape(-1, k // 2))
    return torch.cat(parts)


# ---- 1. torch.save / torch.load(weights_only=True)


@pytest.mark.parametrize("name", sorted(WEIGHTS))
def test_torch_load_weights_only_round_trips_every_format(name):
    weight = WEIGHTS[name]()
    loaded = torch_round_trip({"w": weight, "bias": torch.randn(3)})["w"]
    assert_same_weight(loaded, weight)


def test_checkpoint_names_only_torch_rebuild_functions_and_our_classes(tmp_path):
    path = tmp_path / "sd.pt"
    torch.save({"a": WEIGHTS["int4-bf16-g32"](), "b": WEIGHTS["int8-bf16"]()}, path)
    registered = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    try:
        # everything else it names (rebuild functions, dtypes) is on torch's default allowlist
        unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    finally:
        torch.serialization.add_safe_globals(registered)
    assert unsafe == {"subclasses.formats.int4.Int4WeightTensor", "subclasses.formats.int8.Int8WeightTensor"}
    assert set(torch.load(path, weights_only=True)) == {"a", "b"}


def test_parameter_survives_keep_vars_state_dict():
    model = quantize_(nn.Linear(64, 32).to(torch.bfloat16), Int4WeightOnlyConfig(group_size=32))
    loaded = torch_round_trip(model.state_dict(keep_vars=True))
    assert isinstance(loaded["weight"], nn.Parameter) and isinstance(loaded["weight"], Int4WeightTensor)
    assert_same_weight(loaded["weight"], model.weight)


# ---- 2. safetensors


@pytest.mark.parametrize("name", sorted(WEIGHTS))
def test_safetensors_round_trips_every_format(name, tmp_path):
    weight, bias = WEIGHTS[name](), torch.randn(7, dtype=torch.bfloat16)
    path = tmp_path / "sd.safetensors"
    save_safetensors({"layer.weight": weight, "layer.bias": bias}, path)
    loaded = load_safetensors(path)
    assert set(loaded) == {"layer.weight", "layer.bias"}
    assert torch.equal(loaded["layer.bias"], bias)
    assert_same_weight(loaded["layer.weight"], weight)


def test_flatten_layout_and_metadata_are_plain_strings():
    weight = WEIGHTS["int4-bf16-g32"]()
    tensors, metadata = flatten_state_dict({"l.weight": weight, "l.bias": torch.zeros(80)})
    assert set(tensors) == {"l.weight:packed", "l.weight:scale_and_zero", "l.bias"}
    assert all(isinstance(v, str) for v in metadata.values()) and metadata["format"] == "pt"
    assert json.loads(metadata["unwrap_quantized"]) == {
        "l.weight": {
            "type": "Int4WeightTensor",
            "shape": [80, 128],
            "dtype": "bfloat16",
            "attributes": {"group_size": 32, "packing": "canonical"},
        }
    }


def test_tensors_sharing_memory_are_written_as_copies(tmp_path):
    shared = torch.randn(16, 32)
    weight = WEIGHTS["int8-bf16"]()
    state_dict = {"a": shared, "b": shared, "c": shared.t(), "q1": weight, "q2": weight}
    path = tmp_path / "tied.safetensors"
    save_safetensors(state_dict, path)  # safetensors itself refuses shared or non-contiguous tensors
    loaded = load_safetensors(path)
    assert all(torch.equal(loaded[k], state_dict[k]) for k in "abc")
    assert_same_weight(loaded["q2"], weight)


def test_plain_safetensors_file_loads_unchanged():
    tensors = {"w": torch.randn(4, 4)}
    assert unflatten_state_dict(tensors, {"format": "pt"}) == tensors
    assert unflatten_state_dict(tensors, None) == tensors


# ---- 3. portable int4


def test_checkpoints_store_the_canonical_int4_packing():
    weight = WEIGHTS["int4-bf16-g32"]()
    assert weight.packing == Packing.CPU
    canonical = pack_canonical(weight.codes())
    assert torch.equal(portable.reduce_weight(weight)[1][3]["tensors"]["packed"], canonical)
    tensors, _ = flatten_state_dict({"w": weight})
    assert torch.equal(tensors["w:packed"], canonical)
    assert not torch.equal(weight.packed, canonical)  # the local kernel's bytes are different


@pytest.mark.parametrize("layout", sorted(CPU_LAYOUTS))
def test_test_packer_matches_the_kernel_for_the_local_layout(layout):
    q = torch.randint(0, 16, (112, 64), dtype=torch.int32)
    unpacked = int4_packing._unpack_with(pack_with_layout(q, *CPU_LAYOUTS[layout]), *CPU_LAYOUTS[layout])
    assert torch.equal(unpacked, q.to(torch.uint8))
    if CPU_LAYOUTS[layout] == int4_packing.cpu_layout():
        assert torch.equal(pack_with_layout(q, *CPU_LAYOUTS[layout]), pack_cpu(q))


def test_checkpoint_bytes_do_not_depend_on_the_local_cpu_layout(monkeypatch):
    reference = WEIGHTS["int4-bf16-g32"]()
    codes, scale_and_zero = reference.codes(), reference.scale_and_zero
    saved = set()
    for block, pairing in CPU_LAYOUTS.values():
        # this machine's kernel packs as another CPU would: same codes, other bytes
        monkeypatch.setattr(int4_packing, "cpu_layout", lambda layout=(block, pairing): layout)
        packed = pack_with_layout(codes, block, pairing)
        weight = Int4WeightTensor(packed, scale_and_zero, 32, Packing.CPU, (80, 128), torch.bfloat16)
        assert torch.equal(weight.codes(), codes)
        buffer = io.BytesIO()
        torch.save({"w": weight}, buffer)
        tensors, metadata = flatten_state_dict({"w": weight})
        saved.add((buffer.getvalue(), tensors["w:packed"].numpy().tobytes(), json.dumps(metadata)))
    assert len({pack_with_layout(codes, *layout).numpy().tobytes() for layout in CPU_LAYOUTS.values()}) == 3
    assert len(saved) == 1


def test_canonical_checkpoint_loads_packed_for_the_local_kernel(tmp_path):
    reference = WEIGHTS["int4-bf16-g32"]()
    codes = reference.codes()
    canonical = Int4WeightTensor(
        pack_canonical(codes), reference.scale_and_zero, 32, Packing.CANONICAL, (80, 128), torch.bfloat16
    )
    assert_same_weight(torch_round_trip({"w": canonical})["w"], reference)
    # a safetensors file written by hand from the documented format, not by flatten_state_dict
    path = tmp_path / "canonical.safetensors"
    tensors = {"w:packed": pack_canonical(codes), "w:scale_and_zero": reference.scale_and_zero}
    entry = {"type": "Int4WeightTensor", "shape": [80, 128], "dtype": "bfloat16",
             "attributes": {"group_size": 32, "packing": "canonical"}}  # fmt: skip
    save_file(tensors, path, metadata={"unwrap_format_version": "1", "unwrap_quantized": json.dumps({"w": entry})})
    loaded = load_safetensors(path)["w"]
    assert loaded.packing == Packing.CPU and torch.equal(loaded.packed, pack_cpu(codes))
    assert_same_weight(loaded, reference)


OTHER_CPU_SCRIPT = """
import sys, torch
from safetensors.torch import save_file
sys.path.insert(0, sys.argv[1])
from subclasses import flatten_state_dict
from tests.subclasses.test_serialization import load_safetensors
cap = torch.backends.cpu.get_cpu_capability()
a = torch.load(sys.argv[2] + "/sd.pt", weights_only=True)["w"]
b = load_safetensors(sys.argv[2] + "/sd.safetensors")["w"]
x = torch.load(sys.argv[2] + "/x.pt")
torch.save({"cap": cap, "packed": a.packed, "deq": a.dequantize(), "out_pt": torch.nn.functional.linear(x, a),
            "out_st": torch.nn.functional.linear(x, b), "w": a}, sys.argv[2] + "/other.pt")
"""


def test_checkpoint_moves_between_cpus_that_pack_differently(tmp_path):
    local = torch.backends.cpu.get_cpu_capability()
    other = "default" if local != "DEFAULT" else "avx2"
    weight, x = WEIGHTS["int4-bf16-g32"](), torch.randn(3, 128, dtype=torch.bfloat16)
    torch.save({"w": weight}, tmp_path / "sd.pt")
    save_safetensors({"w": weight}, tmp_path / "sd.safetensors")
    torch.save(x, tmp_path / "x.pt")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": other, "OMP_NUM_THREADS": "1"}
    script = [sys.executable, "-c", OTHER_CPU_SCRIPT, str(REPO), str(tmp_path)]
    subprocess.run(script, env=env, check=True, cwd=REPO, timeout=120)
    there = torch.load(tmp_path / "other.pt", weights_only=True)
    assert there["cap"] != local and not torch.equal(there["packed"], weight.packed)  # other bytes there
    assert torch.equal(there["deq"], weight.dequantize())
    reference = F.linear(x, weight.dequantize())
    assert sqnr(reference, there["out_pt"]) > 35 and torch.equal(there["out_pt"], there["out_st"])
    assert_same_weight(there["w"], weight)  # and its checkpoint, written there, loads here


@pytest.mark.filterwarnings("ignore:Accessing the data pointer of FakeTensor")  # flatten's shared-memory check
def test_safetensors_on_fake_cuda_load_into_the_tinygemm_packing_and_save_canonical():
    _, metadata = flatten_state_dict({"w": WEIGHTS["int4-bf16-g32"]()})
    int4_packing.cpu_layout()  # probes real tensors: run it before entering the fake mode
    with FakeTensorMode():  # no GPU here: shapes, dtypes and packings only
        tensors = {
            "w:packed": torch.empty(80, 64, dtype=torch.uint8, device="cuda:0"),
            "w:scale_and_zero": torch.empty(4, 80, 2, dtype=torch.bfloat16, device="cuda:0"),
        }
        loaded = unflatten_state_dict(tensors, metadata)["w"]
        assert loaded.device.type == "cuda" and loaded.packing == Packing.CUDA_TINYGEMM
        assert loaded.packed.shape == tinygemm_packed_shape(80, 128)
        saved, _ = flatten_state_dict({"w": loaded})
        assert saved["w:packed"].shape == (80, 64) and saved["w:packed"].dtype == torch.uint8


def test_unwrapped_model_checkpoints_load_into_a_wrapped_one_and_back(tmp_path):
    def model(seed):
        torch.manual_seed(seed)
        m = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32)).to(torch.bfloat16)
        return quantize_(m, Int4WeightOnlyConfig(group_size=64))

    source, x = unwrap(model(0)), torch.randn(2, 64, dtype=torch.bfloat16)
    save_safetensors(source.state_dict(), tmp_path / "m.safetensors")
    for target in (unwrap(model(1)), model(1)):
        assert not torch.equal(target(x), source(x))
        target.load_state_dict(torch_round_trip(source.state_dict()))
        assert torch.equal(target(x), source(x))
        target.load_state_dict(model(2).state_dict())
        target.load_state_dict(load_safetensors(tmp_path / "m.safetensors"))
        assert torch.equal(target(x), source(x))


# ---- 4. a tiny transformers Qwen2


def tiny_qwen2(seed, tie_word_embeddings=False):
    """A 2-layer Qwen2 small enough for unit tests (every linear fits int4 group size 32)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie_word_embeddings,
    )  # fmt: skip
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config).to(torch.bfloat16).eval()


@pytest.mark.parametrize(
    "config, fmt, tied, unwrapped",
    [
        (Int4WeightOnlyConfig(group_size=32), "torch", False, False),
        (Int4WeightOnlyConfig(group_size=32), "safetensors", True, True),
        (Int8WeightOnlyConfig(), "torch", True, True),
        (Int8WeightOnlyConfig(), "safetensors", False, False),
    ],
)
@pytest.mark.filterwarnings("ignore:.*left these weights in high precision")  # the tied lm_head
def test_quantized_qwen2_saved_and_loaded_gives_identical_logits(config, fmt, tied, unwrapped, tmp_path):
    def build(seed):
        model = quantize_(tiny_qwen2(seed, tied), config)
        return unwrap(model) if unwrapped else model

    source, target = build(0), build(1)
    ids = torch.randint(0, 256, (2, 12))
    with torch.inference_mode():
        expected = source(ids).logits
        assert not torch.equal(target(ids).logits, expected)
    if fmt == "torch":
        torch.save(source.state_dict(), tmp_path / "m.pt")
        state_dict = torch.load(tmp_path / "m.pt", weights_only=True)
    else:
        save_safetensors(source.state_dict(), tmp_path / "m.safetensors")
        state_dict = load_safetensors(tmp_path / "m.safetensors")
    assert any(isinstance(t, type(source.model.layers[0].mlp.up_proj.weight)) for t in state_dict.values())
    target.load_state_dict(state_dict)
    with torch.inference_mode():
        assert torch.equal(target(ids).logits, expected)


# ---- 5. bad input


@pytest.mark.parametrize("name", ["sd.pt", "sd.safetensors"])
@pytest.mark.parametrize("damage", ["truncate", "garble header"])
def test_truncated_or_corrupt_files_raise_naming_the_file(name, damage, tmp_path):
    path = tmp_path / name
    save_checkpoint({"w": WEIGHTS["int4-bf16-g32"](), "b": torch.zeros(3)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00" * 16 + data[16:])
    with pytest.raises(ValueError, match=f"{path}: not a readable .* file \\(truncated or corrupt\\?\\)"):
        load_checkpoint(path)


def test_save_and_load_checkpoint_round_trip(tmp_path):
    state_dict = {"w": WEIGHTS["int4-bf16-g32"](), "q": WEIGHTS["int8-bf16"](), "b": torch.randn(3)}
    for name in ("sd.pt", "sd.safetensors"):
        save_checkpoint(state_dict, tmp_path / name)
        loaded = load_checkpoint(tmp_path / name)
        assert set(loaded) == set(state_dict) and torch.equal(loaded["b"], state_dict["b"])
        assert_same_weight(loaded["w"], state_dict["w"])
        assert_same_weight(loaded["q"], state_dict["q"])


def test_torch_checkpoint_with_another_format_version_is_refused(monkeypatch):
    buffer = io.BytesIO()
    monkeypatch.setattr(portable, "FORMAT_VERSION", 2)
    torch.save({"w": WEIGHTS["int8-bf16"]()}, buffer)
    monkeypatch.setattr(portable, "FORMAT_VERSION", 1)
    buffer.seek(0)
    with pytest.raises(ValueError, match=r"Int8WeightTensor of shape \(40, 24\): checkpoint format version 2"):
        torch.load(buffer, weights_only=True)


def test_torch_checkpoint_with_misshapen_inner_tensor_is_refused(monkeypatch):
    weight = WEIGHTS["int4-bf16-g32"]()
    state = portable.portable_state(weight)
    state["tensors"]["packed"] = state["tensors"]["packed"][:64]
    monkeypatch.setattr(portable, "portable_state", lambda w: state)
    buffer = io.BytesIO()
    torch.save({"w": weight}, buffer)
    buffer.seek(0)
    with pytest.raises(ValueError, match=r"inner tensor 'packed' must be \(80, 64\) torch.uint8, got \(64, 64\)"):
        torch.load(buffer, weights_only=True)


def _flat():
    return flatten_state_dict({"l.weight": WEIGHTS["int4-bf16-g32"](), "l.bias": torch.zeros(80)})


def _edit_entry(metadata, **changes):
    entries = json.loads(metadata["unwrap_quantized"])
    entries["l.weight"].update(changes)
    return {**metadata, "unwrap_quantized": json.dumps(entries)}


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda t, m: (t, {**m, "unwrap_format_version": "2"}), "format version 2, this version of unwrap reads 1"),
        (lambda t, m: (t, {**m, "unwrap_quantized": "{not json"}), "'unwrap_quantized' is missing or not JSON"),
        (lambda t, m: ({k: v for k, v in t.items() if k != "l.weight:scale_and_zero"}, m),
         r"'l.weight': Int4WeightTensor needs inner tensors \['packed', 'scale_and_zero'\], got \['packed'\]"),
        (lambda t, m: ({**t, "l.weight:packed": t["l.weight:packed"][:, :32]}, m),
         r"'l.weight': inner tensor 'packed' must be \(80, 64\)"),
        (lambda t, m: ({**t, "l.weight:scale_and_zero": t["l.weight:scale_and_zero"].half()}, m),
         r"'l.weight': inner tensor 'scale_and_zero' must be \(4, 80, 2\) torch.bfloat16"),
        (lambda t, m: (t, _edit_entry(m, shape=[80, 256])), r"'l.weight': inner tensor 'packed' must be \(80, 128\)"),
        (lambda t, m: (t, _edit_entry(m, type="Int3WeightTensor")), "'l.weight': unknown quantized type 'Int3WeightTensor'"),
        (lambda t, m: (t, _edit_entry(m, dtype="int8")), "'l.weight': dtype 'int8' is not one of"),
        (lambda t, m: (t, _edit_entry(m, attributes={"group_size": 32, "packing": "cpu"})),
         "'l.weight': int4 checkpoints store packing 'canonical', got 'cpu'"),
        (lambda t, m: (t, _edit_entry(m, attributes={"group_size": 48, "packing": "canonical"})),
         "'l.weight': int4 checkpoint of shape \\(80, 128\\): group_size must be one of"),
        (lambda t, m: ({**t, "l.other:packed": t["l.weight:packed"]}, m), r"\['l.other:packed'\] look like inner tensors"),
    ],
)  # fmt: skip
def test_corrupt_safetensors_content_raises_naming_the_key(corrupt, message):
    tensors, metadata = corrupt(*_flat())
    with pytest.raises(ValueError, match=message):
        unflatten_state_dict(tensors, metadata)


@pytest.mark.parametrize(
    "saved_config, message",
    [
        (Int8WeightOnlyConfig(), r'parameter named "0.weight".*cannot copy a Int8WeightTensor into a Int4WeightTensor'),
        (Int4WeightOnlyConfig(group_size=32), r'parameter named "0.weight".*quantization settings differ'),
        (None, r'parameter named "0.weight".*cannot copy a Tensor into a Int4WeightTensor'),
    ],
)
def test_loading_a_mismatched_format_into_a_model_names_the_key(saved_config, message):
    saved = nn.Sequential(nn.Linear(64, 32)).to(torch.bfloat16)
    if saved_config is not None:
        quantize_(saved, saved_config)
    model = quantize_(nn.Sequential(nn.Linear(64, 32)).to(torch.bfloat16), Int4WeightOnlyConfig(group_size=64))
    with pytest.raises(RuntimeError, match=message):
        model.load_state_dict(torch_round_trip(saved.state_dict()))


def test_flatten_rejects_non_tensors_and_reserved_keys():
    with pytest.raises(TypeError, match=r"state_dict\['step'\] must be a tensor, got int"):
        flatten_state_dict({"step": 3})
    with pytest.raises(ValueError, match="'a:b' contains ':'"):
        flatten_state_dict({"a:b": torch.zeros(1)})
