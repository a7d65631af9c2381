"""Calibrated timing: a machine that gets slower between the baseline and a drafter's
case leaves the reported speedup unchanged. Runs the real session on a tiny target with
a fake clock that advances only inside target forwards (cost ∝ tokens fed × the
machine's slowdown), so every figure is deterministic."""

from __future__ import annotations


import pytest
import torch

from conftest import small_config
from pytest_specdec.bench.config import SpecdecConfig
from pytest_specdec.bench.problems import load_problems
from pytest_specdec.bench.session import ParadigmCase, SpecdecSession
from pytest_specdec.engine import speedup, timing
from pytest_specdec.engine.target import load_target
from pytest_specdec.protocol.registry import load_registry
from pytest_specdec.protocol.spec import DrafterSpec


class FakeMachine:
    """The clock, and a target forward that costs (1 + tokens fed / 8) ms × slowdown."""

    def __init__(self):
        self.now, self.slowdown = 0.0, 1.0

    def clock(self) -> float:
        return self.now

    def wrap(self, target):
        forward = target.forward

        def timed_forward(token_ids, cache, **kwargs):
            self.now += (1 + len(token_ids) / 8) * 1e-3 * self.slowdown
            return forward(token_ids, cache, **kwargs)

        target.forward = timed_forward
        return target


def _config(tmp_path, **changes) -> SpecdecConfig:
    return small_config(tmp_path, **{"paradigms": ("multi_round",), "max_new_tokens": 24,
                                     **changes})


def _speedups(tiny_model_dir, tmp_path, monkeypatch, slow_after_baseline: float,
              timing_mode: str = "calibrated") -> dict:
    machine = FakeMachine()
    monkeypatch.setattr(timing, "clock", machine.clock)
    cfg = _config(tmp_path, timing=timing_mode)
    target = machine.wrap(load_target(str(tiny_model_dir), device="cpu", dtype="float32"))
    session = SpecdecSession(cfg, load_registry(), load_problems("embedded", limit=2),
                             lambda: target)
    case = ParadigmCase("multi_round", 0.0, True)
    session.run_baseline_case(case, None)
    machine.slowdown = slow_after_baseline  # the machine gets slower after the baseline
    return session.run_speculative_case(DrafterSpec("pld"), case, None)


class DraftingMachine(FakeMachine):
    """A fake machine whose host (Python: drafting, the host probe) and target forwards
    slow by different factors, as a contended CPU's do."""

    def __init__(self):
        super().__init__()
        self.host_slowdown = 1.0

    def host_workload(self, *args) -> int:
        self.now += 1e-3 * self.host_slowdown
        return 0


def test_forwards_and_drafting_slowed_differently_leave_the_speedup_unchanged(
        tiny_model_dir, tmp_path, monkeypatch):
    """The target 2.8x slower after the baseline, Python 1.5x (what two busy processes
    do to this 2-core CPU): drafting is calibrated by the host probe, so the speedup
    stays the quiet one; divided by the target's probe alone, the drafting would count
    at 1.5/2.8 of its cost and the speedup would rise."""
    from pytest_specdec.drafters.pld import _Lookup

    propose = _Lookup.propose

    def run(device: float, host: float, calibrate_host: bool) -> dict:
        machine = DraftingMachine()
        monkeypatch.setattr(timing, "clock", machine.clock)
        monkeypatch.setattr(timing, "host_workload",
                            machine.host_workload if calibrate_host else lambda *a: 0)

        def slow_propose(self, context, k):
            machine.now += 2e-3 * machine.host_slowdown  # the drafter's Python
            return propose(self, context, k)

        monkeypatch.setattr(_Lookup, "propose", slow_propose)
        target = machine.wrap(load_target(str(tiny_model_dir), device="cpu", dtype="float32"))
        session = SpecdecSession(_config(tmp_path), load_registry(),
                                 load_problems("embedded", limit=2), lambda: target)
        case = ParadigmCase("multi_round", 0.0, True)
        session.run_baseline_case(case, None)
        machine.slowdown, machine.host_slowdown = device, host
        return session.run_speculative_case(DrafterSpec("pld"), case, None)

    quiet = run(1.0, 1.0, True)
    contended = run(2.8, 1.5, True)
    uncorrected = run(2.8, 1.5, False)
    assert contended["output_sha256"] == quiet["output_sha256"]
    assert contended["speedup"] == pytest.approx(quiet["speedup"], rel=0.03)
    assert contended["host_slowdown"] == pytest.approx(1.5, rel=0.01)
    assert contended["ideal_speedup"] == pytest.approx(quiet["ideal_speedup"], rel=0.03)
    assert uncorrected["speedup"] > quiet["speedup"] * 1.1  # what the host probe fixes


