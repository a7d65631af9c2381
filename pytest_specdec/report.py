"""Reports from saved runs: a terminal table, and Markdown, CSV, JSON and HTML files,
with PNG charts when matplotlib is installed (the ``charts`` extra).

The source is pytest-benchmark's saved JSON (``--benchmark-save`` / ``--benchmark-json``):
every pytest-specdec case leaves one flat record in its ``extra_info``. Reports only
read and format those records; no metric is recomputed here (see ``metrics.py``), so a
report can never disagree with the run it was made from. The one derived figure is the
range of tokens/s over the timed rounds: the record's new tokens over each round's wall
time (every round decodes the same tokens).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from tabulate import tabulate

SCHEMA_VERSION = 1

#: Keys every schema-1 record carries; a record without one of them cannot be reported.
REQUIRED_KEYS = (
    "specdec_schema", "role", "drafter", "paradigm", "temperature",
    "target", "dtype", "device", "k", "problems", "max_new_tokens",
    "new_tokens", "steps", "drafted", "accepted",
    "mat", "acceptance_rate", "per_position_acceptance", "draft_share", "tokens_per_s",
    "wall_s_rounds", "wall_s", "baseline_wall_s", "speedup",
    "accuracy", "output_sha256", "lossless",
)

_NUMBER = (int, float)
_NUMBER_OR_NULL = (int, float, type(None))

#: What the reports compute with must have the right type, or the error would be a crash.
KEY_TYPES: dict[str, tuple[type, ...]] = {
    **dict.fromkeys(("role", "drafter", "paradigm", "target", "dtype", "device",
                     "output_sha256", "lossless"), (str,)),
    **dict.fromkeys(("temperature", "mat", "draft_share", "tokens_per_s", "wall_s",
                     "accuracy"), _NUMBER),
    **dict.fromkeys(("acceptance_rate", "baseline_wall_s", "speedup"), _NUMBER_OR_NULL),
    **dict.fromkeys(("per_position_acceptance", "wall_s_rounds"), (list,)),
}

ROLES = ("baseline", "speculative", "peer")
#: Summary columns start with these paradigms, in this order.
PARADIGM_ORDER = ("multi_round", "best_of_n")
#: Hugging Face's own decoding, in the order they are shown after our drafters.
PEER_ORDER = ("hf_generate", "hf_pld")
#: The like-for-like pair compared in the peer ratios: our prompt lookup vs Hugging Face's.
OUR_PLD, PEER_PLD, PEER_PLAIN = "pld", "hf_pld", "hf_generate"

#: Meta block of the Markdown report, in this order.
META_KEYS = ("target", "dtype", "device", "problems", "max_new_tokens", "k", "depth profile",
             "date", "machine")

REPORT_SUFFIXES = (".md", ".csv", ".json", ".html")
#: Chart files, ``<stem><suffix>``, written only when asked for (``--charts``).
CHART_SUFFIXES = ("-speedup.png", "-acceptance.png")
CHARTS_EXTRA = "pip install pytest-specdec[charts]"
PER_POSITION_SHOWN = 8
NO_VALUE = "—"


class ReportError(ValueError):
    """A run file or one of its records cannot be reported; the message names the file."""


# --------------------------------------------------------------------------- loading


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
        "machine": describe_machine(data.get("machine_info")),
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
    _check_record(extra, f"{source}: case {case!r}")
    record = dict(extra)
    record.setdefault("case", case)
    return record


def _check_record(extra: dict, where: str) -> None:
    """Every required key present, with a usable type; ``where`` opens the message."""
    missing = [key for key in REQUIRED_KEYS if key not in extra]
    if missing:
        raise ReportError(f"{where} lacks required keys: {', '.join(missing)}")
    wrong = [f"{key} ({type(extra[key]).__name__})" for key, types in KEY_TYPES.items()
             if not isinstance(extra[key], types)]
    wrong += [f"{key} (holds a non-number)" for key in ("per_position_acceptance", "wall_s_rounds")
              if isinstance(extra[key], list) and not all(isinstance(x, _NUMBER) for x in extra[key])]
    if wrong:
        raise ReportError(f"{where} has values of the wrong type: {', '.join(wrong)}")
    if extra["role"] not in ROLES:
        raise ReportError(f"{where} has role {extra['role']!r}; expected one of {', '.join(ROLES)}")


def describe_machine(machine_info: Any) -> str:
    """One line from pytest-benchmark's machine_info: host, CPU, OS, Python, then what
    pytest-specdec adds under ``machine_info["specdec"]`` (GPUs, driver, CUDA, torch and
    transformers versions; see :func:`describe_specdec_machine`)."""
    if not isinstance(machine_info, dict):
        return ""
    cpu = machine_info.get("cpu")
    parts = [
        machine_info.get("node"),
        cpu.get("brand_raw") if isinstance(cpu, dict) else None,
        " ".join(filter(None, (machine_info.get("system"), machine_info.get("release")))),
        f"Python {machine_info['python_version']}" if machine_info.get("python_version") else None,
    ]
    line = ", ".join(str(part) for part in parts if part)
    specdec = describe_specdec_machine(machine_info.get("specdec"))
    return "; ".join(filter(None, (line, specdec)))


def describe_specdec_machine(info: Any) -> str:
    """``GPU NVIDIA H200 (driver 550.54, CUDA 12.4); torch 2.13.0, transformers 5.24.0``
    from the ``specdec`` entry of machine_info (empty when there is none)."""
    if not isinstance(info, dict):
        return ""
    parts = []
    gpus = info.get("gpus")
    if isinstance(gpus, list) and gpus:
        counted = {name: gpus.count(name) for name in dict.fromkeys(map(str, gpus))}
        names = ", ".join(f"{count}x {name}" if count > 1 else name
                          for name, count in counted.items())
        versions = ", ".join(f"{label} {info[key]}" for key, label in
                             (("driver", "driver"), ("cuda", "CUDA")) if info.get(key))
        parts.append(f"GPU {names}" + (f" ({versions})" if versions else ""))
    software = ", ".join(f"{key} {info[key]}" for key in ("torch", "transformers") if info.get(key))
    if software:
        parts.append(software)
    return "; ".join(parts)


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


def report_meta(records: Sequence[dict]) -> dict[str, str]:
    """The Markdown meta block: each field's distinct values, in order of appearance;
    ``k`` as :func:`depth_text` gives it."""
    sources = {"date": "run_date", "depth profile": "depth_profile"}
    return {key: depth_text(records) if key == "k" else _distinct_text(records, sources.get(key, key))
            for key in META_KEYS}


def draft_depth_of(record: dict) -> int | None:
    """The draft depth a case ran with: its ``k``, for the cases that draft (our
    drafters and hf_pld); None for plain decoding (the baseline, hf_generate)."""
    k = record.get("k")
    if record["role"] == "baseline" or record["drafter"] == PEER_PLAIN or not k:
        return None
    return k


def depth_text(records: Sequence[dict]) -> str:
    """The meta block's ``k``: the one draft depth every drafting case ran with, or,
    where they differ (each drafter at its own depth), each drafter's, in table order:
    ``lookahead 4, pld 10, sam 40, hf_pld 10`` (``pld 5/10`` for a drafter that ran at
    several); ``—`` without drafting cases."""
    depths: dict[str, dict[str, None]] = {}
    for record in sorted(records, key=lambda r: _row_order(_row_key(r))):
        k = draft_depth_of(record)
        if k is not None:
            depths.setdefault(record["drafter"], {})[str(k)] = None
    distinct = {k for ks in depths.values() for k in ks}
    if len(distinct) <= 1:
        return next(iter(distinct), NO_VALUE)
    return ", ".join(f"{drafter} {'/'.join(ks)}" for drafter, ks in depths.items())


def _distinct_text(records: Sequence[dict], key: str) -> str:
    values = dict.fromkeys(str(r[key]) for r in records if r.get(key) not in (None, ""))
    return ", ".join(values) or NO_VALUE


# --------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class Column:
    """One summary column: a paradigm at one temperature."""

    paradigm: str
    temperature: float

    def header(self, *, with_temperature: bool) -> str:
        if not with_temperature:
            return self.paradigm
        return f"{self.paradigm} T={_temperature_text(self.temperature)}"


def _column_of(record: dict) -> Column:
    return Column(record["paradigm"], float(record["temperature"]))


def _columns(records: Sequence[dict]) -> list[Column]:
    """Known paradigms first, then others in order of appearance; temperatures rising.

    A fixed order keeps tables of different runs (or of files given in another order)
    comparable at a glance.
    """
    paradigms = list(dict.fromkeys([*PARADIGM_ORDER, *(r["paradigm"] for r in records)]))
    columns = set(map(_column_of, records))
    return sorted(columns, key=lambda c: (paradigms.index(c.paradigm), c.temperature))


def _shows_temperature(records: Sequence[dict]) -> bool:
    # Label every column with T as soon as temperatures differ anywhere, so that no
    # column leaves its temperature to be guessed.
    return len({float(r["temperature"]) for r in records}) > 1


def _row_key(record: dict) -> tuple[str, str]:
    return record["role"], record["drafter"]


def _row_order(row: tuple[str, str]) -> tuple:
    """Baseline first, then our drafters alphabetically, then the peers."""
    role, drafter = row
    peer_rank = PEER_ORDER.index(drafter) if drafter in PEER_ORDER else len(PEER_ORDER)
    return ROLES.index(role), peer_rank if role == "peer" else 0, drafter


def _rows(records: Sequence[dict]) -> list[tuple[str, str]]:
    return sorted(set(map(_row_key, records)), key=_row_order)


def _target_label(record: dict) -> str:
    return f"{record['target']} ({record['dtype']})"


def _group_by_target(records: Sequence[dict]) -> dict[str, list[dict]]:
    """Records per target and dtype, in order of first appearance."""
    groups: dict[str, list[dict]] = {}
    for record in records:
        groups.setdefault(_target_label(record), []).append(record)
    return groups


def _report_order(records: Sequence[dict]) -> list[dict]:
    """Records as the report lists them: by target, column, then row."""
    targets = list(_group_by_target(records))
    columns = _columns(records)
    return sorted(records, key=lambda r: (targets.index(_target_label(r)),
                                          columns.index(_column_of(r)),
                                          _row_order(_row_key(r))))


# --------------------------------------------------------------------------- formatting


def _temperature_text(temperature: float) -> str:
    return f"{float(temperature):g}"


def _number(value: float | None, digits: int = 2, suffix: str = "") -> str:
    return NO_VALUE if value is None else f"{value:.{digits}f}{suffix}"


def _percent(value: float | None, digits: int = 1) -> str:
    return NO_VALUE if value is None else f"{value * 100:.{digits}f}%"


def _speedup_text(value: float | None) -> str:
    return _number(value, 2, "x")


def timing_flags_of(record: dict) -> list[str]:
    """Why a record's speedup cannot be trusted as measured (pytest_specdec.timing)."""
    flags = record.get("timing_flags")
    return [str(f) for f in flags] if isinstance(flags, list) else []


