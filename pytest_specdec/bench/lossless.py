"""The losslessness check: every token of every speculative sequence is the target's.

Two judgements, chosen by the dtype and ``--specdec-lossless``:

- **Equality** (float32, and every dtype under ``--specdec-lossless exact``): each
  speculative sequence must equal plain decoding's for the same (problem, sample,
  round), token for token. Any difference fails.
- **Teacher-forced** (float16/bfloat16): a k-token verify forward and a one-token
  decode forward round differently, so greedy can flip at a near-tie, and after a flip
  the two sequences are unrelated text (in multi-round, round 2 even gets another
  prompt). Comparing with plain decoding cannot judge the tokens after the first flip.
  So each speculative sequence is fed through the target once, *teacher-forced* (its
  own prompt and tokens, in chunks), and every emitted token is judged against the
  target's choice given that sequence's own prefix: equal (exact), or within
  ``tie_margin`` of it in logit units (a near-tie), or the case fails naming the token.

The margin of an emitted token e where the target chose c is measured in logit units
with the sampler's noise and temperature taken out: at T=0, ``logit_c - logit_e``; at
T>0 the choice is ``argmax(logits / T + G)``, so the margin is ``T * (score_c - score_e)``:
the amount by which rounding would have to move the two logits apart to flip the choice.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch

from pytest_specdec.bench.runner import SequenceKey
from pytest_specdec.engine.loop import Generation, GenerationRequest
from pytest_specdec.engine.target import Target

#: Tokens shown on each side of a reported position.
CONTEXT_TOKENS = 8
#: Tokens per teacher-forced forward: bounds the logits held at once (chunk x vocab).
CHECK_CHUNK = 512
#: ``--specdec-tie-margin auto``: the near-tie margin, in logits, per half dtype. Measured
#: on SmolLM2-135M on a CPU: the logits of one position differ by up to ~0.6 between a
#: one-token decode, a k-token verify and a teacher-forced forward in bfloat16; the
#: margin allows twice that (both logits of a pair may move). float16 has 3 more
#: mantissa bits.
AUTO_TIE_MARGIN = {torch.bfloat16: 1.5, torch.float16: 0.25}
HALF = frozenset(AUTO_TIE_MARGIN)


class LosslessError(AssertionError):
    """A speculative token is not the target's."""


def _where(key: SequenceKey, position: int) -> str:
    group, sample, round = key
    return f"problem {group!r} sample {sample} round {round}, new token {position}"


@dataclass(frozen=True)
class Divergence:
    """Where a sequence first leaves another (plain decoding's, or a peer's)."""

    key: SequenceKey
    position: int  # index into the new tokens
    baseline: tuple[int, ...]  # tokens around the position
    speculative: tuple[int, ...]

    def describe(self, decode: Callable[[Sequence[int]], str] | None = None,
                 names: tuple[str, str] = ("baseline", "speculative")) -> str:
        """Where, then both token windows (and their text, given `decode`), labelled
        by `names` (the reference's, the other's)."""
        width = max(map(len, names))
        windows = tuple(zip(names, (self.baseline, self.speculative)))
        lines = [_where(self.key, self.position)]
        lines += [f"  {name:<{width}} ...{list(tokens)}" for name, tokens in windows]
        if decode is not None:
            lines += [f"  {name + ' text':<{width + 5}} ...{decode(tokens)!r}"
                      for name, tokens in windows]
        return "\n".join(lines)


def first_divergence(key: SequenceKey, reference: Sequence[int],
                     other: Sequence[int]) -> Divergence | None:
    """The first position where `other` leaves `reference` (a length difference counts
    at the shorter one's end); None when they are equal."""
    position = next((i for i, (a, b) in enumerate(zip(reference, other)) if a != b),
                    None if len(reference) == len(other) else min(len(reference), len(other)))
    if position is None:
        return None
    lo = max(0, position - CONTEXT_TOKENS)
    return Divergence(key, position, tuple(reference[lo:position + 2]),
                      tuple(other[lo:position + 2]))


@dataclass(frozen=True)
class NearTie:
    """A token that is not the teacher-forced choice but within the margin of it."""

    key: SequenceKey
    position: int
    emitted: int
    chosen: int
    margin: float  # logits

    def describe(self, decode: Callable[[Sequence[int]], str] | None = None) -> str:
        text = (lambda t: f" {decode([t])!r}") if decode is not None else (lambda t: "")
        return (f"{_where(self.key, self.position)}: emitted {self.emitted}{text(self.emitted)}, "
                f"the target chose {self.chosen}{text(self.chosen)} given this sequence's "
                f"own prefix; margin {self.margin:.3g} logits")


@dataclass
class LosslessVerdict:
    """What the check found in one case, over all its timed rounds."""

    method: str = "equality"  # "equality" or "teacher_forced"
    sequences: int = 0  # distinct sequences judged
    tokens: int = 0  # tokens judged
    exact: int = 0  # tokens equal to the target's choice (or to plain decoding's)
    near_ties: list[NearTie] = field(default_factory=list)
    # the first place (in paradigm order) where an output left plain decoding's
    departure: Divergence | None = None
    departed: int = 0  # sequences that differ from plain decoding's
    check_s: float = 0.0  # time spent in teacher-forced forwards

    @property
    def label(self) -> str:
        return "near_tie" if self.near_ties else "exact"

    @property
    def max_margin(self) -> float:
        return max((t.margin for t in self.near_ties), default=0.0)

    def summary(self) -> dict:
        """The fields a case record carries."""
        d = self.departure
        return {
            "lossless": self.label,
            "lossless_method": self.method,
            "tokens_exact": self.exact,
            "tokens_near_tie": len(self.near_ties),
            "max_tie_margin": round(self.max_margin, 4),
            "sequences_departed": self.departed,
            "first_departure": None if d is None else
            {"problem": d.key[0], "sample": d.key[1], "round": d.key[2], "token": d.position},
            "check_s": round(self.check_s, 4),
        }


