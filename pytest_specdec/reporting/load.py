"""Reading saved runs: pytest-benchmark's JSON (``--benchmark-save`` /
``--benchmark-json``), in which every pytest-specdec case leaves its record in
``extra_info``. Each record is checked against the case record's schema
(:func:`pytest_specdec.bench.record.check_record`) and stays the plain dict it was
saved as, so a run saved by an older version of this schema still loads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Sequence

from pytest_specdec.bench.record import SCHEMA_VERSION, RecordError, check_record
from pytest_specdec.reporting.machine_text import describe_machine


class ReportError(ValueError):
    """A run file or one of its records cannot be reported; the message names the file."""


def records_from_benchmark_json(data: Any, *, source: str = "<memory>") -> list[dict]:
    """The pytest-specdec records of one pytest-benchmark run, in file order.

    Benchmarks without ``extra_info["specdec_schema"]`` (plain pytest-benchmark cases
    in the same run) are skipped. Each record gets ``case``, ``source``, ``run_date``
    and ``machine`` unless it already has them.
    """
    benchmarks = data.get("benchmarks") if isinstance(data, dict) else None
    if not isinstance(benchmarks, list):
        raise ReportError(f"{source}: not a pytest-benchmark JSON file (no \"benchmarks\" list); "
                          "pass a file written by --benchmark-save or --benchmark-json")
    provenance = {
        "source": source,
        "run_date": str(data.get("datetime") or ""),
        "machine": describe_machine(data.get("machine_info"), _saved_memory(data)),
    }
    records = []
    for index, benchmark in enumerate(benchmarks):
        record = _specdec_record(benchmark, index, source)
        if record is not None:
            for key, value in provenance.items():
                record.setdefault(key, value)
            records.append(record)
    return records


def _specdec_record(benchmark: Any, index: int, source: str) -> dict | None:
    if not isinstance(benchmark, dict):
        raise ReportError(f"{source}: benchmarks[{index}] is not an object")
    extra = benchmark.get("extra_info")
    if not isinstance(extra, dict) or "specdec_schema" not in extra:
        return None
    case = str(benchmark.get("fullname") or benchmark.get("name") or f"benchmarks[{index}]")
    if extra["specdec_schema"] != SCHEMA_VERSION:
        raise ReportError(f"{source}: case {case!r} has specdec_schema "
                          f"{extra['specdec_schema']!r}; this version reads {SCHEMA_VERSION}")
    try:
        check_record(extra, f"{source}: case {case!r}")
    except RecordError as exc:
        raise ReportError(str(exc)) from None
    record = dict(extra)
    record.setdefault("case", case)
    return record


def load_records(paths: Sequence[str | Path]) -> list[dict]:
    """Records of every file, in the order given; ReportError names the file at fault."""
    records: list[dict] = []
    for path in map(Path, paths):
        records.extend(records_from_benchmark_json(_read_json(path), source=str(path)))
    return records


def _read_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ReportError(f"{path}: no such file") from None
    except UnicodeDecodeError:
        raise ReportError(f"{path}: not valid JSON (not UTF-8 text)") from None
    except OSError as exc:
        raise ReportError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ReportError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: "
                          f"{exc.msg})") from None
    except RecursionError:
        raise ReportError(f"{path}: not valid JSON for a report (nested too deeply)") from None


def select_records(records: Iterable[dict], *, drafters: Sequence[str] | None = None,
                   paradigms: Sequence[str] | None = None,
                   temperatures: Sequence[float] | None = None,
                   targets: Sequence[str] | None = None) -> list[dict]:
    """Records whose drafter, paradigm, temperature and target are among those given
    (None or empty: any). Targets are matched by name as the records carry it."""
    wanted_temperatures = {float(t) for t in temperatures or ()}
    return [r for r in records
            if (not drafters or r["drafter"] in drafters)
            and (not paradigms or r["paradigm"] in paradigms)
            and (not wanted_temperatures or float(r["temperature"]) in wanted_temperatures)
            and (not targets or r["target"] in targets)]


def _saved_memory(data: dict) -> Any:
    """The memory limit of a saved run's decode step (its top-level ``specdec`` entry,
    kept out of machine_info; an older run kept it in machine_info's), or None."""
    entry = data.get("specdec")
    return entry.get("memory") if isinstance(entry, dict) else None