def _noise_text(record: dict) -> str:
    noise = record.get("speedup_noise")
    if not isinstance(noise, _NUMBER) or record["role"] == "baseline" or \
            record["drafter"] == PEER_PLAIN:  # their own reference: exactly 1.00x
        return ""
    return f" · ±{noise * 100:.0f}%"


def _summary_cell(record: dict | None) -> str:
    if record is None:
        return NO_VALUE
    flag = " !" if timing_flags_of(record) else ""
    return (f"{_speedup_text(record['speedup'])} · MAT {_number(record['mat'])}"
            f"{_noise_text(record)}{flag}")


def _wall_text(record: dict) -> str:
    rounds = record["wall_s_rounds"]
    median = _number(record["wall_s"])
    if len(rounds) < 2:
        return median
    return f"{median} ({min(rounds):.2f}–{max(rounds):.2f})"


def tokens_per_s_rounds(record: dict) -> list[float]:
    """Tokens/s of each timed round: every round decodes the same tokens (outputs are
    checked equal), so it is the record's new tokens over that round's wall time."""
    new_tokens = record.get("new_tokens")
    if not isinstance(new_tokens, _NUMBER):
        return []
    return [new_tokens / wall for wall in record["wall_s_rounds"] if wall > 0]


def _tokens_per_s_text(record: dict) -> str:
    """The median tokens/s (as the record holds it), with the range over the rounds."""
    median = _number(record["tokens_per_s"], 1)
    rounds = tokens_per_s_rounds(record)
    if len(rounds) < 2:
        return median
    return f"{median} ({min(rounds):.1f}–{max(rounds):.1f})"