@pytest.mark.parametrize("mode", ["calibrated", "paired"])
def test_a_2x_slower_machine_after_the_baseline_leaves_the_speedup_unchanged(
        tiny_model_dir, tmp_path, monkeypatch, mode):
    quiet = _speedups(tiny_model_dir, tmp_path, monkeypatch, 1.0, mode)
    slowed = _speedups(tiny_model_dir, tmp_path, monkeypatch, 2.0, mode)
    assert quiet["output_sha256"] == slowed["output_sha256"]
    # the true speedup is the quiet run's; the raw ratio would halve
    assert slowed["speedup"] == pytest.approx(quiet["speedup"], rel=0.10)
    if mode == "calibrated":
        assert slowed["speedup_raw"] == pytest.approx(quiet["speedup_raw"] / 2, rel=0.05)
        assert slowed["machine_slowdown"] == pytest.approx(2.0, rel=0.01)
    assert slowed["timing"] == mode
    # the costs explain it: same calibrated ideal, and no flag on an honest figure
    assert slowed["ideal_speedup"] == pytest.approx(quiet["ideal_speedup"], rel=0.05)
    assert slowed["timing_flags"] == []


def test_timeline_calibrates_each_segment_by_its_probes(monkeypatch):
    machine = FakeMachine()
    monkeypatch.setattr(timing, "clock", machine.clock)
    probes = iter([1.0, 1.0, 2.0, 2.0])
    line = timing.Timeline(lambda: next(probes))
    line.cut(0)
    machine.now += 3.0  # segment 0: probes 1.0, 1.0
    line.cut(1)
    machine.now += 8.0  # segment 1: probes 1.0, 2.0 (the speed changed inside it)
    line.cut(1)
    machine.now += 4.0  # segment 2: probes 2.0, 2.0
    line.finish()
    assert line.wall_s == 15.0
    assert line.calibrated_by_problem(2) == pytest.approx([3.0, 8 / 1.5 + 2.0])
    # only the segment whose probes disagree adds noise: its 8 s are 8/2 to 8/1 probe
    # units, half that range over the total
    assert line.noise_at(None) == pytest.approx((8 / 1 - 8 / 2) / 2 / (3 + 8 / 1.5 + 2))


def test_a_probe_that_stalled_is_read_again_and_the_newer_reading_kept(monkeypatch):
    """Under a background load a probe's forwards sometimes stall (seen here: 1.47 s
    each, against 69 ms for the probes around it): read again at once, and its
    segments are calibrated by the machine's real speed; a change that lasts reads the
    same twice and is kept."""
    machine = FakeMachine()
    monkeypatch.setattr(timing, "clock", machine.clock)
    readings = iter([0.07, 1.47, 0.07, 0.07, 0.16, 0.16])
    line = timing.Timeline(lambda: next(readings))
    for problem in range(3):
        line.cut(problem)
        machine.now += 7.0
    line.finish()
    # probe 1 stalled (21x the one before) and was read again; probe 3 (2.3x, a load
    # that started) was kept as read
    assert line.probes == [0.07, 0.07, 0.07, 0.16]
    assert next(readings) == 0.16  # one reading left: nothing else was retaken
    assert line.calibrated_at(None) == pytest.approx(100 + 100 + 7 / 0.115)


@pytest.mark.parametrize("seconds, stalled", [
    # every segment the same work at the same cost: no stall
    ([3.0, 3.0, 3.0, 3.0], 0.0),
    # one segment 5x its siblings' cost while its probes read normal: its departure
    # from the median cost (15 - 3 s, in probe units) is a stall the probes missed
    ([3.0, 3.0, 15.0, 3.0], 12.0),
    # 1.5x is the spread of honest segments (draft lengths differ): not a stall
    ([3.0, 3.0, 4.5, 3.0], 0.0),
])
def test_a_stall_the_probes_missed_enters_the_noise(monkeypatch, seconds, stalled):
    machine = FakeMachine()
    monkeypatch.setattr(timing, "clock", machine.clock)
    line = timing.Timeline(lambda: 1.0)
    for problem, s in enumerate(seconds):
        line.cut(problem)
        machine.now += s
    line.finish()
    line.assign_forwards(range(len(seconds)), [30] * len(seconds))
    assert line.stall_units(None) == pytest.approx(stalled)
    assert line.noise_at(None) == pytest.approx(stalled / sum(seconds))
    flagged = speedup.timing_flags(1.0, line.noise_at(None)) == [speedup.UNSTABLE_TIMING]
    assert flagged == (stalled > 0)


