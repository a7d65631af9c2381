"""The batch-size chart: drawn when a report's records span more than one batch size
(speedup and tokens/s against the batch size, a line per drafter), linked from the
Markdown report and embedded in the HTML one like the other charts; absent otherwise."""

from __future__ import annotations

import base64

import pytest

from pytest_specdec.reporting.charts import CHART_TITLES, _batch_panels, render_charts
from pytest_specdec.reporting.files import write_reports
from test_report_html import PNG_MAGIC, Page

pytest.importorskip("matplotlib")


def batched(records: list[dict], sizes=(2, 4)) -> list[dict]:
    """The stored run at batch 1, and copies of its engine cases at other sizes."""
    out = list(records)
    for b in sizes:
        for r in records:
            if r["role"] != "peer":
                speedup = r["speedup"] if r["role"] == "baseline" or r["speedup"] is None \
                    else r["speedup"] / b
                out.append({**r, "batch": b, "speedup": speedup,
                            "tokens_per_s": r["tokens_per_s"] * b})
    return out


def test_the_batch_chart_is_written_linked_and_embedded(records, tmp_path):
    paths = write_reports(batched(records), tmp_path, "run", meta={}, charts=True)
    assert [p.name for p in paths] == ["run.md", "run.csv", "run.json", "run.html",
                                       "run-speedup.png", "run-acceptance.png", "run-batch.png"]
    png = paths[-1].read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 5000
    markdown = paths[0].read_text(encoding="utf-8")
    assert "![Speedup and tokens/s per batch size](run-batch.png)" in markdown
    page = Page(paths[3].read_text(encoding="utf-8"))
    embedded = [base64.b64decode(i["src"].removeprefix("data:image/png;base64,"))
                for i in page.images]
    assert embedded[-1] == png and len(embedded) == 3


def test_no_batch_chart_at_one_batch_size(records, tmp_path):
    paths = write_reports(records, tmp_path, "run", meta={}, charts=True)
    assert not any(p.name.endswith("-batch.png") for p in paths)
    assert "-batch.png" not in set(render_charts(records))
    assert CHART_TITLES["-batch.png"] not in paths[0].read_text(encoding="utf-8")


def test_the_panels_hold_each_drafter_by_batch_size(records):
    panels = _batch_panels(batched(records, sizes=(4,)))
    assert list(panels) == ["multi_round T=0", "best_of_n T=0.6"]
    for lines in panels.values():
        assert list(lines) == ["baseline", "pld"]  # peers run at batch 1 only
        assert all(sorted(by_size) == [1, 4] for by_size in lines.values())
    # a paradigm run at one size only has no panel
    mixed = records + [{**r, "batch": 2} for r in records
                       if r["paradigm"] == "best_of_n" and r["role"] != "peer"]
    assert list(_batch_panels(mixed)) == ["best_of_n T=0.6"]
    # several sizes in the records, but no paradigm at more than one: a note, no panel
    apart = [r for r in records if r["paradigm"] == "multi_round"] + [
        {**r, "batch": 2} for r in records if r["paradigm"] == "best_of_n"]
    assert _batch_panels(apart) == {}
    assert render_charts(apart)["-batch.png"].startswith(PNG_MAGIC)


def test_batch_charts_of_several_targets(records, tmp_path):
    other = [{**r, "target": "tiny-llama", "per_position_acceptance": []} for r in records]
    both = batched(records) + batched(other, sizes=(8,))
    assert len(_batch_panels(both)) == 4
    pngs = render_charts(both)
    assert pngs["-batch.png"].startswith(PNG_MAGIC)
