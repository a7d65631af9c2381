"""Live progress of a paradigm run: the typed event the runner emits after every
sequence it finishes (every batch at batch > 1), at the start of the run and, while a
sequence decodes, as its tokens are emitted; and the meter that counts them. Who listens
is the session's business (the plugin's progress line, plugin/progress.py); nothing
here writes anywhere.

Within a sequence the engine tells the meter each step's emitted tokens
(:meth:`ProgressMeter.tokens`, one O(1) call per step, outside the step's timed spans,
the same for the baseline and every drafter); the meter passes an event on at most
:attr:`ProgressMeter.interval` apart (drawing costs scale with seconds, not steps, so
they weigh alike on every method's run). tok/s and elapsed then move during a sequence.

The ETA counts a sequence still decoding as the share of its budget
(``max_new_tokens``) it has emitted: ``done + decoding`` of ``total`` sequences, where
``decoding`` = tokens emitted by the unfinished sequences / budget. The budget is an
upper bound (a sequence may stop at EOS), so an unfinished sequence counts as no
further along than it is and the ETA leans long while it decodes; finished sequences
count whole, so the ETA converges to the sequence-based one as they finish. Methods
that do not report tokens (a peer's generate) are counted per finished sequence only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from pytest_specdec.engine import timing


@dataclass(frozen=True)
class RunProgress:
    """Where one run of a paradigm stands.

    ``label`` names what decodes, as the case ids do (``pld-best_of_n``,
    ``baseline-multi_round``); ``phase`` is ``warm-up``, ``timed round``, ``paired
    baseline round`` or ``reference``, ``round`` its 1-based timed round out of
    ``rounds`` (0 for a warm-up or a reference run). ``done`` of ``total`` sequences
    are finished (best_of_n: problems x n, multi_round: problems x rounds), the last in
    problem ``problem`` of ``problems`` (1 at the start); ``new_tokens`` is what they
    and the sequences still decoding generated, ``elapsed_s`` the run's seconds so far;
    ``decoding``: the unfinished sequences' emitted tokens in units of one sequence's
    budget (0 between sequences; see the module's docstring).
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
    decoding: float = 0.0

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
        done, ``done + decoding``, in its elapsed time); None before a token of it."""
        progress = self.done + self.decoding
        if progress <= 0 or self.total <= 0:
            return None
        return self.elapsed_s * max(self.total - progress, 0) / progress


@dataclass
class ProgressMeter:
    """Counts the sequences of one run and tells ``listener`` a :class:`RunProgress`
    at its start, after every :meth:`add` and, within a sequence, every
    :meth:`tokens` at least ``interval`` seconds after the last event. Made by the
    session per run (it knows the label and phase), fed by the runner (it knows the
    sequences) and the engine (the tokens of each step)."""

    listener: Callable[[RunProgress], None]
    label: str
    phase: str
    round: int = 0
    rounds: int = 0
    clock: Callable[[], float] = timing.now  # the package's one clock (tests replace it)
    interval: float = 0.25  # seconds between events within a sequence
    _paradigm: str = ""
    _total: int = 0
    _problems: int = 0
    _done: int = 0
    _problem: int = 1
    _tokens: int = 0
    _start: float = field(default=0.0)
    _live: int = 0  # tokens of the sequences decoding now
    _budget: int = 0  # their max_new_tokens each
    _in_flight: int = 0  # how many decode together
    _emitted_at: float = 0.0

    def start(self, paradigm: str, total: int, problems: int) -> None:
        self._paradigm, self._total, self._problems = paradigm, total, problems
        self._done, self._problem, self._tokens, self._live = 0, 1, 0, 0
        self._start = self.clock()
        self._emit(self._start)

    def decoding(self, sequences: int, budget: int) -> Callable[[int], None]:
        """`sequences` start decoding together, `budget` new tokens at most each; returns
        the per-step sink (:meth:`tokens`) to hand the engine."""
        self._in_flight, self._budget, self._live = sequences, budget, 0
        return self.tokens

    def tokens(self, new_tokens: int) -> None:
        """A step of the sequences decoding emitted `new_tokens`; O(1), an event only
        ``interval`` after the last."""
        self._live += new_tokens
        now = self.clock()
        if now - self._emitted_at >= self.interval:
            self._emit(now)

    def add(self, sequences: int, problem: int, new_tokens: int) -> None:
        """`sequences` more finished, the last in (1-based) `problem`, with `new_tokens`
        (those :meth:`tokens` counted while they decoded included)."""
        self._done += sequences
        self._problem = problem
        self._tokens += new_tokens
        self._live = 0
        self._emit(self.clock())

    def _partial(self) -> float:
        """The decoding sequences' tokens in budgets, below their count (unfinished)."""
        if self._live <= 0 or self._budget <= 0:
            return 0.0
        return min(self._live / self._budget, self._in_flight * (1 - 1e-6))

    def _emit(self, now: float) -> None:
        self._emitted_at = now
        self.listener(RunProgress(self.label, self.phase, self.round, self.rounds,
                                  self._paradigm, self._done, self._total, self._problem,
                                  self._problems, self._tokens + self._live,
                                  now - self._start, self._partial()))
