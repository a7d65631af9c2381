"""Calibrated timing: a machine that gets slower between the baseline and a drafter's
case leaves the reported speedup unchanged. Runs the real session on a tiny target with
a fake clock that advances only inside target forwards (cost ∝ tokens fed × the
machine's slowdown), so every figure is deterministic."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pytest_specdec.bench.config import SpecdecConfig
from pytest_specdec.bench.problems import load_problems
from pytest_specdec.bench.session import ParadigmCase, SpecdecSession
from pytest_specdec.engine import timing
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
    base = SpecdecConfig(
        target="", device="cpu", dtype="float32", trust_remote_code=False,
        drafters=None, paradigms=("multi_round",), dataset="embedded", dataset_split="test",
        problems=2, max_new_tokens=24, n=2, rounds=2, temperatures=(0.0,), seed=0, k=None,
        timed_rounds=1, report_dir=tmp_path, peers=(), strict=False, tie_margin=None,
        step_timeout=0.0, compare=None, compare_fail=())
    return dataclasses.replace(base, **changes)


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
    # only the segment whose probes disagree adds noise: (8/1.5 · 1/3) / total
    assert line.relative_noise == pytest.approx((8 / 1.5 / 3) / (3 + 8 / 1.5 + 2))


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
    assert quiet.calibrated == contended.calibrated == pytest.approx(12.0)
    assert quiet.relative_noise == pytest.approx(0.02)
    assert contended.relative_noise == pytest.approx(0.3)
    assert timing.timing_flags(1.0, quiet.relative_noise) == []
    assert timing.timing_flags(1.0, contended.relative_noise) == [timing.UNSTABLE_TIMING]


def test_the_probe_reads_a_trimmed_mean_and_its_spread(monkeypatch):
    """One hiccup (the slowest forward) and the fastest are dropped; the rest's mean is
    the probe's time, half their range over it the spread."""
    machine = FakeMachine()
    monkeypatch.setattr(timing, "clock", machine.clock)
    costs = iter([1.0, 1.2, 0.8, 9.0, 1.0])

    class Target:
        def forward(self, ids, cache, keep_logits=0):
            machine.now += next(costs)
            return torch.zeros(1, 1), None

    class Cache:
        def crop(self, n):
            pass

    probe = object.__new__(timing.Probe)
    probe.target, probe.cache, probe.next_token = Target(), Cache(), 0
    value, spread = probe.reading()
    assert value == pytest.approx((1.0 + 1.2 + 1.0) / 3)
    assert spread == pytest.approx(0.1 / value)


def test_bootstrap_over_problems_is_seeded_and_brackets_the_ratio():
    base, new = [10.0, 20.0, 30.0], [5.0, 10.0, 20.0]
    low, high = timing.bootstrap_ratio(base, new)
    assert (low, high) == timing.bootstrap_ratio(base, new)
    assert low <= sum(base) / sum(new) <= high
    assert low < high


@pytest.mark.parametrize("over_ideal, noise, flags", [
    (1.0, 0.01, []),
    (1.15, 0.02, []),
    (1.3, 0.01, [timing.ABOVE_COST_BOUND]),
    (2.1, 0.02, [timing.ABOVE_COST_BOUND]),
    (1.0, 0.2, [timing.UNSTABLE_TIMING]),
    (None, 0.0, []),
])
def test_timing_flags(over_ideal, noise, flags):
    assert timing.timing_flags(over_ideal, noise) == flags