def resolve_tie_margin(spec: float | None, dtype: torch.dtype) -> float:
    """``--specdec-tie-margin``: the given value, or (None: auto) the dtype's own."""
    return spec if spec is not None else AUTO_TIE_MARGIN.get(dtype, 0.0)


def uses_teacher_forcing(dtype: torch.dtype, exact_mode: bool) -> bool:
    """Half precision is judged teacher-forced unless exact mode promises equality."""
    return dtype in HALF and not exact_mode


@torch.inference_mode()
def judge_sequence(target: Target, request: GenerationRequest, tokens: Sequence[int],
                   key: SequenceKey, *, tie_margin: float, strict: bool = False,
                   decode: Callable[[Sequence[int]], str] | None = None,
                   chunk: int = CHECK_CHUNK) -> tuple[int, list[NearTie]]:
    """Judge every token of one sequence against the target given its own prefix.

    Returns (exact tokens, near-ties); raises LosslessError at the first token outside
    the margin (or at the first near-tie under strict)."""
    prompt = list(request.prompt_ids)
    sequence = [*prompt, *tokens]
    sampler = request.sampler
    unit = sampler.temperature if sampler.temperature > 0 else 1.0
    cache = target.new_cache()
    exact, ties = 0, []
    # the logits after position t choose token t + 1: rows len(prompt)-1 .. len(sequence)-2
    first_row, end_row = len(prompt) - 1, len(sequence) - 1
    for start in range(0, end_row, chunk):
        stop = min(start + chunk, end_row)
        keep = stop - max(start, first_row)
        logits, _ = target.forward(sequence[start:stop], cache, keep_logits=max(keep, 1))
        if keep <= 0:
            continue
        positions = torch.arange(stop - keep + 1, stop + 1, device=logits.device)
        scores = sampler.scores(logits[-keep:], positions)
        emitted = torch.tensor(sequence[stop - keep + 1:stop + 1], device=scores.device)
        best = scores.max(dim=-1)
        margins = (best.values - scores.gather(1, emitted[:, None])[:, 0]) * unit
        off = (best.indices != emitted).nonzero().squeeze(1).tolist()
        exact += keep - len(off)
        for row in off:
            position = stop - keep + row - len(prompt) + 1
            tie = NearTie(key, position, int(emitted[row]), int(best.indices[row]),
                          float(margins[row]))
            if tie.margin > tie_margin or strict:
                why = (f"a near-tie (margin <= {tie_margin:g}), failed under --specdec-strict"
                       if tie.margin <= tie_margin else
                       f"outside the near-tie margin {tie_margin:g}")
                window = tokens[max(0, position - CONTEXT_TOKENS):position + 1]
                shown = f"\n  tokens up to it: ...{list(window)}"
                if decode is not None:
                    shown += f"\n  text up to it:   ...{decode(window)!r}"
                raise LosslessError(f"a token that is not the target's ({why}): "
                                    f"{tie.describe(decode)}{shown}")
            ties.append(tie)
    return exact, ties


def check_lossless(target: Target, baseline: Mapping[SequenceKey, Generation],
                   runs: Sequence[tuple[Mapping[SequenceKey, GenerationRequest],
                                        Mapping[SequenceKey, Generation]]], *,
                   exact_mode: bool = False, tie_margin: float | None = None,
                   strict: bool = False,
                   decode: Callable[[Sequence[int]], str] | None = None) -> LosslessVerdict:
    """Judge the speculative runs of one case (each timed round: its requests and
    outputs) against plain decoding's outputs; raise LosslessError on a bad token.

    A sequence seen in an earlier round with the same prompt and tokens is judged once.
    """
    teacher_forced = uses_teacher_forcing(target.dtype, exact_mode)
    margin = resolve_tie_margin(tie_margin, target.dtype)
    verdict = LosslessVerdict(method="teacher_forced" if teacher_forced else "equality")
    judged: set[tuple[SequenceKey, tuple[int, ...], tuple[int, ...]]] = set()
    for requests, outputs in runs:
        if set(baseline) != set(outputs):
            missing = sorted(set(baseline) ^ set(outputs))[:5]
            raise LosslessError(f"the runs generated different sequences: {missing}")
        for key, generation in outputs.items():
            tokens = generation.tokens
            seen = (key, tuple(requests[key].prompt_ids), tuple(tokens))
            if seen in judged:
                continue
            judged.add(seen)
            divergence = first_divergence(key, baseline[key].tokens, tokens)
            if divergence is not None:
                verdict.departed += 1
                verdict.departure = verdict.departure or divergence
                if not teacher_forced:
                    raise LosslessError("output differs from plain decoding: "
                                        + divergence.describe(decode))
            verdict.sequences += 1
            verdict.tokens += len(tokens)
            if not teacher_forced:
                verdict.exact += len(tokens)
                continue
            started = time.perf_counter()
            exact, ties = judge_sequence(target, requests[key], tokens, key,
                                         tie_margin=margin, strict=strict, decode=decode)
            verdict.check_s += time.perf_counter() - started
            verdict.exact += exact
            verdict.near_ties += ties
    return verdict