# --------------------------------------------------------------------------- summary


def summary_table(records: Sequence[dict], *,
                  mark_best: Callable[[str], str] | None = None) -> tuple[list[str], list[list[str]]]:
    """Headers and rows: one row per drafter, one column per paradigm (and temperature).

    Cells read ``1.42x · MAT 2.31``; ``—`` where no record. With several targets or
    dtypes, a leading ``target`` column tells the groups apart. ``mark_best`` rewrites
    the cell(s) with the best speedup per column among speculative rows. Where several
    records fall on one cell (runs merged), the last one read is shown.
    """
    groups = _group_by_target(records)
    several_targets = len(groups) > 1
    columns = _columns(records)
    with_temperature = _shows_temperature(records)
    headers = (["target"] if several_targets else []) + ["drafter"]
    headers += [column.header(with_temperature=with_temperature) for column in columns]
    rows = []
    for label, group in groups.items():
        for row in _summary_rows(group, columns, mark_best):
            rows.append(([label] if several_targets else []) + row)
    return headers, rows


def _summary_rows(records: Sequence[dict], columns: Sequence[Column],
                  mark_best: Callable[[str], str] | None) -> list[list[str]]:
    by_cell = {(_row_key(r), _column_of(r)): r for r in records}
    best = _best_speedups(by_cell)
    rows = []
    for row in _rows(records):
        cells = [row[1]]
        for column in columns:
            record = by_cell.get((row, column))
            text = _summary_cell(record)
            if mark_best and record is not None and _is_best(record, best):
                text = mark_best(text)
            cells.append(text)
        rows.append(cells)
    return rows


