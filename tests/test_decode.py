"""subclasses.decode: the grouped-KV decode attention (exact against transformers' SDPA), the compiled
decode step with fewer guards, greedy tokens equal to eager's, and perf.decode_profile's breakdown."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.conftest import QWEN2_ONE_LAYER, sqnr
from tests.optional import import_or_fail_in_ci
from tests.subclasses.test_int4_gemv import require_kernel

import_or_fail_in_ci("transformers", "hf")

import transformers  # noqa: E402

from perf.decode_profile import Breakdown, build_model, categorize, format_table, measure  # noqa: E402
from perf.qwen import build_qwen2  # noqa: E402
from subclasses import Int4WeightOnlyConfig, quantize_  # noqa: E402
from subclasses.decode import (  # noqa: E402
    ATTENTION,
    FrozenStep,
    GreedyDecoder,
    compile_decode_step,
    compile_for_decode,
    frozen_model_guards,
    gqa_sdpa_attention,
    step_tokens,
    use_gqa_decode_attention,
)
from subclasses.runtime import packaged_step  # noqa: E402
from subclasses.runtime.caches import allocated_static_cache, cache_keyword  # noqa: E402
from subclasses.runtime.packaged_step import Package, PackagedStep  # noqa: E402
from unwrap import unwrap  # noqa: E402

# The keyword this transformers' forward takes its cache by ("cache" from 5.25, "past_key_values" before).
CACHE = cache_keyword(transformers.Qwen2ForCausalLM)


class Heads(torch.nn.Module):
    num_key_value_groups = 3
    is_causal = True


def qkv(q_len: int, length: int = 40, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """bf16 query [1, 9, q_len, 64], key/value [1, 3, length, 64] and a static cache's bool mask
    (the first 17 + q_len slots visible)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 9, q_len, 64, generator=g).bfloat16()
    k, v = (torch.randn(1, 3, length, 64, generator=g).bfloat16() for _ in range(2))
    mask = (torch.arange(length) < 17 + q_len).view(1, 1, 1, length).expand(1, 1, q_len, length)
    return q, k, v, mask


def test_prompt_attention_is_transformers_sdpa_in_eager():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q, k, v, mask = qkv(5)
    ours, _ = gqa_sdpa_attention(Heads(), q, k, v, mask, scaling=0.125)
    theirs, _ = sdpa_attention_forward(Heads(), q, k, v, mask, scaling=0.125)
    assert ours.shape == (1, 5, 9, 64)
    assert torch.equal(ours, theirs)


def test_one_token_attention_reads_only_the_filled_slots():
    """A one-token query runs unwrap_cpu::decode_attention: the cache's unfilled slots (NaN here)
    are never read, and the result is transformers' SDPA over the filled ones to bf16 rounding."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    require_kernel()
    q, k, v, mask = qkv(1)  # 18 of 40 slots visible
    theirs, _ = sdpa_attention_forward(Heads(), q, k, v, mask, scaling=0.125)
    k[:, :, 18:], v[:, :, 18:] = float("nan"), float("nan")
    ours, _ = gqa_sdpa_attention(Heads(), q, k, v, mask, scaling=0.125)
    assert ours.shape == (1, 1, 9, 64) and not ours.isnan().any()
    assert sqnr(theirs, ours) > 45


def test_attention_compiled_keeps_the_shortcut_and_its_numbers():
    """Compiled, transformers' SDPA expands K/V to every head; ours keeps eager's grouped form (or
    the decode kernel): its graph has no expansion, and Inductor's result equals our eager one's."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q, k, v, mask = qkv(1)
    eager, _ = gqa_sdpa_attention(Heads(), q, k, v, mask, scaling=0.125)
    codes = {}

    def capture(name):
        def backend(gm, inputs):
            codes[name] = gm.code
            return gm.forward

        return backend

    for name, attention in (("ours", gqa_sdpa_attention), ("theirs", sdpa_attention_forward)):
        torch.compile(lambda *a, f=attention: f(Heads(), *a, scaling=0.125)[0], backend=capture(name), fullgraph=True)(
            q, k, v, mask
        )
    assert "expand" in codes["theirs"]
    assert "expand" not in codes["ours"] and "repeat" not in codes["ours"], codes["ours"]
    compiled = torch.compile(lambda *a: gqa_sdpa_attention(Heads(), *a, scaling=0.125)[0], fullgraph=True)(
        q, k, v, mask
    )
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


