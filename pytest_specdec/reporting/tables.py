"""The report's tables and lists, each built from the records alone (headers and rows
of cell texts, or the lines of a list) with the note that explains it; the sections
(:mod:`.sections`) arrange them and every renderer shows them alike.

Reports only read and format records; no metric is recomputed here (see
:mod:`pytest_specdec.engine.metrics`), so a report can never disagree with the run it
was made from. The one derived figure is the range of tokens/s over the timed rounds:
the record's new tokens over each round's wall time (every round decodes the same
tokens).
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

from pytest_specdec.bench.record import OUR_PLD, PEER_PLAIN, PEER_PLD
from pytest_specdec.reporting.layout import (NO_VALUE, NUMBER_TYPES, Column, batch_of, column_of,
                                             shows_engine,
                                             columns_of, paradigm_text,
                                             draft_depth_of, group_by_target, number_text,
                                             percent_text, report_order, row_key, row_order,
                                             shows_temperature, speedup_text, target_label,
                                             temperature_text, timing_flags_of, tokens_per_s_text,
                                             wall_text)

PER_POSITION_SHOWN = 8


DETAIL_HEADERS = ["drafter", "paradigm", "T", "k", "speedup", "MAT", "acceptance", "draft share",
                  "tokens/s median (min–max)", "wall s median (min–max)", "accuracy",
                  "lossless", "output"]


def _depth_text(record: dict) -> str:
    k = draft_depth_of(record)
    return NO_VALUE if k is None else str(k)


def _detail_row(record: dict) -> list[str]:
    """The details of one record; the last cell is the output hash, unformatted."""
    return [
        record["drafter"], paradigm_text(record), temperature_text(record["temperature"]),
        _depth_text(record), speedup_text(record["speedup"]), number_text(record["mat"]),
        percent_text(record["acceptance_rate"]), percent_text(record["draft_share"]),
        tokens_per_s_text(record), wall_text(record), percent_text(record["accuracy"]),
        record["lossless"], record["output_sha256"],
    ]


def details_table(records: Sequence[dict]) -> tuple[list[str], list[list[str]]]:
    several_targets = len(group_by_target(records)) > 1
    headers = (["target"] if several_targets else []) + DETAIL_HEADERS
    rows = [([target_label(r)] if several_targets else []) + _detail_row(r)
            for r in report_order(records)]
    return headers, rows


TIMING_NOTE = (
    "Timing `calibrated`: a short probe of the target (one-token decode forwards) runs "
    "before every sequence and after the last; each stretch of a run is divided by the "
    "probes around it, so a speedup is a ratio of times in units of the machine's speed "
    "and a change of load during the session cancels out (`paired`: each timed round "
    "also has a fresh baseline round next to it). `±noise`: the timing noise (probes "
    "that disagree around a stretch, or the spread of repeated rounds, whichever is "
    "larger). `round scatter`: how far one round's calibrated time is from the next "
    "(the spread of the baselines' rounds, pooled; a case of one round carries it "
    "whole, a baseline's median of N rounds over √N). `problems 95%`: "
    "bootstrap over the problems. `raw`: the ratio of wall times without calibration; "
    "`slowdown`: the machine's speed during the case against its baseline's (probe "
    "time ratio); `host slowdown` the same for the host probe (a fixed piece of Python, "
    "which calibrates drafting: a contended CPU slows the target's forwards and Python "
    "by different factors). Costs per step, at this case's machine speed, over every forward but a "
    "sequence's first: `t_step` a plain decode step (the baseline's), `t_verify` this "
    "case's verify forward, `t_verify steps (width)` the same in plain decode steps "
    "(t_verify ÷ t_step) with the tokens a verify forward fed on average, `t_draft` its "
    "drafting; `ideal` = MAT × t_step ÷ (t_verify + "
    "t_draft). A speedup above its ideal by more than 15% plus twice its noise is flagged "
    "`above cost bound` (a measurement artefact), one whose noise exceeds 10% `unstable "
    "timing`; flagged speedups are never marked best. The meta block's machine line gives "
    "the memory limit of a decode step (the target's weight bytes over the probed memory "
    "bandwidth) and limit ÷ step: how close plain decoding runs to it.")

TIMING_HEADERS = ["drafter", "paradigm", "T", "timing", "speedup", "±noise", "round scatter",
                  "problems 95%",
                  "raw", "slowdown", "host slowdown", "wide slowdown", "t_step ms", "t_verify ms",
                  "t_verify steps (width)", "t_draft ms", "ideal", "measured ÷ ideal", "flags"]


def verify_cost_text(record: dict) -> str:
    """``2.31 (59.8)``: one verify forward of the case in plain decode steps, and the
    tokens it fed on average; ``—`` for a record without them (a peer, an older run)."""
    cost, width = record.get("verify_steps"), record.get("verify_width")
    if not isinstance(cost, NUMBER_TYPES):
        return NO_VALUE
    return number_text(cost) + (f" ({number_text(width, 1)})" if isinstance(width, NUMBER_TYPES)
                                else "")


def timing_table(records: Sequence[dict]) -> tuple[list[str], list[list[str]]]:
    rows = []
    for r in report_order(records):
        if r["role"] == "baseline" or "speedup_noise" not in r:
            continue
        low, high = r.get("speedup_problems_low"), r.get("speedup_problems_high")
        rows.append([
            r["drafter"], paradigm_text(r), temperature_text(r["temperature"]),
            str(r.get("timing", NO_VALUE)), speedup_text(r["speedup"]),
            percent_text(r.get("speedup_noise"), 1), percent_text(r.get("round_scatter"), 1),
            f"{number_text(low)}–{number_text(high)}x" if isinstance(low, NUMBER_TYPES) else NO_VALUE,
            speedup_text(r.get("speedup_raw")), number_text(r.get("machine_slowdown")),
            number_text(r.get("host_slowdown")), number_text(r.get("wide_slowdown")),
            number_text(r.get("t_step_ms"), 1), number_text(r.get("t_verify_ms"), 1),
            verify_cost_text(r), number_text(r.get("t_draft_ms"), 1),
            speedup_text(r.get("ideal_speedup")),
            number_text(r.get("measured_over_ideal")), ", ".join(timing_flags_of(r)) or NO_VALUE,
        ])
    return TIMING_HEADERS, rows


BATCH_NOTE = (
    "Each case at every batch size run (`--specdec-batch`): tokens/s of the whole run, "
    "the speedup over plain decoding at the same batch size, MAT, and the ideal speedup "
    "its step costs at that size allow (MAT × t_step ÷ (t_verify + t_draft): the verify "
    "forward carries every row's draft, and the rows draft one after another). Where the "
    "ideal falls towards 1x, speculative decoding stops paying. *shared*: one drafter "
    "instance served every row (it declares `concurrent_sequences` and sees its siblings' "
    "text as it is generated); *per sequence*: one instance per open sequence "
    "(`drafter_instances`).")


def batch_table(records: Sequence[dict]) -> tuple[list[str], list[list[str]]]:
    """Per drafter and paradigm, side by side at each batch size; no rows at one size."""
    batches = sorted({batch_of(r) for r in records})
    if len(batches) < 2:
        return [], []
    cells: dict[tuple[str, str, str], dict[int, dict]] = {}
    for r in report_order(records):
        if r["role"] != "peer":
            key = (r["drafter"], r["paradigm"], temperature_text(r["temperature"]))
            cells.setdefault(key, {})[batch_of(r)] = r
    rows = []
    for key, by_batch in cells.items():
        row = list(key)
        for b in batches:
            r = by_batch.get(b)
            row.append(NO_VALUE if r is None else " · ".join((
                f"{number_text(r['tokens_per_s'], 1)} tok/s", speedup_text(r["speedup"]),
                f"MAT {number_text(r['mat'])}",
                f"ideal {speedup_text(r.get('ideal_speedup'))}",
                *([r["drafter_instances"]] if r.get("drafter_instances") else []))))
        rows.append(row)
    return ["drafter", "paradigm", "T", *(f"batch {b}" for b in batches)], rows


LOSSLESS_NOTE = (
    "Every token of each speculative case, judged by `method`: `equality` with plain "
    "decoding (float32, or `--specdec-lossless exact`), or `teacher_forced` (half "
    "precision: each token against the target's choice given the sequence's own prefix, "
    "near-ties within the margin accepted). *margin allowed*: the near-tie margin in "
    "logits, measured once per session on the target (or given, by "
    "`--specdec-tie-margin`). *departed*: sequences that differ from plain "
    "decoding's, and the first token where one does (problem / sample / round / token). "
    "*check s*: seconds spent in the teacher-forced forwards, and their share of the "
    "case's time (timed rounds + check).")
LOSSLESS_HEADERS = ["drafter", "paradigm", "T", "method", "exact tokens", "near-ties",
                    "largest margin", "margin allowed", "departed", "first departure",
                    "check s (share)"]


def lossless_table(records: Sequence[dict]) -> tuple[list[str], list[list[str]]]:
    """Per speculative case: what the losslessness check found (records from before
    the check reported it have no row)."""
    rows = []
    for r in report_order(records):
        if r.get("role") != "speculative" or "tokens_exact" not in r:
            continue
        first = r.get("first_departure")
        where = NO_VALUE if not first else (
            f"{first['problem']} / {first['sample']} / {first['round']} / {first['token']}")
        check_s = r.get("check_s") or 0.0
        case_s = check_s + sum(r.get("wall_s_rounds") or [r["wall_s"]])
        rows.append([
            r["drafter"], r["paradigm"], temperature_text(r["temperature"]),
            r.get("lossless_method", NO_VALUE), str(r["tokens_exact"]),
            str(r.get("tokens_near_tie", 0)),
            number_text(r.get("max_tie_margin")) if r.get("tokens_near_tie") else NO_VALUE,
            _allowed_margin(r.get("tie_margin")),
            str(r.get("sequences_departed", 0)), where,
            f"{check_s:.1f} ({percent_text(check_s / case_s if case_s else 0.0)})"])
    return LOSSLESS_HEADERS, rows


def _allowed_margin(margin: dict | None) -> str:
    """A record's ``tie_margin``: its logits, and how it was set unless measured."""
    if not margin:
        return NO_VALUE
    text = f"{margin['logits']:.3g}"
    return text if margin.get("source") == "measured" else f"{text} ({margin.get('source')})"