def _best_speedups(by_cell: Mapping[tuple, dict]) -> dict[Column, float]:
    """Per column, the highest speedup among speculative records (not baseline, not peers)."""
    best: dict[Column, float] = {}
    for (row, column), record in by_cell.items():
        if (row[0] == "speculative" and record["speedup"] is not None
                and not timing_flags_of(record)):  # a flagged speedup is never best
            best[column] = max(best.get(column, record["speedup"]), record["speedup"])
    return best


def _is_best(record: dict, best: Mapping[Column, float]) -> bool:
    # a peer may tie the best speculative speedup, so the role is checked as well
    return (record["role"] == "speculative" and record["speedup"] is not None
            and not timing_flags_of(record) and record["speedup"] == best.get(_column_of(record)))


def render_terminal(records: Sequence[dict]) -> str:
    """The summary table(s) for a terminal; ``*`` marks the best speculative speedup."""
    parts = []
    groups = _group_by_target(records)
    for label, group in groups.items():
        headers, rows = summary_table(group, mark_best=lambda text: f"{text}*")
        table = tabulate(rows, headers, tablefmt="simple", disable_numparse=True)
        parts.append(f"{label}\n{table}" if len(groups) > 1 else table)
    parts.append("cells: speedup · MAT · ±the speedup's timing noise;  * best speedup among "
                 "speculative drafters;  ! flagged (see the report's Timing and costs)")
    return "\n\n".join(parts) + "\n"


# --------------------------------------------------------------------------- markdown


def render_markdown(records: Sequence[dict], *, title: str, meta: Mapping[str, str],
                    charts: Mapping[str, str] | None = None) -> str:
    """The full Markdown report: meta, summary, details, per-position acceptance, peers.

    ``charts`` maps chart titles to image files (relative to the report) shown after
    the summary.
    """
    sections = [f"# {title}", _markdown_meta(meta), _markdown_summary(records)]
    if charts:
        sections.append("## Charts\n\n" + "\n\n".join(f"![{name}]({file})"
                                                      for name, file in charts.items()))
    sections.append(_markdown_details(records))
    for section in (_markdown_timing(records), _markdown_lossless(records), _markdown_per_position(records),
                    _markdown_mat_by_sequence(records), _markdown_hybrid_parts(records),
                    _markdown_drafter_notes(records)):
        if section:
            sections.append(section)
    peers = peer_ratio_lines(records) + peer_settings_lines(records)
    if peers:
        sections.append("## Compared with Hugging Face generate\n\n" + "\n".join(peers))
    sections.append(HOW_TO_READ)
    return "\n\n".join(sections) + "\n"


def _markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    return tabulate(rows, headers, tablefmt="github", disable_numparse=True)


def _markdown_meta(meta: Mapping[str, str]) -> str:
    return "\n".join(f"- **{key}**: {value}" for key, value in meta.items())


def _markdown_summary(records: Sequence[dict]) -> str:
    lines = ["## Summary", "",
             "Cells: speedup over the baseline · MAT · ±the speedup's timing noise. **Bold**: best speedup "
             "among speculative drafters in the column; `!`: flagged (see Timing and costs)."]
    groups = _group_by_target(records)
    for label, group in groups.items():
        headers, rows = summary_table(group, mark_best=lambda text: f"**{text}**")
        if len(groups) > 1:
            lines += ["", f"### {label}"]
        lines += ["", _markdown_table(headers, rows)]
    return "\n".join(lines)


DETAIL_HEADERS = ["drafter", "paradigm", "T", "k", "speedup", "MAT", "acceptance", "draft share",
                  "tokens/s median (min–max)", "wall s median (min–max)", "accuracy",
                  "lossless", "output"]


def _depth_text(record: dict) -> str:
    k = draft_depth_of(record)
    return NO_VALUE if k is None else str(k)


def _detail_row(record: dict) -> list[str]:
    """The details of one record; the last cell is the output hash, unformatted."""
    return [
        record["drafter"], record["paradigm"], _temperature_text(record["temperature"]),
        _depth_text(record), _speedup_text(record["speedup"]), _number(record["mat"]),
        _percent(record["acceptance_rate"]), _percent(record["draft_share"]),
        _tokens_per_s_text(record), _wall_text(record), _percent(record["accuracy"]),
        record["lossless"], record["output_sha256"],
    ]


