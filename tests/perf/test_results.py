"""The results page's one command: each section rerun in a fresh process, stamped, merged into the page."""

import importlib.util
import platform

import pytest

from perf import results
from perf.results import Section, as_markdown, main, sections_of

# ``python -m platform`` prints this machine's platform string: a real command that takes a second
PLATFORM = Section("Platform", "What `platform` says.", "platform", markdown=False)
HEADINGS = Section("Headings", "A command that prints Markdown headings.", "perf.results --list")
FAILING = Section("Failing", "A command that exits 2.", "perf.results --no-such-flag")


@pytest.fixture
def sections(monkeypatch):
    monkeypatch.setattr(results, "SECTIONS", (PLATFORM, HEADINGS, FAILING))


def test_only_reruns_the_chosen_section_and_keeps_the_others(sections, tmp_path):
    page = tmp_path / "results.md"
    page.write_text("# Results\n\n## Headings\n\nkept text\n\n## Gone\n\nno section has this title any more\n")
    assert main(["--only", "platform", "--output", str(page)]) == 0
    text = page.read_text()
    found = sections_of(text)
    assert list(found) == ["Platform", "Headings"]  # the page's order; "Gone" dropped
    assert "kept text" in found["Headings"]
    platform_section = found["Platform"]
    assert f"```\n{platform.platform()}\n```" in platform_section  # plain text in a code block
    assert "`python -m platform`" in platform_section and "thread(s), torch" in platform_section  # the stamp


def test_command_headings_sit_under_the_section():
    body = as_markdown("# Report\n\n## Table\n\n| a |\n|---|\n| 1 |\n\n#### Kept\n", markdown=True)
    assert body == "#### Report\n\n#### Table\n\n| a |\n|---|\n| 1 |\n\n#### Kept"
    assert sections_of("## Section\n\n" + body) == {"Section": "## Section\n\n" + body + "\n"}
    assert as_markdown("a\n## b\n", markdown=False) == "```\na\n## b\n```"
    # consecutive lines of text (a report's notes) stay lines; a table's rows stay one table
    assert (
        as_markdown("Note: a\nNote: b\n| x |\n|---|\n| 1 |", markdown=True)
        == "Note: a\n\nNote: b\n\n| x |\n|---|\n| 1 |"
    )


def test_a_failing_command_stops_with_its_error_and_keeps_what_was_measured(sections, tmp_path):
    page = tmp_path / "results.md"
    with pytest.raises(SystemExit, match=r"python -m perf.results --no-such-flag. failed \(exit 2\)"):
        main(["--output", str(page)])
    assert list(sections_of(page.read_text())) == ["Platform", "Headings"]


def test_an_unknown_section_is_an_error(sections, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--only", "nothing like it", "--output", str(tmp_path / "r.md")])
    assert "matches no section" in capsys.readouterr().err


def test_every_section_runs_a_perf_module_under_its_own_title():
    for section in results.SECTIONS:
        assert importlib.util.find_spec(section.argv[0]) is not None, section.command
    assert len({s.title for s in results.SECTIONS}) == len(results.SECTIONS)
