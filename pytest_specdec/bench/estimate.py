"""How long a session will take, priced before it runs: the cost model of each case.

A case's time is the target forwards it takes times the cost of one decode step:

- a paradigm case's timed round decodes ``problems × sequences per problem`` sequences
  of up to ``max_new_tokens`` tokens, B at a time: ``tokens ÷ B`` plain decode steps;
- a drafter's case takes those steps ÷ its *expected speedup*, a peer's × its *expected
  ratio* to our baseline;
- every timed round adds the calibration probes before every sequence or batch and
  after the last (:data:`PROBE_STEPS` decode steps' worth each: the one-token forwards
  and the wide ones, see :mod:`pytest_specdec.engine.timing`),
  paired timing a baseline round next to each drafter's round, and the first case of a
  paradigm case on a decoding stack (our engine, transformers' generate) its warm-up.

The step cost is measured on the loaded target at the start of the session (the
calibration probe: a one-token forward at a short fixed context; or given,
``--specdec-step-ms``, to size a run for another machine). A real plain decode step of
a run costs more than the probe (sampling, the Python around the forward, a context
that grows; at batch > 1, a forward over B rows): the *step scale*, a baseline's mean
step time over its probe. Expected speedups, peer ratios, step scales and how much of
the token budget sequences use (they may stop at an end token) come from the earlier
reports of the same target, dtype and device in the report folder, each case from the
newest report that measured it; where none did, the speedup is
``--specdec-expected-speedup`` or else a prior (:data:`PRIOR_SPEEDUP_GREEDY`,
:data:`PRIOR_SPEEDUP_SAMPLED`, :data:`PRIOR_PEER_RATIO`), the step scale a prior
(:func:`prior_step_scale`), and every sequence is assumed to use its whole budget. So
the first run on a machine is priced by the priors, and later ones by what the machine
measured.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from pytest_specdec.bench.config import SpecdecConfig
from pytest_specdec.bench.paradigms import make_paradigm
from pytest_specdec.bench.session import WARMUP_TOKENS, ParadigmCase
from pytest_specdec.engine.timing import PROBE_FORWARDS, WIDE_PROBE_FORWARDS

ROLE_BASELINE, ROLE_SPECULATIVE, ROLE_PEER = "baseline", "speculative", "peer"

#: Priors for a case no earlier report measured, from the default run on the 2-core
#: CPU (fresh clone, quiet, 2026-12-03, commit 68261b3): the built-in drafters'
#: time-weighted mean speedup (the baseline's time × 10 over the ten drafters' summed
#: times) was 1.24x on multi_round T=0 and 0.75x on best_of_n T=0.6 (sampled acceptance
#: is lower and the drafting costs the same), and transformers' generate took 1.6x our
#: baseline's time. On a GPU, where drafting is cheap next to a forward, they are
#: pessimistic: pass --specdec-expected-speedup there (the README's GPU examples do).
PRIOR_SPEEDUP_GREEDY = 1.25
PRIOR_SPEEDUP_SAMPLED = 0.75
PRIOR_PEER_RATIO = 1.6
#: The prior step scale (a baseline step over the probe) at batch 1, and what each
#: further row adds: the same runs measured 39.3 ms per step against a 31.6 ms probe at
#: batch 1 (1.24) and 51.9 against 31.9 at batch 4 (1.63) on best_of_n T=0.6
PRIOR_STEP_SCALE = 1.25
PRIOR_STEP_SCALE_PER_ROW = 0.13
#: A wide probe forward's cost in one-token probe forwards (median 1.9 on the 2-core CPU,
#: between 1.6 and 2.4), and one probe's cost in decode steps' worth
PRIOR_WIDE_PROBE_COST = 1.9
PROBE_STEPS = PROBE_FORWARDS + WIDE_PROBE_FORWARDS * PRIOR_WIDE_PROBE_COST

#: the earlier reports an estimate reads, newest first (each a few tens of kB)
HISTORY_REPORTS = 20

#: (drafter label or peer name, paradigm, temperature, batch): one case of a report
CaseKey = tuple[str, str, float, int]


@dataclass(frozen=True)
class PlannedCase:
    """One collected case, as the estimate prices it."""

    label: str  # the case's id, e.g. test_speculative[pld-best_of_n]
    role: str  # baseline, speculative or peer
    drafter: str  # the drafter's label; "baseline"; or the peer's name
    case: ParadigmCase

    @property
    def key(self) -> CaseKey:
        return (self.drafter, self.case.paradigm, self.case.temperature, self.case.batch)


@dataclass(frozen=True)
class History:
    """What an earlier report of this target measured, as ratios (so they carry over
    to another token budget, problem count or machine speed)."""

    source: Path | None = None
    speedups: dict[CaseKey, float] = field(default_factory=dict)
    peer_ratios: dict[CaseKey, float] = field(default_factory=dict)  # peer wall ÷ baseline wall
    # a baseline's mean step over its probe (t_step_ms ÷ probe_ms), per (paradigm,
    # temperature, batch)
    step_scale: dict[tuple[str, float, int], float] = field(default_factory=dict)
    # new tokens ÷ (sequences × max_new_tokens), per (paradigm, temperature, batch)
    fill: dict[tuple[str, float, int], float] = field(default_factory=dict)


@dataclass(frozen=True)
class CaseEstimate:
    planned: PlannedCase
    steps: float  # target forwards (decode steps' worth), warm-up and probes included
    seconds: float
    basis: str  # where its speedup or ratio came from


@dataclass(frozen=True)
class RunEstimate:
    cases: list[CaseEstimate]
    step_s: float  # the cost of one decode step the estimate used
    step_basis: str  # "measured on the loaded target" or "given (--specdec-step-ms)"
    history: History

    @property
    def seconds(self) -> float:
        return sum(c.seconds for c in self.cases)

    def lines(self, *, per_case: bool = True) -> list[str]:
        """The start-of-session block: a headline, then one line per case."""
        source = (f"speedups from {self.history.source.name} where it measured the case, "
                  "else assumed" if self.history.source is not None
                  else "no earlier report of this target: speedups assumed")
        out = [f"pytest-specdec: {len(self.cases)} cases, estimated {duration(self.seconds)} "
               f"at {self.step_s * 1000:.1f} ms per decode step ({self.step_basis}; "
               f"{source}; model loading not included)"]
        if per_case:
            width = max((len(c.planned.label) for c in self.cases), default=0)
            out += [f"  {c.planned.label:<{width}}  {duration(c.seconds):>9}  {c.basis}"
                    for c in self.cases]
        return out


def duration(seconds: float) -> str:
    """``4.2 s``, ``42 s``, ``3 min 05 s``, ``2 h 10 min``, ``3 d 4 h``."""
    if seconds < 9.95:
        return f"{seconds:.1f} s"
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def estimate_run(cfg: SpecdecConfig, planned: Sequence[PlannedCase], *, step_s: float,
                 step_basis: str, problems: int, history: History = History(),
                 step_is_probe: bool = True) -> RunEstimate:
    """Price every planned case, in order (the order the session runs them). `step_s`
    is a probe reading (`step_is_probe`; a real step costs the step scale times it) or
    a plain decode step at batch 1 given by the user (then only a batch's growth over
    batch 1 is scaled)."""
    warm: set[tuple[ParadigmCase, str]] = set()
    baselines = {p.case for p in planned if p.role == ROLE_BASELINE}
    estimates = []
    for p in planned:
        per_problem = make_paradigm(p.case.paradigm, rounds=cfg.rounds,
                                    n=cfg.n).sequences_per_problem
        sequences = problems * per_problem
        where = (p.case.paradigm, p.case.temperature, p.case.batch)
        fill = history.fill.get(where, 1.0)
        scale = (history.step_scale.get(where, prior_step_scale(p.case.batch)) if step_is_probe
                 else prior_step_scale(p.case.batch) / prior_step_scale(1))
        # decode steps in step_s units; the probes cost one probe reading each
        round_steps = sequences * cfg.max_new_tokens * fill / p.case.batch * scale
        probes = (math.ceil(sequences / p.case.batch) + 1) * PROBE_STEPS
        notes = []
        if p.role == ROLE_SPECULATIVE:
            speedup = history.speedups.get(p.key)
            assumed = prior_speedup(cfg, p.case.temperature)
            notes.append(f"{speedup:.2f}x measured" if speedup is not None
                         else f"{assumed:g}x assumed")
            timed = round_steps / (speedup or assumed)
            if cfg.timing == "paired":
                timed += round_steps + probes
        elif p.role == ROLE_PEER:
            ratio = history.peer_ratios.get(p.key)
            notes.append(f"{ratio:.2f}x our baseline's time, measured" if ratio is not None
                         else f"{PRIOR_PEER_RATIO:g}x our baseline's time, assumed")
            timed = round_steps * (ratio or PRIOR_PEER_RATIO)
        else:
            timed = round_steps
        baseline_rounds = cfg.baseline_timed_rounds
        steps = (baseline_rounds if p.role == ROLE_BASELINE else cfg.timed_rounds) * (timed + probes)
        implicit_baseline = p.role != ROLE_BASELINE and p.case not in baselines
        if implicit_baseline:  # the session measures the baseline inside this case
            steps += baseline_rounds * (round_steps + probes)
            baselines.add(p.case)
            notes.append("with its baseline")
        # our engine's warm-up runs in the case that first measures plain decoding;
        # transformers' generate has its own, in the first peer case
        stacks = {"generate"} if p.role == ROLE_PEER else set()
        if p.role == ROLE_BASELINE or implicit_baseline:
            stacks.add("engine")
        for stack in sorted(stacks):
            if (p.case, stack) not in warm:
                warm.add((p.case, stack))
                steps += (per_problem * min(WARMUP_TOKENS, cfg.max_new_tokens) / p.case.batch
                          * scale)
        estimates.append(CaseEstimate(p, steps, steps * step_s, ", ".join(notes)))
    return RunEstimate(estimates, step_s, step_basis, history)


def prior_speedup(cfg: SpecdecConfig, temperature: float) -> float:
    """The speedup assumed for an unmeasured drafter's case at `temperature`."""
    if cfg.expected_speedup is not None:
        return cfg.expected_speedup
    return PRIOR_SPEEDUP_GREEDY if temperature == 0 else PRIOR_SPEEDUP_SAMPLED


