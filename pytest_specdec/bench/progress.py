"""Live progress of a paradigm run: the typed event the runner emits after every
sequence it finishes (every batch at batch > 1) and at the start of the run, and the
meter that counts them. Who listens is the session's business (the plugin's progress
line, plugin/progress.py); nothing here writes anywhere.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable


@dataclass(frozen=True)
class RunProgress:
    """Where one run of a paradigm stands.

    ``label`` names what decodes, as the case ids do (``pld-best_of_n``,
    ``baseline-multi_round``); ``phase`` is ``warm-up``, ``timed round``, ``paired
    baseline round`` or ``reference``, ``round`` its 1-based timed round out of
    ``rounds`` (0 for a warm-up or a reference run). ``done`` of ``total`` sequences
    are finished (best_of_n: problems x n, multi_round: problems x rounds), the last in
    problem ``problem`` of ``problems`` (1 at the start); ``new_tokens`` is what they
    generated, ``elapsed_s`` the run's seconds so far.
    """

    label: str
    phase: str
    round: int
    rounds: int
    paradigm: str
    done: int
    total: int
    problem: int
    problems: int
    new_tokens: int
    elapsed_s: float

    @property
    def stage(self) -> str:
        """``timed round 1/3``, ``warm-up``: the phase with its round."""
        return f"{self.phase} {self.round}/{self.rounds}" if self.round else self.phase

    @property
    def tokens_per_s(self) -> float | None:
        """New tokens per second of the run so far; None before a token is counted."""
        if self.new_tokens <= 0 or self.elapsed_s <= 0:
            return None
        return self.new_tokens / self.elapsed_s

    @property
    def eta_s(self) -> float | None:
        """Seconds left in this run at its pace so far (the fraction of its sequences
        done in its elapsed time); None before the first sequence finishes."""
        if self.done <= 0 or self.total <= 0:
            return None
        return self.elapsed_s * max(self.total - self.done, 0) / self.done


@dataclass
class ProgressMeter:
    """Counts the sequences of one run and tells ``listener`` a :class:`RunProgress`
    at its start and after every :meth:`add`. Made by the session per run (it knows the
    label and phase), fed by the runner (it knows the sequences)."""

    listener: Callable[[RunProgress], None]
    label: str
    phase: str
    round: int = 0
    rounds: int = 0
    clock: Callable[[], float] = time.perf_counter
    _paradigm: str = ""
    _total: int = 0
    _problems: int = 0
    _done: int = 0
    _problem: int = 1
    _tokens: int = 0
    _start: float = field(default=0.0)

    def start(self, paradigm: str, total: int, problems: int) -> None:
        self._paradigm, self._total, self._problems = paradigm, total, problems
        self._done, self._problem, self._tokens = 0, 1, 0
        self._start = self.clock()
        self._emit()

    def add(self, sequences: int, problem: int, new_tokens: int) -> None:
        """`sequences` more finished, the last in (1-based) `problem`, with `new_tokens`."""
        self._done += sequences
        self._problem = problem
        self._tokens += new_tokens
        self._emit()

    def _emit(self) -> None:
        self.listener(RunProgress(self.label, self.phase, self.round, self.rounds,
                                  self._paradigm, self._done, self._total, self._problem,
                                  self._problems, self._tokens, self.clock() - self._start))
