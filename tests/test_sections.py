"""One list of report sections: the Markdown and the HTML report show the same ones, in
the same order, and a conftest adds its own through ``pytest_specdec_report_sections``."""

from __future__ import annotations

import re
from pathlib import Path

from pytest_specdec.reporting import default_sections, render_html, render_markdown, report_meta
from pytest_specdec.reporting.sections import Items, Section, Table

CHARTS = {"Speedup per paradigm": "run-speedup.png", "Per-position acceptance": "run-acceptance.png"}
PNGS = {name: b"\x89PNG\r\n\x1a\n" for name in CHARTS}


def markdown_titles(text: str) -> list[str]:
    return re.findall(r"^## (.+)$", text, flags=re.M)


def html_titles(text: str) -> list[tuple[str, str]]:
    return re.findall(r'<section id="([^"]+)">\n<h2>([^<]+)</h2>', text)


def with_everything(records: list[dict]) -> list[dict]:
    """The stored run plus what only some runs carry: a drafter note, a hybrid's parts,
    a peer's settings."""
    out = []
    for record in records:
        record = dict(record)
        if record["role"] == "speculative":
            record["drafter_note"] = "drafts from the problem's earlier samples"
            record["hybrid_parts"] = {"sam": {"steps": 3, "tokens": 9},
                                      "pld": {"steps": 1, "tokens": 2}}
        if record["role"] == "peer":
            record["peer_settings"] = {"prompt_lookup_num_tokens": 10, "sampling": "greedy"}
        out.append(record)
    return out


def test_markdown_and_html_have_the_same_sections(records):
    records = with_everything(records)
    meta = report_meta(records)
    markdown = render_markdown(records, title="t", meta=meta, charts=CHARTS)
    page = render_html(records, title="t", meta=meta, charts=PNGS)
    in_html = html_titles(page)
    assert markdown_titles(markdown) == [title for _, title in in_html]
    expected = [(s.id, s.title) for s in default_sections(records)]
    assert in_html == expected
    for section_id in ("drafter-notes", "hybrids", "peers", "charts"):
        assert section_id in dict(in_html)
    # the peers' settings reach both
    assert "hf_pld settings: prompt_lookup_num_tokens 10" in markdown
    assert "hf_pld settings: prompt_lookup_num_tokens 10" in page


def test_a_section_without_content_is_left_out_of_both(records):
    meta = report_meta(records)
    markdown = render_markdown(records, title="t", meta=meta)  # no charts drawn
    page = render_html(records, title="t", meta=meta)
    assert "Charts" not in markdown_titles(markdown)
    assert markdown_titles(markdown) == [title for _, title in html_titles(page)]


def test_a_given_section_list_is_what_both_show(records):
    sections = [Section("mine", "Mine", "A **note**.", [Table(["a", "b"], [["1", "2"]]),
                                                        Items(["- one `x`"])])]
    markdown = render_markdown(records, title="t", meta={}, sections=sections)
    page = render_html(records, title="t", meta={}, sections=sections)
    assert markdown_titles(markdown) == ["Mine"] and html_titles(page) == [("mine", "Mine")]
    assert "A **note**." in markdown and "<strong>note</strong>" in page
    assert "- one `x`" in markdown and "<li>one <code>x</code></li>" in page


CONFTEST = '''
from pytest_specdec.reporting.sections import Section, Table


def pytest_specdec_report_sections(config, records, sections):
    rows = [[r["drafter"], r["paradigm"], f"{r['new_tokens'] / r['steps']:.2f}"]
            for r in records if r["steps"]]
    at = next((i for i, s in enumerate(sections) if s.id == "how-to-read"), len(sections))
    sections.insert(at, Section("tokens-per-step", "Tokens per step",
                                "New tokens over target forwards.",
                                [Table(["drafter", "paradigm", "tokens/step"], rows)]))
'''


def test_a_conftest_adds_a_section_to_both_reports(suite, tiny_model_dir, tmp_path):
    suite.makeconftest(CONFTEST)
    reports = tmp_path / "reports"
    result = suite.runpytest_subprocess(
        "-p", "no:cacheprovider", "--specdec-target", str(tiny_model_dir),
        "--specdec-problems", "1", "--specdec-max-new-tokens", "8", "--specdec-rounds", "2",
        "--specdec-paradigm", "multi_round", "--specdec-no-peer", "--benchmark-disable",
        "--specdec-drafter", "pld", "--specdec-report-dir", str(reports), timeout=300)
    result.assert_outcomes(passed=2)
    (markdown,) = reports.glob("specdec-*.md")
    (page,) = reports.glob("specdec-*.html")
    md_titles = markdown_titles(markdown.read_text(encoding="utf-8"))
    html = html_titles(Path(page).read_text(encoding="utf-8"))
    assert md_titles[-2:] == ["Tokens per step", "How to read"]
    assert md_titles == [title for _, title in html]
    assert ("tokens-per-step", "Tokens per step") in html
    assert "| pld " in markdown.read_text(encoding="utf-8")


def test_flagged_speedups_have_a_section_with_what_to_do(records):
    from pytest_specdec.reporting.layout import FLAG_ADVICE, flag_advice

    assert flag_advice(records) == []  # the stored run flags nothing
    assert "flags" not in [s.id for s in default_sections(records)]
    flagged = []
    for record in records:
        record = dict(record)
        if record["role"] == "speculative" and record["drafter"] == "pld":
            record["timing_flags"] = ["unstable timing"]
        flagged.append(record)
    assert flag_advice(flagged) == [FLAG_ADVICE["unstable timing"]]
    markdown = render_markdown(flagged, title="t", meta=report_meta(flagged))
    page = render_html(flagged, title="t", meta=report_meta(flagged))
    assert "Flagged speedups" in markdown_titles(markdown)
    assert ("flags", "Flagged speedups") in html_titles(page)
    for text in (markdown, page):
        assert "--specdec-timed-rounds 3" in text
        assert "pld on " in text and "(unstable timing; ideal" in text
    both = [dict(r, timing_flags=["above cost bound", "unstable timing"]) for r in flagged[:1]]
    assert flag_advice(both) == [FLAG_ADVICE["unstable timing"], FLAG_ADVICE["above cost bound"]]
