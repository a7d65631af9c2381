"""Compare two runs case by case, and gate on the metrics that matter.

Used by ``pytest-specdec compare BASE.json NEW.json [--fail ...]`` and, inside pytest,
by ``--specdec-compare RUN.json [--specdec-compare-fail ...]`` (the session's own
records are the NEW side). Both read the flat records every case stores in
pytest-benchmark's ``extra_info`` (see :mod:`pytest_specdec.reporting.load`).

Matching. A case is identified by (role, drafter, paradigm, temperature, target). When
each run holds a single target and the two differ (a model upgrade), cases are matched
without the target and a warning says so. Cases found in one run only are listed, never
gated. Runs that differ in dtype, device, machine, problems or token budget are
compared too, with a warning naming the difference: their MAT may differ for that reason.
The draft depth k is a setting of each case (every drafter has its own), so it is
compared case by case: one warning lists the compared cases whose k differs.

Deltas. For speedup, MAT, acceptance rate, tokens/s and accuracy (all higher-is-better)
the change is ``(new - base) / base``; it is undefined (``—``) where either side has no
value (the acceptance rate of plain decoding) or base is 0. Raw seconds are never
compared: speedup is already a ratio to a baseline measured in the same run.

The gate. A rule ``METRIC:DROP`` fails a compared case when::

    (new - base) / base < -max(DROP, noise floor of METRIC for that case)

MAT, acceptance rate and accuracy are deterministic (the outputs are checked to be
identical to plain decoding's, and the drafters are deterministic), so their noise floor
is 0: any drop beyond DROP is real. Timings are noisy; with
``spread(rounds) = (max(rounds) - min(rounds)) / median(rounds)`` over a record's
``wall_s_rounds`` (0 with a single timed round):

- speedup: the sum, over both runs, of spread(case) + spread(reference), the reference
  being the record the speedup is a ratio to (``baseline`` of the same paradigm and
  temperature for a drafter; ``hf_generate`` for ``hf_pld``). Where a run lacks the
  reference record, the case's own spread stands in for it. The baseline and
  ``hf_generate`` are their own reference (speedup 1.00 by definition): floor 0.
- tokens/s: spread(case in BASE) + spread(case in NEW).

A drop within the noise therefore never fails; with one timed round the floor is 0 and
a warning says so (use ``--specdec-timed-rounds 3`` for a gate on speedup). A gate
whose runs have no case in common checked nothing, and fails.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from tabulate import tabulate

from pytest_specdec.bench.record import COMPARED, GATED_METRICS, PEER_NAMES, PEER_PLAIN, ROLES
from pytest_specdec.reporting.layout import PARADIGM_ORDER, draft_depth_of, engine_of, timing_flags_of
from pytest_specdec.reporting.load import ReportError, load_records

NO_VALUE = "—"
#: relative changes closer than this to a threshold count as equal to it (float noise)
EPSILON = 1e-9
#: fields whose differences between runs are warned about (when both runs carry them);
#: k (the draft depth) differs between the cases of one run, so it is compared per case
SETTING_KEYS = ("target", "dtype", "device", "machine", "problems", "max_new_tokens")

FORMATS = ("table", "md", "json")


@dataclass(frozen=True)
class Metric:
    key: str
    header: str
    digits: int
    suffix: str = ""
    percent: bool = False

    def text(self, value: float | None) -> str:
        if value is None:
            return NO_VALUE
        if self.percent:
            return f"{value * 100:.{self.digits}f}%"
        return f"{value:.{self.digits}f}{self.suffix}"


#: Compared metrics, in table order: the case record's ``compared`` fields (each may
#: gate, see GATED_METRICS there).
METRICS = tuple(Metric(key, shown.header, shown.digits, shown.suffix, shown.percent)
                for key, shown in COMPARED.items())
METRIC_BY_KEY = {m.key: m for m in METRICS}


def rule_text(metric: str, drop: float) -> str:
    """``mat:5%``: a rule as the command line takes it."""
    return f"{metric}:{drop * 100:g}%"


def spread(rounds: Sequence[float]) -> float:
    """(max - min) / median of a record's timed rounds; 0 with fewer than two rounds."""
    if len(rounds) < 2:
        return 0.0
    median = statistics.median(rounds)
    return (max(rounds) - min(rounds)) / median if median > 0 else 0.0


