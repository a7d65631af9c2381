"""Reports from case records: loading saved runs, the one list of report sections,
their Markdown/HTML/terminal rendering, CSV/JSON, charts, compare and the gate, atomic
files. Reads records; never runs a decode. The names below are its public API."""

from pytest_specdec.reporting.export import render_csv, render_json
from pytest_specdec.reporting.files import write_reports
from pytest_specdec.reporting.html import render_html
from pytest_specdec.reporting.layout import depth_text, flagged_lines, report_meta, summary_table
from pytest_specdec.reporting.load import (ReportError, load_records, records_from_benchmark_json,
                                           select_records)
from pytest_specdec.reporting.machine_text import describe_machine, describe_specdec_machine
from pytest_specdec.reporting.markdown import render_markdown, render_terminal
from pytest_specdec.reporting.sections import Section, default_sections
from pytest_specdec.reporting.tables import peer_settings_lines

__all__ = [
    "ReportError", "Section", "default_sections", "depth_text", "describe_machine",
    "describe_specdec_machine", "flagged_lines", "load_records", "peer_settings_lines",
    "records_from_benchmark_json", "render_csv", "render_html", "render_json",
    "render_markdown", "render_terminal", "report_meta", "select_records", "summary_table",
    "write_reports",
]
