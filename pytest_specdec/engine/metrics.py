"""Every metric, defined once.

The engine feeds :class:`SpecDecodingStats` one record per target forward; cases merge
the stats of all their sequences; reports read the derived values from here and from
nowhere else.
"""

from __future__ import annotations

import hashlib
import statistics
from dataclasses import dataclass, field
from typing import Iterable, Sequence


@dataclass(frozen=True)
class StepRecord:
    """One target forward of one sequence."""

    drafted: int  # draft tokens verified (a tree's nodes)
    depth: int  # draft positions: the chain's length, the tree's longest root path
    accepted: int  # of those, the ones that reached the output
    emitted: int  # tokens appended (accepted + the bonus, unless an EOS came first)
    drafter_s: float  # seconds in the drafter: propose, observe and accept
    target_s: float  # seconds in the forward and the choice of tokens
    # tokens the forward computed: the uncached context and the draft's nodes (at batch
    # > 1, every row's slots, pad slots included); what timing prices a forward by
    fed: int
    # sequences the forward verified together (batch > 1: the batch's open rows, each
    # with its own record of the same forward; target_s is the shared forward's)
    rows: int = 1


@dataclass
class SpecDecodingStats:
    # generated tokens, prompt excluded
    new_tokens: int = 0
    # target forwards, each verifying one draft (possibly empty) and emitting its
    # accepted tokens plus one; the first forward also prefills the prompt
    steps: int = 0
    # draft tokens sent to verification (every node of a tree)
    drafted: int = 0
    # draft tokens the target agreed with (the bonus token is not counted)
    accepted: int = 0
    # drafted_at[i]: forwards whose draft had a token at position i (tree: depth i+1)
    drafted_at: list[int] = field(default_factory=list)
    # accepted_at[i]: forwards that accepted the draft token at position i
    accepted_at: list[int] = field(default_factory=list)
    # seconds in the drafter (propose, observe, accept: a draft model's forwards),
    # in target forwards (with token choice), end to end
    drafter_s: float = 0.0
    target_s: float = 0.0
    wall_s: float = 0.0

    def add_step(self, step: StepRecord) -> None:
        self.steps += 1
        self.drafted += step.drafted
        self.accepted += step.accepted
        self.new_tokens += step.emitted
        self.drafter_s += step.drafter_s
        self.target_s += step.target_s
        _bump(self.drafted_at, step.depth)
        _bump(self.accepted_at, step.accepted)

    def merge(self, other: SpecDecodingStats) -> None:
        for name in ("new_tokens", "steps", "drafted", "accepted",
                     "drafter_s", "target_s", "wall_s"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for mine, theirs in ((self.drafted_at, other.drafted_at),
                             (self.accepted_at, other.accepted_at)):
            mine.extend([0] * (len(theirs) - len(mine)))
            for i, n in enumerate(theirs):
                mine[i] += n

    @property
    def mat(self) -> float:
        """Mean accepted tokens per target forward, bonus token included (1.0 without SD)."""
        return self.new_tokens / self.steps if self.steps else 0.0

    @property
    def acceptance_rate(self) -> float | None:
        """Accepted draft tokens / drafted tokens; None when nothing was drafted."""
        return self.accepted / self.drafted if self.drafted else None

    @property
    def per_position_acceptance(self) -> list[float]:
        """[i] = P(draft token i accepted | a token was drafted at position i)."""
        return [a / d for a, d in zip(self.accepted_at, self.drafted_at) if d]

    @property
    def draft_share(self) -> float:
        """Share of the wall time spent in the drafter (propose, observe, accept)."""
        return self.drafter_s / self.wall_s if self.wall_s else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_s if self.wall_s else 0.0


def _bump(counts: list[int], upto: int) -> None:
    if len(counts) < upto:
        counts.extend([0] * (upto - len(counts)))
    for i in range(upto):
        counts[i] += 1


def mat_by_index(sequences: Iterable[tuple[int, SpecDecodingStats]]) -> list[float]:
    """MAT of the i-th sequence of every problem pooled (i = round or sample index):
    where sharing state across the sequences of a problem pays off, later ones rise."""
    pooled: dict[int, SpecDecodingStats] = {}
    for index, stats in sequences:
        pooled.setdefault(index, SpecDecodingStats()).merge(stats)
    return [pooled[i].mat for i in sorted(pooled)]


def ideal_speedup(mat: float, step_s: float, verify_s: float, draft_s: float) -> float | None:
    """The speedup a case's measured costs allow: MAT × t_step / (t_verify + t_draft),
    with t_step a plain decode step, t_verify a verify forward and t_draft the drafter's
    time per step, all at the same machine speed. None without costs."""
    if step_s <= 0 or verify_s + draft_s <= 0:
        return None
    return mat * step_s / (verify_s + draft_s)


def verify_steps(verify_s: float, step_s: float) -> float | None:
    """t_verify ÷ t_step: what one of a case's verify forwards costs in plain decode
    steps, both at the same machine speed (1.0: a verify forward costs no more than a
    decode step). None without a step."""
    if step_s <= 0:
        return None
    return verify_s / step_s


def memory_limit_s(weight_bytes: int, bytes_per_s: float) -> float | None:
    """The memory limit of a decode step at batch 1: one pass over the target's weights
    (parameters and buffers) at the device's memory bandwidth. None without a bandwidth."""
    if bytes_per_s <= 0 or weight_bytes <= 0:
        return None
    return weight_bytes / bytes_per_s


def limit_over_step(limit_s: float, step_s: float) -> float | None:
    """limit ÷ step: how close a plain decode step runs to its memory limit (1.0: at the
    limit; 0.5: twice as long as one pass over the weights takes). None without a step."""
    if step_s <= 0 or limit_s <= 0:
        return None
    return limit_s / step_s


def speedup(baseline_wall_s: float, speculative_wall_s: float) -> float:
    """Baseline wall time / speculative wall time for the same work (ratio of totals)."""
    return baseline_wall_s / speculative_wall_s


def median_round(seconds: Sequence[float]) -> float:
    """The figure quoted for repeated timed rounds: their median."""
    return statistics.median(seconds)


def accuracy(correct: Iterable[bool]) -> float:
    """Fraction of problems whose final extracted answer is right."""
    flags = list(correct)
    return sum(flags) / len(flags) if flags else 0.0


def output_digest(sequences: Iterable[Sequence[int]]) -> str:
    """A short hash of every output token, in order: equal outputs, equal digests."""
    h = hashlib.sha256()
    for seq in sequences:
        h.update(",".join(map(str, seq)).encode())
        h.update(b";")
    return h.hexdigest()[:16]
