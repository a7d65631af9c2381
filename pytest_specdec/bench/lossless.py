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

The margin is measured, not assumed (:func:`measure_tie_margin`): on a short plain decode
of the target, in its own dtype and on its own device, the logits of each position as the
engine computes them (one token a forward, chain and tree verify forwards of several
widths) are compared with the teacher-forced forward's, at the tokens near each
position's top; the margin is :data:`TIE_MARGIN_FACTOR` times the largest difference seen.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Sequence

import torch

from pytest_specdec.bench.runner import SequenceKey
from pytest_specdec.engine.loop import DRAFT_ROOM, Generation, GenerationRequest, generate
from pytest_specdec.engine.target import Target

#: Tokens shown on each side of a reported position.
CONTEXT_TOKENS = 8
#: Tokens per teacher-forced forward: bounds the logits held at once (chunk x vocab).
CHECK_CHUNK = 512
#: The dtypes judged teacher-forced (outside exact mode): their rounding differs between
#: forwards of different shapes by more than a near-tie.
HALF = frozenset({torch.bfloat16, torch.float16})
#: New tokens of the calibration decode that :func:`measure_tie_margin` compares.
CALIBRATION_TOKENS = 48
#: The forwards the calibration compares with teacher forcing, as the engine feeds them:
#: (tokens per forward, kind). Width 1 is plain decoding; a width w is a verify forward of
#: a w - 1 token draft plus the bonus row, as a chain (implicit positions, causal) or as a
#: tree (explicit positions and mask, the path tree drafters' forwards take).
CALIBRATION_FEEDS = ((1, "chain"), (2, "chain"), (4, "chain"), (8, "chain"), (16, "chain"),
                     (4, "tree"), (16, "tree"))
#: The measured margin over the largest logit gap seen. A flip needs the emitted token e
#: to beat the chosen c in the decode's scores while c beats e teacher-forced (the noise
#: is the same in both), so the teacher-forced margin l_c - l_e is at most
#: |gap_c| + |gap_e|: twice the largest gap, reached when the two logits move by it in
#: opposite directions.
TIE_MARGIN_FACTOR = 2.0
#: Logits below a position's top whose gaps the calibration takes: a token further below
#: is chosen with a probability under e^-14 (about 1e-6) at T <= 1, so it takes part in
#: no flip, while its larger magnitude rounds more coarsely in half precision.
CANDIDATE_WINDOW = 14.0


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


@dataclass(frozen=True)
class TieMargin:
    """The near-tie margin a teacher-forced check allows, in logits, and its origin."""

    logits: float
    source: str  # "measured", "given" (--specdec-tie-margin) or "equality" (none needed)
    max_gap: float | None = None  # measured: the largest logit gap seen
    positions: int = 0  # measured: the calibration decode's new tokens
    feeds: tuple[str, ...] = ()  # measured: the forwards compared ("chain 1", "tree 16")

    def summary(self) -> dict:
        """What a case record carries (``tie_margin``)."""
        out: dict = {"logits": round(self.logits, 4), "source": self.source}
        if self.source == "measured":
            out.update(max_gap=round(self.max_gap or 0.0, 6), factor=TIE_MARGIN_FACTOR,
                       window=CANDIDATE_WINDOW, positions=self.positions,
                       feeds=list(self.feeds))
        return out


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
    tie_margin: TieMargin | None = None  # the margin allowed (teacher-forced only)

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
            **({} if self.tie_margin is None else {"tie_margin": self.tie_margin.summary()}),
        }


def uses_teacher_forcing(dtype: torch.dtype, exact_mode: bool) -> bool:
    """Half precision is judged teacher-forced unless exact mode promises equality."""
    return dtype in HALF and not exact_mode


def resolve_tie_margin(spec: float | None, target: Target, prompt_ids: Sequence[int], *,
                       exact_mode: bool = False) -> TieMargin:
    """``--specdec-tie-margin``: none where equality is checked (float32, exact mode),
    else the given value, or (None: auto) the margin measured on `target` after
    `prompt_ids` (:func:`measure_tie_margin`; a session measures it once per target)."""
    if not uses_teacher_forcing(target.dtype, exact_mode):
        return TieMargin(0.0, "equality")
    if spec is not None:
        return TieMargin(float(spec), "given")
    return measure_tie_margin(target, prompt_ids)


