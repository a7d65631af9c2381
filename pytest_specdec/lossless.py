"""The losslessness check: speculative output must equal plain decoding, token for token.

In fp32 any difference fails. In fp16/bf16, verifying k tokens in one forward and
decoding one token at a time round differently, and the choice can flip where the
baseline's top-2 margin is tiny: such a divergence is reported as a near-tie (and
fails under strict mode); any other divergence fails with its position and context.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch

from pytest_specdec.engine import Generation
from pytest_specdec.runner import SequenceKey

CONTEXT_TOKENS = 8


class LosslessError(AssertionError):
    """Speculative output differs from plain decoding."""


@dataclass(frozen=True)
class Divergence:
    key: SequenceKey
    position: int  # index into the new tokens
    baseline: tuple[int, ...]  # tokens around the position
    speculative: tuple[int, ...]
    margin: float | None  # baseline top-2 margin of the choice scores there

    def describe(self, decode: Callable[[Sequence[int]], str] | None = None) -> str:
        group, sample, round = self.key
        where = f"problem {group!r} sample {sample} round {round}, new token {self.position}"
        lines = [where,
                 f"  baseline    ...{list(self.baseline)}",
                 f"  speculative ...{list(self.speculative)}"]
        if decode is not None:
            lines += [f"  baseline text    ...{decode(self.baseline)!r}",
                      f"  speculative text ...{decode(self.speculative)!r}"]
        if self.margin is not None:
            lines.append(f"  baseline top-2 margin there: {self.margin:.3g}")
        return "\n".join(lines)


@dataclass
class LosslessVerdict:
    sequences: int = 0
    near_ties: list[Divergence] = field(default_factory=list)

    @property
    def label(self) -> str:
        return "near_tie" if self.near_ties else "exact"


def first_divergence(key: SequenceKey, baseline: Generation, speculative: Sequence[int]) -> Divergence | None:
    ref = baseline.tokens
    position = next((i for i, (a, b) in enumerate(zip(ref, speculative)) if a != b),
                    None if len(ref) == len(speculative) else min(len(ref), len(speculative)))
    if position is None:
        return None
    lo = max(0, position - CONTEXT_TOKENS)
    # a rounding flip changes a token; one output ending inside the other is an engine
    # error, so it carries no margin and can never pass as a near-tie
    truncated = position >= min(len(ref), len(speculative))
    margin = None if truncated or position >= len(baseline.margins) else baseline.margins[position]
    return Divergence(key, position, tuple(ref[lo:position + 2]),
                      tuple(speculative[lo:position + 2]), margin)


def check_lossless(baseline: Mapping[SequenceKey, Generation],
                   speculative: Mapping[SequenceKey, Sequence[int]], *, dtype: torch.dtype,
                   tie_margin: float, strict: bool = False,
                   decode: Callable[[Sequence[int]], str] | None = None) -> LosslessVerdict:
    """Compare every sequence; raise LosslessError on a divergence that is not allowed."""
    if set(baseline) != set(speculative):
        missing = sorted(set(baseline) ^ set(speculative))[:5]
        raise LosslessError(f"the runs generated different sequences: {missing}")
    verdict = LosslessVerdict()
    half = dtype in (torch.float16, torch.bfloat16)
    for key, reference in baseline.items():
        verdict.sequences += 1
        divergence = first_divergence(key, reference, speculative[key])
        if divergence is None:
            continue
        near_tie = half and divergence.margin is not None and divergence.margin <= tie_margin
        if near_tie and not strict:
            verdict.near_ties.append(divergence)
            continue
        why = ("a near-tie in half precision, failed under --specdec-strict" if near_tie
               else "output differs from plain decoding")
        raise LosslessError(f"{why}: {divergence.describe(decode)}")
    return verdict