def relative_change(base: float | None, new: float | None) -> float | None:
    """(new - base) / base; None where undefined (a missing value, or base 0 and new not)."""
    if base is None or new is None:
        return None
    if base == 0:
        return 0.0 if new == 0 else None
    return (new - base) / base


# --------------------------------------------------------------------------- results


@dataclass
class MetricDelta:
    metric: str
    base: float | None
    new: float | None
    change: float | None
    floor: float = 0.0  # noise floor (a fraction); 0 for deterministic metrics
    rule: float | None = None  # DROP of the rule on this metric, if any
    failed: bool = False

    @property
    def threshold(self) -> float | None:
        return None if self.rule is None else max(self.rule, self.floor)

    def cell(self) -> str:
        metric = METRIC_BY_KEY[self.metric]
        if self.base == self.new:
            return metric.text(self.new)
        text = f"{metric.text(self.base)} → {metric.text(self.new)}"
        return text if self.change is None else f"{text} ({self.change * 100:+.1f}%)"

    def as_dict(self) -> dict[str, Any]:
        return {"base": self.base, "new": self.new, "change": self.change,
                "noise_floor": self.floor, "threshold": self.threshold, "failed": self.failed}


@dataclass
class CaseDelta:
    role: str
    drafter: str
    paradigm: str
    temperature: float
    target: str
    status: str  # "compared", "only_base" or "only_new"
    metrics: dict[str, MetricDelta] = field(default_factory=dict)
    single_round: bool = False  # a run measured this case (or its reference) once
    own_reference: bool = False  # baseline / hf_generate: speedup 1 by definition
    batch: int = 1  # sequences decoded together
    engine: str = "eager"  # the decode path (layout.engine_of)

    @property
    def label(self) -> str:
        batch = f" batch {self.batch}" if self.batch != 1 else ""
        engine = " compiled" if self.engine == "compiled" else ""
        return f"{self.drafter} {self.paradigm} T={self.temperature:g}{batch}{engine}"

    @property
    def failures(self) -> list[MetricDelta]:
        return [d for d in self.metrics.values() if d.failed]

    def as_dict(self) -> dict[str, Any]:
        return {"role": self.role, "drafter": self.drafter, "paradigm": self.paradigm,
                "temperature": self.temperature, "batch": self.batch, "target": self.target,
                "engine": self.engine,
                "status": self.status,
                "metrics": {k: d.as_dict() for k, d in self.metrics.items()},
                "failed": [d.metric for d in self.failures]}


@dataclass
class Comparison:
    base_name: str
    new_name: str
    rules: tuple[tuple[str, float], ...]
    cases: list[CaseDelta]
    warnings: list[str]

    @property
    def compared(self) -> list[CaseDelta]:
        return [c for c in self.cases if c.status == "compared"]

    @property
    def checked_nothing(self) -> bool:
        return bool(self.rules) and not self.compared

    @property
    def passed(self) -> bool:
        return not self.checked_nothing and not any(c.failures for c in self.cases)

    def failure_lines(self) -> list[str]:
        """One line per failed (case, rule), naming both; or why a gate checked nothing."""
        if self.checked_nothing:
            return [f"no case of {self.new_name} matches a case of {self.base_name}: "
                    "the gate checked nothing"]
        lines = []
        several_targets = len({c.target for c in self.cases}) > 1
        for case in self.cases:
            for delta in case.failures:
                metric = METRIC_BY_KEY[delta.metric]
                assert delta.rule is not None and delta.change is not None
                floor = (f", noise floor {delta.floor * 100:.1f}%"
                         if delta.floor > delta.rule else "")
                where = f" [{case.target}]" if several_targets else ""
                lines.append(
                    f"{case.label}{where}: {metric.header} {metric.text(delta.base)} → "
                    f"{metric.text(delta.new)} ({delta.change * 100:+.1f}%) breaks "
                    f"{rule_text(delta.metric, delta.rule)}{floor}")
        return lines

    def as_dict(self) -> dict[str, Any]:
        return {"base": self.base_name, "new": self.new_name,
                "rules": {metric: drop for metric, drop in self.rules},
                "passed": self.passed, "failures": self.failure_lines(),
                "warnings": list(self.warnings),
                "cases": [c.as_dict() for c in self.cases]}


