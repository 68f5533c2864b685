"""subclasses.runtime.generate: ``model.generate(..., custom_generate=decoder)`` through the compiled
decode step: greedy tokens equal ``GreedyDecoder.generate``'s and transformers' own, seeded sampling
repeats, streamers get every token, left-padded rows equal their prompts alone, bad input raises."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from tests.conftest import tiny_llama_config
from tests.optional import import_or_fail_in_ci

import_or_fail_in_ci("transformers", "hf")

from subclasses import Int4WeightOnlyConfig, quantize_  # noqa: E402
from subclasses.decode import compile_for_decode  # noqa: E402
from subclasses.runtime.caches import allocated_static_cache, cache_keyword, given_cache  # noqa: E402
from unwrap import unwrap  # noqa: E402

PROMPT = torch.tensor([[5, 17, 99, 3, 250]])
NEW = 8
SLOTS = PROMPT.shape[1] + NEW  # every call below sizes its cache to this: one compiled trace per batch


@pytest.fixture(autouse=True)
def _seed_and_reset_dynamo():
    """Seeded as everywhere, but Dynamo is not reset between these tests: they share one compiled
    decoder (its step has a code object of its own, so no other test's traces mix with it)."""
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def models():
    """A random ``tiny_llama_config`` Llama, int4, unwrapped; eager and compiled."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    config = tiny_llama_config()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eager = unwrap(quantize_(LlamaForCausalLM(config).to(torch.bfloat16).eval(), Int4WeightOnlyConfig()))
    decoder = compile_for_decode(copy.deepcopy(eager), max_len=SLOTS)
    return eager, decoder


def test_greedy_through_generate_equals_the_decoder_and_transformers(models):
    eager, decoder = models
    reference = eager.generate(PROMPT, max_new_tokens=NEW, do_sample=False, eos_token_id=None)
    ours = decoder.generate(PROMPT, NEW)
    cache = decoder.cache_for(1, SLOTS)
    through = decoder.model.generate(
        PROMPT, max_new_tokens=NEW, do_sample=False, eos_token_id=None, custom_generate=decoder
    )
    assert ours.tolist() == reference.tolist()
    assert through.tolist() == ours.tolist() and through.dtype == torch.long
    out = decoder.model.generate(
        PROMPT,
        max_new_tokens=NEW,
        do_sample=False,
        eos_token_id=None,
        custom_generate=decoder,
        return_dict_in_generate=True,
        output_scores=True,
    )
    assert out.sequences.tolist() == ours.tolist()
    assert [int(s.argmax()) for s in out.scores] == ours[0, PROMPT.shape[1] :].tolist()
    assert decoder.cache_for(1, SLOTS) is cache and len(decoder.caches) == 1  # sized to the request, reused


def test_eos_list_stops_and_max_length_counts_the_prompt(models):
    _, decoder = models
    full = decoder.generate(PROMPT, NEW)[0].tolist()
    eos = full[PROMPT.shape[1] + 2]  # the third generated token
    stopped = decoder.model.generate(
        PROMPT, max_new_tokens=NEW, do_sample=False, eos_token_id=[511, eos], custom_generate=decoder
    )
    assert stopped[0].tolist() == full[: full.index(eos, PROMPT.shape[1]) + 1]
    short = decoder.model.generate(
        PROMPT, max_length=SLOTS, do_sample=False, eos_token_id=None, custom_generate=decoder
    )
    assert short[0].tolist() == full


def test_seeded_sampling_repeats_and_top_k_1_is_greedy(models):
    _, decoder = models
    greedy = decoder.generate(PROMPT, NEW)
    kwargs = dict(max_new_tokens=NEW, do_sample=True, eos_token_id=None, custom_generate=decoder)
    runs = []
    for _ in range(2):
        torch.manual_seed(1)
        runs.append(decoder.model.generate(PROMPT, temperature=5.0, top_p=0.99, repetition_penalty=1.3, **kwargs))
    assert runs[0].tolist() == runs[1].tolist()
    assert runs[0].tolist() != greedy.tolist()  # at temperature 5 over 512 tokens, 8 greedy draws in a row: never
    assert decoder.model.generate(PROMPT, top_k=1, **kwargs).tolist() == greedy.tolist()


def test_text_streamer_gets_the_new_tokens(models, capsys):
    from transformers import TextStreamer

    class Digits:  # what TextStreamer asks of a tokenizer
        def decode(self, ids, **kwargs):
            return "".join(f"<{i}>" for i in ids)

    _, decoder = models
    ids = decoder.model.generate(
        PROMPT,
        max_new_tokens=NEW,
        do_sample=False,
        eos_token_id=None,
        custom_generate=decoder,
        streamer=TextStreamer(Digits(), skip_prompt=True),
    )
    assert capsys.readouterr().out == "".join(f"<{i}>" for i in ids[0, PROMPT.shape[1] :].tolist()) + "\n"


def test_left_padded_batch_rows_equal_their_prompts_alone(models):
    _, decoder = models
    short = [7, 8, 9]
    batch = torch.tensor([[0, 0, *short], PROMPT[0].tolist()])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    both = decoder.model.generate(
        batch, attention_mask=mask, max_new_tokens=NEW, do_sample=False, eos_token_id=None, custom_generate=decoder
    )
    # alone, the short prompt gets 2 more new tokens: the same cache size, so the same compiled step
    alone = decoder.model.generate(
        torch.tensor([short]), max_new_tokens=NEW + 2, do_sample=False, eos_token_id=None, custom_generate=decoder
    )
    assert both[0, 2:].tolist() == alone[0, : len(short) + NEW].tolist()
    assert both[1].tolist() == decoder.generate(PROMPT, NEW)[0].tolist()


def test_a_cache_given_to_generate_ends_holding_the_decoded_tokens(models):
    """A ``StaticCache`` passed as ``cache=`` ends as the decoder's own: decoding runs in the decoder's cache of
    that size (a compiled step's frozen trace reads the cache it was traced with: another cache of the same
    shapes raises there, rather than decode from the first one's tensors) and is copied out. Two such caches
    give the same tokens as no cache, in a padded batch (the compiled step) and alone (the package)."""
    from transformers import StaticCache

    _, decoder = models
    batch = torch.tensor([[0, 0, 7, 8, 9], PROMPT[0].tolist()])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    for ids, extra in ((batch, {"attention_mask": mask}), (PROMPT, {})):
        kwargs = dict(max_new_tokens=NEW, do_sample=False, eos_token_id=None, custom_generate=decoder, **extra)
        expected = decoder.model.generate(ids, **kwargs).tolist()
        own = decoder.cache_for(ids.shape[0], SLOTS)
        for _ in range(2):
            given = StaticCache(config=decoder.model.config, max_cache_len=SLOTS)
            assert decoder.model.generate(ids, **{cache_keyword(decoder.model): given}, **kwargs).tolist() == expected
            for theirs, ours in zip(given.layers, own.layers, strict=True):
                assert torch.equal(theirs.keys, ours.keys) and torch.equal(theirs.values, ours.values)
    step = decoder.step.fallback  # the FrozenStep
    with pytest.raises(ValueError, match="traced over another cache of 13 slots"), torch.inference_mode():
        step(
            batch[:, -1:],
            **{cache_keyword(decoder.model): allocated_static_cache(decoder.model, SLOTS, batch=2)},
            use_cache=True,
            cache_position=torch.tensor([5]),
            logits_to_keep=1,
            attention_mask=torch.ones(2, SLOTS, dtype=torch.long),
            position_ids=torch.tensor([[3], [5]]),
        )


def test_batch_rows_finished_at_eos_are_padded(models):
    _, decoder = models
    batch = torch.tensor([[0, 0, 7, 8, 9], PROMPT[0].tolist()])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    kwargs = dict(attention_mask=mask, max_new_tokens=NEW, do_sample=False, custom_generate=decoder, pad_token_id=0)
    free = decoder.model.generate(batch, eos_token_id=None, **kwargs)[:, PROMPT.shape[1] :].tolist()
    eos = free[0][2]  # row 0's third new token
    stopped = decoder.model.generate(batch, eos_token_id=eos, **kwargs)[:, PROMPT.shape[1] :].tolist()
    ends = [row.index(eos) + 1 if eos in row else NEW for row in free]
    assert ends[0] == free[0].index(eos) + 1 <= 3
    expected = [row[:end] + [0] * (max(ends) - end) for row, end in zip(free, ends)]
    assert stopped == expected


def test_bad_input_names_the_value(models):
    from transformers import DynamicCache, StaticCache

    eager, decoder = models
    model = decoder.model
    padded = torch.tensor([[2, 2, 7], [4, 5, 6]])  # pad = eos: transformers cannot infer the mask
    with pytest.raises(ValueError, match="a batch of 2 prompts holding pad_token_id 2 needs their attention_mask"):
        model.generate(padded, max_new_tokens=2, pad_token_id=2, custom_generate=decoder)
    right = torch.tensor([[1, 1, 0], [1, 1, 1]])
    with pytest.raises(ValueError, match=r"rows \[0\] are right-padded; pad on the left"):
        model.generate(padded, attention_mask=right, max_new_tokens=2, pad_token_id=2, custom_generate=decoder)
    small = StaticCache(config=model.config, max_cache_len=6)
    with pytest.raises(ValueError, match=r"holds 6 tokens; prompt \+ max_new_tokens - 1 = 7 do not fit"):
        model.generate(PROMPT, max_new_tokens=3, cache=small, custom_generate=decoder)
    with pytest.raises(ValueError, match="needs a StaticCache; got a DynamicCache"):
        model.generate(PROMPT, max_new_tokens=3, cache=DynamicCache(config=model.config), custom_generate=decoder)
    with pytest.raises(ValueError, match="cache_implementation='offloaded'"):
        model.generate(PROMPT, max_new_tokens=3, cache_implementation="offloaded", custom_generate=decoder)
    with pytest.raises(ValueError, match="does not return attentions; got output_attentions=True"):
        model.generate(
            PROMPT, max_new_tokens=3, output_attentions=True, return_dict_in_generate=True, custom_generate=decoder
        )
    with pytest.raises(ValueError, match="compiled for another model; got a LlamaForCausalLM"):
        eager.generate(PROMPT, max_new_tokens=3, custom_generate=decoder)


def test_sampling_after_top_k_keeps_the_whole_vocabulary_distribution():
    """The value-only warpers from temperature on run on the head's largest k + margin scores only:
    the probabilities equal those of the whole list on the whole vocabulary, ties at the k-th value
    kept as transformers keeps them (in the slice, or past the margin on the whole vocabulary)."""
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        MinPLogitsWarper,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    from subclasses.runtime.generate import TIE_MARGIN, split_at_top_k, top_k_probabilities

    generator = torch.Generator().manual_seed(0)
    # fp32 draws (no ties but those made below), flat enough that top-p / min-p keep the top 40
    logits = torch.randn(2, 1000, generator=generator) * 0.5
    ids = torch.tensor([[3, 5], [7, 9]])
    processors = LogitsProcessorList(
        [
            RepetitionPenaltyLogitsProcessor(1.3),
            TemperatureLogitsWarper(0.7),
            TopKLogitsWarper(40),
            TopPLogitsWarper(0.99),
            MinPLogitsWarper(0.001),
        ]
    )
    split = split_at_top_k(processors)
    assert split is not None and len(split[0]) == 1 and len(split[1]) == 4 and split[2] == 40
    penalized = {3, 5, 7, 9}
    for ties in (1, TIE_MARGIN + 4):  # within the margin; past it (the whole vocabulary again)
        tied = logits.clone()
        kth = float(tied[1].topk(40).values[-1])
        low = [int(i) for i in tied[1].argsort()[: ties + 4] if int(i) not in penalized][:ties]
        tied[1, low] = kth  # ties with row 1's 40th value: top-k keeps them all
        full = torch.softmax(processors(ids, tied.clone()), dim=-1)
        probs, indices = top_k_probabilities(ids, tied.clone(), split)
        assert (indices is None) == (ties > TIE_MARGIN)
        compact = probs if indices is None else torch.zeros_like(full).scatter(-1, indices, probs)
        assert bool((full[1, low] > 0).all()) and int((full[1] > 0).sum()) == 40 + ties  # every tie survives
        assert torch.equal(compact > 0, full > 0)
        # the same exponentials summed over at most k + margin terms in another order: within as many
        # fp32 roundings
        torch.testing.assert_close(compact, full, rtol=(40 + TIE_MARGIN) * torch.finfo(torch.float32).eps, atol=0)
    assert split_at_top_k(LogitsProcessorList([TopPLogitsWarper(0.9)])) is None
    assert split_at_top_k(LogitsProcessorList([TopKLogitsWarper(4), RepetitionPenaltyLogitsProcessor(1.3)])) is None
    assert split_at_top_k(LogitsProcessorList([TopPLogitsWarper(0.9), TopKLogitsWarper(4)])) is None


def test_the_cache_goes_by_the_keyword_the_forward_takes():
    """transformers 5.25 renamed the forward's ``past_key_values`` to ``cache`` (the old name logs a
    deprecation at every call and is removed in 5.40): the loops pass whichever the model's forward names,
    and read a cache given under either name."""

    class Before(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None, **kwargs):
            return past_key_values

    class After(torch.nn.Module):
        def forward(self, input_ids, cache=None, **kwargs):
            return cache

    assert cache_keyword(Before()) == "past_key_values" and cache_keyword(After()) == "cache"
    marker = object()
    for model in (Before(), After()):
        assert model(None, **{cache_keyword(model): marker}) is marker
    assert given_cache({"cache": marker}) is marker and given_cache({"past_key_values": marker}) is marker
    assert given_cache({"cache": None, "past_key_values": marker}) is marker and given_cache({}) is None


def test_decoding_passes_no_deprecated_cache_keyword(models):
    """No call of the decode loop (prompt, compiled steps, package) passes the deprecated keyword; the
    same capture sees transformers' FutureWarning when the old keyword is passed (where it is deprecated)."""
    from transformers import DynamicCache

    eager, decoder = models

    def cache_warnings(call):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call()
        return [str(w.message) for w in caught if "past_key_values" in str(w.message)]

    assert not cache_warnings(
        lambda: decoder.model.generate(PROMPT, max_new_tokens=NEW, do_sample=False, custom_generate=decoder)
    )
    if cache_keyword(eager) == "cache":
        with torch.no_grad():
            assert cache_warnings(lambda: eager(PROMPT, past_key_values=DynamicCache(), use_cache=True))
