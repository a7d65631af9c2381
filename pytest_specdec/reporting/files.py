"""Writing a report's files: Markdown, CSV, JSON and HTML (and the charts), under the
first free name, each file whole or not at all (:mod:`pytest_specdec.atomic`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

from pytest_specdec.atomic import fsync_folder, write_file
from pytest_specdec.reporting.charts import CHART_TITLES, render_charts
from pytest_specdec.reporting.export import render_csv, render_json
from pytest_specdec.reporting.html import render_html
from pytest_specdec.reporting.load import ReportError
from pytest_specdec.reporting.markdown import render_markdown
from pytest_specdec.reporting.sections import Section, default_sections

REPORT_SUFFIXES = (".md", ".csv", ".json", ".html")


def write_reports(records: Sequence[dict], directory: str | Path, stem: str, *,
                  meta: Mapping[str, str], title: str | None = None,
                  charts: bool = False, replace: bool = False,
                  sections: Sequence[Section] | None = None) -> list[Path]:
    """Write ``<stem>.md``, ``.csv``, ``.json`` and ``.html`` into ``directory`` (with
    ``charts``, also ``<stem>-speedup.png``, ``<stem>-acceptance.png`` and, for records
    of several batch sizes, ``<stem>-batch.png``, which the Markdown links and the HTML
    embeds); return their paths.

    Each file appears whole or not at all (temp file, fsync, rename). Existing files are
    never overwritten: if any of the names is taken, all files get the first free suffix
    ``-2``, ``-3``, ... With ``replace`` the stem is used as given and its files are
    replaced (atomically, each whole): how a session rewrites its own report as cases
    finish. Charts without matplotlib raise ReportError before any file or directory
    is made. ``sections``: what the Markdown and HTML files show (default:
    :func:`~pytest_specdec.reporting.sections.default_sections`; a session's report
    passes the ``pytest_specdec_report_sections`` hook's list).
    """
    _check_stem(stem)
    pngs = render_charts(records) if charts else {}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    suffixes = REPORT_SUFFIXES + tuple(pngs)
    free_stem = stem if replace else _free_stem(directory, stem, suffixes)
    title = title or f"pytest-specdec report: {stem}"
    sections = default_sections(records) if sections is None else sections
    contents: dict[str, str | bytes] = {
        ".md": render_markdown(records, title=title, meta=meta, sections=sections, charts={
            CHART_TITLES[suffix]: f"{free_stem}{suffix}" for suffix in pngs}),
        ".csv": render_csv(records),
        ".json": render_json(records, meta=meta),
        ".html": render_html(records, title=title, meta=meta, sections=sections, charts={
            CHART_TITLES[suffix]: png for suffix, png in pngs.items()}),
        **pngs,
    }
    paths = []
    for suffix in suffixes:
        path = directory / f"{free_stem}{suffix}"
        write_file(path, contents[suffix], durable=True)
        paths.append(path)
    fsync_folder(directory)
    return paths


def _check_stem(stem: str) -> None:
    if stem in ("", ".", "..") or Path(stem).name != stem:
        raise ReportError(f"report name {stem!r} must be a plain file name without directories")


def _free_stem(directory: Path, stem: str, suffixes: Sequence[str] = REPORT_SUFFIXES) -> str:
    # lexists: a dangling symlink is taken too, and os.replace would clobber the link.
    # Another writer could take a name between this check and the rename; reports of one
    # directory are written by one process at a time, so that race is left open.
    candidate, number = stem, 1
    while any(os.path.lexists(directory / f"{candidate}{suffix}") for suffix in suffixes):
        number += 1
        candidate = f"{stem}-{number}"
    return candidate