@pytest.fixture(scope="module")
def tiny():
    """Qwen2 tiny widths, one layer, int4 default config, unwrapped."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    model = unwrap(quantize_(build_qwen2(QWEN2_ONE_LAYER), Int4WeightOnlyConfig()))
    yield model
    torch.set_num_threads(threads)


def test_compile_for_decode_tokens_equal_eager_and_transformers_generate(tiny):
    prompt = torch.tensor([[5, 17, 99, 3, 250]])
    reference = tiny.generate(prompt, max_new_tokens=6, do_sample=False)
    eager = GreedyDecoder(tiny, max_len=16).generate(prompt, 6)
    model = copy.deepcopy(tiny)
    decoder = compile_for_decode(model, max_len=16)
    assert model.config._attn_implementation == ATTENTION
    compiled = decoder.generate(prompt, 6)
    assert eager.tolist() == reference.tolist()
    assert compiled.tolist() == eager.tolist()
    assert decoder.generate(prompt, 6).tolist() == compiled.tolist()  # reset between generations
    assert isinstance(decoder.step.packages[(1, 16)], Package)  # the steps ran as the package


def test_compile_for_decode_with_the_python_wrapper_gives_the_same_tokens(tiny):
    """The step's faster-to-compile variant (docs/decoding.md): Inductor's Python wrapper instead of the
    default C++ one."""
    prompt = torch.tensor([[5, 17, 99, 3, 250]])
    eager = GreedyDecoder(tiny, max_len=16).generate(prompt, 6)
    decoder = compile_for_decode(copy.deepcopy(tiny), max_len=16, packaged=False, options={"cpp_wrapper": False})
    assert decoder.generate(prompt, 6).tolist() == eager.tolist()


def test_decode_step_skips_module_guards_and_stays_per_model(tiny):
    """Fewer guards with the model's and the globals' skipped (those on the inputs and the cache kept);
    two models of one class compiled side by side each run their own weights (each step has its own code
    object, so no cache entry is shared)."""
    from transformers import StaticCache

    other = unwrap(quantize_(build_qwen2(QWEN2_ONE_LAYER, seed=1), Int4WeightOnlyConfig()))
    counts: dict[bool, list[int]] = {True: [], False: []}
    kept: list[str] = []

    def counting(skip: bool):
        def keep(entries):
            flags = frozen_model_guards(entries) if skip else [True] * len(entries)
            counts[skip].append(sum(flags))
            if skip:
                kept.extend(f"{entry.name} {entry.guard_type}" for entry, flag in zip(entries, flags) if flag)
            return flags

        return keep

    token, logits = torch.tensor([[7]]), {}
    for name, model, skip in (("a", tiny, True), ("b", other, True), ("a, all guards", tiny, False)):
        # Dynamo installs and filters the guards; Inductor's code is not what this checks
        options = {"guard_filter_fn": counting(skip)}
        step = compile_decode_step(model, skip_module_guards=False, options=options, backend="eager")
        with torch.inference_mode():
            cache = StaticCache(config=model.config, max_cache_len=8)
            logits[name] = step(token, **{CACHE: cache}, cache_position=torch.tensor([0]), logits_to_keep=1).logits
            cache = StaticCache(config=model.config, max_cache_len=8)
            eager = model(token, **{CACHE: cache}, cache_position=torch.tensor([0]), logits_to_keep=1).logits
        assert sqnr(eager, logits[name]) > 30, name
    assert not torch.equal(logits["a"], logits["b"])
    assert len(counts[True]) == 2 and max(counts[True]) < 0.5 * counts[False][0], counts
    assert not [name for name in kept if name.startswith("G[")]
    assert "args[0] TENSOR_MATCH" in kept and any(name.startswith(f"kwargs['{CACHE}']") for name in kept), kept


def step_output(step, cache, token: int, position: int):
    """What one step returns called as the decoders call it: ``token`` at cache slot ``position``."""
    with torch.inference_mode():
        return step(
            torch.tensor([[token]]),
            **{CACHE: cache},
            use_cache=True,
            cache_position=torch.tensor([position]),
            logits_to_keep=1,
        )


def one_token(step, cache, token: int, position: int) -> torch.Tensor:
    """The logits of ``step_output``."""
    return step_output(step, cache, token, position).logits


def test_frozen_step_equals_the_unfrozen_one(tiny):
    """freeze=True (the default: the weights are constants of the graph) changes speed, not numbers: the same
    tokens, and the next step's logits bit for bit. (The frozen step is the one the first test here compiles,
    the same model and calls: Inductor's cache has it.)"""
    prompt, new, token, tokens, logits = torch.tensor([[5, 17, 99, 3, 250]]), 6, 7, {}, {}
    for freeze in (True, False):
        decoder = compile_for_decode(copy.deepcopy(tiny), max_len=16, packaged=False, freeze=freeze)
        assert isinstance(decoder.step, FrozenStep) == freeze
        tokens[freeze] = decoder.generate(prompt, new)
        # the slot after the generation, through the same trace
        logits[freeze] = one_token(decoder.step, decoder.cache, token, prompt.shape[1] + new)
    assert tokens[True].tolist() == tokens[False].tolist()
    assert torch.equal(logits[True], logits[False])
    assert not torch._inductor.config.freezing  # set around the call only


