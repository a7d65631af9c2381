"""The live progress line inside a case: the runner's events (bench/progress.py), the
line's text and ETA, when it is shown, what it writes to a terminal (and that it leaves
nothing behind), and real sessions: piped and -q (no progress line at all) and on a
pseudo-terminal (drawn, erased, never in the JUnit XML or the benchmark JSON)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import select
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import small_config
from pytest_specdec.bench.paradigms import make_paradigm
from pytest_specdec.bench.problems import load_problems
from pytest_specdec.bench.progress import ProgressMeter, RunProgress
from pytest_specdec.bench.runner import (DecodeSettings, engine_batch_method, engine_method,
                                         run_paradigm, run_paradigm_batched)
from pytest_specdec.plugin.progress import (CLOSE, ERASE_TO_END, OPEN, PLUGIN_NAME, ProgressLine,
                                            clock_text, eta_text, install_progress,
                                            progress_line, progress_wanted)


def event(done=0, total=8, elapsed=0.0, tokens=0, *, label="pld-best_of_n", phase="timed round",
          round=1, rounds=1, problem=1, problems=2, paradigm="best_of_n") -> RunProgress:
    return RunProgress(label, phase, round, rounds, paradigm, done, total, problem, problems,
                       tokens, elapsed)


# --------------------------------------------------------------------------- the text


@pytest.mark.parametrize("seconds, text", [
    (0, "0:00"), (0.99, "0:00"), (12.7, "0:12"), (59.999, "0:59"), (60, "1:00"),
    (754, "12:34"), (3599, "59:59"), (3600, "1:00:00"), (3725.5, "1:02:05"),
    (36061, "10:01:01"), (-3, "0:00"),
])
def test_clock_text(seconds, text):
    assert clock_text(seconds) == text


@pytest.mark.parametrize("done, total, elapsed, eta_s, text", [
    (0, 8, 0.0, None, "ETA —"),       # the run's start: nothing to go by
    (0, 8, 5.0, None, "ETA —"),       # the first sequence decoding, no token reported
    (1, 8, 2.0, 14.0, "ETA 0:14"),    # 7 more at 2 s each
    (6, 8, 12.0, 4.0, "ETA 0:04"),
    (3, 8, 10.0, 50 / 3, "ETA 0:17"),  # 16.67 s: rounded up
    (4, 8, 0.5, 0.5, "ETA 0:01"),      # under a second left: not 0:00 yet
    (8, 8, 31.0, 0.0, "ETA 0:00"),     # done
    (2, 2, 0.0, 0.0, "ETA 0:00"),
    (10, 4000, 60.0, 23940.0, "ETA 6:39:00"),
])
def test_eta(done, total, elapsed, eta_s, text):
    e = event(done, total, elapsed)
    assert e.eta_s == (None if eta_s is None else pytest.approx(eta_s))
    assert eta_text(e) == text


@pytest.mark.parametrize("e, line", [
    (event(6, 8, 12.3, 384, problem=2),
     "  pld-best_of_n  timed round 1/1  problem 2/2  seq 6/8  31.2 tok/s  elapsed 0:12  ETA 0:05"),
    (event(0, 4, 0.0, label="baseline-best_of_n", phase="warm-up", round=0, rounds=3,
           problems=1),
     "  baseline-best_of_n  warm-up  problem 1/1  seq 0/4  — tok/s  elapsed 0:00  ETA —"),
    (event(2, 4, 4.0, 64, label="baseline-multi_round", phase="paired baseline round", round=2,
           rounds=3, problems=2, paradigm="multi_round"),
     "  baseline-multi_round  paired baseline round 2/3  problem 1/2  seq 2/4  16.0 tok/s  "
     "elapsed 0:04  ETA 0:04"),
    (event(8, 8, 80.0, 2048, label="baseline-best_of_n", phase="reference", round=0, problem=2),
     "  baseline-best_of_n  reference  problem 2/2  seq 8/8  25.6 tok/s  elapsed 1:20  ETA 0:00"),
    (event(1, 8, 3.0, 0),  # a sequence that stopped at once: no tokens yet
     "  pld-best_of_n  timed round 1/1  problem 1/2  seq 1/8  — tok/s  elapsed 0:03  ETA 0:21"),
    (event(3, 12, 1.5, 3000, label=""),  # no label: the paradigm names the run
     "  best_of_n  timed round 1/1  problem 1/2  seq 3/12  2000.0 tok/s  elapsed 0:01  ETA 0:05"),
])
def test_progress_line(e, line):
    assert progress_line(e) == line


@pytest.mark.parametrize("name, kw, per_problem", [
    ("best_of_n", {"n": 4}, 4), ("best_of_n", {"n": 1}, 1),
    ("multi_round", {"rounds": 2}, 2), ("multi_round", {"rounds": 5}, 5),
])
def test_sequences_per_problem(name, kw, per_problem):
    assert make_paradigm(name, **kw).sequences_per_problem == per_problem


def test_meter_counts_and_times():
    seen, now = [], [10.0]
    meter = ProgressMeter(seen.append, "pld-best_of_n", "timed round", 2, 3, clock=lambda: now[0])
    meter.start("best_of_n", 8, 2)
    now[0] = 12.5
    meter.add(1, 1, 30)
    now[0] = 20.0
    meter.add(4, 2, 100)
    assert seen == [event(0, 8, 0.0, 0, round=2, rounds=3),
                    event(1, 8, 2.5, 30, round=2, rounds=3),
                    event(5, 8, 10.0, 130, round=2, rounds=3, problem=2)]


def test_meter_counts_tokens_within_a_sequence():
    """The engine's per-step sink: events at most `interval` apart, tokens rising and the
    unfinished sequence counted as its share of the budget (the ETA moves with it)."""
    seen, now = [], [0.0]
    meter = ProgressMeter(seen.append, "pld-best_of_n", "timed round", 1, 1,
                          clock=lambda: now[0], interval=0.25)
    meter.start("best_of_n", 4, 1)
    sink = meter.decoding(1, 100)  # one sequence, 100 tokens at most
    for at, emitted in [(0.1, 3), (0.3, 5), (0.4, 1), (0.6, 4), (0.7, 2)]:
        now[0] = at
        sink(emitted)
    assert [(e.elapsed_s, e.new_tokens, e.done) for e in seen] == \
        [(0.0, 0, 0), (0.3, 8, 0), (0.6, 13, 0)]  # 0.1, 0.4, 0.7: throttled
    assert seen[1].decoding == pytest.approx(0.08)
    assert seen[1].eta_s == pytest.approx(0.3 * (4 - 0.08) / 0.08)
    assert seen[2].tokens_per_s == pytest.approx(13 / 0.6)
    now[0] = 1.0
    meter.add(1, 1, 15)  # finished: counted whole, its tokens once
    assert (seen[-1].done, seen[-1].new_tokens, seen[-1].decoding) == (1, 15, 0.0)
    assert seen[-1].eta_s == pytest.approx(3.0)
    # a sequence at its budget but not yet added is still short of one
    meter.decoding(2, 10)(25)
    assert 1.0 < meter._partial() < 2.0


# --------------------------------------------------------------------------- the runner


@pytest.fixture(scope="module")
def two_problems():
    return load_problems("embedded", limit=2)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    """The tiny random model with the embedded tokenizer (prompts are encoded)."""
    from pytest_specdec.engine.target import load_target

    return load_target(str(tiny_model_dir), device="cpu", dtype="float32")


@pytest.fixture
def still_clock(monkeypatch):
    """The package's clock a microsecond a read: a tiny run never reaches the meter's
    interval, so its events are the sequences' alone on a machine of any speed (on the
    real clock a loaded machine adds per-step events inside a slow sequence)."""
    from pytest_specdec.engine import timing

    ticks = iter(range(1, 1 << 62))
    monkeypatch.setattr(timing, "clock", lambda: next(ticks) * 1e-6)


@pytest.mark.usefixtures("still_clock")
@pytest.mark.parametrize("name, per_problem", [("best_of_n", 3), ("multi_round", 2)])
def test_runner_emits_every_sequence(tiny, two_problems, name, per_problem):
    paradigm = make_paradigm(name, n=3, rounds=2)
    seen: list[RunProgress] = []
    meter = ProgressMeter(seen.append, f"baseline-{name}", "timed round", 1, 1)
    result = run_paradigm(tiny, paradigm, two_problems,
                          engine_method(tiny, None, k=0, drafter_name="baseline"),
                          DecodeSettings(0.6, 0, 6), meter=meter)
    total = 2 * per_problem
    assert [e.done for e in seen] == list(range(total + 1))  # the start, then each sequence
    assert {e.total for e in seen} == {total} and {e.problems for e in seen} == {2}
    assert [e.problem for e in seen] == [1] + [1] * per_problem + [2] * per_problem
    assert seen[-1].new_tokens == result.stats.new_tokens
    assert all(a.elapsed_s <= b.elapsed_s for a, b in zip(seen, seen[1:]))
    assert seen[-1].eta_s == 0.0


@pytest.mark.usefixtures("still_clock")
def test_batched_runner_counts_a_batch_when_it_finishes(tiny, two_problems):
    paradigm = make_paradigm("best_of_n", n=3)
    seen: list[RunProgress] = []
    meter = ProgressMeter(seen.append, "baseline-best_of_n-b4", "timed round", 1, 1)
    method = engine_batch_method(tiny, None, batch=4, k=0, drafter_name="baseline")
    result = run_paradigm_batched(tiny, paradigm, two_problems, method,
                                  DecodeSettings(0.6, 0, 6), 4, meter=meter)
    # 6 sequences, 4 at a time: batches of 4 (problem 1's 3, problem 2's first) and 2
    assert [(e.done, e.problem) for e in seen] == [(0, 1), (4, 2), (6, 2)]
    assert seen[-1].new_tokens == result.stats.new_tokens and seen[-1].total == 6


class CountingClock:
    """Every read a tenth of a second later: the engine's timing.clock and the meter's
    one clock, so a run's events are the same on every machine."""

    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        self.t += 0.1
        return self.t


