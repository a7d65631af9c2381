"""Timing that survives a machine whose speed changes during the session.

A benchmark session lasts minutes to hours; on a shared machine a background load can
start or stop at any time, and a baseline timed once at the start would then be divided
into drafter runs timed under another load. So every timed run is *calibrated*: a short
fixed workload of the target, the **probe** (:data:`PROBE_FORWARDS` one-token decode
forwards at a fixed context of :data:`PROBE_CONTEXT` tokens; their trimmed mean is one plain
decode step *now*), runs before every sequence and after the last. The run's wall time
is cut at the probes into segments, and each segment is divided by the mean of the two
probes around it: a run's *calibrated time* is its length in decode steps of the machine
as it was while it ran. A speedup is a ratio of calibrated times, so a machine that is
twice as slow during a drafter's case as during the baseline's leaves it unchanged. A
probe that reads :data:`RETAKE_FACTOR` times off the one before it is read again at
once and the newer reading kept, so a stall inside one probe does not miscalibrate the
segments on either side.

Uncertainty, stated for every speedup (see :func:`speedup_estimate`):

- *timing noise*: where the two probes around a segment differ, the machine's speed
  changed somewhere inside it (or the probe jittered), and the segment's calibrated
  length lies anywhere between its seconds over the faster probe and over the slower
  one: half that range is its uncertainty (so a probe hit by a stall, reading many
  times the others, makes its segments' figure uncertain instead of silently
  shrinking them); these add in quadrature over a run's segments, and over the two
  runs of a ratio; with several timed rounds, the spread of the rounds' ratios is
  added;
- *stalls the probes missed*: a run's segments do the same kind of work, so their
  calibrated cost per target forward agrees within a small factor; a segment more than
  :data:`STALL_FACTOR` times off the run's median (measured here under a background
  load: stretches where one-token forwards took 5 to 50 times their usual time while
  the probes around them read normal, or the reverse) is a stretch the calibration
  did not follow, and its whole departure from the median cost is added to the noise;
- *over problems*: a bootstrap over the problems (which problems were drawn), the 95%
  interval of the ratio of calibrated totals;
- *round to round*: the calibration does not follow every change of the machine (on
  the 2-core CPU, five rounds in a row of the default target's best_of_n baseline
  scattered by 3%, one standard deviation, and two sessions' baselines read 12% apart),
  so a baseline is timed in several rounds (``--specdec-baseline-rounds``, median
  taken) and their spread, pooled over the session's baselines, is the
  *round scatter* (:func:`round_scatter`): each run's uncertainty is the larger of its
  probes' noise and that scatter over the root of its rounds (a case of one round, which
  shows no spread of its own, takes the baseline's).

Drafting is calibrated by a second probe, of the host. A contended CPU slows the
target's forwards and a drafter's Python by different factors (measured here with two
busy processes on the 2 cores: a one-token decode forward 2.8x slower, a few
milliseconds of Python about 1.5x): a run divided by the target's probe alone would
count its drafting at the wrong speed. So every probe also times
:data:`HOST_PROBE_CHUNKS` chunks of a fixed pure-Python workload (dict and tuple work,
like an n-gram drafter's), and each segment's drafting seconds (its sequences' time in
``propose``, ``observe`` and ``accept``) are divided by the host probes around it
instead, converted to target-probe units at the reference ratio of the two probes (the
fastest host probe over the fastest target probe of the runs being compared, the
quietest machine they saw; :func:`host_ratio`).

Probe time is never part of a run's wall time. Every timed figure of the package reads
:func:`now`, so a test can run the whole stack on a fake clock.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

#: The clock of every timed figure (runs, probes, engine steps); tests replace it.
clock: Callable[[], float] = time.perf_counter

#: One-token forwards per probe; the probe reads the mean of all but the fastest and the
#: slowest (one hiccup cannot move it, while a contended machine's slower forwards count)
PROBE_FORWARDS = 5
#: Context tokens the probe's forwards attend to (prefilled once, never timed).
PROBE_CONTEXT = 64
#: Chunks of the host workload per probe, and the loop iterations of one chunk (about
#: 3 ms of Python on the 2-core CPU: long enough that a contended machine's scheduler
#: takes turns inside it, as it does inside a drafter's step); the probe reads their mean
HOST_PROBE_CHUNKS = 4
HOST_PROBE_ITERATIONS = 15_000
#: A segment whose calibrated cost per target forward is this many times above or below
#: the run's median is a stall the probes missed (see the module docstring); a quiet
#: run's segments agree within about 1.5x (draft lengths and context differ)
STALL_FACTOR = 2.0
#: A probe reading this many times the previous one's (or a fraction of it) is read again
#: once: a background load starting or stopping moves the probe 2 to 2.5x on the
#: 2-core CPU, a stall inside one probe's forwards 5 to 50x
RETAKE_FACTOR = 3.0
#: Bootstrap resamples over problems, from a fixed seed (same data, same interval).
BOOTSTRAP_SAMPLES = 2000
BOOTSTRAP_SEED = 0

#: ``--specdec-baseline-rounds``'s default: a baseline's timed rounds. Every case of a
#: paradigm divides into its baseline, so one slow or fast baseline round would move them
#: all; three give a median and the round scatter (about 13% more time for the default run)
BASELINE_ROUNDS = 3

#: ``--specdec-timing`` values: ``calibrated`` (every run probed, the default);
#: ``paired`` (also a fresh baseline round next to every timed round of a case; about
#: twice the time).
TIMING_MODES = ("calibrated", "paired")


def now() -> float:
    """Seconds on :data:`clock` (monotonic, arbitrary origin)."""
    return clock()


def host_workload(iterations: int = HOST_PROBE_ITERATIONS) -> int:
    """A fixed piece of pure-Python work (dict updates and tuple slices over ints, what
    an n-gram drafter's step does); returns a checksum so nothing is optimised away."""
    counts: dict[int, int] = {}
    window: tuple[int, ...] = ()
    for i in range(iterations):
        key = (i * 7919) % 1009
        counts[key] = counts.get(key, 0) + 1
        window = (window + (key,))[-4:]
    return len(counts) + sum(window)


@dataclass(frozen=True)
class ProbeReading:
    """One probe: the target's decode-step time (trimmed mean of its forwards), their
    relative spread, and the host workload's time per chunk (None: not measured)."""

    device_s: float
    spread: float = 0.0
    host_s: float | None = None
    host_spread: float = 0.0


class Probe:
    """The calibration workload of one target: ``reading()`` (or calling the probe)
    times :data:`PROBE_FORWARDS` one-token decode forwards after a fixed context, i.e.
    what a plain decode step costs on this machine at this moment, and the host
    workload (:func:`host_workload`); ``measure()`` returns the first alone. The context is prefilled
    once into the probe's own cache; each forward is rolled back (``crop(-1)``), so
    every probe does the same work and no sequence's cache is touched."""

    def __init__(self, target: Any, context: Sequence[int]):
        self.target = target
        ids = list(context)[:PROBE_CONTEXT] or [0]
        while len(ids) < PROBE_CONTEXT:  # a short prompt is repeated up to the size
            ids += ids[: PROBE_CONTEXT - len(ids)]
        self.next_token = ids[-1]
        with torch.inference_mode():
            self.cache = target.new_cache()
            target.forward(ids[:-1], self.cache, keep_logits=1)

    def measure(self) -> float:
        return self.reading().device_s

    @torch.inference_mode()
    def reading(self) -> ProbeReading:
        """The target's probe (the trimmed mean of the forwards, and half the range of
        the kept ones over that mean: on a quiet machine the forwards agree to a few
        percent; on a contended one, whose threads are descheduled by other processes,
        they scatter, and the spread enters the timing noise, see
        :meth:`Timeline.noise_at`), then the host's (the mean chunk time of
        :func:`host_workload`, and half its range over that mean)."""
        times = []
        for _ in range(PROBE_FORWARDS):
            started = now()
            logits, _ = self.target.forward([self.next_token], self.cache, keep_logits=1)
            float(logits[0, 0])  # waits for an asynchronous device
            times.append(now() - started)
            self.cache.crop(-1)
        kept = sorted(times)[1:-1] if len(times) > 2 else times
        mean = statistics.fmean(kept)
        host = []
        for _ in range(HOST_PROBE_CHUNKS):
            started = now()
            host_workload()
            host.append(now() - started)
        host_mean = statistics.fmean(host)
        return ProbeReading(mean, _half_range(kept, mean), host_mean, _half_range(host, host_mean))


def _half_range(times: Sequence[float], mean: float) -> float:
    return (max(times) - min(times)) / 2 / mean if mean > 0 else 0.0


def host_ratio(timelines: Sequence["Timeline"]) -> float | None:
    """The reference host ÷ target probe ratio of runs compared with each other: the
    fastest host probe over the fastest target probe among them (the quietest machine
    they saw), so one steady load cancels and both runs use the same conversion. None
    when no run has host readings (a probe that measures none, or a fake clock that
    never advances outside forwards)."""
    hosts = [h for t in timelines for h in t.host_probes if h is not None and h > 0]
    devices = [p for t in timelines for p in t.probes if p > 0]
    if not hosts or not devices:
        return None
    return min(hosts) / min(devices)


@dataclass
class Timeline:
    """One timed run cut by probes: segment i lies between probe i and probe i + 1 and
    belongs to problem ``problem_of[i]``; ``drafting[i]`` is the seconds of it spent in
    the drafter (see :meth:`assign_drafting`). Without a probe (``probe=None``) every
    probe reads 1.0, so calibrated times are the raw seconds.

    Calibrated figures take the run's reference ``ratio`` (:func:`host_ratio`): with it,
    a segment's drafting is calibrated by the host probes around it, the rest by the
    target's; without it (None, or no host readings), the whole segment by the
    target's."""

    #: returns a ProbeReading, the probe's time, or (time, relative spread)
    probe: Callable[[], Any] | None = None
    probes: list[float] = field(default_factory=list)
    spreads: list[float] = field(default_factory=list)  # each probe's relative spread
    host_probes: list[float | None] = field(default_factory=list)
    host_spreads: list[float] = field(default_factory=list)
    segments: list[float] = field(default_factory=list)
    problem_of: list[int] = field(default_factory=list)
    drafting: list[float] = field(default_factory=list)  # drafter seconds per segment
    forwards: list[int] = field(default_factory=list)  # target forwards per segment
    _mark: float | None = None
    _problem: int = 0

    def _read(self) -> ProbeReading:
        reading = self.probe() if self.probe is not None else 1.0
        if not isinstance(reading, ProbeReading):
            value, spread = reading if isinstance(reading, tuple) else (reading, 0.0)
            reading = ProbeReading(value, spread)
        return reading

    def _take_probe(self) -> None:
        reading = self._read()
        last = self.probes[-1] if self.probes else None
        if last and reading.device_s > 0 and max(reading.device_s / last,
                                                 last / reading.device_s) > RETAKE_FACTOR:
            # a stall inside the probe, or the machine changed: read again and keep
            # the newer reading (the one nearer the segment it calibrates); a change
            # that lasts reads the same twice
            reading = self._read()
        self.probes.append(reading.device_s)
        self.spreads.append(reading.spread)
        self.host_probes.append(reading.host_s)
        self.host_spreads.append(reading.host_spread)
        self._mark = now()

    def cut(self, problem: int) -> None:
        """A new segment starts (a sequence of `problem` is about to run)."""
        if self._mark is not None:
            self.segments.append(now() - self._mark)
            self.problem_of.append(self._problem)
        self._problem = problem
        self._take_probe()

    def finish(self) -> None:
        if self._mark is not None:
            self.segments.append(now() - self._mark)
            self.problem_of.append(self._problem)
            self._mark = None
            self._take_probe()

    def assign_drafting(self, segment_of: Sequence[int], drafter_s: Sequence[float]) -> None:
        """Each sequence's drafting seconds (``drafter_s[j]``, decoded in segment
        ``segment_of[j]``) added up per segment."""
        self.drafting = [0.0] * len(self.segments)
        for segment, seconds in zip(segment_of, drafter_s):
            if 0 <= segment < len(self.drafting):
                self.drafting[segment] += seconds

    def assign_forwards(self, segment_of: Sequence[int], forwards: Sequence[int]) -> None:
        """Each segment's target forwards, from its sequences' (``forwards[j]``, decoded
        in segment ``segment_of[j]``): the most of any of them, since a segment holds
        one sequence at batch 1 and, at batch > 1, one batch whose forwards run until
        its longest row is done."""
        self.forwards = [0] * len(self.segments)
        for segment, count in zip(segment_of, forwards):
            if 0 <= segment < len(self.forwards):
                self.forwards[segment] = max(self.forwards[segment], count)

    @property
    def wall_s(self) -> float:
        """The run's own seconds, probes excluded."""
        return sum(self.segments)

    def scales(self) -> list[float]:
        """Each segment's calibration: the mean of the two probes around it."""
        return [(self.probes[i] + self.probes[i + 1]) / 2 for i in range(len(self.segments))]

    def host_scales(self) -> list[float | None]:
        """Each segment's host calibration (None where a probe around it has none)."""
        hosts = self.host_probes if len(self.host_probes) == len(self.probes) else [None] * len(self.probes)
        out: list[float | None] = []
        for i in range(len(self.segments)):
            a, b = hosts[i], hosts[i + 1]
            out.append((a + b) / 2 if a and b and a > 0 and b > 0 else None)
        return out

    def _parts(self, ratio: float | None) -> list[tuple[float, float, int]]:
        """Per segment: (calibrated time outside the drafter, calibrated drafting, i)."""
        drafting = self.drafting if len(self.drafting) == len(self.segments) else [0.0] * len(self.segments)
        parts = []
        for i, (s, c, h) in enumerate(zip(self.segments, self.scales(), self.host_scales())):
            d = min(drafting[i], s)
            if ratio is None or h is None:
                parts.append(((s - d) / c, d / c, i))
            else:
                parts.append(((s - d) / c, d * ratio / h, i))
        return parts

    def segment_units(self, ratio: float | None = None) -> list[float]:
        """Each segment's calibrated length (probe units)."""
        return [rest + draft for rest, draft, _ in self._parts(ratio)]

    def calibrated_at(self, ratio: float | None) -> float:
        """The run's length in probe units (decode steps of the machine as it was)."""
        return sum(self.segment_units(ratio))

    def calibrated_by_problem(self, problems: int, ratio: float | None = None) -> list[float]:
        out = [0.0] * problems
        for units, p in zip(self.segment_units(ratio), self.problem_of):
            out[p] += units
        return out

    def noise_at(self, ratio: float | None) -> float:
        """The calibrated time's relative uncertainty, from three sources (the module
        docstring): per segment, the range its two probes leave (the speed changed
        somewhere between them: its seconds over the faster probe and over the slower
        give that range, half of it the uncertainty) and the probes' own spread (a
        contended machine, whose forwards scatter), each for the part of the segment
        that probe calibrates (the target's probes the time outside the drafter, the
        host's the drafting, with `ratio`); and the stalls the probes missed
        (:meth:`stall_units`). Ranges add in quadrature over the segments; spreads,
        weighted by the segments' calibrated lengths, and stalls add linearly, since
        contention moves every forward of a stretch alike and does not average out."""
        total = self.calibrated_at(ratio)
        if total <= 0:
            return 0.0
        square = weighted_spread = 0.0
        spreads = self.spreads if len(self.spreads) == len(self.probes) else [0.0] * len(self.probes)
        host_spreads = (self.host_spreads if len(self.host_spreads) == len(self.probes)
                        else [0.0] * len(self.probes))
        drafting = self.drafting if len(self.drafting) == len(self.segments) else [0.0] * len(self.segments)
        hosts = self.host_scales()
        for rest, draft, i in self._parts(ratio):
            by_host = ratio is not None and hosts[i] is not None
            device_part = rest if by_host else rest + draft
            d = min(drafting[i], self.segments[i])
            device_s = self.segments[i] - d if by_host else self.segments[i]
            square += (device_s * _half_range_of_inverse(self.probes[i], self.probes[i + 1])) ** 2
            weighted_spread += device_part * (spreads[i] + spreads[i + 1]) / 2
            if by_host and ratio is not None:
                square += (d * ratio * _half_range_of_inverse(self.host_probes[i],
                                                              self.host_probes[i + 1])) ** 2
                weighted_spread += draft * (host_spreads[i] + host_spreads[i + 1]) / 2
        stalls = self.stall_units(ratio)
        return math.sqrt(square / total ** 2 + ((weighted_spread + stalls) / total) ** 2)

    def stall_units(self, ratio: float | None) -> float:
        """The calibrated time of segments whose cost per target forward is more than
        :data:`STALL_FACTOR` times above or below the run's median (their departure from
        the median cost, summed): stretches the probes did not follow. 0 without
        per-segment forward counts (a peer's generate reports none) or with fewer than
        three counted segments (no median to trust)."""
        if len(self.forwards) != len(self.segments):
            return 0.0
        units = self.segment_units(ratio)
        costs = [(u, f) for u, f in zip(units, self.forwards) if f > 0]
        if len(costs) < 3:
            return 0.0
        median = statistics.median(u / f for u, f in costs)
        if median <= 0:
            return 0.0
        stalled = 0.0
        for u, f in costs:
            per_forward = u / f
            if per_forward > median * STALL_FACTOR or per_forward * STALL_FACTOR < median:
                stalled += abs(u - f * median)
        return stalled

    @property
    def probe_s(self) -> float:
        """The median probe: one plain decode step during this run (seconds)."""
        return statistics.median(self.probes) if self.probes else 0.0

    @property
    def host_probe_s(self) -> float | None:
        """The median host probe (seconds per chunk), None without host readings."""
        hosts = [h for h in self.host_probes if h is not None and h > 0]
        return statistics.median(hosts) if hosts else None


def _half_range_of_inverse(a: float | None, b: float | None) -> float:
    """Half the range of 1/a and 1/b: a segment's calibrated length per second of it
    is anywhere between 1/max and 1/min of the probes around it."""
    if not a or not b or a <= 0 or b <= 0:
        return 0.0
    return abs(1 / a - 1 / b) / 2


@dataclass(frozen=True)
class SpeedupEstimate:
    """A speedup with its uncertainty (definitions in :func:`speedup_estimate`)."""

    value: float  # ratio of calibrated times (median over paired rounds in paired mode)
    raw: float  # ratio of wall times, uncalibrated: what the run would say without probes
    noise: float  # relative timing noise (one standard deviation)
    problems_low: float  # bootstrap over problems, 2.5th percentile
    problems_high: float  # 97.5th percentile


def bootstrap_ratio(base: Sequence[float], new: Sequence[float], *,
                    samples: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """95% interval of sum(base[p]) / sum(new[p]) over problems p resampled with
    replacement; a fixed seed, so the same times give the same interval."""
    n = len(base)
    if n == 0 or n != len(new):
        raise ValueError(f"per-problem times must be non-empty and of equal length, "
                         f"got {len(base)} and {len(new)}")
    rng = random.Random(seed)
    ratios = []
    for _ in range(samples):
        picks = [rng.randrange(n) for _ in range(n)]
        denominator = sum(new[p] for p in picks)
        if denominator > 0:
            ratios.append(sum(base[p] for p in picks) / denominator)
    if not ratios:
        return math.nan, math.nan
    ratios.sort()
    return ratios[int(0.025 * (len(ratios) - 1))], ratios[int(0.975 * (len(ratios) - 1))]


def round_scatter(runs: Sequence[Sequence[Timeline]],
                  ratios: Sequence[float | None]) -> float | None:
    """The relative round-to-round scatter of calibrated times: the standard deviation of
    each run's rounds about their mean, relative to it, pooled over `runs` (each the
    timed rounds of one run, the same work every round; ``ratios[i]`` its
    :func:`host_ratio`); runs of one round add nothing. None when no run has two."""
    squares, freedom = 0.0, 0
    for rounds, ratio in zip(runs, ratios):
        if len(rounds) < 2:
            continue
        totals = [t.calibrated_at(ratio) for t in rounds]
        mean = statistics.fmean(totals)
        if mean <= 0:
            continue
        squares += sum((x / mean - 1) ** 2 for x in totals)
        freedom += len(totals) - 1
    return math.sqrt(squares / freedom) if freedom else None


def _run_variance(probe_noise: float, scatter: float | None, rounds: int) -> float:
    """One run's relative variance: the larger of its probes' (:meth:`Timeline.noise_at`)
    and the round scatter's for a median over `rounds` rounds: two estimates of one
    uncertainty, the probes' from inside the run, the scatter's from repeating it."""
    return max(probe_noise ** 2, scatter ** 2 / rounds if scatter else 0.0)


def speedup_estimate(base_rounds: Sequence[Timeline], new_rounds: Sequence[Timeline],
                     problems: int, *, paired: bool = False, ratio: float | None = None,
                     scatter: float | None = None) -> SpeedupEstimate:
    """Speedup of `new_rounds` over `base_rounds` (the timed rounds of one case and of
    its baseline), every figure a ratio of totals over the problems:

    - value: calibrated baseline time / calibrated drafter time; the median round of
      each (calibrated, unpaired); in paired mode, the median over rounds of the ratio
      of each round to the baseline round timed next to it;
    - raw: the same with wall seconds (no calibration), for comparison;
    - noise: each run's uncertainty (:func:`_run_variance`: its median round's
      calibration noise, or the round scatter over the root of its rounds, whichever is
      larger; `scatter` is the session's, :func:`round_scatter`, and a drafter run of
      several rounds uses the spread of its own per-round ratios instead), the two in
      quadrature; in paired mode with several rounds, the two calibration noises and the
      standard error of the paired ratios;
    - problems_low/high: the bootstrap over problems of the median rounds' per-problem
      calibrated times.

    With `ratio` (the :func:`host_ratio` of all the rounds given), drafting is
    calibrated by the host probes; without it, by the target's probes only.
    """
    if not base_rounds or not new_rounds:
        raise ValueError("a speedup needs at least one timed round of each run")
    if paired and len(base_rounds) != len(new_rounds):
        raise ValueError(f"paired timing needs one baseline round per timed round, got "
                         f"{len(base_rounds)} and {len(new_rounds)}")
    base_m, new_m = _median_round(base_rounds, ratio), _median_round(new_rounds, ratio)
    if paired:
        ratios = [b.calibrated_at(ratio) / n.calibrated_at(ratio)
                  for b, n in zip(base_rounds, new_rounds)]
    else:
        ratios = [base_m.calibrated_at(ratio) / n.calibrated_at(ratio) for n in new_rounds]
    value = statistics.median(ratios)
    base_noise, new_noise = base_m.noise_at(ratio), new_m.noise_at(ratio)
    own = statistics.stdev(ratios) / value if len(ratios) > 1 else None
    if paired and own is not None:
        noise_sq = base_noise ** 2 + new_noise ** 2 + own ** 2 / len(ratios)
    else:
        noise_sq = (_run_variance(base_noise, scatter, len(base_rounds))
                    + _run_variance(new_noise, own if own is not None else scatter,
                                    len(new_rounds)))
    low, high = bootstrap_ratio(base_m.calibrated_by_problem(problems, ratio),
                                new_m.calibrated_by_problem(problems, ratio))
    return SpeedupEstimate(value=value, raw=base_m.wall_s / new_m.wall_s,
                           noise=math.sqrt(noise_sq), problems_low=low, problems_high=high)


def _median_round(rounds: Sequence[Timeline], ratio: float | None = None) -> Timeline:
    """The round of median calibrated time (the lower median for an even count)."""
    ordered = sorted(rounds, key=lambda t: t.calibrated_at(ratio))
    return ordered[(len(ordered) - 1) // 2]


#: measured ÷ ideal above 1 + this (plus twice the timing noise) breaks the cost bound:
#: the baseline's own per-token overheads (prefill, sampling, Python) let a real speedup
#: exceed the forwards-only ideal a little, never by this much
COST_BOUND_TOLERANCE = 0.15
#: a relative timing noise above this: the machine's speed changed too fast within the
#: case for the probes to follow
UNSTABLE_NOISE = 0.10
ABOVE_COST_BOUND = "above cost bound"
UNSTABLE_TIMING = "unstable timing"


@dataclass(frozen=True)
class StepCosts:
    """Mean costs per target forward, in probe units (plain decode steps of the machine
    as it was), over every forward but a sequence's first (which also prefills)."""

    forward: float  # the target's forward and token choice (t_step, or t_verify)
    draft: float  # the drafter's propose, observe and accept (t_draft)
    forwards: int  # how many forwards the means are over


def step_costs(runs: Sequence[Any], ratio: float | None = None) -> StepCosts | None:
    """The calibrated step costs of timed runs (``runner.RunResult``s): each sequence's
    step times divided by the calibration of the segment it was decoded in (its own at
    batch 1, its batch's at batch > 1; drafting by the segment's host probes at
    `ratio`, as :class:`Timeline` calibrates it). A batched forward is counted once per row, so
    the forward mean is per forward; drafting is per forward too: a row's drafting
    time times the rows of that forward (the rows draft one after another). None when
    no sequence has a step past its first (a peer's generate records none)."""
    forward = draft = 0.0
    count = 0
    for run in runs:
        scales, hosts = run.timeline.scales(), run.timeline.host_scales()
        segments = getattr(run, "segment_of", None) or range(len(run.outputs))
        for segment, generation in zip(segments, run.outputs.values()):
            scale = scales[segment] if segment < len(scales) else 0.0
            if scale <= 0:
                continue
            host = hosts[segment] if ratio is not None else None
            draft_scale = host / ratio if host is not None else scale
            for step in generation.steps[1:]:
                forward += step.target_s / scale
                draft += step.drafter_s * step.rows / draft_scale
                count += 1
    if not count:
        return None
    return StepCosts(forward / count, draft / count, count)


def timing_flags(measured_over_ideal: float | None, noise: float) -> list[str]:
    """Why a speedup cannot be trusted as measured (empty: it can)."""
    flags = []
    if measured_over_ideal is not None and measured_over_ideal > 1 + COST_BOUND_TOLERANCE + 2 * noise:
        flags.append(ABOVE_COST_BOUND)
    if noise > UNSTABLE_NOISE:
        flags.append(UNSTABLE_TIMING)
    return flags
