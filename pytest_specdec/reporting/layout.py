"""How a report lays records out: the order of rows (baseline, our drafters, then the
peers) and columns (paradigm and temperature), one group per target, the meta block,
and the text of each kind of cell; the summary table built from them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

from pytest_specdec.bench.record import PEER_NAMES, PEER_PLAIN, ROLES
from pytest_specdec.engine.speedup import ABOVE_COST_BOUND, UNSTABLE_TIMING

#: What a numeric field may hold (bool counts: it is an int).
NUMBER_TYPES = (int, float)

#: Summary columns start with these paradigms, in this order.
PARADIGM_ORDER = ("multi_round", "best_of_n")

#: Meta block of the Markdown report, in this order.
META_KEYS = ("profile", "target", "dtype", "device", "problems", "max_new_tokens", "k",
             "depth profile", "date", "machine")

NO_VALUE = "—"


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
    for record in sorted(records, key=lambda r: row_order(row_key(r))):
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


@dataclass(frozen=True)
class Column:
    """One summary column: a paradigm at one temperature and batch size, on one decode
    path (a session may run both: ``--specdec-engine both``)."""

    paradigm: str
    temperature: float
    batch: int = 1
    engine: str = "eager"

    def header(self, *, with_temperature: bool, with_engine: bool = False) -> str:
        text = self.paradigm
        if with_temperature:
            text += f" T={temperature_text(self.temperature)}"
        if with_engine:
            text += f" · {self.engine}"
        # batch 1 is the reference protocol's: only other sizes are named
        return text if self.batch == 1 else f"{text} · batch {self.batch}"


def engine_of(record: dict) -> str:
    """The decode path a record's forwards ran on, "compiled" or "eager" (a record saved
    before the compiled path existed, or one that fell back, ran eagerly)."""
    return "compiled" if str(record.get("engine") or "").startswith("compiled") else "eager"


def shows_engine(records: Sequence[dict]) -> bool:
    """Columns name their decode path when the records ran on both."""
    return len({engine_of(r) for r in records}) > 1


def batch_of(record: dict) -> int:
    """A record's batch size (a record saved before the batch axis ran at batch 1)."""
    return int(record.get("batch", 1) or 1)


def paradigm_text(record: dict) -> str:
    """A record's paradigm as the tables name it, with its batch size when not 1."""
    batch = batch_of(record)
    return record["paradigm"] if batch == 1 else f"{record['paradigm']} · batch {batch}"


def column_of(record: dict) -> Column:
    return Column(record["paradigm"], float(record["temperature"]), batch_of(record),
                  engine_of(record))


def columns_of(records: Sequence[dict]) -> list[Column]:
    """Known paradigms first, then others in order of appearance; temperatures rising.

    A fixed order keeps tables of different runs (or of files given in another order)
    comparable at a glance.
    """
    paradigms = list(dict.fromkeys([*PARADIGM_ORDER, *(r["paradigm"] for r in records)]))
    columns = set(map(column_of, records))
    return sorted(columns, key=lambda c: (paradigms.index(c.paradigm), c.temperature, c.batch,
                                          c.engine != "eager"))


def shows_temperature(records: Sequence[dict]) -> bool:
    # Label every column with T as soon as temperatures differ anywhere, so that no
    # column leaves its temperature to be guessed.
    return len({float(r["temperature"]) for r in records}) > 1


def row_key(record: dict) -> tuple[str, str]:
    return record["role"], record["drafter"]


def row_order(row: tuple[str, str]) -> tuple:
    """Baseline first, then our drafters alphabetically, then the peers."""
    role, drafter = row
    peer_rank = PEER_NAMES.index(drafter) if drafter in PEER_NAMES else len(PEER_NAMES)
    return ROLES.index(role), peer_rank if role == "peer" else 0, drafter


def row_keys(records: Sequence[dict]) -> list[tuple[str, str]]:
    return sorted(set(map(row_key, records)), key=row_order)


def target_label(record: dict) -> str:
    return f"{record['target']} ({record['dtype']})"


def group_by_target(records: Sequence[dict]) -> dict[str, list[dict]]:
    """Records per target and dtype, in order of first appearance."""
    groups: dict[str, list[dict]] = {}
    for record in records:
        groups.setdefault(target_label(record), []).append(record)
    return groups


def report_order(records: Sequence[dict]) -> list[dict]:
    """Records as the report lists them: by target, column, then row."""
    targets = list(group_by_target(records))
    columns = columns_of(records)
    return sorted(records, key=lambda r: (targets.index(target_label(r)),
                                          columns.index(column_of(r)),
                                          row_order(row_key(r))))


def temperature_text(temperature: float) -> str:
    return f"{float(temperature):g}"


def number_text(value: float | None, digits: int = 2, suffix: str = "") -> str:
    return NO_VALUE if value is None else f"{value:.{digits}f}{suffix}"


def percent_text(value: float | None, digits: int = 1) -> str:
    return NO_VALUE if value is None else f"{value * 100:.{digits}f}%"