def _one_sequence_run(tiny, monkeypatch, method, batched: bool, meter):
    from pytest_specdec.engine import timing

    monkeypatch.setattr(timing, "clock", meter.clock if meter is not None else CountingClock())
    paradigm = make_paradigm("best_of_n", n=2)
    problems = load_problems("embedded", limit=1)
    settings = DecodeSettings(0.0, 0, 16)
    if batched:
        return run_paradigm_batched(tiny, paradigm, problems, method, settings, 2, meter=meter)
    return run_paradigm(tiny, paradigm, problems, method, settings, meter=meter)


@pytest.mark.parametrize("batched", [False, True], ids=["batch1", "batch2"])
def test_events_arrive_within_a_sequence(tiny, monkeypatch, batched):
    seen: list[RunProgress] = []
    meter = ProgressMeter(seen.append, "baseline-best_of_n", "timed round", 1, 1,
                          clock=CountingClock())
    method = engine_batch_method(tiny, None, batch=2, k=0, drafter_name="baseline") \
        if batched else engine_method(tiny, None, k=0, drafter_name="baseline")
    result = _one_sequence_run(tiny, monkeypatch, method, batched, meter)
    first = result.outputs[next(iter(result.outputs))]
    inside = [e for e in seen[1:] if e.done == 0]  # before the first sequence (batch) ends
    assert len(first.tokens) > 4 and len(inside) >= 3, [len(g.tokens) for g in
                                                         result.outputs.values()]
    tokens = [e.new_tokens for e in inside]
    assert tokens == sorted(tokens) and len(set(tokens)) == len(tokens) and tokens[0] > 0
    assert all(0 < e.decoding < (2 if batched else 1) for e in inside)
    assert all(e.eta_s is not None and e.tokens_per_s is not None for e in inside)
    assert all(a.elapsed_s < b.elapsed_s for a, b in zip(seen, seen[1:]))
    assert seen[-1].new_tokens == result.stats.new_tokens and seen[-1].eta_s == 0.0


