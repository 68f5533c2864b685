"""Tensor parallel: quantized weights as DTensor shards (``subclasses.runtime.tensor_parallel``).

The cuts run in this process; everything that needs a process group runs once, in 2 spawned ranks
joined with gloo on CPU (``perf.tp.run_ranks``, bounded by a timeout), and the tests below check
what the ranks report.
"""

import copy
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from subclasses import (
    Int4WeightOnlyConfig,
    Int8DynamicActivationInt8WeightConfig,
    Int8WeightOnlyConfig,
    QuantizedWeight,
    quantize_,
)
from subclasses.runtime.tensor_parallel import (
    TransposedWeight,
    check_plan,
    local_weight,
    local_weight_bytes,
    parallelize,
)
from tests.conftest import QWEN2_ONE_LAYER, sqnr

CONFIGS = {
    "int4": Int4WeightOnlyConfig(group_size=64),
    "int8": Int8WeightOnlyConfig(),
    "int8-dyn": Int8DynamicActivationInt8WeightConfig(),
}
WORLD = 2
TOKENS = 12


def quantized(weight: torch.Tensor, fmt: str) -> QuantizedWeight:
    return CONFIGS[fmt].quantize(weight)


# --- cuts, in this process -------------------------------------------------------------------


@pytest.mark.parametrize("fmt", sorted(CONFIGS))
@pytest.mark.parametrize("dim, start, length", [(0, 0, 48), (0, 48, 32), (0, 16, 64), (1, 64, 128), (1, 0, 192)])
def test_a_cut_is_the_cut_of_the_dequantized_weight(fmt, dim, start, length):
    weight = quantized(torch.randn(96, 256, dtype=torch.bfloat16), fmt)
    piece = weight.narrow(dim, start, length)
    assert type(piece) is type(weight) and piece.shape == weight.dequantize().narrow(dim, start, length).shape
    assert torch.equal(piece.dequantize(), weight.dequantize().narrow(dim, start, length))
    chunks = torch.chunk(weight, 2, dim=dim)  # what DTensor's Shard does
    assert torch.equal(torch.cat([c.dequantize() for c in chunks], dim), weight.dequantize())


def test_int4_cuts_keep_whole_groups_and_kernel_rows():
    weight = quantized(torch.randn(64, 192, dtype=torch.bfloat16), "int4")  # group 64
    with pytest.raises(ValueError, match=r"shape \(64, 192\) at in_features \[0, 96\).*group_size=64"):
        weight.narrow(1, 0, 96)
    with pytest.raises(ValueError, match=r"out_features \[0, 24\).*multiple of 16"):
        weight.narrow(0, 0, 24)
    with pytest.raises(ValueError, match="step 1 only"):
        weight[::2]


def test_copy_into_a_cut_raises_instead_of_being_lost():
    weight = quantized(torch.randn(64, 128, dtype=torch.bfloat16), "int8")
    source = quantized(torch.randn(32, 128, dtype=torch.bfloat16), "int8")
    with pytest.raises(ValueError, match="cannot copy into a cut"):
        weight[:32].detach().copy_(source)  # what a distributed checkpoint at another TP degree does
    piece = weight[:32].clone()  # a shard of its own (DTensor clones its chunk): a weight like any other
    piece.copy_(source)
    assert torch.equal(piece.dequantize(), source.dequantize())


def test_check_plan_names_the_layer_and_sizes():
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    model = nn.Sequential(nn.Linear(192, 64), nn.Linear(64, 192)).bfloat16()
    quantize_(model, CONFIGS["int4"])
    check_plan(model, {"0": ColwiseParallel(), "1": ColwiseParallel()}, WORLD)  # 32 and 96 rows: fine
    with pytest.raises(
        ValueError, match=r"^0 \(RowwiseParallel over 2 ranks\): .*\(64, 192\) at in_features \[0, 96\)"
    ):
        check_plan(model, {"0": RowwiseParallel()}, WORLD)
    with pytest.raises(
        ValueError, match=r"^1 \(ColwiseParallel over 8 ranks\): .*\(192, 64\) at out_features \[0, 24\)"
    ):
        check_plan(model, {"1": ColwiseParallel()}, 8)


@pytest.mark.parametrize("fmt", sorted(CONFIGS))
def test_transposed_weight_multiplies_with_the_format_kernel(fmt):
    weight = quantized(torch.randn(64, 128, dtype=torch.bfloat16), fmt)
    x, bias = torch.randn(3, 128, dtype=torch.bfloat16), torch.randn(64, dtype=torch.bfloat16)
    wt = weight.t()
    assert type(wt) is TransposedWeight and wt.shape == (128, 64)
    assert type(wt.t()) is type(weight) and torch.equal(wt.t().dequantize(), weight.dequantize())
    assert torch.equal(torch.mm(x, wt), F.linear(x, weight))
    assert torch.equal(torch.addmm(bias, x, wt), F.linear(x, weight) + bias)
    assert torch.equal(torch.matmul(x, wt), F.linear(x, weight))
    with pytest.raises(NotImplementedError, match="TransposedWeight does not implement aten.add"):
        wt + 1
    with pytest.raises(NotImplementedError, match="only x @ w.t()"):
        torch.mm(wt, torch.randn(64, 3, dtype=torch.bfloat16))