def test_a_contended_machines_scattered_probes_raise_the_noise_to_unstable(monkeypatch):
    """Probes that agree with each other but whose own forwards scatter (threads
    descheduled by other processes) say the calibration follows the run only roughly:
    their spread is noise that does not average out over segments."""
    machine = FakeMachine()
    monkeypatch.setattr(timing, "clock", machine.clock)

    def run(spread: float) -> timing.Timeline:
        line = timing.Timeline(lambda: (2.0, spread))
        for problem in range(8):
            line.cut(problem)
            machine.now += 3.0
        line.finish()
        return line

    quiet, contended = run(0.02), run(0.3)
    assert quiet.calibrated_at(None) == contended.calibrated_at(None) == pytest.approx(12.0)
    assert quiet.noise_at(None) == pytest.approx(0.02)
    assert contended.noise_at(None) == pytest.approx(0.3)
    assert speedup.timing_flags(1.0, quiet.noise_at(None)) == []
    assert speedup.timing_flags(1.0, contended.noise_at(None)) == [speedup.UNSTABLE_TIMING]


def test_the_probe_reads_a_trimmed_mean_and_its_spread(monkeypatch):
    """One hiccup (the slowest forward) and the fastest are dropped; the rest's mean is
    the probe's time, half their range over it the spread; then the wide forwards'
    median, each rolled back."""
    machine = FakeMachine()
    monkeypatch.setattr(timing, "clock", machine.clock)
    costs = iter([1.0, 1.2, 0.8, 9.0, 1.0, 2.0, 7.0, 2.2])
    fed, cropped = [], []

    class Target:
        def forward(self, ids, cache, keep_logits=0):
            machine.now += next(costs)
            fed.append(len(ids))
            return torch.zeros(1, 1), None

    class Cache:
        def crop(self, n):
            cropped.append(n)

    host_costs = iter([3.0, 3.0, 5.0, 3.0])

    def host_workload():
        machine.now += next(host_costs)

    monkeypatch.setattr(timing, "host_workload", host_workload)
    probe = object.__new__(timing.Probe)
    probe.target, probe.cache, probe.next_token = Target(), Cache(), 0
    probe.wide_tokens = list(range(timing.WIDE_PROBE_WIDTH))
    reading = probe.reading()
    assert reading.device_s == pytest.approx((1.0 + 1.2 + 1.0) / 3)
    assert reading.spread == pytest.approx(0.1 / reading.device_s)
    # the host's chunks: their mean (no trimming: drafting meets every slow stretch)
    assert reading.host_s == pytest.approx(3.5)
    assert reading.host_spread == pytest.approx(1.0 / 3.5)
    assert reading.wide_s == pytest.approx(2.2)
    assert fed == [1] * 5 + [timing.WIDE_PROBE_WIDTH] * 3
    assert cropped == [-1] * 5 + [-timing.WIDE_PROBE_WIDTH] * 3


def test_the_host_workload_is_fixed_work():
    assert timing.host_workload(1000) == timing.host_workload(1000)
    assert timing.host_workload(10) != timing.host_workload(1000)


@pytest.mark.parametrize("host_probes, ratio, expected", [
    # no host readings: the whole segment by the target's probe, as before
    ((None, None), None, 10.0 / 2.0),
    # host and target slowed alike (both probes 2x the reference): the same answer
    ((0.2, 0.2), 0.1 / 1.0, 10.0 / 2.0),
    # the target 2x slower, the host not (0.1 = its reference): drafting (4 s of the
    # 10) counts at the host's speed, 6/2 + 4·0.1/0.1
    ((0.1, 0.1), 0.1 / 1.0, 6.0 / 2.0 + 4.0),
])
def test_drafting_is_calibrated_by_the_host_probes(monkeypatch, host_probes, ratio, expected):
    machine = FakeMachine()
    monkeypatch.setattr(timing, "clock", machine.clock)
    readings = iter([timing.ProbeReading(2.0, 0.0, h) for h in host_probes])
    line = timing.Timeline(lambda: next(readings))
    line.cut(0)
    machine.now += 10.0
    line.finish()
    line.assign_drafting([0], [4.0])
    assert line.calibrated_at(timing.Reference(host=ratio)) == pytest.approx(expected)