# --------------------------------------------------------------------------- loading


def load_run(path: str | Path) -> list[dict]:
    """The pytest-specdec records of one saved run; ReportError names the file at fault."""
    records = load_records([path])
    if not records:
        raise ReportError(f"{path}: no pytest-specdec records (benchmarks without "
                          "extra_info['specdec_schema'] are not pytest-specdec cases)")
    return records


def load_compare_options(compare: Path | None,
                         rules: Sequence[tuple[str, float]]) -> list[dict] | None:
    """The saved run of ``--specdec-compare`` (None without it), read at configure time.

    ValueError, with a message for a usage error, when ``--specdec-compare-fail`` comes
    without ``--specdec-compare`` or the file cannot be read as a pytest-specdec run.
    """
    if rules and compare is None:
        raise ValueError("--specdec-compare-fail needs --specdec-compare RUN.json "
                         "(the saved run to compare this session with)")
    if compare is None:
        return None
    try:
        return load_run(compare)
    except ReportError as exc:
        raise ValueError(f"--specdec-compare: {exc}") from None


# --------------------------------------------------------------------------- comparing

Key = tuple[str, str, str, float, int, str, str]


def _key(record: Mapping[str, Any], *, with_target: bool) -> Key:
    # a case is matched at its batch size (a record without one ran at batch 1) and on
    # its decode path too: like with like
    return (record["role"], record["drafter"], record["paradigm"], float(record["temperature"]),
            int(record.get("batch", 1) or 1), record["target"] if with_target else "",
            engine_of(dict(record)))


def _index(records: Iterable[dict], with_target: bool, name: str,
           warnings: list[str]) -> dict[Key, dict]:
    index: dict[Key, dict] = {}
    for record in records:
        key = _key(record, with_target=with_target)
        if key in index:
            warnings.append(f"{name} holds {record['drafter']} {record['paradigm']} "
                            f"T={key[3]:g} more than once; the last one is compared")
        index[key] = record
    return index


def _reference(index: Mapping[Key, dict], key: Key) -> dict | None:
    """The record a case's speedup is a ratio to, in the same run (None: not there)."""
    role, drafter, paradigm, temperature, batch, target, engine = key
    if role == "speculative":
        return index.get(("baseline", "baseline", paradigm, temperature, batch, target, engine))
    if role == "peer" and drafter != PEER_PLAIN:
        return index.get(("peer", PEER_PLAIN, paradigm, temperature, batch, target, engine))
    return None  # the baseline and hf_generate: their own reference


#: a speedup's stated timing noise is one standard deviation; the floor is this many
NOISE_SIGMAS = 2.0


def _stated_noise(record: dict) -> float | None:
    """The record's own timing noise (pytest_specdec.engine.timing), if it states one."""
    noise = record.get("speedup_noise")
    return float(noise) if isinstance(noise, (int, float)) else None


def _speedup_noise(record: dict, reference: dict | None, is_own_reference: bool) -> float:
    """One run's share of the speedup's noise floor: its stated timing noise (×2), or,
    for records without one (older runs), the max−min spread of its and its
    reference's timed rounds."""
    if is_own_reference:
        return 0.0
    stated = _stated_noise(record)
    if stated is not None:
        return NOISE_SIGMAS * stated
    own = spread(record["wall_s_rounds"])
    return own + (spread(reference["wall_s_rounds"]) if reference is not None else own)


def _sort_key(case: CaseDelta) -> tuple:
    paradigm = (PARADIGM_ORDER.index(case.paradigm) if case.paradigm in PARADIGM_ORDER
                else len(PARADIGM_ORDER))
    peer = PEER_NAMES.index(case.drafter) if case.drafter in PEER_NAMES else len(PEER_NAMES)
    role = ROLES.index(case.role) if case.role in ROLES else len(ROLES)
    return (case.target, paradigm, case.paradigm, case.temperature, role, peer, case.drafter)


def _setting_warnings(base: Sequence[dict], new: Sequence[dict], base_name: str,
                      new_name: str) -> list[str]:
    warnings = []
    for key in SETTING_KEYS:
        old = list(dict.fromkeys(str(r[key]) for r in base if r.get(key) not in (None, "")))
        now = list(dict.fromkeys(str(r[key]) for r in new if r.get(key) not in (None, "")))
        if old and now and set(old) != set(now):
            warnings.append(f"the runs differ in {key}: {base_name} has {', '.join(old)}; "
                            f"{new_name} has {', '.join(now)}")
    return warnings


