"""The report as one self-contained HTML page: the sections of :mod:`.sections`, as the
Markdown report has them, inline style, no scripts, no external assets, every text from
the records escaped."""

from __future__ import annotations

import base64
import html
import re
from typing import Any, Mapping, Sequence

from pytest_specdec.reporting.sections import (Best, Block, Heading, Images, Items, Section, Table,
                                               Text, default_sections)


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
                charts: Mapping[str, bytes] | None = None,
                sections: Sequence[Section] | None = None) -> str:
    """The report as one self-contained HTML page (inline style, no scripts, no external
    assets): the title, the meta table, then ``sections`` (default:
    :func:`~pytest_specdec.reporting.sections.default_sections` of the records), each a
    ``<section>`` with the section's id. ``charts`` maps chart titles to PNG bytes,
    embedded as data URIs. Every text from the records is escaped."""
    parts = [f"<h1>{_escape(title)}</h1>", _html_meta(meta)]
    for section in default_sections(records) if sections is None else sections:
        text = html_section(section, charts or {})
        if text:
            parts.append(text)
    body = "\n".join(parts)
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{_escape(title)}</title>\n<style>\n{HTML_STYLE}\n</style>\n</head>\n"
            f"<body>\n{body}\n</body>\n</html>\n")


def html_section(section: Section, charts: Mapping[str, bytes]) -> str:
    """``<section id=...>`` with its title, note and blocks; "" when no block has
    anything to show."""
    blocks = [text for block in section.blocks if (text := _block(block, charts))]
    if not blocks:
        return ""
    note = f'<p class="note">{_inline(section.note)}</p>\n' if section.note else ""
    content = "\n".join(blocks)
    return (f'<section id="{_escape(section.id)}">\n<h2>{_escape(section.title)}</h2>\n'
            f"{note}{content}\n</section>")


def _block(block: Block, charts: Mapping[str, bytes]) -> str:
    if isinstance(block, Table):
        return _html_table(block.headers, block.rows, css_class=block.css_class,
                           code_last=block.code_last)
    if isinstance(block, Heading):
        return f"<h3>{_escape(block.text)}</h3>"
    if isinstance(block, Items):
        items = "\n".join(f"<li>{_inline(line.removeprefix('- '))}</li>" for line in block.lines)
        return f"<ul>\n{items}\n</ul>"
    if isinstance(block, Text):
        return f"<p>{_inline(block.text)}</p>"
    if isinstance(block, Images):
        return "\n".join(
            f'<figure><img alt="{_escape(name)}" src="data:image/png;base64,'
            f'{base64.b64encode(charts[name]).decode("ascii")}"><figcaption>{_escape(name)}'
            "</figcaption></figure>" for name in block.titles if name in charts)
    raise TypeError(f"a report section holds {type(block).__name__}, not a block")


def _escape(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _inline(text: str) -> str:
    """Escaped text with its ``**bold**`` and ```code``` as tags."""
    escaped = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", _escape(text))
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)


def _html_table(headers: Sequence[str], rows: Sequence[Sequence[str]], *,
                css_class: str = "", code_last: bool = False) -> str:
    head = "".join(f'<th scope="col">{_escape(h)}</th>' for h in headers)
    body = []
    for row in rows:
        cells = []
        for index, cell in enumerate(row):
            if isinstance(cell, Best):
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