@pytest.mark.parametrize("drafter", [None, "pld"])
@pytest.mark.parametrize("batched", [False, True], ids=["batch1", "batch2"])
def test_outputs_and_timed_steps_do_not_depend_on_the_sink(tiny, monkeypatch, batched, drafter):
    """The same run with and without a progress sink: the same tokens, and the same
    step costs on the fake clock (the sink's clock reads fall between timed spans)."""
    from pytest_specdec.protocol.registry import load_registry

    def method():
        make = (lambda: load_registry().get(drafter).create()) if drafter else None
        k = 3 if drafter else 0
        if batched:
            return engine_batch_method(tiny, make, batch=2, k=k, drafter_name=drafter or "b")
        return engine_method(tiny, make() if make else None, k=k, drafter_name=drafter or "b")

    silent = _one_sequence_run(tiny, monkeypatch, method(), batched, None)
    seen: list[RunProgress] = []
    meter = ProgressMeter(seen.append, "x", "timed round", clock=CountingClock(), interval=0.0)
    watched = _one_sequence_run(tiny, monkeypatch, method(), batched, meter)
    assert len(seen) > len(watched.outputs) + 1  # events within the sequences
    assert silent.digest == watched.digest
    assert [g.tokens for g in silent.outputs.values()] == \
        [g.tokens for g in watched.outputs.values()]
    for a, b in zip(silent.outputs.values(), watched.outputs.values()):
        costs = [[x for s in g.steps for x in (s.target_s, s.drafter_s)] for g in (a, b)]
        assert costs[0] == pytest.approx(costs[1])