def _series_table(records: Sequence[dict], series: Callable[[dict], Sequence[float]],
                  label: str, cell: Callable[[float], str], *, longest: int = 10**9,
                  at_least: int = 1) -> tuple[list[str], list[list[str]]]:
    """One row per speculative record: a series of numbers in columns ``label 1..n``
    (n: the longest series, at most `longest`); no table when n < at_least."""
    speculative = [r for r in report_order(records) if r["role"] == "speculative"]
    shown = min(longest, max((len(series(r)) for r in speculative), default=0))
    if shown < at_least:
        return [], []
    several_targets = len(group_by_target(records)) > 1
    headers = (["target"] if several_targets else []) + ["drafter", "paradigm", "T"]
    headers += [f"{label} {i + 1}" for i in range(shown)]
    rows = []
    for record in speculative:
        values = list(series(record))[:shown]
        cells = [cell(v) for v in values] + [NO_VALUE] * (shown - len(values))
        row = [record["drafter"], record["paradigm"], temperature_text(record["temperature"])]
        rows.append(([target_label(record)] if several_targets else []) + row + cells)
    return headers, rows


def per_position_table(records: Sequence[dict]) -> tuple[list[str], list[list[str]]]:
    """Acceptance at the first draft positions, in percent, per speculative record."""
    return _series_table(records, lambda r: r["per_position_acceptance"], "pos",
                         lambda rate: percent_text(rate, 0), longest=PER_POSITION_SHOWN)


