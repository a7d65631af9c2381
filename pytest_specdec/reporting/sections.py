"""The one list of report sections, which the Markdown and the HTML report both render
(:mod:`.markdown`, :mod:`.html`), so the two cannot drift apart.

A :class:`Section` is an id (the HTML anchor), a title, a note and blocks: tables,
sub-headings, list items, a paragraph, chart images. Text may hold ``**bold**`` and
```code``` (Markdown as is; HTML turns them into tags). A section without content is
left out of the list; a renderer leaves out a block it has nothing to show for (the
charts, when none were drawn).

:func:`default_sections` is the plugin's own list; through the hook
``pytest_specdec_report_sections`` (:mod:`pytest_specdec.plugin.hookspec`) a conftest
or package adds, removes or reorders sections of the session's report.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence, Union

from pytest_specdec.reporting.charts import CHART_TITLES
from pytest_specdec.reporting.layout import (flag_advice, flagged_lines, group_by_target,
                                             summary_table)
from pytest_specdec.reporting.tables import (BATCH_NOTE, HOW_TO_READ, HYBRIDS_NOTE, LOSSLESS_NOTE,
                                             MAT_BY_SEQUENCE_NOTE, PER_POSITION_NOTE, TIMING_NOTE,
                                             batch_table, details_table, drafter_note_lines,
                                             hybrid_part_lines,
                                             lossless_table, mat_by_sequence_table,
                                             peer_ratio_lines, peer_settings_lines,
                                             per_position_table, timing_table)


class Best(str):
    """A summary cell holding its column's best speedup: bold in Markdown, bold on
    green in HTML."""


@dataclass(frozen=True)
class Table:
    headers: Sequence[str]
    rows: Sequence[Sequence[str]]
    code_last: bool = False  # the last column is code (the output hash)
    css_class: str = ""


@dataclass(frozen=True)
class Heading:
    """A sub-heading inside a section (one per target, when a report holds several)."""

    text: str


@dataclass(frozen=True)
class Items:
    """A list; each line is a Markdown list item (``- text``)."""

    lines: Sequence[str]


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class Images:
    """Chart images, by title; each renderer is handed the images drawn (file names for
    Markdown, PNG bytes for HTML) and shows those it has."""

    titles: Sequence[str]


Block = Union[Table, Heading, Items, Text, Images]


@dataclass(frozen=True)
class Section:
    id: str
    title: str
    note: str = ""
    blocks: Sequence[Block] = ()


SUMMARY_NOTE = ("Cells: speedup over the baseline · MAT · ±the speedup's timing noise. "
                "**Bold**: best speedup among speculative drafters in the column; `!`: "
                "flagged (see Flagged speedups).")


def summary_section(records: Sequence[dict]) -> Section:
    groups = group_by_target(records)
    blocks: list[Block] = []
    for label, group in groups.items():
        headers, rows = summary_table(group, mark_best=Best)
        if len(groups) > 1:
            blocks.append(Heading(label))
        blocks.append(Table(headers, rows, css_class="summary"))
    return Section("summary", "Summary", SUMMARY_NOTE, blocks)


def charts_section(records: Sequence[dict]) -> Section:
    return Section("charts", "Charts", blocks=[Images(tuple(CHART_TITLES.values()))])


def details_section(records: Sequence[dict]) -> Section:
    headers, rows = details_table(records)
    return Section("details", "Details", blocks=[Table(headers, rows, code_last=True)])


def _table_section(section_id: str, title: str, note: str,
                   table: Callable[[Sequence[dict]], tuple[list[str], list[list[str]]]]
                   ) -> Callable[[Sequence[dict]], Section | None]:
    def build(records: Sequence[dict]) -> Section | None:
        headers, rows = table(records)
        return Section(section_id, title, note, [Table(headers, rows)]) if rows else None

    build.__name__ = f"{section_id.replace('-', '_')}_section"
    return build


def _items_section(section_id: str, title: str, note: str,
                   lines: Callable[[Sequence[dict]], list[str]]
                   ) -> Callable[[Sequence[dict]], Section | None]:
    def build(records: Sequence[dict]) -> Section | None:
        found = lines(records)
        return Section(section_id, title, note, [Items(found)]) if found else None

    build.__name__ = f"{section_id.replace('-', '_')}_section"
    return build


batch_section = _table_section("batches", "Batch sizes", BATCH_NOTE, batch_table)
timing_section = _table_section("timing", "Timing and costs", TIMING_NOTE, timing_table)
lossless_section = _table_section("lossless", "Losslessness", LOSSLESS_NOTE, lossless_table)
per_position_section = _table_section("per-position", "Per-position acceptance",
                                      PER_POSITION_NOTE, per_position_table)
mat_by_sequence_section = _table_section("mat-by-sequence", "MAT by round and sample",
                                         MAT_BY_SEQUENCE_NOTE, mat_by_sequence_table)
flags_section = _items_section("flags", "Flagged speedups",
                               "Never marked best; each fails a `compare --fail speedup:` rule.",
                               lambda records: flagged_lines(records) + flag_advice(records))
hybrids_section = _items_section("hybrids", "Hybrids", HYBRIDS_NOTE, hybrid_part_lines)
drafter_notes_section = _items_section("drafter-notes", "Drafter notes", "", drafter_note_lines)
peers_section = _items_section("peers", "Compared with Hugging Face generate", "",
                               lambda records: peer_ratio_lines(records)
                               + peer_settings_lines(records))


NOT_RUN_NOTE = ("Drafters of the default set that were skipped because something they need "
                "is not there yet; each line says what and the command that provides it.")


def not_run_section(unavailable: Mapping[str, str]) -> Section:
    """The default drafters skipped for a missing prerequisite: name -> why."""
    return Section("not-run", "Drafters not run", NOT_RUN_NOTE,
                   [Items([f"`{name}`: {why}" for name, why in unavailable.items()])])


def how_to_read_section(records: Sequence[dict]) -> Section:
    return Section("how-to-read", "How to read", blocks=[Text(HOW_TO_READ)])


#: The plugin's sections, in report order: each builds its section from the records,
#: or None when the records hold nothing for it.
DEFAULT_SECTIONS: tuple[Callable[[Sequence[dict]], Section | None], ...] = (
    summary_section, charts_section, details_section, batch_section, timing_section,
    flags_section, lossless_section,
    per_position_section, mat_by_sequence_section, hybrids_section, drafter_notes_section,
    peers_section, how_to_read_section,
)


def default_sections(records: Sequence[dict]) -> list[Section]:
    """The plugin's own sections for these records, in report order."""
    return [section for build in DEFAULT_SECTIONS if (section := build(records)) is not None]