def speedup_text(value: float | None) -> str:
    return number_text(value, 2, "x")


def timing_flags_of(record: dict) -> list[str]:
    """Why a record's speedup cannot be trusted as measured (pytest_specdec.engine.speedup)."""
    flags = record.get("timing_flags")
    return [str(f) for f in flags] if isinstance(flags, list) else []


def _noise_text(record: dict) -> str:
    noise = record.get("speedup_noise")
    if not isinstance(noise, NUMBER_TYPES) or record["role"] == "baseline" or \
            record["drafter"] == PEER_PLAIN:  # their own reference: exactly 1.00x
        return ""
    return f" · ±{noise * 100:.0f}%"


def summary_cell(record: dict | None) -> str:
    if record is None:
        return NO_VALUE
    flag = " !" if timing_flags_of(record) else ""
    return (f"{speedup_text(record['speedup'])} · MAT {number_text(record['mat'])}"
            f"{_noise_text(record)}{flag}")


def wall_text(record: dict) -> str:
    rounds = record["wall_s_rounds"]
    median = number_text(record["wall_s"])
    if len(rounds) < 2:
        return median
    return f"{median} ({min(rounds):.2f}–{max(rounds):.2f})"


def tokens_per_s_rounds(record: dict) -> list[float]:
    """Tokens/s of each timed round: every round decodes the same tokens (outputs are
    checked equal), so it is the record's new tokens over that round's wall time."""
    new_tokens = record.get("new_tokens")
    if not isinstance(new_tokens, NUMBER_TYPES):
        return []
    return [new_tokens / wall for wall in record["wall_s_rounds"] if wall > 0]


def tokens_per_s_text(record: dict) -> str:
    """The median tokens/s (as the record holds it), with the range over the rounds."""
    median = number_text(record["tokens_per_s"], 1)
    rounds = tokens_per_s_rounds(record)
    if len(rounds) < 2:
        return median
    return f"{median} ({min(rounds):.1f}–{max(rounds):.1f})"


def summary_table(records: Sequence[dict], *,
                  mark_best: Callable[[str], str] | None = None) -> tuple[list[str], list[list[str]]]:
    """Headers and rows: one row per drafter, one column per paradigm (and temperature).

    Cells read ``1.42x · MAT 2.31``; ``—`` where no record. With several targets or
    dtypes, a leading ``target`` column tells the groups apart. ``mark_best`` rewrites
    the cell(s) with the best speedup per column among speculative rows. Where several
    records fall on one cell (runs merged), the last one read is shown.
    """
    groups = group_by_target(records)
    several_targets = len(groups) > 1
    columns = columns_of(records)
    with_temperature = shows_temperature(records)
    headers = (["target"] if several_targets else []) + ["drafter"]
    with_engine = shows_engine(records)
    headers += [column.header(with_temperature=with_temperature, with_engine=with_engine)
                for column in columns]
    rows = []
    for label, group in groups.items():
        for row in _summary_rows(group, columns, mark_best):
            rows.append(([label] if several_targets else []) + row)
    return headers, rows


def _summary_rows(records: Sequence[dict], columns: Sequence[Column],
                  mark_best: Callable[[str], str] | None) -> list[list[str]]:
    by_cell = {(row_key(r), column_of(r)): r for r in records}
    best = _best_speedups(by_cell)
    rows = []
    for row in row_keys(records):
        cells = [row[1]]
        for column in columns:
            record = by_cell.get((row, column))
            text = summary_cell(record)
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
            and not timing_flags_of(record) and record["speedup"] == best.get(column_of(record)))


def flagged_lines(records: Sequence[dict]) -> list[str]:
    """One line per record whose speedup is flagged, for the session's closing warning."""
    return [f"{r['drafter']} on {r['paradigm']} T={temperature_text(r['temperature'])}: "
            f"{speedup_text(r['speedup'])} ({', '.join(timing_flags_of(r))}; ideal "
            f"{speedup_text(r.get('ideal_speedup'))}, noise {percent_text(r.get('speedup_noise'))})"
            for r in report_order(records) if timing_flags_of(r)]


#: what to do about each flag, after the closing warning (docs/timing.md#flags)
FLAG_ADVICE = {
    UNSTABLE_TIMING: "unstable timing: the machine's speed moved more than its probes could "
                     "follow (on a shared VM this happens with no load of yours); a quieter "
                     "machine, or more timed rounds (--specdec-timed-rounds 3: each case the "
                     "median of three), narrows it",
    ABOVE_COST_BOUND: "above cost bound: faster than its MAT and step costs allow, a timing "
                      "artefact and not a result; rerun the case",
}


def flag_advice(records: Sequence[dict]) -> list[str]:
    """What to do about the flags the records carry, one line per kind of flag."""
    present = {flag for r in records for flag in timing_flags_of(r)}
    return [advice for flag, advice in FLAG_ADVICE.items() if flag in present]
