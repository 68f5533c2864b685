"""subclasses.runtime.prompt_lookup: ``generate(..., prompt_lookup_num_tokens=k, custom_generate=decoder)``
gives the plain loop's greedy tokens with fewer forwards (drafts accepted), stops (eos, max_new_tokens,
any criterion) cut inside an accepted run, streamers get exactly the emitted tokens, the verification
compiles once, and what it does not run falls back or raises."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from tests.conftest import tiny_llama_config
from tests.optional import import_or_fail_in_ci

import_or_fail_in_ci("transformers", "hf")

from subclasses.decode import compile_for_decode  # noqa: E402

K = 4
PROMPT_LENGTH = 16
NEW = 32
SLOTS = PROMPT_LENGTH + NEW  # every call keeps this cache size: one trace per step shape


def prompt(seed: int) -> torch.Tensor:
    """A random half-prompt said twice, [1, PROMPT_LENGTH]."""
    half = torch.randint(3, 512, (PROMPT_LENGTH // 2,), generator=torch.Generator().manual_seed(seed))
    return torch.cat([half, half])[None]


# seed 11: the tiny model below falls into a loop that the lookup drafts (17 forwards for 32 tokens)
PROMPT = prompt(11)


@pytest.fixture(autouse=True)
def _seed_and_reset_dynamo():
    """Seeded as everywhere, but Dynamo is not reset between these tests: they share one compiled
    decoder (and count its traces)."""
    torch.manual_seed(0)
    yield


class Recorder:
    """A streamer keeping what each ``put`` got, and how often ``end`` was called."""

    def __init__(self) -> None:
        self.puts: list[list[int]] = []
        self.ends = 0

    def put(self, value: torch.Tensor) -> None:
        self.puts.append(value.flatten().tolist())

    def end(self) -> None:
        self.ends += 1


class Counting:
    """The decoder's step, counting calls by the number of tokens they feed."""

    def __init__(self, step):
        self.step, self.widths = step, []

    def __call__(self, *args, **kwargs):
        self.widths.append(args[0].shape[1])
        return self.step(*args, **kwargs)


@pytest.fixture(scope="module")
def decoder():
    """A tiny random fp32 Llama (no int4: a verification at M = K + 1 and a step at M = 1 then run the
    same fp32 kernels up to summation order), compiled; both step shapes traced here."""
    from torch._dynamo.utils import counters
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    config = tiny_llama_config()
    decoder = compile_for_decode(copy.deepcopy(LlamaForCausalLM(config).eval()), max_len=SLOTS)
    generate(decoder, PROMPT, k=None)
    before = counters["stats"]["unique_graphs"]
    generate(decoder, PROMPT)
    decoder.lookup_graphs = counters["stats"]["unique_graphs"] - before
    return decoder


def generate(decoder, ids, k=K, **kwargs):
    """Greedy ``generate`` through ``decoder``, eos ignored unless given."""
    kwargs = {"max_new_tokens": NEW, "do_sample": False, "eos_token_id": None, **kwargs}
    if k is not None:
        kwargs["prompt_lookup_num_tokens"] = k
    return decoder.model.generate(ids, custom_generate=decoder, **kwargs)


def counted(decoder, monkeypatch) -> Counting:
    counting = Counting(decoder.step)
    monkeypatch.setattr(decoder, "step", counting)
    return counting


def test_tokens_equal_plain_greedy_with_drafts_accepted(decoder, monkeypatch):
    details = {"return_dict_in_generate": True, "output_logits": True, "output_scores": True}
    plain = generate(decoder, PROMPT, k=None, **details)
    counting = counted(decoder, monkeypatch)
    lookup = generate(decoder, PROMPT, **details)
    # The same fp32 sums in another order (GEMM at M = K + 1, GEMV at 1): a token can flip only where
    # its top-2 logits are within twice the largest logit difference between the runs. None is here,
    # so the tokens must be equal.
    difference = max(float((a - b).abs().max()) for a, b in zip(plain.logits, lookup.logits))
    gaps = [float(logits.topk(2).values.diff().abs()) for logits in plain.logits]
    assert difference < 1e-4 and min(gaps) > 2 * difference, (difference, min(gaps))
    assert lookup.sequences.tolist() == plain.sequences.tolist()
    assert lookup.sequences.shape[1] == SLOTS and len(lookup.scores) == len(lookup.logits) == NEW
    assert [int(s.argmax()) for s in lookup.scores] == lookup.sequences[0, PROMPT_LENGTH:].tolist()
    # fewer forwards than tokens: drafts were accepted (the prefill makes the first token)
    verifies = counting.widths.count(K + 1)
    assert set(counting.widths) == {1, K + 1} and verifies >= 4
    assert 1 + len(counting.widths) <= NEW - 10


def test_processors_see_each_position_with_its_own_prefix(decoder, monkeypatch):
    """A processor whose choice depends on the length of the ids it is given: each verified
    position must get its own prefix (the tokens accepted before it), or the tokens change."""
    from transformers.generation.logits_process import LogitsProcessor, LogitsProcessorList

    class Cycle(LogitsProcessor):  # token 100 + (prefix length % 5) wins: a loop the lookup drafts
        def __call__(self, input_ids, scores):
            bonus = torch.zeros_like(scores)
            bonus[:, 100 + input_ids.shape[1] % 5] = 1e3
            return scores + bonus

    kwargs = {"repetition_penalty": 1.05, "logits_processor": LogitsProcessorList([Cycle()])}
    plain = generate(decoder, PROMPT, k=None, **kwargs)
    counting = counted(decoder, monkeypatch)
    lookup = generate(decoder, PROMPT, **kwargs)
    assert lookup.tolist() == plain.tolist()
    assert plain[0, PROMPT_LENGTH:].tolist() == [100 + n % 5 for n in range(PROMPT_LENGTH, SLOTS)]
    assert 1 + len(counting.widths) <= NEW // 2  # drafts accepted with the processors on


