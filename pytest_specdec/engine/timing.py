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

Uncertainty, stated for every speedup (see :func:`pytest_specdec.engine.speedup.speedup_estimate`):

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
  *round scatter* (:func:`pytest_specdec.engine.speedup.round_scatter`): each run's uncertainty is the larger of its
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

Wide forwards are calibrated by a third, the wide probe. A one-token forward does not
price a forward of many tokens consistently (on the 2-core CPU a 32-token forward cost
1.6 to 2.4 one-token ones on an idle machine, in episodes of seconds to minutes), and
every verify forward feeds a draft, every first forward a prompt. So every probe also
times :data:`WIDE_PROBE_FORWARDS` forwards of :data:`WIDE_PROBE_WIDTH` tokens, and each
segment's forward seconds of each width (``StepRecord.fed``; :func:`forward_load`) are
repriced by :func:`width_factor` from the wide ÷ narrow ratio of the probes around the
segment to the reference ratio (:func:`wide_ratio` of the session's timed runs so far)
before the segment is divided by its one-token probes. One-token forwards are left as
they are. :class:`Reference` carries both conversions.

Probe time is never part of a run's wall time. Every timed figure of the package reads
:func:`now`, so a test can run the whole stack on a fake clock.

Span boundaries. On an accelerator kernels run asynchronously: a host clock read after
a forward is launched measures its enqueueing, and work left queued is charged to
whichever span next waits for the device. So every boundary of a timed span (the
decode loops' t0..t3, a batched forward's start and end, each probe forward) is read
with :func:`boundary`, which first waits for the device (:data:`synchronize`; nothing
to wait for on the CPU) and then reads the clock: each span holds exactly the device
work launched inside it. A test replaces :data:`synchronize` as it replaces
:data:`clock`.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

#: The clock of every timed figure (runs, probes, engine steps); tests replace it.
clock: Callable[[], float] = time.perf_counter


def synchronize_device(device: torch.device | str | None) -> None:
    """Wait until every kernel queued on `device` has run (CUDA, MPS); a no-op on the
    CPU, whose work is done when the call that did it returns."""
    kind = torch.device(device).type if device is not None else "cpu"
    if kind == "cuda":
        torch.cuda.synchronize(device)
    elif kind == "mps":
        torch.mps.synchronize()


#: How a span boundary waits for the device (:func:`boundary`); tests replace it.
synchronize: Callable[[torch.device | str | None], None] = synchronize_device

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
#: Wide forwards per probe, and the tokens each feeds (after the narrow forwards, at the
#: same context): a one-token forward does not price a verify forward of tens of tokens
#: consistently (on the 2-core CPU their ratio wandered between 1.6 and 2.4 on an idle
#: machine, in episodes of seconds to minutes), so each probe also reads the median of
#: these, and wide verify forwards are calibrated at their width (:func:`width_factor`)
WIDE_PROBE_FORWARDS = 3
WIDE_PROBE_WIDTH = 32
#: A segment whose calibrated cost per target forward is this many times above or below
#: the run's median is a stall the probes missed (see the module docstring); a quiet
#: run's segments agree within about 1.5x (draft lengths and context differ)
STALL_FACTOR = 2.0
#: A probe reading this many times the previous one's (or a fraction of it) is read again
#: once: a background load starting or stopping moves the probe 2 to 2.5x on the
#: 2-core CPU, a stall inside one probe's forwards 5 to 50x
RETAKE_FACTOR = 3.0

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


def boundary(device: torch.device | str | None) -> float:
    """A span boundary: wait for `device` (:data:`synchronize`), then read :func:`now`,
    so the span that ends here holds the device work launched in it (see the module
    docstring)."""
    synchronize(device)
    return now()


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
    relative spread, the host workload's time per chunk, and the median time of a wide
    forward (:data:`WIDE_PROBE_WIDTH` tokens); None: not measured."""

    device_s: float
    spread: float = 0.0
    host_s: float | None = None
    host_spread: float = 0.0
    wide_s: float | None = None


class Probe:
    """The calibration workload of one target: ``reading()`` (or calling the probe)
    times :data:`PROBE_FORWARDS` one-token decode forwards after a fixed context, i.e.
    what a plain decode step costs on this machine at this moment, and the host
    workload (:func:`host_workload`) and :data:`WIDE_PROBE_FORWARDS` forwards of
    :data:`WIDE_PROBE_WIDTH` context tokens; ``measure()`` returns the first alone. The
    context is prefilled once into the probe's own cache; each forward is rolled back
    (``crop``), so every probe does the same work and no sequence's cache is touched."""

    def __init__(self, target: Any, context: Sequence[int]):
        self.target = target
        ids = list(context)[:PROBE_CONTEXT] or [0]
        while len(ids) < PROBE_CONTEXT:  # a short prompt is repeated up to the size
            ids += ids[: PROBE_CONTEXT - len(ids)]
        self.next_token = ids[-1]
        self.wide_tokens = ids[:WIDE_PROBE_WIDTH]
        with torch.inference_mode():
            # on the compiled path a static cache of its own; its one-token and wide
            # forwards run once here, so no reading pays a first call (a compilation)
            if getattr(target, "path", "eager") == "compiled":
                target.compiled_forward().warm_up(PROBE_CONTEXT + WIDE_PROBE_WIDTH, (
                    PROBE_CONTEXT - 1, 1, WIDE_PROBE_WIDTH), owner="probe")
            self.cache = target.new_cache(PROBE_CONTEXT + WIDE_PROBE_WIDTH, owner="probe")
            target.forward(ids[:-1], self.cache, keep_logits=1)
            for fed in ([self.next_token], self.wide_tokens) * 2:
                target.forward(fed, self.cache, keep_logits=1)
                self.cache.crop(-len(fed))

    def measure(self) -> float:
        return self.reading().device_s

    @torch.inference_mode()
    def reading(self) -> ProbeReading:
        """The target's probe (the trimmed mean of the forwards, and half the range of
        the kept ones over that mean: on a quiet machine the forwards agree to a few
        percent; on a contended one, whose threads are descheduled by other processes,
        they scatter, and the spread enters the timing noise, see
        :meth:`Timeline.noise_at`), then the host's (the mean chunk time of
        :func:`host_workload`, and half its range over that mean), then the wide
        forwards' median."""
        device = getattr(self.target, "device", None)
        times = []
        for _ in range(PROBE_FORWARDS):
            started = boundary(device)
            self.target.forward([self.next_token], self.cache, keep_logits=1)
            times.append(boundary(device) - started)
            self.cache.crop(-1)
        kept = sorted(times)[1:-1] if len(times) > 2 else times
        mean = statistics.fmean(kept)
        host = []
        for _ in range(HOST_PROBE_CHUNKS):
            started = now()
            host_workload()
            host.append(now() - started)
        host_mean = statistics.fmean(host)
        wide = []
        for _ in range(WIDE_PROBE_FORWARDS):
            started = boundary(device)
            self.target.forward(self.wide_tokens, self.cache, keep_logits=1)
            wide.append(boundary(device) - started)
            self.cache.crop(-len(self.wide_tokens))
        return ProbeReading(mean, _half_range(kept, mean), host_mean, _half_range(host, host_mean),
                            statistics.median(wide) if wide else None)


def _half_range(times: Sequence[float], mean: float) -> float:
    return (max(times) - min(times)) / 2 / mean if mean > 0 else 0.0


@dataclass(frozen=True)
class Reference:
    """The conversions that runs compared with each other share: ``host``, the host ÷
    target probe ratio that drafting's calibration converts at (:func:`host_ratio`);
    ``wide``, the wide ÷ narrow probe ratio that wide forwards are priced at
    (:func:`wide_ratio`). None: that calibration is off."""

    host: float | None = None
    wide: float | None = None

    @classmethod
    def of(cls, compared: Sequence["Timeline"], session: Sequence["Timeline"]) -> "Reference":
        """The reference of a case: the host ratio of every run `compared`, the wide
        ratio of every timed run of the `session` so far, this case's included (the
        machine as it typically was: the wide ratio wanders for minutes at a time, so
        one baseline's probes would price a whole paradigm's cases at the episode it
        ran in)."""
        return cls(host_ratio(compared), wide_ratio(session))


def wide_ratio(timelines: Sequence["Timeline"]) -> float | None:
    """The median over the probes of `timelines` of a wide forward's time over the
    narrow probe's, None without wide readings."""
    ratios = [w / n for t in timelines for w, n in zip(t.wide_probes, t.probes)
              if w is not None and w > 0 and n > 0]
    return statistics.median(ratios) if ratios else None


def width_factor(width: float, now: float | None, wide: float | None) -> float:
    """What a forward of `width` tokens costs at the reference, over what it costs now,
    both in narrow-probe units, given the wide ÷ narrow probe ratio now (`now`) and at
    the reference (`wide`): a forward's cost taken as a power of its width through the
    narrow probe (one token) and the wide one (:data:`WIDE_PROBE_WIDTH` tokens), so
    ``(wide / now) ** (log width / log WIDE_PROBE_WIDTH)``. On the 2-core CPU the verify
    forwards of pld (about 7 tokens) and eagle3 (60) moved 8% and 14% while the wide
    probe moved 12% and 15%; this predicts 7% and 18%, a cost affine in width 4% and
    21%. 1 for one-token forwards, or without both ratios."""
    if now is None or wide is None or width <= 1 or now <= 0 or wide <= 0:
        return 1.0
    return (wide / now) ** (math.log(width) / math.log(WIDE_PROBE_WIDTH))


def forward_load(steps: Sequence[Any]) -> dict[int, float]:
    """A sequence's target forwards (``StepRecord``s, its prefill's included): their
    seconds by width (tokens ``fed``; a batched forward's seconds shared equally by its
    rows' records)."""
    load: dict[int, float] = {}
    for step in steps:
        load[step.fed] = load.get(step.fed, 0.0) + step.target_s / step.rows
    return load


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
    the drafter (see :meth:`assign_drafting`), ``forward_load[i]`` those in target
    forwards, by the forwards' width (:meth:`assign_forward_load`). Without a probe
    (``probe=None``) every probe reads 1.0, so calibrated times are the raw seconds.

    Calibrated figures take the runs' :class:`Reference`: with its ``host`` ratio, a
    segment's drafting is calibrated by the host probes around it, the rest by the
    target's; with its ``wide`` ratio, the target's forwards are priced at their width
    (:func:`width_factor`); without a reference (None), the whole segment by the
    target's narrow probes."""

    #: returns a ProbeReading, the probe's time, or (time, relative spread)
    probe: Callable[[], Any] | None = None
    probes: list[float] = field(default_factory=list)
    spreads: list[float] = field(default_factory=list)  # each probe's relative spread
    host_probes: list[float | None] = field(default_factory=list)
    host_spreads: list[float] = field(default_factory=list)
    wide_probes: list[float | None] = field(default_factory=list)
    segments: list[float] = field(default_factory=list)
    problem_of: list[int] = field(default_factory=list)
    drafting: list[float] = field(default_factory=list)  # drafter seconds per segment
    forwards: list[int] = field(default_factory=list)  # target forwards per segment
    # per segment, target-forward seconds by width (tokens fed)
    forward_load: list[dict[int, float]] = field(default_factory=list)
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
        self.wide_probes.append(reading.wide_s)
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

    def _per_segment(self, segment_of: Sequence[int], values: Sequence[float]) -> list[float]:
        out = [0.0] * len(self.segments)
        for segment, value in zip(segment_of, values):
            if 0 <= segment < len(out):
                out[segment] += value
        return out

    def assign_drafting(self, segment_of: Sequence[int], drafter_s: Sequence[float]) -> None:
        """Each sequence's drafting seconds (``drafter_s[j]``, decoded in segment
        ``segment_of[j]``) added up per segment."""
        self.drafting = self._per_segment(segment_of, drafter_s)

    def assign_forwards(self, segment_of: Sequence[int], forwards: Sequence[int]) -> None:
        """Each segment's target forwards, from its sequences' (``forwards[j]``, decoded
        in segment ``segment_of[j]``): the most of any of them, since a segment holds
        one sequence at batch 1 and, at batch > 1, one batch whose forwards run until
        its longest row is done."""
        self.forwards = [0] * len(self.segments)
        for segment, count in zip(segment_of, forwards):
            if 0 <= segment < len(self.forwards):
                self.forwards[segment] = max(self.forwards[segment], count)

    def assign_forward_load(self, segment_of: Sequence[int],
                            loads: Sequence[dict[int, float]]) -> None:
        """Each segment's target-forward seconds by width, from its sequences'
        (``loads[j]``, :func:`forward_load`, decoded in segment ``segment_of[j]``)."""
        self.forward_load = [{} for _ in self.segments]
        for segment, load in zip(segment_of, loads):
            if 0 <= segment < len(self.forward_load):
                mine = self.forward_load[segment]
                for width, seconds in load.items():
                    mine[width] = mine.get(width, 0.0) + seconds

    @property
    def wall_s(self) -> float:
        """The run's own seconds, probes excluded."""
        return sum(self.segments)

    def scales(self) -> list[float]:
        """Each segment's calibration: the mean of the two probes around it."""
        return [(self.probes[i] + self.probes[i + 1]) / 2 for i in range(len(self.segments))]

    def _around(self, readings: Sequence[float | None]) -> list[float | None]:
        """Per segment, the mean of two optional readings around it (None where either
        is missing)."""
        if len(readings) != len(self.probes):
            readings = [None] * len(self.probes)
        out: list[float | None] = []
        for i in range(len(self.segments)):
            a, b = readings[i], readings[i + 1]
            out.append((a + b) / 2 if a and b and a > 0 and b > 0 else None)
        return out

    def host_scales(self) -> list[float | None]:
        """Each segment's host calibration (None where a probe around it has none)."""
        return self._around(self.host_probes)

    def wide_now(self) -> list[float | None]:
        """Each segment's wide ÷ narrow probe ratio (the means of the probes around it;
        None where a probe around it has no wide reading)."""
        return [None if w is None else w / c
                for w, c in zip(self._around(self.wide_probes), self.scales())]

    def _width_excess(self, i: int, now: float | None, wide: float | None) -> float:
        """Segment i's forward seconds times their :func:`width_factor` less 1, summed
        over its forwards' widths: what pricing them at their width adds (or removes,
        when negative) to its seconds before calibration."""
        if now is None or wide is None or len(self.forward_load) != len(self.segments):
            return 0.0
        return sum(seconds * (width_factor(width, now, wide) - 1)
                   for width, seconds in self.forward_load[i].items())

    def _parts(self, ref: Reference | None) -> list[tuple[float, float, int]]:
        """Per segment: (calibrated time outside the drafter, calibrated drafting, i)."""
        ref = ref or Reference()
        drafting = self.drafting if len(self.drafting) == len(self.segments) else [0.0] * len(self.segments)
        parts = []
        for i, (s, c, h, r) in enumerate(zip(self.segments, self.scales(), self.host_scales(),
                                             self.wide_now())):
            d = min(drafting[i], s)
            rest = max(0.0, s - d + self._width_excess(i, r, ref.wide)) / c
            if ref.host is None or h is None:
                parts.append((rest, d / c, i))
            else:
                parts.append((rest, d * ref.host / h, i))
        return parts

    def segment_units(self, ref: Reference | None = None) -> list[float]:
        """Each segment's calibrated length (probe units)."""
        return [rest + draft for rest, draft, _ in self._parts(ref)]

    def calibrated_at(self, ref: Reference | None) -> float:
        """The run's length in probe units (decode steps of the machine as it was)."""
        return sum(self.segment_units(ref))

    def calibrated_by_problem(self, problems: int, ref: Reference | None = None) -> list[float]:
        out = [0.0] * problems
        for units, p in zip(self.segment_units(ref), self.problem_of):
            out[p] += units
        return out

    def noise_at(self, ref: Reference | None) -> float:
        """The calibrated time's relative uncertainty, from three sources (the module
        docstring): per segment, the range its two probes leave (the speed changed
        somewhere between them: its seconds over the faster probe and over the slower
        give that range, half of it the uncertainty; for wide forwards, the same
        for the two wide ratios around it) and the probes' own spread (a contended
        machine, whose forwards scatter), each for the part of the segment that probe
        calibrates (the target's probes the time outside the drafter, the host's the
        drafting, with a host reference); and the stalls the probes missed
        (:meth:`stall_units`). Ranges add in quadrature over the segments; spreads,
        weighted by the segments' calibrated lengths, and stalls add linearly, since
        contention moves every forward of a stretch alike and does not average out."""
        ref = ref or Reference()
        total = self.calibrated_at(ref)
        if total <= 0:
            return 0.0
        square = weighted_spread = 0.0
        spreads = self.spreads if len(self.spreads) == len(self.probes) else [0.0] * len(self.probes)
        host_spreads = (self.host_spreads if len(self.host_spreads) == len(self.probes)
                        else [0.0] * len(self.probes))
        wides = self.wide_probes if len(self.wide_probes) == len(self.probes) else [None] * len(self.probes)
        drafting = self.drafting if len(self.drafting) == len(self.segments) else [0.0] * len(self.segments)
        hosts, scales = self.host_scales(), self.scales()
        for rest, draft, i in self._parts(ref):
            by_host = ref.host is not None and hosts[i] is not None
            device_part = rest if by_host else rest + draft
            d = min(drafting[i], self.segments[i])
            device_s = self.segments[i] - d if by_host else self.segments[i]
            square += (device_s * _half_range_of_inverse(self.probes[i], self.probes[i + 1])) ** 2
            weighted_spread += device_part * (spreads[i] + spreads[i + 1]) / 2
            a, b = wides[i], wides[i + 1]
            if a and b and self.probes[i] > 0 and self.probes[i + 1] > 0:
                # the wide ratios of the two probes around it, each taken alone
                excess_a = self._width_excess(i, a / self.probes[i], ref.wide)
                excess_b = self._width_excess(i, b / self.probes[i + 1], ref.wide)
                square += (abs(excess_a - excess_b) / 2 / scales[i]) ** 2
            if by_host:
                square += (d * ref.host * _half_range_of_inverse(self.host_probes[i],
                                                                 self.host_probes[i + 1])) ** 2
                weighted_spread += draft * (host_spreads[i] + host_spreads[i + 1]) / 2
        stalls = self.stall_units(ref)
        return math.sqrt(square / total ** 2 + ((weighted_spread + stalls) / total) ** 2)

    def stall_units(self, ref: Reference | None) -> float:
        """The calibrated time of segments whose cost per target forward is more than
        :data:`STALL_FACTOR` times above or below the run's median (their departure from
        the median cost, summed): stretches the probes did not follow. 0 without
        per-segment forward counts (a peer's generate reports none) or with fewer than
        three counted segments (no median to trust)."""
        if len(self.forwards) != len(self.segments):
            return 0.0
        units = self.segment_units(ref)
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

    @property
    def wide_ratio_s(self) -> float | None:
        """The median wide ÷ narrow probe ratio of this run, None without wide readings."""
        return wide_ratio([self])


def _half_range_of_inverse(a: float | None, b: float | None) -> float:
    """Half the range of 1/a and 1/b: a segment's calibrated length per second of it
    is anywhere between 1/max and 1/min of the probes around it."""
    if not a or not b or a <= 0 or b <= 0:
        return 0.0
    return abs(1 / a - 1 / b) / 2
