"""``model.generate(..., custom_generate=decoder)`` (subclasses.runtime.generate): transformers' options
on the compiled decode step, checked against transformers' own loop on the same model."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.conftest import QWEN2_ONE_LAYER, sqnr
from tests.optional import import_or_fail_in_ci

import_or_fail_in_ci("transformers", "hf")

from perf.qwen import build_qwen2  # noqa: E402
from subclasses import Int4WeightOnlyConfig, quantize_  # noqa: E402
from subclasses.decode import compile_for_decode  # noqa: E402
from unwrap import unwrap  # noqa: E402

PROMPT = torch.tensor([[5, 17, 99, 3, 250, 61]])
NEW = 6


@pytest.fixture(scope="module")
def models():
    """(eager reference, the same weights switched by compile_for_decode, its decoder)."""
    reference = unwrap(quantize_(build_qwen2(QWEN2_ONE_LAYER), Int4WeightOnlyConfig()))
    model = copy.deepcopy(reference)
    return reference, model, compile_for_decode(model, max_len=24)


def greedy(model, ids, **kwargs):
    return model.generate(
        ids, max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True, output_logits=True, **kwargs
    )


def test_greedy_equals_the_decoder_and_transformers_generate(models):
    reference, model, decoder = models
    theirs = greedy(reference, PROMPT)
    ours = greedy(model, PROMPT, custom_generate=decoder)
    assert ours.sequences.tolist() == theirs.sequences.tolist() == decoder.generate(PROMPT, NEW).tolist()
    assert len(ours.logits) == NEW
    for step, (a, b) in enumerate(zip(theirs.logits, ours.logits)):
        assert sqnr(a, b) > 30, step  # the same bf16 model, compiled: roundings apart


def test_sampling_is_seeded_and_draws_from_the_processed_distribution(models):
    _, model, decoder = models
    options = dict(do_sample=True, temperature=0.7, top_k=3, repetition_penalty=1.3, max_new_tokens=NEW)
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        runs.append(
            model.generate(PROMPT, return_dict_in_generate=True, output_scores=True, custom_generate=decoder, **options)
        )
    assert runs[0].sequences.tolist() == runs[1].sequences.tolist()
    for step, scores in enumerate(runs[0].scores):  # top-k left 3 finite scores; the token is one of them
        token = runs[0].sequences[0, PROMPT.shape[1] + step]
        assert int(torch.isfinite(scores).sum()) == 3 and torch.isfinite(scores[0, token]), step


def test_streamer_gets_the_prompt_then_each_token_and_one_end(models):
    from transformers.generation.streamers import BaseStreamer

    class Recorder(BaseStreamer):
        def __init__(self):
            self.puts, self.ends = [], 0

        def put(self, value):
            self.puts.append(value.tolist())

        def end(self):
            self.ends += 1

    _, model, decoder = models
    recorder = Recorder()
    out = model.generate(PROMPT, max_new_tokens=NEW, do_sample=False, streamer=recorder, custom_generate=decoder)
    assert recorder.puts[0] == PROMPT.tolist() and recorder.ends == 1
    assert [p[0] for p in recorder.puts[1:]] == out[0, PROMPT.shape[1] :].tolist()


def test_eos_stops_the_batch_and_pads_finished_rows(models):
    reference, model, decoder = models
    full = decoder.generate(PROMPT, NEW)
    eos = int(full[0, PROMPT.shape[1] + 1])  # the second new token
    ours = model.generate(
        PROMPT, max_new_tokens=NEW, do_sample=False, eos_token_id=[eos, 4095], custom_generate=decoder
    )
    theirs = reference.generate(PROMPT, max_new_tokens=NEW, do_sample=False, eos_token_id=[eos, 4095])
    assert ours.tolist() == theirs.tolist() and int(ours[0, -1]) == eos


def test_left_padded_batch_rows_equal_each_prompt_alone(models):
    reference, model, decoder = models
    short = torch.tensor([[40, 41, 42]])
    batch = torch.cat([PROMPT, torch.cat([torch.zeros(1, 3, dtype=torch.long), short], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    ours = greedy(model, batch, attention_mask=mask, pad_token_id=0, custom_generate=decoder)
    again = greedy(model, batch, attention_mask=mask, pad_token_id=0, custom_generate=decoder)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs <= 1  # batch 2 compiles once
    theirs = greedy(reference, batch, attention_mask=mask, pad_token_id=0)
    assert ours.sequences.tolist() == again.sequences.tolist() == theirs.sequences.tolist()
    for row, prompt in enumerate((PROMPT, short)):
        alone = greedy(model, prompt, custom_generate=decoder)
        assert ours.sequences[row, -NEW:].tolist() == alone.sequences[0, -NEW:].tolist(), row
        for step in range(NEW):
            assert sqnr(alone.logits[step][0], ours.logits[step][row]) > 30, (row, step)


def test_bad_requests_name_the_value(models):
    from transformers import DynamicCache

    reference, model, decoder = models
    with pytest.raises(ValueError, match=r"prompt \(6\) \+ max_new_tokens \(30\) = 36 exceeds .*max_len=24"):
        model.generate(PROMPT, max_new_tokens=30, custom_generate=decoder)
    with pytest.raises(ValueError, match="pad on the left"):
        model.generate(
            PROMPT.expand(2, -1),
            attention_mask=torch.tensor([[1] * 6, [1] * 5 + [0]]),
            max_new_tokens=2,
            custom_generate=decoder,
        )
    with pytest.raises(ValueError, match="must be called on the model compile_for_decode was given"):
        reference.generate(PROMPT, max_new_tokens=2, custom_generate=decoder)
    with pytest.raises(ValueError, match="uses its own StaticCache; got a DynamicCache"):
        model.generate(PROMPT, max_new_tokens=2, past_key_values=DynamicCache(), custom_generate=decoder)