def test_decoder_rejects_bad_input(tiny):
    with pytest.raises(ValueError, match="max_len .* at least 2, got 1"):
        GreedyDecoder(tiny, max_len=1)
    decoder = GreedyDecoder(tiny, max_len=8)
    with pytest.raises(ValueError, match=r"prompt \(5\) \+ max_new_tokens \(4\) exceeds the cache's max_len \(8\)"):
        decoder.generate(torch.ones(1, 5, dtype=torch.long), 4)
    with pytest.raises(ValueError, match=r"batch 1\), got shape \(2, 3\)"):
        decoder.generate(torch.ones(2, 3, dtype=torch.long), 1)
    eager_model = copy.deepcopy(tiny)
    eager_model.set_attn_implementation("eager")
    with pytest.raises(ValueError, match="replaces 'sdpa'; this model uses 'eager'"):
        use_gqa_decode_attention(eager_model)


def test_eos_stops_generation(tiny):
    prompt = torch.tensor([[5, 17, 99]])
    full = GreedyDecoder(tiny, max_len=16).generate(prompt, 6)
    eos = int(full[0, 4])  # the second generated token
    stopped = GreedyDecoder(tiny, max_len=16).generate(prompt, 6, eos_token_id=eos)
    assert stopped.tolist() == full[:, : full[0].tolist().index(eos, 3) + 1].tolist()


def test_profile_splits_the_token(tiny):
    rows = measure(tiny, ["eager", "decode"], max_len=32, rounds=1, tokens=2, profile_rounds=1)
    eager, decode = rows
    for row in rows:
        assert row.total > 0 and row.profiled > 0 and row.cpu > 0
        assert row.parts["GEMVs"] > 0 and row.parts["lm_head"] > 0 and row.parts["attention"] > 0
    # no Dynamo frame runs per token in either: eager, and decode's package (guards are counted by the
    # other modes, e.g. decode+dynamo; categorize's test checks the guard events are found)
    for row in rows:
        assert row.parts["guards"] == 0 and row.guard_count is None
    table = format_table("tiny", rows)
    assert "| eager |" in table and "| decode |" in table and "CPU time" in table and "guard count" in table


def test_categorize_counts_outermost_events_and_finds_the_lm_head():
    class Event:
        def __init__(self, name, us, shapes=(), parent=None):
            self.name, self.cpu_time_total, self.input_shapes, self.cpu_parent = name, us, list(shapes), parent

    linear = Event("aten::linear", 300, [[1, 64], [128, 64]])
    events = [
        linear,
        Event("aten::mm", 290, [[1, 64], [64, 128]], linear),
        Event("aten::_weight_int4pack_mm_for_cpu", 1000, [[1, 64], [4096, 32], [], [2, 4096, 2]]),
        Event("aten::scaled_dot_product_attention", 50),
        Event("TorchDynamo Cache Lookup", 20),
    ]
    parts = categorize(events, vocab_size=4096)
    assert parts == {"GEMVs": 0.3, "lm_head": 1.0, "attention": 0.05, "guards": 0.02}
    row = Breakdown("eager", total=2.0, profiled=1.5, parts=parts)
    assert row.rest == pytest.approx(1.5 - 1.37)


def test_build_model_rejects_unknown_names():
    with pytest.raises(ValueError, match="model must be one of .* got 'llama'"):
        build_model("llama", "int4")
    with pytest.raises(ValueError, match="format must be one of .* got 'int3'"):
        build_model("qwen2-tiny", "int3")


