"""The live progress line inside a case, on a terminal: what the session's runs report
(:class:`~pytest_specdec.bench.progress.RunProgress`) drawn as one line below pytest's
own, rewritten in place and erased before pytest writes the case's result::

    test_cases.py ..
      pld-best_of_n  timed round 1/1  problem 2/2  seq 6/8  31.2 tok/s  elapsed 0:12  ETA 0:04

Shown when pytest's terminal reporter writes to a terminal at normal or higher
verbosity, in the main process; never under ``-q``, with output piped or redirected
(CI logs: pytest's own line per case remains), on an xdist worker, on a ``TERM=dumb``
terminal, or with pytest's live logging on (``--log-cli-level``: the INFO lines per
problem are the progress then).

The line is written past pytest's output capture (the capture manager's
``global_and_fixture_disabled``, as live logging does), so nothing of it reaches a
case's captured output, the JUnit XML or the benchmark JSON; and straight to the
stream pytest writes to, not through the terminal reporter, whose bookkeeping of the
current line's width (where ``[ 50%]`` goes) must not see it. The cursor is saved
at the end of pytest's line and put back there when the line is erased.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import sys
import time
from typing import Any, Callable, ContextManager, TextIO

import pytest

from pytest_specdec.bench.progress import RunProgress
from pytest_specdec.plugin.xdist import is_worker

#: the plugin manager's name of the progress line
PLUGIN_NAME = "specdec-progress"
#: at most this many redraws a second (a new run or phase is drawn at once)
REDRAWS_PER_S = 4

# VT100 controls (every terminal pytest's colours work on)
SAVE_CURSOR, RESTORE_CURSOR = "\x1b7", "\x1b8"
INDEX, REVERSE_INDEX = "\x1bD", "\x1bM"  # one line down / up, same column, scrolling
ERASE_LINE, ERASE_TO_END = "\x1b[2K", "\x1b[K"
#: open the progress line below pytest's: make sure the row below exists (scrolling
#: now if the cursor is on the last row, so the saved position stays valid), save the
#: cursor at the end of pytest's line, go down to the new line's start
OPEN = INDEX + REVERSE_INDEX + SAVE_CURSOR + INDEX + "\r"
#: erase the progress line and put the cursor back at the end of pytest's line
CLOSE = "\r" + ERASE_LINE + RESTORE_CURSOR


def clock_text(seconds: float) -> str:
    """``m:ss``, or ``h:mm:ss`` from an hour on (whole seconds, rounded down).

    >>> [clock_text(s) for s in (0, 12.9, 75, 3600, 3725.5)]
    ['0:00', '0:12', '1:15', '1:00:00', '1:02:05']
    """
    hours, rest = divmod(int(max(seconds, 0.0)), 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def eta_text(event: RunProgress) -> str:
    """``ETA 0:04`` (rounded up: 0:00 only when the run is done), ``ETA —`` before the
    run's first token (a method that reports no tokens per step: its first sequence)."""
    eta = event.eta_s
    return "ETA —" if eta is None else f"ETA {clock_text(math.ceil(eta - 1e-9))}"


def progress_line(event: RunProgress) -> str:
    """The progress line of one event, indented like pytest's detail lines."""
    rate = event.tokens_per_s
    parts = [event.label or event.paradigm, event.stage,
             f"problem {event.problem}/{event.problems}",
             f"seq {event.done}/{event.total}",
             "— tok/s" if rate is None else f"{rate:.1f} tok/s",
             f"elapsed {clock_text(event.elapsed_s)}", eta_text(event)]
    return "  " + "  ".join(p for p in parts if p)


def progress_wanted(*, isatty: bool, verbosity: int, worker: bool, live_logging: bool,
                    term: str | None) -> bool:
    """Whether a session draws the progress line (see the module's docstring)."""
    return isatty and verbosity >= 0 and not worker and not live_logging and term != "dumb"


def _live_logging(config: pytest.Config) -> bool:
    """pytest's live logging is on (``--log-cli-level``, or ``log_cli`` in the ini)."""
    if config.getoption("log_cli_level", None) is not None:
        return True
    try:
        return bool(config.getini("log_cli"))
    except ValueError:  # the logging plugin is disabled: no such ini key
        return False


class ProgressLine:
    """The session's progress listener (``SpecdecSession.progress``) and the pytest
    plugin that erases its line before pytest writes anything of a case's result.

    ``capture``: pytest's capture manager (None: nothing is captured); ``stream``:
    where the line goes, looked up while capture is suspended (pytest's stdout);
    ``width``: the terminal's columns (the line is cut to fit on one row); ``clock``:
    monotonic seconds, for the redraw throttle.
    """

    def __init__(self, capture: Any = None, *, stream: Callable[[], TextIO] = lambda: sys.stdout,
                 width: Callable[[], int] = lambda: shutil.get_terminal_size().columns,
                 clock: Callable[[], float] = time.monotonic,
                 interval: float = 1.0 / REDRAWS_PER_S) -> None:
        self._capture, self._stream, self._width = capture, stream, width
        self._clock, self._interval = clock, interval
        self._open = False  # the line is on the screen
        self._stage: tuple[str, str, int] | None = None  # the run drawn last
        self._drawn_at = -math.inf

    def _uncaptured(self) -> ContextManager[Any]:
        if self._capture is None:
            return contextlib.nullcontext()
        return self._capture.global_and_fixture_disabled()

    def __call__(self, event: RunProgress) -> None:
        now = self._clock()
        stage = (event.label, event.phase, event.round)
        if stage == self._stage and now - self._drawn_at < self._interval:
            return  # throttled; a new run or phase is drawn at once
        self._stage, self._drawn_at = stage, now
        self.draw(progress_line(event))

    def draw(self, line: str) -> None:
        with self._uncaptured():  # the terminal's size too: fd 1 is a file while captured
            line = line[:max(self._width() - 1, 1)]  # one row: a wrapped line would scroll
            out = self._stream()
            out.write(("" if self._open else OPEN) + "\r" + line + ERASE_TO_END)
            out.flush()
        self._open = True

    def clear(self) -> None:
        """Erase the line (if drawn) and put the cursor back where pytest left it."""
        if not self._open:
            return
        with self._uncaptured():
            out = self._stream()
            out.write(CLOSE)
            out.flush()
        self._open, self._stage, self._drawn_at = False, None, -math.inf

    # -- pytest hooks: erased before pytest reports, whatever ends the case

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.clear()

    @pytest.hookimpl(tryfirst=True)
    def pytest_keyboard_interrupt(self, excinfo: Any) -> None:
        self.clear()

    @pytest.hookimpl(tryfirst=True)
    def pytest_internalerror(self, excrepr: Any, excinfo: Any) -> None:
        self.clear()

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        self.clear()


def install_progress(config: pytest.Config) -> ProgressLine | None:
    """The session's progress listener, registered as a plugin, when a progress line is
    wanted here (:func:`progress_wanted`); None otherwise."""
    manager = config.pluginmanager
    reporter = manager.get_plugin("terminalreporter")
    wanted = reporter is not None and progress_wanted(
        isatty=bool(reporter.isatty), verbosity=config.option.verbose,
        worker=is_worker(config), live_logging=_live_logging(config),
        term=os.environ.get("TERM"))
    if not wanted:
        return None
    existing = manager.get_plugin(PLUGIN_NAME)
    if existing is not None:
        return existing
    line = ProgressLine(manager.get_plugin("capturemanager"))
    manager.register(line, PLUGIN_NAME)
    return line