def teacher_forced_logits(target: Target, prompt: Sequence[int], tokens: Sequence[int],
                          chunk: int = CHECK_CHUNK) -> Iterator[tuple[int, torch.Tensor]]:
    """The teacher-forced forwards of prompt + tokens, `chunk` tokens each: per forward
    that chooses some of `tokens`, (the index of the first token it chooses, its logits
    [rows, vocab], row r choosing tokens[index + r])."""
    sequence = [*prompt, *tokens]
    cache = target.new_cache()
    # the logits after position t choose token t + 1: rows len(prompt)-1 .. len(sequence)-2
    first_row, end_row = len(prompt) - 1, len(sequence) - 1
    for start in range(0, end_row, chunk):
        stop = min(start + chunk, end_row)
        keep = stop - max(start, first_row)
        logits, _ = target.forward(sequence[start:stop], cache, keep_logits=max(keep, 1))
        if keep > 0:
            yield stop - keep + 1 - len(prompt), logits[-keep:]


@torch.inference_mode()
def incremental_logits(target: Target, prompt: Sequence[int], tokens: Sequence[int],
                       width: int, kind: str = "chain") -> torch.Tensor:
    """Logits [len(tokens), vocab], row i choosing tokens[i], computed as the engine's
    decode loop computes them when every draft of width - 1 tokens (capped, as the loop
    caps it, so none runs past the tokens) is accepted: the first forward feeds the
    prompt and the first draft, each later one the bonus token and the next draft. A
    "tree" forward passes explicit positions and mask, as a tree verify forward does."""
    if width < 1 or kind not in ("chain", "tree"):
        raise ValueError(f"expected a width >= 1 and a kind 'chain' or 'tree', "
                         f"got width {width!r}, kind {kind!r}")
    # the decode path's own cache (the compiled path's static one), as the loop makes it
    cache = target.new_cache(len(prompt) + len(tokens) + DRAFT_ROOM)
    rows, done, cached = [], 0, 0
    while done < len(tokens):
        context = [*prompt, *tokens[:done]]
        draft = tokens[done:min(done + width - 1, len(tokens) - 1)]
        fed = [*context[cached:], *draft]
        extra: dict = {}
        if kind == "tree":  # a chain-shaped tree: each node sees the context and its ancestors
            extra = dict(positions=list(range(cached, cached + len(fed))),
                         attend=torch.ones(len(fed), cached + len(fed), dtype=torch.bool)
                         .tril(cached))
        logits, _ = target.forward(fed, cache, keep_logits=len(draft) + 1, **extra)
        rows.append(logits)
        done += len(draft) + 1
        cached = len(context) + len(draft)  # the bonus token is fed by the next forward
    return torch.cat(rows)


def logit_gap(decoded: torch.Tensor, forced: torch.Tensor,
              window: float = CANDIDATE_WINDOW) -> float:
    """The largest |decoded - forced| (logits [positions, vocab] each) over the tokens
    whose teacher-forced logit is within `window` of its position's top (equal
    infinities: 0)."""
    decoded, forced = decoded.float(), forced.float()
    near = forced >= forced.max(dim=-1, keepdim=True).values - window
    return float(torch.where(decoded == forced, 0.0, (decoded - forced).abs())[near].max())


@torch.inference_mode()
def measure_tie_margin(target: Target, prompt_ids: Sequence[int], *,
                       tokens: int = CALIBRATION_TOKENS,
                       feeds: Sequence[tuple[int, str]] = CALIBRATION_FEEDS) -> TieMargin:
    """The near-tie margin of `target` in its dtype on its device: plain decoding's
    first `tokens` tokens after `prompt_ids` (fewer at an EOS), their logits from each
    of `feeds` (:func:`incremental_logits`; tree feeds only where the target verifies
    trees) against the teacher-forced forward's (:func:`logit_gap`);
    :data:`TIE_MARGIN_FACTOR` times the largest gap."""
    if not prompt_ids:
        raise ValueError("the calibration prompt is empty: at least one token is needed")
    decoded = generate(target, GenerationRequest(tuple(prompt_ids), tokens)).tokens
    if len(decoded) < 2:
        raise ValueError(f"the calibration decode of {target.name!r} stopped at an EOS after "
                         f"{len(decoded)} token(s): too few to measure the near-tie margin; "
                         "give one with --specdec-tie-margin")
    forced = torch.cat([rows for _, rows in teacher_forced_logits(target, prompt_ids, decoded)])
    if target.tree_support():
        feeds = [feed for feed in feeds if feed[1] == "chain"]
    gap = max(logit_gap(incremental_logits(target, prompt_ids, decoded, width, kind), forced)
              for width, kind in feeds)
    return TieMargin(TIE_MARGIN_FACTOR * gap, "measured", max_gap=gap, positions=len(decoded),
                     feeds=tuple(f"{kind} {width}" for width, kind in feeds))