def _session(tiny, tmp_path, seen, **changes):
    from pytest_specdec.bench.session import SpecdecSession
    from pytest_specdec.protocol.registry import load_registry

    cfg = small_config(tmp_path, **{"timed_rounds": 2, **changes})
    return SpecdecSession(cfg, load_registry(), load_problems("embedded", limit=2),
                          lambda: tiny, progress=seen.append)


def _runs(seen: list[RunProgress]) -> list[tuple[str, str, int, int]]:
    """Each run's label, stage, sequences and problems, from its start event."""
    return [(e.label, e.stage, e.total, e.problems) for e in seen if e.done == 0]


@pytest.mark.usefixtures("still_clock")
def test_a_sessions_runs_are_labelled(tiny, tmp_path):
    from pytest_specdec.bench.session import ParadigmCase
    from pytest_specdec.protocol.spec import DrafterSpec

    seen: list[RunProgress] = []
    session = _session(tiny, tmp_path, seen, timing="paired")
    case = ParadigmCase("best_of_n", 0.0, True)
    session.run_baseline_case(case, None)
    session.run_speculative_case(DrafterSpec("pld"), case, None)
    assert _runs(seen) == [
        ("baseline-best_of_n-T0", "warm-up", 2, 1),  # the first problem only
        ("baseline-best_of_n-T0", "timed round 1/2", 4, 2),
        ("baseline-best_of_n-T0", "timed round 2/2", 4, 2),
        # paired timing: a baseline round before each of the drafter's
        ("baseline-best_of_n-T0", "paired baseline round 1/2", 4, 2),
        ("pld-best_of_n-T0", "timed round 1/2", 4, 2),
        ("baseline-best_of_n-T0", "paired baseline round 2/2", 4, 2),
        ("pld-best_of_n-T0", "timed round 2/2", 4, 2),
    ]
    # every run counted to its end
    ends = [e for e in seen if e.done == e.total]
    assert len(ends) == 7 and all(e.eta_s == 0.0 for e in ends)


@pytest.mark.usefixtures("still_clock")
def test_a_batched_case_counts_its_reference(tiny, tmp_path):
    from pytest_specdec.bench.session import ParadigmCase

    seen: list[RunProgress] = []
    session = _session(tiny, tmp_path, seen, timed_rounds=1)
    session.run_baseline_case(ParadigmCase("best_of_n", 0.0, True, 2, True), None)
    assert _runs(seen) == [
        ("baseline-best_of_n-T0-b2", "warm-up", 2, 1),
        ("baseline-best_of_n-T0-b2", "timed round 1/1", 4, 2),
        # judged against plain decoding at batch 1, never measured here: run untimed
        ("baseline-best_of_n-T0-b1", "reference", 4, 2),
    ]
    timed = [e.done for e in seen if e.phase == "timed round"]
    assert timed == [0, 2, 4]  # a batch of 2 at a time


# --------------------------------------------------------------------------- when it shows


@pytest.mark.parametrize("isatty, verbosity, worker, live_logging, term, wanted", [
    (True, 0, False, False, "xterm-256color", True),   # a terminal: on by default
    (True, 2, False, False, "screen", True),           # -vv
    (True, 0, False, False, None, True),               # no TERM set
    (True, -1, False, False, "xterm", False),          # -q
    (True, -2, False, False, "xterm", False),          # -qq
    (False, 0, False, False, "xterm", False),          # piped, redirected, CI logs
    (False, 1, False, False, None, False),
    (True, 0, True, False, "xterm", False),            # an xdist worker
    (True, 0, False, True, "xterm", False),            # --log-cli-level: the INFO lines
    (True, 0, False, False, "dumb", False),            # no cursor control
])
def test_progress_wanted(isatty, verbosity, worker, live_logging, term, wanted):
    assert progress_wanted(isatty=isatty, verbosity=verbosity, worker=worker,
                           live_logging=live_logging, term=term) is wanted