def _details_table(records: Sequence[dict]) -> tuple[list[str], list[list[str]]]:
    several_targets = len(_group_by_target(records)) > 1
    headers = (["target"] if several_targets else []) + DETAIL_HEADERS
    rows = [([_target_label(r)] if several_targets else []) + _detail_row(r)
            for r in _report_order(records)]
    return headers, rows


def _markdown_details(records: Sequence[dict]) -> str:
    headers, rows = _details_table(records)
    rows = [row[:-1] + [f"`{row[-1]}`"] for row in rows]
    return "## Details\n\n" + _markdown_table(headers, rows)


TIMING_NOTE = (
    "Timing `calibrated`: a short probe of the target (one-token decode forwards) runs "
    "before every sequence and after the last; each stretch of a run is divided by the "
    "probes around it, so a speedup is a ratio of times in units of the machine's speed "
    "and a change of load during the session cancels out (`paired`: each timed round "
    "also has a fresh baseline round next to it). `±noise`: the timing noise (probes "
    "that disagree around a stretch, and the spread of the rounds). `problems 95%`: "
    "bootstrap over the problems. `raw`: the ratio of wall times without calibration; "
    "`slowdown`: the machine's speed during the case against its baseline's (probe "
    "time ratio). Costs per step, at this case's machine speed, over every forward but a "
    "sequence's first: `t_step` a plain decode step (the baseline's), `t_verify` this "
    "case's verify forward, `t_draft` its drafting; `ideal` = MAT × t_step ÷ (t_verify + "
    "t_draft). A speedup above its ideal by more than 15% plus twice its noise is flagged "
    "`above cost bound` (a measurement artefact), one whose noise exceeds 10% `unstable "
    "timing`; flagged speedups are never marked best.")

TIMING_HEADERS = ["drafter", "paradigm", "T", "timing", "speedup", "±noise", "problems 95%",
                  "raw", "slowdown", "t_step ms", "t_verify ms", "t_draft ms", "ideal",
                  "measured ÷ ideal", "flags"]


def _timing_table(records: Sequence[dict]) -> tuple[list[str], list[list[str]]]:
    rows = []
    for r in _report_order(records):
        if r["role"] == "baseline" or "speedup_noise" not in r:
            continue
        low, high = r.get("speedup_problems_low"), r.get("speedup_problems_high")
        rows.append([
            r["drafter"], r["paradigm"], _temperature_text(r["temperature"]),
            str(r.get("timing", NO_VALUE)), _speedup_text(r["speedup"]),
            _percent(r.get("speedup_noise"), 1),
            f"{_number(low)}–{_number(high)}x" if isinstance(low, _NUMBER) else NO_VALUE,
            _speedup_text(r.get("speedup_raw")), _number(r.get("machine_slowdown")),
            _number(r.get("t_step_ms"), 1), _number(r.get("t_verify_ms"), 1),
            _number(r.get("t_draft_ms"), 1), _speedup_text(r.get("ideal_speedup")),
            _number(r.get("measured_over_ideal")), ", ".join(timing_flags_of(r)) or NO_VALUE,
        ])
    return TIMING_HEADERS, rows


def _markdown_timing(records: Sequence[dict]) -> str:
    headers, rows = _timing_table(records)
    if not rows:
        return ""
    return "## Timing and costs\n\n" + TIMING_NOTE + "\n\n" + _markdown_table(headers, rows)


def flagged_lines(records: Sequence[dict]) -> list[str]:
    """One line per record whose speedup is flagged, for the session's closing warning."""
    return [f"{r['drafter']} on {r['paradigm']} T={_temperature_text(r['temperature'])}: "
            f"{_speedup_text(r['speedup'])} ({', '.join(timing_flags_of(r))}; ideal "
            f"{_speedup_text(r.get('ideal_speedup'))}, noise {_percent(r.get('speedup_noise'))})"
            for r in _report_order(records) if timing_flags_of(r)]


LOSSLESS_NOTE = (
    "Every token of each speculative case, judged by `method`: `equality` with plain "
    "decoding (float32, or `--specdec-lossless exact`), or `teacher_forced` (half "
    "precision: each token against the target's choice given the sequence's own prefix, "
    "near-ties within the margin accepted). *departed*: sequences that differ from plain "
    "decoding's, and the first token where one does (problem / sample / round / token). "
    "*check s*: seconds spent in the teacher-forced forwards, and their share of the "
    "case's time (timed rounds + check).")