def test_host_ratio_is_the_quietest_probes_and_none_without_host_readings(monkeypatch):
    machine = FakeMachine()
    monkeypatch.setattr(timing, "clock", machine.clock)

    def line(*readings):
        it = iter(readings)
        t = timing.Timeline(lambda: next(it))
        t.cut(0)
        t.finish()
        return t

    a = line(timing.ProbeReading(2.0, 0.0, 0.3), timing.ProbeReading(1.0, 0.0, 0.4))
    b = line(timing.ProbeReading(3.0, 0.0, 0.2), timing.ProbeReading(3.0, 0.0, 0.2))
    assert timing.host_ratio([a, b]) == pytest.approx(0.2 / 1.0)
    assert timing.host_ratio([line(1.0, 1.0)]) is None


@pytest.mark.parametrize("width, now, wide, expected", [
    (1, 2.0, 1.8, 1.0),  # a one-token forward is what the narrow probe prices
    (32, 2.0, 1.8, 0.9),  # as wide as the wide probe: the wide ratios' quotient
    (8, 2.0, 1.8, 0.9 ** 0.6),  # log 8 / log 32 = 0.6 of the way
    (64, 1.5, 1.8, 1.2 ** 1.2),  # wider: extrapolated on the same power law
    (32, None, 1.8, 1.0),  # no wide reading now: no pricing
    (32, 2.0, None, 1.0),  # no reference: no pricing
])
def test_width_factor(width, now, wide, expected):
    assert timing.width_factor(width, now, wide) == pytest.approx(expected)


def test_forwards_are_priced_at_their_width(monkeypatch):
    """A segment of 10 s: 2 s drafting, 6 s in forwards (1 s at one token, 5 s at 32),
    2 s other; its probes read 2 s narrow, 4.4 s wide (ratio 2.2) against a reference
    of 2.0: the wide forwards' 5 s count as 5 · 2.0 / 2.2; the rest as measured."""
    machine = FakeMachine()
    monkeypatch.setattr(timing, "clock", machine.clock)
    readings = iter([timing.ProbeReading(2.0, 0.0, None, 0.0, 4.4)] * 2)
    line = timing.Timeline(lambda: next(readings))
    line.cut(0)
    machine.now += 10.0
    line.finish()
    line.assign_drafting([0], [2.0])
    line.assign_forward_load([0], [{1: 1.0, 32: 5.0}])
    assert line.wide_now() == [pytest.approx(2.2)]
    assert line.calibrated_at(None) == pytest.approx(10.0 / 2.0)
    priced = (10.0 - 5.0 + 5.0 * 2.0 / 2.2) / 2.0
    assert line.calibrated_at(timing.Reference(wide=2.0)) == pytest.approx(priced)
    assert line.calibrated_at(timing.Reference(wide=2.2)) == pytest.approx(10.0 / 2.0)
    assert timing.wide_ratio([line]) == pytest.approx(2.2)


def test_forward_load_is_seconds_by_width_a_batch_sharing_its_forwards():
    from pytest_specdec.engine.metrics import StepRecord

    def step(fed, target_s, rows=1):
        return StepRecord(drafted=0, depth=0, accepted=0, emitted=1, drafter_s=0.0,
                          target_s=target_s, fed=fed, rows=rows)

    assert timing.forward_load([step(40, 3.0), step(1, 1.0), step(1, 1.0)]) == {40: 3.0, 1: 2.0}
    assert timing.forward_load([step(8, 2.0, rows=4)]) == {8: 0.5}


def test_bootstrap_over_problems_is_seeded_and_brackets_the_ratio():
    base, new = [10.0, 20.0, 30.0], [5.0, 10.0, 20.0]
    low, high = speedup.bootstrap_ratio(base, new)
    assert (low, high) == speedup.bootstrap_ratio(base, new)
    assert low <= sum(base) / sum(new) <= high
    assert low < high