PER_POSITION_NOTE = (f"Share of draft tokens accepted at each of the first {PER_POSITION_SHOWN} "
                     "draft positions, among forwards whose draft reached that position.")


def _sequence_mats(record: dict) -> Sequence[float]:
    """MAT by round for multi-round records, by sample for best-of-N ones."""
    by_round = record.get("mat_by_round") or []
    return by_round if len(by_round) > 1 else record.get("mat_by_sample") or []


def mat_by_sequence_table(records: Sequence[dict]) -> tuple[list[str], list[list[str]]]:
    """MAT of the i-th round (multi-round) or sample (best-of-N) per speculative record."""
    return _series_table(records, _sequence_mats, "seq", number_text, at_least=2)


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
    groups = group_by_target(records)
    for label, group in groups.items():
        with_temperature = shows_temperature(group)
        by_cell = {(r["drafter"], column_of(r)): r for r in group}
        for column in columns_of(group):
            ratios = _peer_ratios(by_cell, column)
            if ratios:
                name = column.header(with_temperature=with_temperature,
                                     with_engine=shows_engine(group))
                prefix = f"{label}, {name}" if len(groups) > 1 else name
                lines.append(f"- {prefix}: " + "; ".join(ratios))
    return lines


def peer_settings_lines(records: Sequence[dict]) -> list[str]:
    """How each peer ran (``peer_settings`` of its records: prompt lookup depth and
    n-gram size, copied from our pld, and the coupled sampling), and where a peer's
    tokens differed from our baseline's (half precision only: in fp32 that fails the
    case). Records written before peers stored their settings show nothing here."""
    settings: dict[str, dict[str, None]] = {}
    lines = []
    for record in sorted(records, key=lambda r: row_order(row_key(r))):
        if record["role"] != "peer":
            continue
        if isinstance(record.get("peer_settings"), dict):
            text = ", ".join(f"{key} {value}" for key, value in record["peer_settings"].items())
            settings.setdefault(record["drafter"], {})[text] = None
        if record.get("peer_divergence"):
            where = str(record["peer_divergence"]).splitlines()[0]
            lines.append(f"- {record['drafter']}, {record['paradigm']} "
                         f"T={temperature_text(record['temperature'])}: differs from our "
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


#: The last section: what the figures mean.
HOW_TO_READ = """\
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


def drafter_note_lines(records: Sequence[dict]) -> list[str]:
    """What each drafter says about its rows (``drafter_note``: where its drafts come
    from when that is not obvious), once per drafter and note."""
    notes: dict[str, dict[str, None]] = {}
    for record in sorted(records, key=lambda r: row_order(row_key(r))):
        if record.get("drafter_note"):
            notes.setdefault(record["drafter"], {})[str(record["drafter_note"])] = None
    return [f"- {drafter}: {'; '.join(texts)}" for drafter, texts in notes.items()]


def hybrid_part_lines(records: Sequence[dict]) -> list[str]:
    """Which part of each hybrid (A+B) drafted how often (``hybrid_parts``: the steps
    whose draft came from each part, and the tokens drafted in them)."""
    lines = []
    for record in sorted(records, key=lambda r: row_order(row_key(r))):
        parts = record.get("hybrid_parts")
        if not isinstance(parts, dict) or not parts:
            continue
        total = sum(int(c.get("steps", 0)) for c in parts.values()) or 1
        text = "; ".join(f"{name} {c.get('steps', 0)} steps ({100 * c.get('steps', 0) / total:.0f}%), "
                         f"{c.get('tokens', 0)} tokens" for name, c in parts.items())
        lines.append(f"- {record['drafter']}, {record['paradigm']} "
                     f"T={temperature_text(record['temperature'])}: {text}")
    return lines


HYBRIDS_NOTE = ("The steps whose draft came from each part (the last timed round), and the "
                "draft tokens proposed in them.")