class FakePluginManager:
    def __init__(self, **plugins):
        self.plugins = dict(plugins)

    def get_plugin(self, name):
        return self.plugins.get(name)

    def register(self, plugin, name):
        assert name not in self.plugins
        self.plugins[name] = plugin


def fake_config(*, isatty=True, verbose=0, log_cli_level=None, log_cli=False, worker=False,
                capture=None, reporter=True):
    plugins = {"capturemanager": capture}
    if reporter:
        plugins["terminalreporter"] = SimpleNamespace(isatty=isatty)
    config = SimpleNamespace(pluginmanager=FakePluginManager(**plugins),
                             option=SimpleNamespace(verbose=verbose),
                             getoption=lambda name, default=None: (
                                 log_cli_level if name == "log_cli_level" else default),
                             getini=lambda name: log_cli)
    if worker:
        config.workerinput = {"workerid": "gw0"}
    return config


@pytest.mark.parametrize("kw, installed", [
    ({}, True),
    ({"verbose": 1}, True),
    ({"verbose": -1}, False),
    ({"isatty": False}, False),
    ({"worker": True}, False),
    ({"log_cli_level": "INFO"}, False),
    ({"log_cli": True}, False),
    ({"reporter": False}, False),  # -p no:terminal
])
def test_install_progress(monkeypatch, kw, installed):
    monkeypatch.setenv("TERM", "xterm")
    config = fake_config(**kw)
    line = install_progress(config)
    assert (line is not None) is installed
    assert config.pluginmanager.get_plugin(PLUGIN_NAME) is line
    if installed:  # once per session
        assert install_progress(config) is line


# --------------------------------------------------------------------------- the terminal


class FakeCapture:
    """pytest's capture manager, as far as the progress line uses it: while "captured",
    sys.stdout is the case's captured output; global_and_fixture_disabled hands it the
    terminal, and every write must happen there."""

    def __init__(self, monkeypatch):
        self.terminal, self.captured = io.StringIO(), io.StringIO()
        self.suspensions = 0
        monkeypatch.setattr(sys, "stdout", self.captured)

    @contextlib.contextmanager
    def global_and_fixture_disabled(self):
        self.suspensions += 1
        sys.stdout = self.terminal
        try:
            yield
        finally:
            sys.stdout = self.captured


class Screen:
    """Just enough of a VT100 to read what a terminal shows: text, CR, LF, the cursor
    save/restore and index controls the progress line uses, erase-in-line, and SGR
    colour codes (ignored); rows wrap at `width`."""

    CONTROL = re.compile(r"\x1b\[([0-9;]*)([A-Za-z])|\x1b([78DM])|([\r\n\b])|([^\x1b\r\n\b]+)")

    def __init__(self, width=100):
        self.width, self.rows, self.row, self.col, self.saved = width, [[]], 0, 0, (0, 0)

    def _line(self) -> list[str]:
        while len(self.rows) <= self.row:
            self.rows.append([])
        return self.rows[self.row]

    def feed(self, text: str) -> Screen:
        for csi_args, csi, esc, ctl, chars in self.CONTROL.findall(text):
            line = self._line()
            if csi == "K":
                keep = {"": self.col, "0": self.col, "2": 0}[csi_args]
                del line[keep:]
                if csi_args == "2":
                    line.extend(" " * self.col)
            elif esc == "7":
                self.saved = (self.row, self.col)
            elif esc == "8":
                self.row, self.col = self.saved
            elif esc == "D":
                self.row += 1
            elif esc == "M":
                self.row = max(self.row - 1, 0)
            elif ctl == "\r":
                self.col = 0
            elif ctl == "\n":
                self.row, self.col = self.row + 1, 0
            elif ctl == "\b":
                self.col = max(self.col - 1, 0)
            for ch in chars:
                if self.col >= self.width:
                    self.row, self.col = self.row + 1, 0
                line = self._line()
                line.extend(" " * (self.col - len(line)))
                line[self.col:self.col + 1] = [ch]
                self.col += 1
        return self

    @property
    def lines(self) -> list[str]:
        text = ["".join(r).rstrip() for r in self.rows]
        while text and not text[-1]:
            text.pop()
        return text


