"""The report as Markdown (the sections of :mod:`.sections`, as GitHub renders them) and
the summary as a terminal table."""

from __future__ import annotations

from typing import Mapping, Sequence

from tabulate import tabulate

from pytest_specdec.reporting.layout import group_by_target, summary_table
from pytest_specdec.reporting.sections import (Best, Block, Heading, Images, Items, Section, Table,
                                               Text, default_sections)


def render_terminal(records: Sequence[dict]) -> str:
    """The summary table(s) for a terminal; ``*`` marks the best speculative speedup."""
    parts = []
    groups = group_by_target(records)
    for label, group in groups.items():
        headers, rows = summary_table(group, mark_best=lambda text: f"{text}*")
        table = tabulate(rows, headers, tablefmt="simple", disable_numparse=True)
        parts.append(f"{label}\n{table}" if len(groups) > 1 else table)
    parts.append("cells: speedup · MAT · ±the speedup's timing noise;  * best speedup among "
                 "speculative drafters;  ! flagged (see the report's Flagged speedups)")
    return "\n\n".join(parts) + "\n"


def render_markdown(records: Sequence[dict], *, title: str, meta: Mapping[str, str],
                    charts: Mapping[str, str] | None = None,
                    sections: Sequence[Section] | None = None) -> str:
    """The full Markdown report: the title, the meta block, then ``sections`` (default:
    :func:`~pytest_specdec.reporting.sections.default_sections` of the records).

    ``charts`` maps chart titles to image files (relative to the report).
    """
    parts = [f"# {title}", "\n".join(f"- **{key}**: {value}" for key, value in meta.items())]
    for section in default_sections(records) if sections is None else sections:
        text = markdown_section(section, charts or {})
        if text:
            parts.append(text)
    return "\n\n".join(parts) + "\n"


def markdown_section(section: Section, charts: Mapping[str, str]) -> str:
    """``## title``, the note, the blocks; "" when no block has anything to show."""
    blocks = [text for block in section.blocks if (text := _block(block, charts))]
    if not blocks:
        return ""
    return "\n\n".join([f"## {section.title}", *([section.note] if section.note else []),
                        *blocks])


def _block(block: Block, charts: Mapping[str, str]) -> str:
    if isinstance(block, Table):
        rows = [[f"**{cell}**" if isinstance(cell, Best) else cell for cell in row]
                for row in block.rows]
        if block.code_last:
            rows = [row[:-1] + [f"`{row[-1]}`"] for row in rows]
        return tabulate(rows, block.headers, tablefmt="github", disable_numparse=True)
    if isinstance(block, Heading):
        return f"### {block.text}"
    if isinstance(block, Items):
        return "\n".join(block.lines)
    if isinstance(block, Text):
        return block.text
    if isinstance(block, Images):
        return "\n\n".join(f"![{title}]({charts[title]})" for title in block.titles
                           if title in charts)
    raise TypeError(f"a report section holds {type(block).__name__}, not a block")