@pytest.mark.parametrize("over_ideal, noise, flags", [
    (1.0, 0.01, []),
    (1.15, 0.02, []),
    (1.3, 0.01, [speedup.ABOVE_COST_BOUND]),
    (2.1, 0.02, [speedup.ABOVE_COST_BOUND]),
    (1.0, 0.2, [speedup.UNSTABLE_TIMING]),
    (None, 0.0, []),
])
def test_timing_flags(over_ideal, noise, flags):
    assert speedup.timing_flags(over_ideal, noise) == flags


def _timeline_of(machine: FakeMachine, seconds: list[float]) -> timing.Timeline:
    """A run of one segment per entry of `seconds`, on probes that all read 1.0."""
    line = timing.Timeline(lambda: 1.0)
    for problem, s in enumerate(seconds):
        line.cut(problem)
        machine.now += s
    line.finish()
    return line


@pytest.mark.parametrize("runs, expected", [
    # one run, three rounds: 100, 106, 94 s: 6% about the mean
    ([[100.0, 106.0, 94.0]], 0.06),
    # a run of one round shows no scatter and adds nothing to the pool
    ([[100.0, 106.0, 94.0], [50.0]], 0.06),
    # two runs pooled: squared deviations over their degrees of freedom (2 + 1)
    ([[100.0, 106.0, 94.0], [50.0, 50.0]], (2 * 0.06 ** 2 / 3) ** 0.5),
    ([[50.0]], None),
])
def test_round_scatter_is_the_pooled_relative_spread_of_rounds(monkeypatch, runs, expected):
    machine = FakeMachine()
    monkeypatch.setattr(timing, "clock", machine.clock)
    rounds = [[_timeline_of(machine, [total]) for total in run] for run in runs]
    scatter = speedup.round_scatter(rounds, [None] * len(rounds))
    assert scatter == (None if expected is None else pytest.approx(expected))


def test_a_one_round_speedup_carries_the_round_scatter_of_its_baseline(monkeypatch):
    """Probes that agree make no noise of their own; the baseline's three rounds scatter
    by 6%: its median carries 6%/√3, the drafter's single round the whole 6%."""
    machine = FakeMachine()
    monkeypatch.setattr(timing, "clock", machine.clock)
    base = [_timeline_of(machine, [t]) for t in (100.0, 106.0, 94.0)]
    new = [_timeline_of(machine, [50.0])]
    scatter = speedup.round_scatter([base], [None])
    estimate = speedup.speedup_estimate(base, new, 1, scatter=scatter)
    assert estimate.value == pytest.approx(2.0)  # the median baseline round
    assert estimate.noise == pytest.approx(0.06 * (1 / 3 + 1) ** 0.5)
    # without a scatter (one baseline round), only the probes' noise: none here
    assert speedup.speedup_estimate(base[:1], new, 1).noise == 0.0
    # a drafter of three rounds uses its own rounds' spread (here none)
    own = [_timeline_of(machine, [50.0]) for _ in range(3)]
    assert speedup.speedup_estimate(base, own, 1, scatter=scatter).noise == pytest.approx(0.06 / 3 ** 0.5)


def test_a_probe_noise_larger_than_the_scatter_is_kept():
    assert speedup._run_variance(0.2, 0.06, 3) == pytest.approx(0.04)
    assert speedup._run_variance(0.01, 0.06, 1) == pytest.approx(0.0036)
    assert speedup._run_variance(0.01, None, 1) == pytest.approx(0.0001)