def _refuse(tie: NearTie, tie_margin: float, tokens: Sequence[int],
            decode: Callable[[Sequence[int]], str] | None) -> LosslessError:
    """The error for a token outside the margin (or a near-tie under strict)."""
    why = (f"a near-tie (margin <= {tie_margin:g}), failed under --specdec-strict"
           if tie.margin <= tie_margin else f"outside the near-tie margin {tie_margin:g}")
    window = tokens[max(0, tie.position - CONTEXT_TOKENS):tie.position + 1]
    shown = f"\n  tokens up to it: ...{list(window)}"
    if decode is not None:
        shown += f"\n  text up to it:   ...{decode(window)!r}"
    return LosslessError(f"a token that is not the target's ({why}): "
                         f"{tie.describe(decode)}{shown}")


@torch.inference_mode()
def judge_sequence(target: Target, request: GenerationRequest, tokens: Sequence[int],
                   key: SequenceKey, *, tie_margin: float, strict: bool = False,
                   decode: Callable[[Sequence[int]], str] | None = None,
                   chunk: int = CHECK_CHUNK) -> tuple[int, list[NearTie]]:
    """Judge every token of one sequence against the target given its own prefix.

    Returns (exact tokens, near-ties); raises LosslessError at the first token outside
    the margin (or at the first near-tie under strict)."""
    prompt = request.prompt_ids
    sampler = request.sampler
    unit = sampler.temperature if sampler.temperature > 0 else 1.0
    exact, ties = 0, []
    for index, logits in teacher_forced_logits(target, prompt, tokens, chunk):
        keep = logits.shape[0]
        positions = torch.arange(len(prompt) + index, len(prompt) + index + keep,
                                 device=logits.device)
        scores = sampler.scores(logits, positions)
        emitted = torch.tensor(tokens[index:index + keep], device=scores.device)
        best = scores.max(dim=-1)
        margins = (best.values - scores.gather(1, emitted[:, None])[:, 0]) * unit
        off = (best.indices != emitted).nonzero().squeeze(1).tolist()
        exact += keep - len(off)
        for row in off:
            tie = NearTie(key, index + row, int(emitted[row]), int(best.indices[row]),
                          float(margins[row]))
            if tie.margin > tie_margin or strict:
                raise _refuse(tie, tie_margin, tokens, decode)
            ties.append(tie)
    return exact, ties


def check_lossless(target: Target, baseline: Mapping[SequenceKey, Generation],
                   runs: Sequence[tuple[Mapping[SequenceKey, GenerationRequest],
                                        Mapping[SequenceKey, Generation]]], *,
                   exact_mode: bool = False, tie_margin: float | TieMargin | None = None,
                   strict: bool = False,
                   decode: Callable[[Sequence[int]], str] | None = None) -> LosslessVerdict:
    """Judge the speculative runs of one case (each timed round: its requests and
    outputs) against plain decoding's outputs; raise LosslessError on a bad token.

    `tie_margin`: a :class:`TieMargin` (a session's, measured once), a number of logits
    (given), or None: measured here after the prompt of the first sequence judged
    (:func:`resolve_tie_margin`). A sequence seen in an earlier round with the same
    prompt and tokens is judged once.
    """
    teacher_forced = uses_teacher_forcing(target.dtype, exact_mode)
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
            if verdict.tie_margin is None:  # measured (if asked) at the first sequence judged
                verdict.tie_margin = tie_margin if isinstance(tie_margin, TieMargin) else \
                    resolve_tie_margin(tie_margin, target, requests[key].prompt_ids)
            started = time.perf_counter()
            exact, ties = judge_sequence(target, requests[key], tokens, key,
                                         tie_margin=verdict.tie_margin.logits, strict=strict,
                                         decode=decode)
            verdict.check_s += time.perf_counter() - started
            verdict.exact += exact
            verdict.near_ties += ties
    return verdict

