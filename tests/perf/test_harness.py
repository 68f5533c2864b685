"""perf.harness: the one timing loop and the one table writer every benchmark and report use."""

import pytest

from perf.harness.models import config, report_config
from perf.harness.tables import markdown_table
from perf.harness.timing import interleaved_min


def test_interleaved_min_warms_up_then_visits_every_key_per_round():
    calls = []
    fns = {key: (lambda key=key: calls.append(key)) for key in ("a", "b")}
    best = interleaved_min(fns, rounds=3, number=2, warmup=1, before=lambda key: calls.append(f"before {key}"))
    assert calls[:4] == ["before a", "a", "before b", "b"]  # warm-up: untimed, before() first
    assert calls[4:] == ["before a", "a", "a", "before b", "b", "b"] * 3  # then the rounds, interleaved
    assert set(best) == {"a", "b"} and all(t >= 0 for t in best.values())


def test_interleaved_min_is_the_mean_of_number_calls_of_the_best_round():
    now, rounds = [0.0], iter([3.0, 1.0, 2.0])
    cost = {"step": 0.0}

    def before(key):
        cost["step"] = next(rounds)

    def fn():
        now[0] += cost["step"]

    best = interleaved_min({"k": fn}, rounds=3, number=4, before=before, clock=lambda: now[0])
    assert best == {"k": 1.0}


def test_markdown_table():
    text = markdown_table(["a", "b"], [[1, "x"], ["-", 2.5]], title="T", stamp="_here_")
    assert text.splitlines() == ["### T", "", "_here_", "", "| a | b |", "|---|---|", "| 1 | x |", "| - | 2.5 |"]
    assert markdown_table(["a"], [], title="#### U").splitlines()[0] == "#### U"


def test_config_table():
    assert report_config("int4").group_size == 128 and config("int4").group_size == config("int4", None).group_size
    assert config("int4", 64).group_size == 64 and type(config("int8", 64)) is type(config("int8"))
    with pytest.raises(ValueError, match="format must be one of"):
        config("int3")