def _changed(label: str, old: dict, now: dict, field: str) -> list[str]:
    """``["label: old → new"]`` when both records carry `field` and it differs, else
    ``[]`` (a run saved before the field existed says nothing)."""
    if old.get(field) and now.get(field) and old[field] != now[field]:
        return [f"{label}: {old[field]} → {now[field]}"]
    return []


def compare_records(base: Sequence[dict], new: Sequence[dict], *,
                    rules: Sequence[tuple[str, float]] = (), base_name: str = "BASE",
                    new_name: str = "NEW") -> Comparison:
    """Match the cases of two runs, compute the deltas and evaluate the gate rules."""
    rules = tuple(rules)
    unknown = [metric for metric, _ in rules if metric not in METRIC_BY_KEY]
    if unknown:
        raise ValueError(f"unknown metric {', '.join(unknown)}; gated metrics: "
                         f"{', '.join(GATED_METRICS)}")
    warnings = _setting_warnings(base, new, base_name, new_name)
    base_targets = {r["target"] for r in base}
    new_targets = {r["target"] for r in new}
    with_target = not (len(base_targets) == len(new_targets) == 1 and base_targets != new_targets)
    if not with_target:
        warnings.append(f"cases are matched across targets ({', '.join(base_targets)} in "
                        f"{base_name}, {', '.join(new_targets)} in {new_name})")
    old_index = _index(base, with_target, base_name, warnings)
    new_index = _index(new, with_target, new_name, warnings)
    drops = dict(rules)
    cases = []
    single_round = 0
    weight_changes: list[str] = []  # compared cases whose drafter weights differ
    instance_changes: list[str] = []  # compared cases served shared vs per sequence
    flagged: list[str] = []  # compared cases whose new speedup is flagged (timing)
    depth_changes = []  # compared cases whose draft depth k differs: "pld ...: 5 → 10"
    for key in dict.fromkeys([*old_index, *new_index]):
        old, now = old_index.get(key), new_index.get(key)
        shown = now if now is not None else old
        assert shown is not None
        status = "compared" if old is not None and now is not None else (
            "only_base" if now is None else "only_new")
        case = CaseDelta(key[0], key[1], key[2], key[3], shown["target"], status, batch=key[4],
                         engine=key[6])
        for metric in METRICS:
            before = old.get(metric.key) if old is not None else None
            after = now.get(metric.key) if now is not None else None
            case.metrics[metric.key] = MetricDelta(metric.key, before, after,
                                                   relative_change(before, after))
        if status == "compared":
            assert old is not None and now is not None
            case.own_reference = own_reference = (
                key[0] == "baseline" or (key[0] == "peer" and key[1] == PEER_PLAIN))
            case.metrics["speedup"].floor = (
                _speedup_noise(old, _reference(old_index, key), own_reference)
                + _speedup_noise(now, _reference(new_index, key), own_reference))
            case.metrics["tokens_per_s"].floor = (spread(old["wall_s_rounds"])
                                                  + spread(now["wall_s_rounds"]))
            case.single_round = not own_reference and (
                len(old["wall_s_rounds"]) < 2 or len(now["wall_s_rounds"]) < 2)
            single_round += case.single_round
            weight_changes += _changed(case.label, old, now, "drafter_weights")
            # one instance serving every row is not the measurement of one per row
            instance_changes += _changed(case.label, old, now, "drafter_instances")
            if draft_depth_of(old) != draft_depth_of(now):  # plain decoding has none
                depth_changes.append(f"{case.label}: {draft_depth_of(old)} → {draft_depth_of(now)}")
            for metric, drop in drops.items():
                delta = case.metrics[metric]
                delta.rule = drop
                threshold = delta.threshold
                delta.failed = (delta.change is not None and threshold is not None
                                and delta.change < -threshold - EPSILON)
            if "speedup" in drops and timing_flags_of(now):
                # a gate never passes on a flagged speedup silently
                case.metrics["speedup"].failed = True
                flagged.append(case.label)
        cases.append(case)
    cases.sort(key=_sort_key)
    if weight_changes:
        warnings.append(f"the runs used different drafter weights in {len(weight_changes)} "
                        f"compared case(s) (drafter_weights, {base_name} → {new_name}; weights "
                        f"trained by another commit, torch build or CPU differ, and "
                        f"training.json records which): " + "; ".join(weight_changes))
    if instance_changes:
        warnings.append(f"the runs served the batch's rows differently in "
                        f"{len(instance_changes)} compared case(s) (drafter_instances: one "
                        f"shared instance or one per sequence, {base_name} → {new_name}): "
                        + "; ".join(instance_changes))
    if depth_changes:
        warnings.append(f"the runs differ in k (draft depth) of {len(depth_changes)} compared "
                        f"case(s), {base_name} → {new_name}: " + "; ".join(depth_changes))
    old_stated = [r for r in base if _stated_noise(r) is not None]
    new_stated = [r for r in new if _stated_noise(r) is not None]
    if "speedup" in drops:
        if old_stated and new_stated:
            warnings.append(f"speedup noise floor: each run's stated timing noise × "
                            f"{NOISE_SIGMAS:g} (calibrated timing), added")
            single_round = 0  # the stated noise covers a single round too
        if flagged:
            warnings.append(f"{len(flagged)} case(s) of {new_name} have a flagged speedup "
                            "(timing artefact or unstable timing) and fail the speedup rule: "
                            + ", ".join(flagged))
    if single_round and "speedup" in drops:
        warnings.append(f"{single_round} compared case(s) have a single timed round in a run: "
                        "their speedup has no noise floor (use --specdec-timed-rounds 3)")
    return Comparison(base_name, new_name, rules, cases, warnings)