LOSSLESS_HEADERS = ["drafter", "paradigm", "T", "method", "exact tokens", "near-ties",
                    "largest margin", "departed", "first departure", "check s (share)"]


def _lossless_table(records: Sequence[dict]) -> tuple[list[str], list[list[str]]]:
    """Per speculative case: what the losslessness check found (records from before
    the check reported it have no row)."""
    rows = []
    for r in _report_order(records):
        if r.get("role") != "speculative" or "tokens_exact" not in r:
            continue
        first = r.get("first_departure")
        where = NO_VALUE if not first else (
            f"{first['problem']} / {first['sample']} / {first['round']} / {first['token']}")
        check_s = r.get("check_s") or 0.0
        case_s = check_s + sum(r.get("wall_s_rounds") or [r["wall_s"]])
        rows.append([
            r["drafter"], r["paradigm"], _temperature_text(r["temperature"]),
            r.get("lossless_method", NO_VALUE), str(r["tokens_exact"]),
            str(r.get("tokens_near_tie", 0)),
            _number(r.get("max_tie_margin")) if r.get("tokens_near_tie") else NO_VALUE,
            str(r.get("sequences_departed", 0)), where,
            f"{check_s:.1f} ({_percent(check_s / case_s if case_s else 0.0)})"])
    return LOSSLESS_HEADERS, rows


def _markdown_lossless(records: Sequence[dict]) -> str:
    headers, rows = _lossless_table(records)
    if not rows:
        return ""
    return "## Losslessness\n\n" + LOSSLESS_NOTE + "\n\n" + _markdown_table(headers, rows)


def _series_table(records: Sequence[dict], series: Callable[[dict], Sequence[float]],
                  label: str, cell: Callable[[float], str], *, longest: int = 10**9,
                  at_least: int = 1) -> tuple[list[str], list[list[str]]]:
    """One row per speculative record: a series of numbers in columns ``label 1..n``
    (n: the longest series, at most `longest`); no table when n < at_least."""
    speculative = [r for r in _report_order(records) if r["role"] == "speculative"]
    shown = min(longest, max((len(series(r)) for r in speculative), default=0))
    if shown < at_least:
        return [], []
    several_targets = len(_group_by_target(records)) > 1
    headers = (["target"] if several_targets else []) + ["drafter", "paradigm", "T"]
    headers += [f"{label} {i + 1}" for i in range(shown)]
    rows = []
    for record in speculative:
        values = list(series(record))[:shown]
        cells = [cell(v) for v in values] + [NO_VALUE] * (shown - len(values))
        row = [record["drafter"], record["paradigm"], _temperature_text(record["temperature"])]
        rows.append(([_target_label(record)] if several_targets else []) + row + cells)
    return headers, rows


def _per_position_table(records: Sequence[dict]) -> tuple[list[str], list[list[str]]]:
    """Acceptance at the first draft positions, in percent, per speculative record."""
    return _series_table(records, lambda r: r["per_position_acceptance"], "pos",
                         lambda rate: _percent(rate, 0), longest=PER_POSITION_SHOWN)


def _markdown_per_position(records: Sequence[dict]) -> str:
    headers, rows = _per_position_table(records)
    if not rows:
        return ""
    return ("## Per-position acceptance\n\n" + PER_POSITION_NOTE + "\n\n"
            + _markdown_table(headers, rows))


PER_POSITION_NOTE = (f"Share of draft tokens accepted at each of the first {PER_POSITION_SHOWN} "
                     "draft positions, among forwards whose draft reached that position.")


def _sequence_mats(record: dict) -> Sequence[float]:
    """MAT by round for multi-round records, by sample for best-of-N ones."""
    by_round = record.get("mat_by_round") or []
    return by_round if len(by_round) > 1 else record.get("mat_by_sample") or []


def _mat_by_sequence_table(records: Sequence[dict]) -> tuple[list[str], list[list[str]]]:
    """MAT of the i-th round (multi-round) or sample (best-of-N) per speculative record."""
    return _series_table(records, _sequence_mats, "seq", _number, at_least=2)


def _markdown_mat_by_sequence(records: Sequence[dict]) -> str:
    headers, rows = _mat_by_sequence_table(records)
    if not rows:
        return ""
    return ("## MAT by round and sample\n\n" + MAT_BY_SEQUENCE_NOTE + "\n\n"
            + _markdown_table(headers, rows))


MAT_BY_SEQUENCE_NOTE = (
    "MAT of the i-th sequence of every problem: round i for multi_round, sample i "
    "for best_of_n. A drafter that shares state across the sequences of a problem "
    "(group sharing) should rise after seq 1; compare it with the same drafter "
    "run with sharing off.")