def test_one_baseline_round_slowed_unseen_by_the_probes_moves_no_speedup(
        tiny_model_dir, tmp_path, monkeypatch):
    """Each baseline round's prompts cost extra time that no probe sees (the probes
    track forwards; a hiccup between them does not reach them): with three baseline
    rounds the median drops the slowed one, the speedup is the unslowed session's and
    its noise carries the scatter the rounds showed; the baseline record says so."""
    def run(extra_s_by_round: dict[int, float], baseline_rounds: int) -> tuple[dict, dict]:
        machine = FakeMachine()
        monkeypatch.setattr(timing, "clock", machine.clock)
        target = machine.wrap(load_target(str(tiny_model_dir), device="cpu", dtype="float32"))
        made = [0]  # baseline methods made: the warm-up's, then one per timed round
        encode = target.encode_prompt

        def slowed_encode(prompt):
            machine.now += extra_s_by_round.get(made[0], 0.0)
            return encode(prompt)

        target.encode_prompt = slowed_encode
        session = SpecdecSession(_config(tmp_path, baseline_rounds=baseline_rounds),
                                 load_registry(), load_problems("embedded", limit=2),
                                 lambda: target)
        baseline_method = session.baseline_method

        def counted(*args):
            made[0] += 1
            return baseline_method(*args)

        session.baseline_method = counted
        case = ParadigmCase("multi_round", 0.0, True)
        base = session.run_baseline_case(case, None)
        made[0] = -1  # the drafter's case: no extra time
        return base, session.run_speculative_case(DrafterSpec("pld"), case, None)

    quiet_base, quiet = run({}, 1)
    # rounds 1-3 are made 2nd-4th: round 2 costs 50 ms more per sequence (about 2x), round
    # 3 0.5 ms (about 2%)
    base, slowed = run({3: 0.05, 4: 0.0005}, 3)
    assert len(base["wall_s_rounds"]) == 3 and quiet_base["round_scatter"] is None
    assert base["round_scatter"] > 0.05
    assert slowed["output_sha256"] == quiet["output_sha256"]
    assert slowed["speedup"] == pytest.approx(quiet["speedup"], rel=0.05)
    assert slowed["round_scatter"] == base["round_scatter"]
    assert slowed["speedup_noise"] >= base["round_scatter"]
    # one slowed round alone would have moved the speedup
    _, lone = run({2: 0.05}, 1)
    assert lone["speedup"] > quiet["speedup"] * 1.1


class WidthMachine(FakeMachine):
    """A fake machine whose forwards cost (1 + tokens fed / 8 × per_token) ms: changing
    per_token moves a wide forward's cost and barely a one-token one's (on the real CPU
    the ratio of the two wanders by ±15% on an idle machine)."""

    def __init__(self):
        super().__init__()
        self.per_token = 1.0

    def wrap(self, target):
        forward = target.forward

        def timed_forward(token_ids, cache, **kwargs):
            self.now += (1 + len(token_ids) / 8 * self.per_token) * 1e-3
            return forward(token_ids, cache, **kwargs)

        target.forward = timed_forward
        return target


@pytest.mark.parametrize("per_token", [1.5, 0.7])
def test_wide_forwards_slowed_unlike_narrow_ones_leave_the_speedup_unchanged(
        tiny_model_dir, tmp_path, monkeypatch, per_token):
    """After the baseline, the machine's cost per fed token changes while a one-token
    forward's barely does: the wide probe prices every forward at its width (the
    prefills and the drafts) as the machine typically was in the session (three
    baseline rounds, one case round: the unchanged machine), so the speedup stays the
    unchanged machine's; the narrow probe alone would move it by more than 10%."""
    def run(per_token: float, wide_forwards: int) -> dict:
        machine = WidthMachine()
        monkeypatch.setattr(timing, "clock", machine.clock)
        monkeypatch.setattr(timing, "WIDE_PROBE_FORWARDS", wide_forwards)
        target = machine.wrap(load_target(str(tiny_model_dir), device="cpu", dtype="float32"))
        session = SpecdecSession(_config(tmp_path, baseline_rounds=3), load_registry(),
                                 load_problems("embedded", limit=2), lambda: target)
        case = ParadigmCase("multi_round", 0.0, True)
        session.run_baseline_case(case, None)
        machine.per_token = per_token
        return session.run_speculative_case(DrafterSpec("pld"), case, None)

    unchanged = run(1.0, timing.WIDE_PROBE_FORWARDS)
    changed = run(per_token, timing.WIDE_PROBE_FORWARDS)
    narrow_only = run(per_token, 0)
    assert changed["output_sha256"] == unchanged["output_sha256"]
    # the fake's cost is affine in width, the pricing a power law: close, not exact
    assert changed["speedup"] == pytest.approx(unchanged["speedup"], rel=0.05)
    assert abs(narrow_only["speedup"] / unchanged["speedup"] - 1) > 0.10
    # the record says how much the wide forwards' cost moved against the baseline's
    assert unchanged["wide_slowdown"] == pytest.approx(1.0)
    assert (changed["wide_slowdown"] > 1.2) if per_token > 1 else (changed["wide_slowdown"] < 0.8)