def test_a_terminal_gets_the_lines_past_capture(monkeypatch):
    """A fake terminal reporter (a tty) and capture manager: the installed plugin is the
    session's listener; what it writes reaches the terminal, none of it the capture."""
    capture = FakeCapture(monkeypatch)
    monkeypatch.setenv("TERM", "xterm-256color")
    monkeypatch.setenv("COLUMNS", "200")
    config = fake_config(capture=capture)
    listener = install_progress(config)
    assert isinstance(listener, ProgressLine)
    print("suites/test_cases.py .", end="")  # pytest's own line: captured, here
    events = [event(0, 4, 0.0, label="baseline-best_of_n", phase="warm-up", round=0, problems=1),
              event(0, 8, 0.0, label="baseline-best_of_n"),  # another run: drawn at once
              event(0, 8, 0.0, label="pld-best_of_n")]
    for e in events:
        listener(e)
    # pytest reports the case: the line is erased first (the hook is tryfirst)
    config.pluginmanager.get_plugin(PLUGIN_NAME).pytest_runtest_logreport(report=None)
    assert capture.terminal.getvalue() == (
        OPEN + "".join("\r" + progress_line(e) + ERASE_TO_END for e in events) + CLOSE)
    assert capture.suspensions == 4  # three draws and the erase, each past capture
    assert capture.captured.getvalue() == "suites/test_cases.py ."  # nothing of the line
    listener.pytest_runtest_logreport(report=None)  # erased once: nothing more written
    assert capture.suspensions == 4


def test_redraws_are_throttled(monkeypatch):
    capture, now = FakeCapture(monkeypatch), [100.0]
    line = ProgressLine(capture, width=lambda: 200, clock=lambda: now[0])
    timeline = [(0.0, event(0, 8, 0.0)),    # a run's start: drawn
                (0.1, event(1, 8, 0.1, 8)),  # within a quarter second of the last: not
                (0.2, event(2, 8, 0.2, 16)),
                (0.3, event(3, 8, 0.3, 24)),  # drawn
                (0.4, event(4, 8, 0.4, 32)),
                (0.45, event(0, 8, 0.0, round=2)),  # a new timed round: drawn at once
                (0.5, event(1, 8, 0.05, 8, round=2)),
                (0.8, event(2, 8, 0.35, 16, round=2))]  # drawn
    for at, e in timeline:
        now[0] = 100.0 + at
        line(e)
    drawn = [timeline[i][1] for i in (0, 3, 5, 7)]
    assert capture.terminal.getvalue() == (
        OPEN + "".join("\r" + progress_line(e) + ERASE_TO_END for e in drawn))
    line.clear()
    line(event(5, 8, 0.85, 40, round=2))  # after an erase (the next case): drawn at once
    assert capture.terminal.getvalue().endswith(
        CLOSE + OPEN + "\r" + progress_line(event(5, 8, 0.85, 40, round=2)) + ERASE_TO_END)
    assert capture.captured.getvalue() == ""


def test_the_screen_keeps_pytests_line_and_no_residue():
    """pytest's line, a progress line drawn under it and erased, then pytest's next
    result letter: on the screen (a VT100's reading), pytest's line as if no progress
    line had been, on the last row of the terminal too (where opening the line scrolls)."""
    for rows_before in (0, 30):  # mid-screen; at the bottom (scrolled) all the same
        out = io.StringIO()
        line = ProgressLine(None, stream=lambda: out, width=lambda: 60, clock=lambda: 0.0)
        out.write("\n" * rows_before + "suites/test_cases.py .")
        line(event(3, 8, 6.0, 96))
        line.clear()
        out.write(".")
        out.write(" [100%]\n=== 2 passed ===\n")
        screen = Screen(60).feed(out.getvalue())
        assert screen.lines[rows_before:] == ["suites/test_cases.py .. [100%]", "=== 2 passed ==="]


def test_a_long_line_is_cut_to_the_terminal_width():
    out = io.StringIO()
    line = ProgressLine(None, stream=lambda: out, width=lambda: 40, clock=lambda: 0.0)
    line(event(3, 8, 6.0, 96))
    drawn = out.getvalue().removeprefix(OPEN + "\r").removesuffix(ERASE_TO_END)
    assert drawn == progress_line(event(3, 8, 6.0, 96))[:39]
    assert Screen(40).feed(out.getvalue()).lines == ["", drawn]  # one row, no wrap