# --- 2 ranks, gloo ---------------------------------------------------------------------------


def _plan():
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    return {"0": ColwiseParallel(), "1": RowwiseParallel()}


def _inner(named: dict) -> dict:
    """The inner tensors of each quantized local shard, by name."""
    return {
        name: [t.clone() for t in local_weight(p).inner_tensors()]
        for name, p in named.items()
        if isinstance(local_weight(p), QuantizedWeight)
    }


def _layers_checks(mesh) -> dict:
    """Per format: quantize-then-shard vs shard-then-quantize local tensors, the sharded output's
    SQNR against the unsharded quantized model, and the bytes per rank."""
    from torch.distributed.tensor.parallel import parallelize_module

    out = {}
    for fmt, config in CONFIGS.items():
        torch.manual_seed(0)  # the same model on every rank
        layers = nn.Sequential(nn.Linear(256, 512), nn.Linear(512, 256)).bfloat16()
        x = torch.randn(2, 3, 256, dtype=torch.bfloat16)
        first = quantize_(copy.deepcopy(layers), config)
        with torch.inference_mode():
            ref = first(x)
        full_bytes = local_weight_bytes(first)
        parallelize(first, mesh, _plan())
        later = parallelize_module(copy.deepcopy(layers), mesh, _plan())  # bf16, scattered from rank 0
        quantize_(later, config)
        a, b = _inner(dict(first.named_parameters())), _inner(dict(later.named_parameters()))
        with torch.inference_mode():
            y = first(x)
        out[fmt] = dict(
            same_local=list(a) == list(b) == ["0.weight", "1.weight"]
            and all(torch.equal(s, t) for k in a for s, t in zip(a[k], b[k])),
            sqnr=sqnr(ref, y),
            bytes=(local_weight_bytes(first), full_bytes),
        )
    # parallelize_module's default (src_data_rank=0) would scatter the quantized weight
    model = quantize_(nn.Sequential(nn.Linear(256, 512)).bfloat16(), CONFIGS["int4"])
    try:
        parallelize_module(model, mesh, {"0": _plan()["0"]})
        out["scatter_error"] = None
    except NotImplementedError as error:
        out["scatter_error"] = str(error)
    return out


def _qwen2_checks(mesh, checkpoint_dir: str) -> dict:
    """The tiny Qwen2, int4: TP=1 vs TP=2 (eager; unwrapped and compiled), bytes, checkpoints."""
    import torch.distributed.checkpoint as dcp

    from perf.qwen import Decoder, build_qwen2
    from perf.tp import qwen2_tp_plan
    from unwrap import unwrap

    def model(seed: int) -> nn.Module:
        return quantize_(build_qwen2(QWEN2_ONE_LAYER, seed=seed), Int4WeightOnlyConfig())

    prompt = torch.randint(0, QWEN2_ONE_LAYER["vocab_size"], (1, 32), generator=torch.Generator().manual_seed(1))
    tp1 = model(0)
    with torch.inference_mode():
        logits1 = tp1(prompt).logits
    # the tied vocabulary matrix is quantized too, and the plan replicates it on every rank
    vocab = sum(t.numel() * t.element_size() for t in tp1.model.embed_tokens.weight.inner_tensors())
    out = dict(tokens1=Decoder(tp1).generate(TOKENS), full_bytes=local_weight_bytes(tp1) - vocab, vocab=vocab)
    tp2 = parallelize(tp1, mesh, qwen2_tp_plan())
    out["bytes"] = local_weight_bytes(tp2) - vocab
    with torch.inference_mode():
        logits2 = tp2(prompt).logits
    # argmax where it is decided: random weights give bf16 logits with exact ties, and TP's other order
    # of the partial sums may break a tie or a near-tie the other way
    top2 = logits1.float().topk(2, dim=-1).values
    decided = top2[..., 0] - top2[..., 1] > 2 * (logits1.float() - logits2.float()).abs().amax(-1)
    out.update(
        tokens2=Decoder(tp2).generate(TOKENS),
        sqnr=sqnr(logits1, logits2),
        argmax_same=torch.equal(logits1.argmax(-1)[decided], logits2.argmax(-1)[decided]),
        argmax_decided=int(decided.sum()),
    )
    keys = list(tp2.state_dict())
    dcp.save(tp2.state_dict(), checkpoint_id=checkpoint_dir)
    saved = _inner(tp2.state_dict())

    unwrap(tp2)
    out["same_keys"] = list(tp2.state_dict()) == keys
    out["bytes_unwrapped"] = local_weight_bytes(tp2) - vocab
    out["plain"] = sorted({type(p).__name__ for p in tp2.parameters()})
    out["plain_names"] = [n for n, _ in tp2.model.layers[0].self_attn.q_proj.named_parameters()]
    out["tokens2_compiled"] = Decoder(tp2, torch.compile(tp2, fullgraph=True)).generate(TOKENS)

    fresh = unwrap(parallelize(model(1), mesh, qwen2_tp_plan()))  # other weights, then the checkpoint
    state = fresh.state_dict()
    dcp.load(state, checkpoint_id=checkpoint_dir)
    fresh.load_state_dict(state)
    loaded = _inner(fresh.state_dict())
    out["loaded"] = list(loaded) == list(saved) and all(
        torch.equal(s, t) for k in saved for s, t in zip(saved[k], loaded[k])
    )
    out["loaded_tokens"] = Decoder(fresh).generate(TOKENS)
    return out