# --------------------------------------------------------------------------- rendering

STATUS_TEXT = {"only_base": "only in base", "only_new": "only in new"}


def delta_table(comparison: Comparison) -> tuple[list[str], list[list[str]]]:
    """Headers and rows: one row per case, cells ``base → new (+x.x%)``, or the value
    alone where both runs have the same one.

    ``speedup noise`` is the speedup's noise floor (``—`` for the baseline and
    hf_generate, whose speedup is 1 by definition); ``gate`` says ``ok`` or ``FAIL`` with
    the metrics that broke a rule (empty without rules), or that a case is in one run only.
    """
    several_targets = len({c.target for c in comparison.cases}) > 1
    headers = (["target"] if several_targets else []) + ["drafter", "paradigm", "T"]
    headers += [m.header for m in METRICS] + ["speedup noise", "gate"]
    rows = []
    for case in comparison.cases:
        row = ([case.target] if several_targets else [])
        row += [case.drafter, case.paradigm, f"{case.temperature:g}"]
        row += [case.metrics[m.key].cell() for m in METRICS]
        if case.status == "compared":
            row.append(NO_VALUE if case.own_reference
                       else f"{case.metrics['speedup'].floor * 100:.1f}%")
            failed = [d.metric for d in case.failures]
            verdict = "ok" if comparison.rules else ""
            row.append(("FAIL " + ", ".join(failed)) if failed else verdict)
        else:
            row += [NO_VALUE, STATUS_TEXT[case.status]]
        rows.append(row)
    return headers, rows


def render(comparison: Comparison, fmt: str = "table") -> str:
    """The comparison as a text table (``table``), a Markdown table (``md``) or JSON."""
    if fmt == "json":
        return json.dumps(comparison.as_dict(), indent=2, ensure_ascii=False) + "\n"
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    headers, rows = delta_table(comparison)
    table = tabulate(rows, headers, tablefmt="github" if fmt == "md" else "simple",
                     disable_numparse=True)
    return table + "\n"


def render_summary(comparison: Comparison) -> str:
    """What the end of a pytest session shows: the table, the warnings, the verdict."""
    lines = [f"base: {comparison.base_name}", render(comparison).rstrip("\n")]
    lines += [f"warning: {w}" for w in comparison.warnings]
    if comparison.rules:
        rules = ",".join(rule_text(m, d) for m, d in comparison.rules)
        if comparison.passed:
            lines.append(f"gate {rules}: passed ({len(comparison.compared)} cases compared)")
        else:
            lines += [f"gate {rules} FAILED: {line}" for line in comparison.failure_lines()]
    return "\n".join(lines)
