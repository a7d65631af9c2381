"""A speedup from calibrated timelines: its value, its stated uncertainty and the costs
that explain it (the timing protocol, the probes and the noise of one run:
:mod:`pytest_specdec.engine.timing`).

- :func:`speedup_estimate`: the ratio of a case's and its baseline's calibrated times,
  with the timing noise (each run's probes' noise or the session's round scatter,
  :func:`round_scatter`) and the bootstrap over problems (:func:`bootstrap_ratio`);
- :func:`step_costs`: the calibrated mean forward and drafting time per step, from which
  the ideal speedup follows (:func:`pytest_specdec.engine.metrics.ideal_speedup`);
- :func:`timing_flags`: why a speedup cannot be trusted as measured.
"""

from __future__ import annotations

import math
import random
import statistics
from dataclasses import dataclass
from typing import Any, Sequence

from pytest_specdec.engine.timing import Reference, Timeline, width_factor

#: Bootstrap resamples over problems, from a fixed seed (same data, same interval).
BOOTSTRAP_SAMPLES = 2000
BOOTSTRAP_SEED = 0


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
                  refs: Sequence[Reference | None]) -> float | None:
    """The relative round-to-round scatter of calibrated times: the standard deviation of
    each run's rounds about their mean, relative to it, pooled over `runs` (each the
    timed rounds of one run, the same work every round; ``refs[i]`` its
    :class:`Reference`); runs of one round add nothing. None when no run has two."""
    squares, freedom = 0.0, 0
    for rounds, ref in zip(runs, refs):
        if len(rounds) < 2:
            continue
        totals = [t.calibrated_at(ref) for t in rounds]
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
                     problems: int, *, paired: bool = False, ref: Reference | None = None,
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

    With `ref` (:meth:`Reference.of`), drafting is calibrated by the host probes and wide
    forwards at their width; without it, everything by the target's narrow probes.
    """
    if not base_rounds or not new_rounds:
        raise ValueError("a speedup needs at least one timed round of each run")
    if paired and len(base_rounds) != len(new_rounds):
        raise ValueError(f"paired timing needs one baseline round per timed round, got "
                         f"{len(base_rounds)} and {len(new_rounds)}")
    base_m, new_m = _median_round(base_rounds, ref), _median_round(new_rounds, ref)
    if paired:
        ratios = [b.calibrated_at(ref) / n.calibrated_at(ref)
                  for b, n in zip(base_rounds, new_rounds)]
    else:
        ratios = [base_m.calibrated_at(ref) / n.calibrated_at(ref) for n in new_rounds]
    value = statistics.median(ratios)
    base_noise, new_noise = base_m.noise_at(ref), new_m.noise_at(ref)
    own = statistics.stdev(ratios) / value if len(ratios) > 1 else None
    if paired and own is not None:
        noise_sq = base_noise ** 2 + new_noise ** 2 + own ** 2 / len(ratios)
    else:
        noise_sq = (_run_variance(base_noise, scatter, len(base_rounds))
                    + _run_variance(new_noise, own if own is not None else scatter,
                                    len(new_rounds)))
    low, high = bootstrap_ratio(base_m.calibrated_by_problem(problems, ref),
                                new_m.calibrated_by_problem(problems, ref))
    return SpeedupEstimate(value=value, raw=base_m.wall_s / new_m.wall_s,
                           noise=math.sqrt(noise_sq), problems_low=low, problems_high=high)


def _median_round(rounds: Sequence[Timeline], ref: Reference | None = None) -> Timeline:
    """The round of median calibrated time (the lower median for an even count)."""
    ordered = sorted(rounds, key=lambda t: t.calibrated_at(ref))
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
    # mean tokens a forward fed (StepRecord.fed: the uncached context and the draft's
    # nodes; at batch > 1 every row's slots), the width :func:`width_factor` prices
    width: float = 1.0


def step_costs(runs: Sequence[Any], ref: Reference | None = None) -> StepCosts | None:
    """The calibrated step costs of timed runs (``runner.RunResult``s): each sequence's
    step times divided by the calibration of the segment it was decoded in (its own at
    batch 1, its batch's at batch > 1; drafting by the segment's host probes, and each
    forward priced at its width, with `ref`, as :class:`Timeline` calibrates them). A
    batched forward is counted once per row, so the forward mean is per forward;
    drafting is per forward too: a row's drafting time times the rows of that forward
    (the rows draft one after another). None when no sequence has a step past its first
    (a peer's generate records none)."""
    ref = ref or Reference()
    forward = draft = fed = 0.0
    count = 0
    for run in runs:
        line = run.timeline
        scales, hosts, wide_now = line.scales(), line.host_scales(), line.wide_now()
        segments = getattr(run, "segment_of", None) or range(len(run.outputs))
        for segment, generation in zip(segments, run.outputs.values()):
            scale = scales[segment] if segment < len(scales) else 0.0
            if scale <= 0:
                continue
            host = hosts[segment] if ref.host is not None else None
            draft_scale = host / ref.host if host is not None and ref.host else scale
            for step in generation.steps[1:]:
                forward += step.target_s / scale * width_factor(step.fed, wide_now[segment],
                                                                ref.wide)
                draft += step.drafter_s * step.rows / draft_scale
                fed += step.fed
                count += 1
    if not count:
        return None
    return StepCosts(forward / count, draft / count, count, fed / count)


def timing_flags(measured_over_ideal: float | None, noise: float) -> list[str]:
    """Why a speedup cannot be trusted as measured (empty: it can)."""
    flags = []
    if measured_over_ideal is not None and measured_over_ideal > 1 + COST_BOUND_TOLERANCE + 2 * noise:
        flags.append(ABOVE_COST_BOUND)
    if noise > UNSTABLE_NOISE:
        flags.append(UNSTABLE_TIMING)
    return flags