def _rank_checks(rank: int, world_size: int, checkpoint_dir: str) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    warnings.simplefilter("ignore")
    mesh = init_device_mesh("cpu", (world_size,))
    return dict(layers=_layers_checks(mesh), qwen2=_qwen2_checks(mesh, checkpoint_dir))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """What each of the 2 ranks reports (one process group for every test below)."""
    if os.environ.get("CI") == "true":
        import transformers  # noqa: F401  (CI installs the 'hf' extra: missing is a failure there)
    else:
        pytest.importorskip("transformers", reason="the 'hf' extra (make test installs it)")
    from perf.tp import run_ranks

    return run_ranks(_rank_checks, WORLD, str(tmp_path_factory.mktemp("dcp")), timeout=600)


@pytest.mark.parametrize("fmt", sorted(CONFIGS))
def test_shard_then_quantize_equals_quantize_then_shard(ranks, fmt):
    for rank in ranks:
        result = rank["layers"][fmt]
        assert result["same_local"]
        assert result["sqnr"] > 35, result  # bf16 rounding of the two partial sums only
        local, full = result["bytes"]
        # int8 cut by input features (rowwise) keeps the whole per-output-channel scale on every
        # rank: 256 bf16 values; everything else is cut in halves
        assert local * WORLD == full + (256 * 2 if fmt.startswith("int8") else 0)


def test_parallelize_module_default_scatter_says_what_to_do(ranks):
    for rank in ranks:
        assert "src_data_rank=None" in rank["layers"]["scatter_error"]


def test_qwen2_tp2_generates_the_tp1_tokens_eager_and_compiled(ranks):
    for rank in ranks:
        q = rank["qwen2"]
        assert q["tokens2"] == q["tokens1"]
        assert q["tokens2_compiled"] == q["tokens1"]
        assert q["argmax_same"] and q["argmax_decided"] >= 16 and q["sqnr"] > 30, (q["argmax_decided"], q["sqnr"])
    assert ranks[0]["qwen2"]["tokens2"] == ranks[1]["qwen2"]["tokens2"]


def test_qwen2_each_rank_holds_half_the_quantized_bytes(ranks):
    """Half of the sharded layers' quantized bytes; the replicated (quantized) vocabulary matrix whole."""
    for rank in ranks:
        assert rank["qwen2"]["vocab"] > 0
        assert rank["qwen2"]["bytes"] * WORLD == rank["qwen2"]["full_bytes"] == rank["qwen2"]["bytes_unwrapped"] * WORLD


def test_qwen2_unwrapped_tp_registers_plain_local_tensors(ranks):
    q = ranks[0]["qwen2"]
    assert q["plain"] == ["Parameter"] and q["same_keys"]
    assert q["plain_names"] == [
        "weight___local_tensor__packed",
        "weight___local_tensor__scale_and_zero",
        "bias___local_tensor",
    ]


def test_distributed_checkpoint_saves_and_loads_the_shards(ranks):
    for rank in ranks:
        assert rank["qwen2"]["loaded"]
        assert rank["qwen2"]["loaded_tokens"] == rank["qwen2"]["tokens1"]


# --- the report (python -m perf --tp N) --------------------------------------------------------


def test_tp_report_table_and_cli(monkeypatch, capsys):
    import perf.tp
    from perf.__main__ import parse_args

    rows = [
        dict(
            variant="int4",
            bytes={1: 4 * 2**20, 2: 3 * 2**20},
            ms={"1 eager": 9.0, "1 compiled": 2.0, "2 eager": 30.0, "2 compiled": 3.0},
        )
    ]
    monkeypatch.setattr(perf.tp, "run_ranks", lambda fn, world, *args, timeout: [rows, rows])
    table = perf.tp.tp_report(2, ["Qwen2 tiny"], ["int4"], threads=2, quick=True, progress=lambda _: None)
    assert "| int4 | 9.00 | 2.00 | 30.00 | 3.00 | 1.50 | 4.0 / 3.0 |" in table
    assert "TP=1 runs alone with 2 thread(s), TP=2 with 1 per rank" in table
    for argv, message in ((["--tp", "1"], "at least 2"), (["--tp", "2", "--json", "x"], "own tables")):
        with pytest.raises(SystemExit):
            parse_args(argv)
        assert message in capsys.readouterr().err