def test_fused_projections_change_nothing_but_the_calls(tiny):
    """q/k/v and gate/up as one int4 GEMV each at one token: logits equal the separate linears'
    exactly (Qwen2 has q/k/v biases), prefill unchanged, state_dict unchanged, 2 fused calls per layer."""
    from torch.profiler import profile
    from transformers import StaticCache

    from subclasses.runtime.decode_fusion import fuse_decode_projections

    require_kernel()
    fused = copy.deepcopy(tiny)
    assert fuse_decode_projections(fused) == 2 * tiny.config.num_hidden_layers
    assert fused.state_dict().keys() == tiny.state_dict().keys()  # nothing added (a fused copy would be)

    def run(model, ids, start):
        cache = StaticCache(config=model.config, max_cache_len=16)
        logits = []
        with torch.inference_mode():
            for chunk in (ids[:, :start], *ids[:, start:].split(1, dim=1)):
                position = torch.arange(
                    sum(x.shape[1] for x in logits), sum(x.shape[1] for x in logits) + chunk.shape[1]
                )
                logits.append(model(chunk, **{CACHE: cache}, cache_position=position).logits)
        return torch.cat(logits, dim=1)

    ids = torch.tensor([[5, 17, 99, 3, 250, 8, 1]])
    assert torch.equal(run(fused, ids, 4), run(tiny, ids, 4))
    with profile() as prof, torch.inference_mode():
        fused(
            ids[:, :1],
            **{CACHE: StaticCache(config=fused.config, max_cache_len=4)},
            cache_position=torch.tensor([0]),
        )
    calls = [e.name for e in prof.events()]
    assert calls.count("unwrap_cpu::int4_gemv_cat") == 2 * tiny.config.num_hidden_layers


def test_packaged_step_computes_what_the_compiled_step_computes(tiny):
    """The package is the compiled step's model, graph and kernels, exported and compiled by AOTInductor
    with the same options: equal logits bit for bit, position by position, each into its own cache; and
    the package writes the caller's cache in place, as the compiled step writes its own."""
    decoder = compile_for_decode(copy.deepcopy(tiny), max_len=16)
    packaged, compiled = decoder.step, decoder.step.fallback
    assert isinstance(packaged, PackagedStep)
    with torch.inference_mode():  # inference tensors, as a decoder's own caches
        caches = {name: allocated_static_cache(decoder.model, 16) for name in ("packaged", "compiled")}
    for position, token in enumerate([5, 17, 99, 3, 250, 7]):
        ours = step_output(packaged, caches["packaged"], token, position)
        theirs = step_output(compiled, caches["compiled"], token, position)
        assert torch.equal(ours.logits, theirs.logits), position
        # the greedy tokens the package computes with its logits are their argmax, as decoders pick it
        assert torch.equal(ours.greedy_tokens, ours.logits[:, -1].float().argmax(-1, keepdim=True)), position
        assert torch.equal(step_tokens(ours), step_tokens(theirs)), position
    for name in ("keys", "values", "cumulative_length"):
        assert torch.equal(getattr(caches["packaged"].layers[0], name), getattr(caches["compiled"].layers[0], name))


def test_package_reads_its_weights_from_the_huge_page_copies(tiny):
    """Every constant of the package named after a parameter or buffer (the tied lm_head is the embedding's)
    is bound to the step's copy in huge pages: scaling the copy of the final norm's weight changes the
    package's logits, and restoring it gives the same logits bit for bit."""
    decoder = compile_for_decode(copy.deepcopy(tiny), max_len=16)
    step = decoder.step
    with torch.inference_mode():
        cache = allocated_static_cache(decoder.model, 16)
    before = one_token(step, cache, 5, 0)
    package = step.packages[(1, 16)]
    named = {name for name in package.runner.get_constant_fqns() if name.startswith("model.")}
    weights = {f"model.{name}" for name, _ in decoder.model.named_parameters()}  # the tied lm_head left out
    assert weights <= named <= set(step.huge_page_weights)
    norm = step.huge_page_weights["model.model.norm.weight"]
    original = norm.clone()
    with torch.inference_mode():
        norm.mul_(2)
        changed = one_token(step, cache, 5, 0)
        norm.copy_(original)
        after = one_token(step, cache, 5, 0)
    assert not torch.equal(changed, before) and torch.equal(after, before)