# --------------------------------------------------------------------------- real sessions


@pytest.fixture
def small(tiny_model_dir: Path) -> list[str]:
    """A small, fast session on the tiny model: the baseline and pld under best_of_n."""
    return ["-p", "no:cacheprovider", "--specdec-target", str(tiny_model_dir),
            "--specdec-problems", "2", "--specdec-max-new-tokens", "8", "--specdec-n", "2",
            "--specdec-paradigm", "best_of_n", "--specdec-drafter", "pld", "--specdec-no-peer"]


@pytest.mark.parametrize("quiet", [[], ["-q"]], ids=["piped", "piped-q"])
def test_no_progress_line_when_piped(suite, small, quiet):
    result = suite.runpytest_subprocess(*small, *quiet, timeout=300)
    result.assert_outcomes(passed=2)
    # the progress line's own words ("timed round 1/1"); a flag's advice may name
    # --specdec-timed-rounds
    for pattern in ("*ETA*", "*tok/s*", "*timed round [0-9]*"):
        result.stdout.no_fnmatch_line(pattern)
    assert "\x1b7" not in result.stdout.str() + result.stderr.str()


def _run_on_a_pty(args: list[str], cwd: Path, *, columns: int, timeout: float) -> tuple[int, str]:
    """Run pytest with its stdin, stdout and stderr a pseudo-terminal of `columns`."""
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    env = {**os.environ, "TERM": "xterm-256color"}
    env.pop("COLUMNS", None)
    env.pop("PYTEST_ADDOPTS", None)
    proc = subprocess.Popen([sys.executable, "-m", "pytest", *args], cwd=cwd, env=env,
                            stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the slave side is closed
                break
            if not data:
                break
            chunks.append(data)
        else:
            proc.kill()
            pytest.fail("the session on a pseudo-terminal did not finish in time")
        return proc.wait(timeout=30), b"".join(chunks).decode("utf-8", "replace")
    finally:
        os.close(master)


@pytest.mark.skipif(sys.platform == "win32", reason="a POSIX pseudo-terminal")
@pytest.mark.parametrize("verbose", [[], ["-v"]], ids=["default", "verbose"])
def test_progress_line_on_a_terminal(suite, small, tmp_path, verbose):
    junit, bench = tmp_path / "junit.xml", tmp_path / "bench.json"
    args = [*small, *verbose, f"--junitxml={junit}", f"--benchmark-json={bench}",
            f"--basetemp={tmp_path / 'base'}"]
    code, out = _run_on_a_pty(args, suite.path, columns=120, timeout=300)
    assert code == 0, out
    # the line was drawn (past capture, at the terminal) ...
    drawn = re.findall(r"\r(  (?:baseline|pld)-best_of_n  [^\r\x1b]*ETA [^\r\x1b]*)\x1b\[K", out)
    # the baseline's case warms the engine up (on the first problem); pld's does not
    assert "  baseline-best_of_n  warm-up  problem 1/1  seq 0/2  — tok/s  elapsed 0:00  ETA —" \
        in drawn, out
    # the baseline's three rounds (--specdec-baseline-rounds), the drafter's one
    assert any(d.startswith("  baseline-best_of_n  timed round 3/3  problem ") for d in drawn), out
    assert any(d.startswith("  pld-best_of_n  timed round 1/1  problem 1/2  seq 0/4  ")
               for d in drawn), out
    assert all(len(d) < 120 for d in drawn)
    # ... and erased: the screen is pytest's own, every result on its case's line
    screen = Screen(120).feed(out).lines
    assert not [row for row in screen if "ETA" in row or "tok/s" in row], "\n".join(screen)
    if verbose:
        rows = [r for r in screen if r.startswith("test_cases.py::")]
        assert len(rows) == 2 and all(re.search(r" PASSED +\[ *\d+%\]$", r) for r in rows), screen
    else:
        assert any(re.fullmatch(r"test_cases\.py \.\. +\[100%\]", r) for r in screen), screen
    # never in what pytest and pytest-benchmark save
    assert "ETA" not in junit.read_text(encoding="utf-8")
    saved = json.loads(bench.read_text(encoding="utf-8"))
    assert "ETA" not in json.dumps(saved) and "\x1b7" not in json.dumps(saved)
    assert len(saved["benchmarks"]) == 2
