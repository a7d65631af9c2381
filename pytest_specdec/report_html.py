"""The report as one self-contained HTML page: the same tables as the Markdown report
(see report.py, which this module only lays out), inline style, no scripts, no external
assets, every text from the records escaped."""

from __future__ import annotations

import base64
import html
import re
from typing import Any, Mapping, Sequence

from pytest_specdec.report import (HOW_TO_READ, MAT_BY_SEQUENCE_NOTE, PER_POSITION_NOTE,
                                   LOSSLESS_NOTE, TIMING_NOTE, _details_table,
                                   _group_by_target, _timing_table,
                                   _lossless_table, _mat_by_sequence_table,
                                   _per_position_table, peer_ratio_lines, summary_table)

class _Best(str):
    """A summary cell holding its column's best speedup (what ``mark_best`` makes of it)."""

HTML_STYLE = """\
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 72em; padding: 0 1em;
       color: #1b1b1b; line-height: 1.45; }
table { border-collapse: collapse; margin: 0.8em 0 1.4em; font-size: 0.92em; }
th, td { border: 1px solid #c8c8c8; padding: 0.25em 0.6em; text-align: left; }
thead th { background: #f0f0f0; }
td.best { background: #e3f4e1; }
table.meta th { background: #f7f7f7; font-weight: 600; }
code { font-size: 0.95em; }
img { max-width: 100%; display: block; margin: 0.8em 0; }
p.note { color: #444; }"""


def render_html(records: Sequence[dict], *, title: str, meta: Mapping[str, str],
                charts: Mapping[str, bytes] | None = None) -> str:
    """The report as one self-contained HTML page (inline style, no scripts, no external
    assets): meta, summary with the best speedup per column marked, details, per-position
    acceptance, MAT by round and sample, peer ratios. ``charts`` maps chart titles to PNG
    bytes, embedded as data URIs. Every text from the records is escaped."""
    sections = [f"<h1>{_escape(title)}</h1>", _html_meta(meta), _html_summary(records)]
    if charts:
        images = "\n".join(
            f'<figure><img alt="{_escape(name)}" src="data:image/png;base64,'
            f'{base64.b64encode(png).decode("ascii")}"><figcaption>{_escape(name)}</figcaption>'
            "</figure>" for name, png in charts.items())
        sections.append(f'<section id="charts">\n<h2>Charts</h2>\n{images}\n</section>')
    headers, rows = _details_table(records)
    sections.append(_html_section("details", "Details", None,
                                  _html_table(headers, rows, code_last=True)))
    for section_id, name, note, (headers, rows) in (
            ("timing", "Timing and costs", TIMING_NOTE, _timing_table(records)),
            ("lossless", "Losslessness", LOSSLESS_NOTE, _lossless_table(records)),
            ("per-position", "Per-position acceptance", PER_POSITION_NOTE,
             _per_position_table(records)),
            ("mat-by-sequence", "MAT by round and sample", MAT_BY_SEQUENCE_NOTE,
             _mat_by_sequence_table(records))):
        if rows:
            sections.append(_html_section(section_id, name, note, _html_table(headers, rows)))
    peers = peer_ratio_lines(records)
    if peers:
        items = "\n".join(f"<li>{_escape(line.removeprefix('- '))}</li>" for line in peers)
        sections.append(_html_section("peers", "Compared with Hugging Face generate", None,
                                      f"<ul>\n{items}\n</ul>"))
    how_to_read = HOW_TO_READ.split("\n", 1)[1].strip()
    sections.append(_html_section("how-to-read", "How to read", None,
                                  f"<p>{_inline_bold(_escape(how_to_read))}</p>"))
    body = "\n".join(sections)
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{_escape(title)}</title>\n<style>\n{HTML_STYLE}\n</style>\n</head>\n"
            f"<body>\n{body}\n</body>\n</html>\n")


def _escape(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _inline_bold(escaped: str) -> str:
    """``**x**`` (already escaped text) as <strong>x</strong>."""
    return re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", escaped)


def _html_section(section_id: str, name: str, note: str | None, content: str) -> str:
    note_html = f'<p class="note">{_escape(note)}</p>\n' if note else ""
    return f'<section id="{section_id}">\n<h2>{_escape(name)}</h2>\n{note_html}{content}\n</section>'


def _html_table(headers: Sequence[str], rows: Sequence[Sequence[str]], *,
                css_class: str = "", code_last: bool = False) -> str:
    head = "".join(f'<th scope="col">{_escape(h)}</th>' for h in headers)
    body = []
    for row in rows:
        cells = []
        for index, cell in enumerate(row):
            if isinstance(cell, _Best):
                cells.append(f'<td class="best"><strong>{_escape(cell)}</strong></td>')
            elif code_last and index == len(row) - 1:
                cells.append(f"<td><code>{_escape(cell)}</code></td>")
            else:
                cells.append(f"<td>{_escape(cell)}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    attribute = f' class="{css_class}"' if css_class else ""
    return (f"<table{attribute}>\n<thead><tr>{head}</tr></thead>\n<tbody>\n"
            + "\n".join(body) + "\n</tbody>\n</table>")


def _html_meta(meta: Mapping[str, str]) -> str:
    rows = "\n".join(f'<tr><th scope="row">{_escape(key)}</th><td>{_escape(value)}</td></tr>'
                     for key, value in meta.items())
    return f'<section id="meta">\n<table class="meta">\n<tbody>\n{rows}\n</tbody>\n</table>\n</section>'


def _html_summary(records: Sequence[dict]) -> str:
    parts = []
    groups = _group_by_target(records)
    for label, group in groups.items():
        headers, rows = summary_table(group, mark_best=_Best)
        if len(groups) > 1:
            parts.append(f"<h3>{_escape(label)}</h3>")
        parts.append(_html_table(headers, rows, css_class="summary"))
    return _html_section("summary", "Summary",
                         "Cells: speedup over the baseline · MAT · ±the speedup's timing noise. Bold on green: "
                         "best speedup among speculative drafters in the column; !: flagged "
                         "(see Timing and costs).", "\n".join(parts))