def peer_ratio_lines(records: Sequence[dict]) -> list[str]:
    """Per column where both sides exist, how we compare with Hugging Face's generate.

    ``our baseline tok/s ÷ hf_generate tok/s`` compares plain decoding loops;
    ``our pld speedup ÷ hf_pld speedup`` compares the same method (prompt lookup), each
    against its own plain decoding. Only the drafter named exactly ``pld`` is compared.
    """
    lines = []
    groups = _group_by_target(records)
    for label, group in groups.items():
        with_temperature = _shows_temperature(group)
        by_cell = {(r["drafter"], _column_of(r)): r for r in group}
        for column in _columns(group):
            ratios = _peer_ratios(by_cell, column)
            if ratios:
                name = column.header(with_temperature=with_temperature)
                prefix = f"{label}, {name}" if len(groups) > 1 else name
                lines.append(f"- {prefix}: " + "; ".join(ratios))
    return lines


def _markdown_drafter_notes(records: Sequence[dict]) -> str:
    """What each drafter says about its rows (``drafter_note``: where its drafts come
    from when that is not obvious), once per drafter and note."""
    notes: dict[str, dict[str, None]] = {}
    for record in sorted(records, key=lambda r: _row_order(_row_key(r))):
        if record.get("drafter_note"):
            notes.setdefault(record["drafter"], {})[str(record["drafter_note"])] = None
    if not notes:
        return ""
    return "## Drafter notes\n\n" + "\n".join(
        f"- {drafter}: {'; '.join(texts)}" for drafter, texts in notes.items())


def _markdown_hybrid_parts(records: Sequence[dict]) -> str:
    """Which part of each hybrid (A+B) drafted how often (``hybrid_parts``: the steps
    whose draft came from each part, and the tokens drafted in them)."""
    lines = []
    for record in sorted(records, key=lambda r: _row_order(_row_key(r))):
        parts = record.get("hybrid_parts")
        if not isinstance(parts, dict) or not parts:
            continue
        total = sum(int(c.get("steps", 0)) for c in parts.values()) or 1
        text = "; ".join(f"{name} {c.get('steps', 0)} steps ({100 * c.get('steps', 0) / total:.0f}%), "
                         f"{c.get('tokens', 0)} tokens" for name, c in parts.items())
        lines.append(f"- {record['drafter']}, {record['paradigm']} "
                     f"T={_temperature_text(record['temperature'])}: {text}")
    if not lines:
        return ""
    return ("## Hybrids\n\nThe steps whose draft came from each part (the last timed round), "
            "and the draft tokens proposed in them.\n\n" + "\n".join(lines))


def peer_settings_lines(records: Sequence[dict]) -> list[str]:
    """How each peer ran (``peer_settings`` of its records: prompt lookup depth and
    n-gram size, copied from our pld, and the coupled sampling), and where a peer's
    tokens differed from our baseline's (half precision only: in fp32 that fails the
    case). Records written before peers stored their settings show nothing here."""
    settings: dict[str, dict[str, None]] = {}
    lines = []
    for record in sorted(records, key=lambda r: _row_order(_row_key(r))):
        if record["role"] != "peer":
            continue
        if isinstance(record.get("peer_settings"), dict):
            text = ", ".join(f"{key} {value}" for key, value in record["peer_settings"].items())
            settings.setdefault(record["drafter"], {})[text] = None
        if record.get("peer_divergence"):
            where = str(record["peer_divergence"]).splitlines()[0]
            lines.append(f"- {record['drafter']}, {record['paradigm']} "
                         f"T={_temperature_text(record['temperature'])}: differs from our "
                         f"baseline ({record['dtype']}) first at {where}")
    return [f"- {peer} settings: {'; '.join(texts)}" for peer, texts in settings.items()] + lines


def _peer_ratios(by_cell: Mapping[tuple[str, Column], dict], column: Column) -> list[str]:
    ours_plain, peer_plain = by_cell.get(("baseline", column)), by_cell.get((PEER_PLAIN, column))
    ours_pld, peer_pld = by_cell.get((OUR_PLD, column)), by_cell.get((PEER_PLD, column))
    ratios = []
    if ours_plain and peer_plain and peer_plain["tokens_per_s"]:
        ours, theirs = ours_plain["tokens_per_s"], peer_plain["tokens_per_s"]
        ratios.append(f"our baseline tok/s ÷ {PEER_PLAIN} tok/s = {ours / theirs:.2f} "
                      f"({ours:.1f} ÷ {theirs:.1f})")
    if ours_pld and peer_pld and ours_pld["speedup"] is not None and peer_pld["speedup"]:
        ours, theirs = ours_pld["speedup"], peer_pld["speedup"]
        ratios.append(f"our {OUR_PLD} speedup ÷ {PEER_PLD} speedup = {ours / theirs:.2f} "
                      f"({ours:.2f}x ÷ {theirs:.2f}x)")
    return ratios