def test_a_model_not_unwrapped_gets_its_package_too():
    """Quantized weights left as tensor subclasses (no ``unwrap``): the package is built (its plain tensors
    in huge pages, the subclasses' inner tensors its own copies) and greedy tokens equal eager's."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model = quantize_(build_qwen2(QWEN2_ONE_LAYER), Int4WeightOnlyConfig())
        prompt = torch.tensor([[5, 17, 99, 3, 250]])
        eager = GreedyDecoder(model, max_len=16).generate(prompt, 6)
        decoder = compile_for_decode(model, max_len=16)
        assert decoder.generate(prompt, 6).tolist() == eager.tolist()
        assert decoder.step.packages[(1, 16)] is not None
        assert decoder.step.huge_page_weights  # the norms and biases
    finally:
        torch.set_num_threads(threads)


def test_huge_page_copies_equal_their_tensors():
    """in_huge_pages: same names, values, dtypes and shapes, contiguous, each on a 64-byte line, the first
    on a 2 MB page; a 0-d, an empty and a bool tensor included."""
    from subclasses.runtime.huge_pages import PAGE, in_huge_pages

    g = torch.Generator().manual_seed(0)
    tensors = {
        "packed": torch.randint(0, 256, (48, 40), generator=g, dtype=torch.uint8),
        "scale": torch.randn(3, 5, 2, generator=g).bfloat16(),
        "step": torch.tensor(7),
        "empty": torch.empty(0, 4),
        "mask": torch.rand(7, generator=g) > 0.5,
    }
    copies = in_huge_pages(tensors)
    if copies is None:
        pytest.skip("no MADV_HUGEPAGE on this platform")
    assert copies.keys() == tensors.keys()
    for name, tensor in tensors.items():
        copy_ = copies[name]
        assert copy_.dtype == tensor.dtype and copy_.shape == tensor.shape and copy_.is_contiguous()
        assert torch.equal(copy_, tensor)
        if tensor.numel():  # an empty tensor has no address
            assert copy_.data_ptr() != tensor.data_ptr() and copy_.data_ptr() % 64 == 0
    assert copies["packed"].data_ptr() % PAGE == 0
    assert in_huge_pages({}) is None


def test_huge_page_copies_are_none_where_the_kernel_refuses_the_advice(monkeypatch):
    """madvise failing (a kernel without THP), or no MADV_HUGEPAGE (not Linux): None (PackagedStep then binds
    nothing and the package reads its own weights)."""
    import mmap
    import types

    from subclasses.runtime import huge_pages

    class Refusing:
        def __init__(self, *args: object, **kwargs: object) -> None:
            pass

        def madvise(self, advice: int) -> None:
            raise OSError(22, "Invalid argument")

        def close(self) -> None:
            pass

    names = {name: getattr(mmap, name) for name in ("MAP_PRIVATE", "MAP_ANONYMOUS") if hasattr(mmap, name)}
    monkeypatch.setattr(huge_pages, "mmap", types.SimpleNamespace(**names, MADV_HUGEPAGE=14, mmap=Refusing))
    assert huge_pages.in_huge_pages({"w": torch.ones(4)}) is None
    monkeypatch.setattr(huge_pages, "mmap", types.SimpleNamespace(**names, mmap=Refusing))
    assert huge_pages.in_huge_pages({"w": torch.ones(4)}) is None


def test_packaged_step_follows_the_cache_it_is_given_and_falls_back_for_the_rest(tiny, caplog, monkeypatch):
    """Two decoders of one step (one package, bound to each cache in turn) give eager's tokens; calls a
    package cannot answer (grad on, a mask) and a model that does not export run the compiled step."""
    prompt = torch.tensor([[5, 17, 99, 3, 250]])
    eager = GreedyDecoder(tiny, max_len=16).generate(prompt, 6)
    decoder = compile_for_decode(copy.deepcopy(tiny), max_len=16)
    other = GreedyDecoder(decoder.model, 16, decoder.step)
    for _ in range(2):
        assert decoder.generate(prompt, 6).tolist() == eager.tolist()
        assert (
            other.generate(prompt[:, :3], 8).tolist()
            == GreedyDecoder(tiny, max_len=16).generate(prompt[:, :3], 8).tolist()
        )
    assert list(decoder.step.packages) == [(1, 16)]

    step = decoder.step
    calls = []
    step.fallback = lambda *args, **kwargs: calls.append(kwargs) or "compiled"
    cache = decoder.cache
    assert one_token(step, cache, 7, 8) is not None and not calls
    with torch.enable_grad():
        assert (
            step(torch.tensor([[7]]), **{CACHE: cache}, cache_position=torch.tensor([8]), logits_to_keep=1)
            == "compiled"
        )
    mask = torch.ones(1, 16, dtype=torch.long)
    with torch.inference_mode():
        out = step(
            torch.tensor([[7]]),
            **{CACHE: cache},
            cache_position=torch.tensor([8]),
            logits_to_keep=1,
            attention_mask=mask,
        )
    assert out == "compiled" and len(calls) == 2

    def no_export(*args, **kwargs):
        raise RuntimeError("Unsupported: a test")

    monkeypatch.setattr(packaged_step, "build_package", no_export)
    broken = compile_for_decode(copy.deepcopy(tiny), max_len=12)
    with caplog.at_level("WARNING", logger=packaged_step.__name__):
        assert broken.generate(prompt, 6).tolist() == eager.tolist()
    assert broken.step.packages == {(1, 12): None}
    assert "does not export as an AOTInductor package (RuntimeError: Unsupported: a test)" in caplog.text
