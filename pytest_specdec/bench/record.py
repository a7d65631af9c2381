"""The case record: what one benchmark case measured, typed, with its schema version.

Its fields are the one list of what a record holds: the JSON and CSV columns (in
declaration order), the keys a saved record must have (``required``), the types the
reports compute with (``checked``), the metrics a comparison shows and may gate on
(``compared``), and the fields a drafter fills itself (``by_drafter``, through its
optional ``record_fields()``, see :func:`pytest_specdec.protocol.drafter.drafter_record_fields`)
are all read from the field declarations below, never listed again.

Both paths go through it: the session builds a :class:`CaseRecord` and keeps its
:meth:`~CaseRecord.as_dict` (which the suites also put into pytest-benchmark's
``extra_info``); a saved run's records are checked by :func:`check_record` when read.
Records stay plain dicts after that, so a run saved by an older version, with fewer
optional fields or some this version no longer writes, still loads and compares.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping

#: Bumped when a field changes meaning or a required one is added; a saved run of
#: another version is refused, not misread.
SCHEMA_VERSION = 1

ROLES = ("baseline", "speculative", "peer")

#: Hugging Face's own decoding, run as peer cases, in the order reports show them after
#: our drafters: plain generate, then its prompt lookup, compared like for like with
#: our ``pld`` (whose settings it copies).
PEER_PLAIN, PEER_PLD = "hf_generate", "hf_pld"
PEER_NAMES = (PEER_PLAIN, PEER_PLD)
OUR_PLD = "pld"

#: ``drafter_instances``'s values (see :class:`CaseRecord`).
SHARED, PER_SEQUENCE = "shared", "per sequence"
DRAFTER_INSTANCES = (SHARED, PER_SEQUENCE)


class RecordError(ValueError):
    """A record lacks a required field or holds a value of the wrong type."""


class _Absent:
    """An optional field this record does not carry (None is a value: "not measured")."""

    _instance: _Absent | None = None

    def __new__(cls) -> _Absent:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "ABSENT"

    def __bool__(self) -> bool:
        return False


ABSENT: Any = _Absent()


@dataclass(frozen=True)
class Compared:
    """How a comparison shows a metric (all compared metrics are higher-is-better, so
    each can gate a regression: ``--specdec-compare-fail METRIC:DROP``)."""

    order: int
    header: str
    digits: int
    suffix: str = ""
    percent: bool = False


def _field(*, required: bool = False, checked: bool = False, compared: Compared | None = None,
           by_drafter: bool = False, factory: Any = None) -> Any:
    metadata = {"required": required, "checked": checked, "compared": compared,
                "by_drafter": by_drafter}
    if required:
        return field(metadata=metadata)
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=ABSENT, metadata=metadata)


def _required(*, checked: bool = True, compared: Compared | None = None) -> Any:
    return _field(required=True, checked=checked, compared=compared)


_optional = _field


@dataclass(frozen=True, kw_only=True)
class CaseRecord:
    """One case: a role (baseline, speculative or peer), its drafter on a paradigm at a
    temperature, on a target; the tokens and acceptance of its last timed round, the
    timing of all of them, and the lossless verdict. Field order is column order."""

    case: str = _optional()  # the test's id; set when the record is read or written
    role: str = _required()
    drafter: str = _required()
    drafter_options: dict = _optional(factory=dict)
    paradigm: str = _required()
    temperature: float = _required()
    batch: int = _optional()  # sequences decoded together; a record without it: 1
    # at batch > 1, how the drafter's instances served the batch's rows: one instance for
    # every row (SHARED: it declares concurrent_sequences and sees its siblings' text as
    # it is generated) or one per open sequence (PER_SEQUENCE); absent for plain decoding,
    # peers and batch 1 (one instance, one sequence at a time)
    drafter_instances: str = _optional()
    target: str = _required()
    dtype: str = _required()
    device: str = _required()
    worker: str = _optional()  # the pytest-xdist worker ("main" without xdist)
    # the decode path the case ran on (Target.path): "compiled", "eager", or "eager
    # (compiled refused: WHY)"; batched and exact-mode forwards run eagerly on either
    engine: str = _optional()
    k: int = _required(checked=False)
    depth_profile: str = _optional()
    profile: str = _optional()  # --specdec-profile: the run's size (bench.profiles)
    problems: int = _required(checked=False)
    max_new_tokens: int = _required(checked=False)
    sequences: int = _optional()
    new_tokens: int = _required(checked=False)
    steps: int = _required(checked=False)
    drafted: int = _required(checked=False)
    accepted: int = _required(checked=False)
    mat: float = _required(compared=Compared(1, "MAT", 2))
    mat_by_round: list = _optional()
    mat_by_sample: list = _optional()
    acceptance_rate: float | None = _required(compared=Compared(2, "acceptance", 1, percent=True))
    per_position_acceptance: list[float] = _required()
    draft_share: float = _required()
    tokens_per_s: float = _required(compared=Compared(3, "tok/s", 1))
    wall_s: float = _required()
    wall_s_rounds: list[float] = _required()
    baseline_wall_s: float | None = _required()
    speedup: float | None = _required(compared=Compared(0, "speedup", 2, "x"))
    # the timing protocol's estimate and costs (pytest_specdec.engine.timing)
    timing: str = _optional()
    speedup_raw: float = _optional()
    speedup_noise: float = _optional()
    # the session's round-to-round timing scatter when the case was recorded (relative;
    # None: no baseline of two rounds yet), which its noise includes
    round_scatter: float | None = _optional()
    speedup_problems_low: float = _optional()
    speedup_problems_high: float = _optional()
    probe_ms: float = _optional()
    machine_slowdown: float | None = _optional()
    host_slowdown: float | None = _optional()
    wide_slowdown: float | None = _optional()
    t_step_ms: float | None = _optional()
    t_verify_ms: float | None = _optional()
    t_draft_ms: float | None = _optional()
    # one verify forward of this case: the tokens it fed on average, and its cost in
    # plain decode steps (t_verify ÷ t_step, metrics.verify_steps)
    verify_width: float | None = _optional()
    verify_steps: float | None = _optional()
    ideal_speedup: float | None = _optional()
    measured_over_ideal: float | None = _optional()
    timing_flags: list = _optional()
    drafter_weights: str = _field(by_drafter=True)  # a digest of the weights it loaded
    accuracy: float = _required(compared=Compared(4, "accuracy", 1, percent=True))
    lossless: str = _required()
    # the lossless check's details (pytest_specdec.bench.lossless.LosslessVerdict.summary)
    lossless_method: str = _optional()
    tokens_exact: int = _optional()
    tokens_near_tie: int = _optional()
    max_tie_margin: float = _optional()
    # the near-tie margin allowed, in logits, and how it was set: measured (with the
    # largest gap, factor, positions and forwards) or given (LosslessVerdict.tie_margin)
    tie_margin: dict = _optional()
    sequences_departed: int = _optional()
    first_departure: dict | None = _optional()
    check_s: float = _optional()
    drafter_note: str = _field(by_drafter=True)  # where the drafts come from
    hybrid_parts: dict = _field(by_drafter=True)  # a hybrid's steps and tokens per part
    peer_settings: dict = _optional()
    peer_divergence: str = _optional()
    output_sha256: str = _required()
    specdec_schema: int = _required(checked=False)
    # provenance, added when a saved run is read
    source: str = _optional()
    run_date: str = _optional()
    machine: str = _optional()

    def __post_init__(self) -> None:
        check_record(self.as_dict(), f"the record of {self.drafter} on {self.paradigm}")

    def as_dict(self) -> dict[str, Any]:
        """The record as reports, JSON files and ``extra_info`` hold it: the fields it
        carries, in column order."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) is not ABSENT}


