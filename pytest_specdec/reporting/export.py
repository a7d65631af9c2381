"""The records as data files: CSV (one row per record, the case record's columns in
order) and JSON (the records as they are, with the meta block)."""

from __future__ import annotations

import csv
import io
import json
from typing import Any, Mapping, Sequence

from pytest_specdec.bench.record import COLUMNS

#: CSV columns in this order first (the case record's); any other keys (a record of
#: another version) follow alphabetically.
CSV_FIELDS = COLUMNS


def render_csv(records: Sequence[dict]) -> str:
    """One row per record, in the order given; lists are joined with ';', None is empty."""
    present = dict.fromkeys(key for record in records for key in record)
    fields = [key for key in CSV_FIELDS if key in present]
    fields += sorted(key for key in present if key not in CSV_FIELDS)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(fields)
    for record in records:
        writer.writerow([_csv_value(record.get(key)) for key in fields])
    return buffer.getvalue()


def _csv_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ";".join(map(str, value))
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return str(value)


def render_json(records: Sequence[dict], *, meta: Mapping[str, str]) -> str:
    """``{"meta": ..., "records": [...]}``, records unchanged and in the order given."""
    return json.dumps({"meta": dict(meta), "records": list(records)},
                      indent=2, ensure_ascii=False) + "\n"