def prior_step_scale(batch: int) -> float:
    """The step scale assumed where no earlier report measured a baseline at `batch`."""
    return PRIOR_STEP_SCALE + PRIOR_STEP_SCALE_PER_ROW * (batch - 1)


def read_history(report_dir: Path, target_name: str, dtype: str | None = None,
                 device: str | None = None) -> History:
    """What the reports in `report_dir` (``specdec-*.json``, the newest
    :data:`HISTORY_REPORTS`) measured on `target_name` (in `dtype` on `device`, when
    given, as records spell them: ``float32``, ``cpu``; a bfloat16 run's speedups and
    step costs would misprice a float32 one), case by case from the newest report that
    has the case (a smoke run after a full one prices the full run's other cases by the
    full one); ``source`` is the newest report used. An empty History when none can be
    read (an estimate never stops a session)."""
    wanted = {"target": target_name, "dtype": dtype, "device": device}
    wanted = {key: value for key, value in wanted.items() if value is not None}
    candidates = sorted(report_dir.glob("specdec-*.json"), key=_mtime, reverse=True)
    merged = History()
    for path in candidates[:HISTORY_REPORTS]:
        try:
            records = json.loads(path.read_text())["records"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        mine = [r for r in records if isinstance(r, dict)
                and all(r.get(key) == value for key, value in wanted.items())]
        if mine:
            older = _history_of(path, mine)
            merged = History(merged.source or path, {**older.speedups, **merged.speedups},
                             {**older.peer_ratios, **merged.peer_ratios},
                             {**older.step_scale, **merged.step_scale},
                             {**older.fill, **merged.fill})
    return merged


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _history_of(source: Path, records: Iterable[dict]) -> History:
    speedups: dict[CaseKey, float] = {}
    peer_walls: dict[CaseKey, float] = {}
    baseline_walls: dict[tuple[str, float, int], float] = {}
    fill: dict[tuple[str, float, int], float] = {}
    step_scale: dict[tuple[str, float, int], float] = {}
    for r in records:
        try:
            where = (str(r["paradigm"]), float(r["temperature"]), int(r.get("batch", 1)))
            key = (str(r["drafter"]), *where)
            if r["role"] == ROLE_SPECULATIVE and _positive(r.get("speedup")):
                speedups[key] = float(r["speedup"])
            elif r["role"] == ROLE_PEER and _positive(r.get("wall_s")):
                peer_walls[key] = float(r["wall_s"])
            elif r["role"] == ROLE_BASELINE and _positive(r.get("wall_s")):
                baseline_walls[where] = float(r["wall_s"])
                if _positive(r.get("t_step_ms")) and _positive(r.get("probe_ms")):
                    step_scale[where] = float(r["t_step_ms"]) / float(r["probe_ms"])
                budget = int(r["sequences"]) * int(r["max_new_tokens"])
                if budget > 0 and _positive(r.get("new_tokens")):
                    fill[where] = min(1.0, int(r["new_tokens"]) / budget)
        except (KeyError, TypeError, ValueError):
            continue  # a record of another shape prices nothing
    ratios = {key: wall / baseline_walls[key[1:]] for key, wall in peer_walls.items()
              if key[1:] in baseline_walls}
    return History(source, speedups, ratios, step_scale, fill)


def _positive(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0