def runs_of(decoder, ids, **kwargs) -> tuple[list[int], list[list[int]], Recorder]:
    """The new tokens, the streamed runs (the prompt's put dropped), and the streamer."""
    streamer = Recorder()
    out = generate(decoder, ids, streamer=streamer, **kwargs)
    return out[0, ids.shape[1] :].tolist(), streamer.puts[1:], streamer


def inside_a_run(runs: list[list[int]]) -> tuple[int, int]:
    """(index among the new tokens, token) of the first new token that is not the last of its run
    and was not generated before it: stopping at it cuts an accepted run."""
    seen, index = set(), 0
    for run in runs:
        for offset, token in enumerate(run):
            if offset < len(run) - 1 and token not in seen:
                return index, token
            seen.add(token)
            index += 1
    raise AssertionError(f"every token inside a run was generated before it: {runs}")


def continued() -> tuple[torch.Tensor, int]:
    """``PROMPT`` and its first 16 greedy tokens, and the new tokens that fill the cache after them.
    The tiny model repeats what it generated, not the prompt, so a new token inside an accepted run
    was always generated before (a stop at it would have come earlier); after this prompt, which
    holds the model's loop, the first tokens generated are drafted from the prompt."""
    return torch.cat([PROMPT, torch.tensor([[423] * 5 + [390] + [23, 196] * 5])], dim=1), NEW - 16


def test_streamer_gets_the_runs_and_stops_cut_inside_them(decoder):
    from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList

    tokens, runs, streamer = runs_of(decoder, PROMPT)
    assert [t for run in runs for t in run] == tokens and streamer.ends == 1
    assert streamer.puts[0] == PROMPT[0].tolist()  # transformers streams the prompt first
    assert tokens[:16] == continued()[0][0, PROMPT_LENGTH:].tolist()
    ids, new = continued()
    tokens, runs, _ = runs_of(decoder, ids, max_new_tokens=new)
    index, stop = inside_a_run(runs)

    class StopAt(StoppingCriteria):  # what a stop string does, unknown to the draft
        def __call__(self, ids, scores, **kwargs):
            return ids[:, -1] == stop

    for kwargs in ({"eos_token_id": stop}, {"stopping_criteria": StoppingCriteriaList([StopAt()])}):
        cut, cut_runs, streamer = runs_of(decoder, ids, max_new_tokens=new, pad_token_id=0, **kwargs)
        assert cut == tokens[: index + 1], kwargs
        assert [t for run in cut_runs for t in run] == cut and streamer.ends == 1


def test_max_new_tokens_cuts_inside_a_run(decoder):
    ids, new = continued()
    tokens, runs, _ = runs_of(decoder, ids, max_new_tokens=new)
    index, _ = inside_a_run(runs)
    cache = decoder.cache_for(1, SLOTS)  # the decoder's own: the same traces at fewer new tokens
    for fewer in (index + 1, new - 1):
        out = generate(decoder, ids, max_new_tokens=fewer, cache=cache)
        assert out[0, ids.shape[1] :].tolist() == tokens[:fewer]


def test_verification_compiles_once(decoder, monkeypatch):
    from torch._dynamo.utils import counters

    assert decoder.lookup_graphs == 1  # the fixture's first lookup traced the K + 1 shape, once
    before = counters["stats"]["unique_graphs"]
    counting = counted(decoder, monkeypatch)
    for seed in (2, 5, 8):
        counting.widths.clear()
        generate(decoder, prompt(seed))
        assert counting.widths.count(K + 1) > 0
    assert counters["stats"]["unique_graphs"] == before
    # the verification's trace alone: one-token steps run as the package (compile_for_decode's default)
    assert len(counting.step.fallback.traced) == 1


def test_batches_raise_and_sampling_falls_back(decoder, caplog):
    batch = torch.cat([PROMPT, prompt(2)])
    with pytest.raises(ValueError, match=f"prompt_lookup_num_tokens={K}. runs one prompt at a time; got a batch of 2"):
        generate(decoder, batch, pad_token_id=0)
    with pytest.raises(ValueError, match="prompt_lookup_num_tokens must be at least 1, got 0"):
        generate(decoder, PROMPT, k=0)
    runs = []
    for k in (None, K):
        torch.manual_seed(1)
        with caplog.at_level(logging.INFO, logger="subclasses.runtime.prompt_lookup"):
            runs.append(generate(decoder, PROMPT, k=k, do_sample=True, temperature=3.0))
    assert runs[0].tolist() == runs[1].tolist()
    assert f"prompt_lookup_num_tokens={K} ignored: do_sample=True samples one token at a time" in caplog.text


def test_a_padded_prompt_falls_back(caplog):
    from transformers import GenerationConfig

    from subclasses.runtime.prompt_lookup import uses_prompt_lookup

    config = GenerationConfig(prompt_lookup_num_tokens=K, do_sample=False)
    with caplog.at_level(logging.INFO, logger="subclasses.runtime.prompt_lookup"):
        assert not uses_prompt_lookup(config, PROMPT, torch.tensor([[0] + [1] * (PROMPT_LENGTH - 1)]))
    assert "a padded prompt decodes one token at a time" in caplog.text
    assert uses_prompt_lookup(config, PROMPT, None)
    assert not uses_prompt_lookup(GenerationConfig(do_sample=False), PROMPT, None)