FIELDS = {f.name: f for f in dataclasses.fields(CaseRecord)}
#: Every column, in order (JSON and CSV).
COLUMNS = tuple(FIELDS)
#: The keys every saved record of this schema carries.
REQUIRED_KEYS = tuple(name for name, f in FIELDS.items() if f.metadata["required"])
#: Compared metrics in table order; each may gate (``--specdec-compare-fail``).
COMPARED = dict(sorted(((name, f.metadata["compared"]) for name, f in FIELDS.items()
                        if f.metadata["compared"] is not None), key=lambda item: item[1].order))
GATED_METRICS = tuple(COMPARED)
#: What a drafter may add through ``record_fields()``.
DRAFTER_FIELDS = tuple(name for name, f in FIELDS.items() if f.metadata["by_drafter"])

_NUMBER = (int, float)


def _accepted_types(annotation: Any) -> tuple[tuple[type, ...], bool]:
    """The types a checked field's value may have, and whether it is a list of numbers."""
    args = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    accepted: list[type] = []
    numbers_list = False
    for arg in args:
        origin = typing.get_origin(arg) or arg
        if arg is float:
            accepted += _NUMBER
        elif arg is type(None):
            accepted.append(type(None))
        else:
            accepted.append(origin)
            numbers_list = numbers_list or (origin is list and typing.get_args(arg) == (float,))
    return tuple(accepted), numbers_list


_HINTS = typing.get_type_hints(CaseRecord)
#: field -> (accepted types, holds numbers): what the reports compute with must have
#: the right type, or the error would be a crash.
CHECKED_TYPES = {name: _accepted_types(_HINTS[name]) for name, f in FIELDS.items()
                 if f.metadata["checked"]}


def check_record(record: Mapping[str, Any], where: str) -> None:
    """Every required key present, with a usable type; ``where`` opens the message."""
    missing = [key for key in REQUIRED_KEYS if key not in record]
    if missing:
        raise RecordError(f"{where} lacks required keys: {', '.join(missing)}")
    wrong = [f"{key} ({type(record[key]).__name__})" for key, (accepted, _) in CHECKED_TYPES.items()
             if not isinstance(record[key], accepted)]
    wrong += [f"{key} (holds a non-number)" for key, (_, numbers) in CHECKED_TYPES.items()
              if numbers and isinstance(record[key], list)
              and not all(isinstance(x, _NUMBER) for x in record[key])]
    if wrong:
        raise RecordError(f"{where} has values of the wrong type: {', '.join(wrong)}")
    if record["role"] not in ROLES:
        raise RecordError(f"{where} has role {record['role']!r}; "
                          f"expected one of {', '.join(ROLES)}")
    if record.get("drafter_instances", SHARED) not in DRAFTER_INSTANCES:
        raise RecordError(f"{where} has drafter_instances {record['drafter_instances']!r}; "
                          f"expected one of {', '.join(map(repr, DRAFTER_INSTANCES))}")