HOW_TO_READ = """\
## How to read

**Speedup** is the ratio of total times for the same work: the baseline's time divided by
the drafter's, each the median of its timed rounds, both measured side by side in one session on one
machine and calibrated to the machine's speed while each ran (see Timing and costs; hf_pld
is measured against hf_generate the same way); ±: its timing noise; `!`: flagged.
**MAT** (mean accepted tokens) is the number of tokens one target forward yields on
average, the bonus token included: 1.00 without speculation. A higher MAT means fewer
target forwards; the speedup is what remains after paying for drafting (see draft share).
Acceptance is accepted draft tokens ÷ drafted tokens. **k** is the draft depth a case ran
with, the most draft tokens one step can accept: each drafter's own (its reference's), or
the one --specdec-k set for all; hf_pld drafts as deep as pld. Lossless says whether the output was
identical to the baseline's (exact), differed only where the target's top choices were
nearly tied (near_tie), or was not checked."""


# --------------------------------------------------------------------------- data files


#: CSV columns in this order first; any other keys follow alphabetically.
CSV_FIELDS = (
    "case", "role", "drafter", "paradigm", "temperature", "target", "dtype", "device",
    "k", "problems", "max_new_tokens", "new_tokens", "steps", "drafted", "accepted",
    "mat", "acceptance_rate", "per_position_acceptance", "draft_share", "tokens_per_s",
    "wall_s", "wall_s_rounds", "baseline_wall_s", "speedup", "timing", "speedup_raw",
    "speedup_noise", "speedup_problems_low", "speedup_problems_high", "probe_ms",
    "machine_slowdown", "t_step_ms", "t_verify_ms", "t_draft_ms", "ideal_speedup",
    "measured_over_ideal", "timing_flags", "drafter_weights", "accuracy", "lossless",
    "lossless_method", "tokens_exact", "tokens_near_tie", "max_tie_margin",
    "sequences_departed", "first_departure", "check_s",
    "output_sha256", "specdec_schema", "source", "run_date", "machine",
)


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


def write_reports(records: Sequence[dict], directory: str | Path, stem: str, *,
                  meta: Mapping[str, str], title: str | None = None,
                  charts: bool = False, replace: bool = False) -> list[Path]:
    """Write ``<stem>.md``, ``.csv``, ``.json`` and ``.html`` into ``directory`` (with
    ``charts``, also ``<stem>-speedup.png`` and ``<stem>-acceptance.png``, which the
    Markdown links and the HTML embeds); return their paths.

    Each file appears whole or not at all (temp file, fsync, rename). Existing files are
    never overwritten: if any of the names is taken, all files get the first free suffix
    ``-2``, ``-3``, ... With ``replace`` the stem is used as given and its files are
    replaced (atomically, each whole): how a session rewrites its own report as cases
    finish. Charts without matplotlib raise ReportError before any file or directory
    is made.
    """
    from pytest_specdec.charts import CHART_TITLES, render_charts
    from pytest_specdec.report_html import render_html

    _check_stem(stem)
    pngs = render_charts(records) if charts else {}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    suffixes = REPORT_SUFFIXES + tuple(pngs)
    free_stem = stem if replace else _free_stem(directory, stem, suffixes)
    title = title or f"pytest-specdec report: {stem}"
    contents: dict[str, str | bytes] = {
        ".md": render_markdown(records, title=title, meta=meta, charts={
            CHART_TITLES[suffix]: f"{free_stem}{suffix}" for suffix in pngs}),
        ".csv": render_csv(records),
        ".json": render_json(records, meta=meta),
        ".html": render_html(records, title=title, meta=meta, charts={
            CHART_TITLES[suffix]: png for suffix, png in pngs.items()}),
        **pngs,
    }
    paths = []
    for suffix in suffixes:
        path = directory / f"{free_stem}{suffix}"
        _write_atomically(path, contents[suffix])
        paths.append(path)
    _fsync_directory(directory)
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


def _write_atomically(path: Path, content: str | bytes) -> None:
    data = content.encode("utf-8") if isinstance(content, str) else content
    descriptor, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temp_name, 0o666 & ~_umask())  # mkstemp makes 0600; reports are shared files
        os.replace(temp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_name)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_directory(directory: Path) -> None:
    """Make the renames durable; not possible everywhere (Windows), so best effort."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)
