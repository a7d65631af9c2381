"""Steady-state cost of one drafting step (propose + accept) at a given context length.

A drafter that keeps incremental structures (an automaton, a trie, an index extended
per accepted token) pays the same per step at 128k tokens of context as at 1k; one that
rescans the context pays in proportion to it. The benchmark feeds each drafter a
synthetic token stream with the repetition of real text (spans copied from earlier in
the stream), begins a sequence whose prompt is the first L tokens, then times steps in
which the drafter proposes and the stream's next tokens are accepted exactly as the
engine would accept them (the matching draft prefix plus one bonus token).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Sequence

import torch

from pytest_specdec.engine import TokenView
from pytest_specdec.protocol.drafter import Draft, DraftRequest, DrafterBase

VOCAB = 32000


def synthetic_stream(length: int, *, seed: int = 0, copy_share: float = 0.35) -> list[int]:
    """Zipf-like tokens with spans copied from earlier in the stream (4-32 tokens long),
    so n-gram drafters find matches and sometimes long ones. Streams of different seeds
    share the vocabulary and its frequencies, like two texts of one domain."""
    # one vocabulary and one Zipf law for every seed: streams differ in order, not in kind
    weights = [1.0 / (rank + 1) for rank in range(4000)]
    common = random.Random(0).sample(range(VOCAB), 4000)
    rng = random.Random(seed)
    tokens: list[int] = []
    while len(tokens) < length:
        if len(tokens) > 64 and rng.random() < copy_share:
            span = rng.randint(4, 32)
            start = rng.randrange(len(tokens) - span)
            tokens.extend(tokens[start:start + span])
        else:
            tokens.extend(rng.choices(common, weights, k=rng.randint(1, 8)))
    return tokens[:length]


def accepted_by(draft: Draft, stream: Sequence[int], at: int) -> tuple[int, ...]:
    """What verification would append if the stream were the target's output: the
    longest root path of the draft matching the stream, then the next stream token."""
    out: list[int] = []
    here = -1
    parents = draft.parents if draft.parents is not None else range(-1, len(draft) - 1)
    while at + len(out) < len(stream) - 1:
        want = stream[at + len(out)]
        here = next((i for i, p in enumerate(parents)
                     if i > here and p == here and draft.tokens[i] == want), -1)
        if here < 0:
            break
        out.append(want)
    return tuple(stream[at:at + len(out) + 1])


@dataclass
class SteadyState:
    """One drafter mid-sequence at a given context length, stepping through the stream.

    Every measured sequence follows the same earlier sample of its problem (`history`,
    another stream), so drafters that keep a group's or a case's history hold about as
    much at every context length, and only the current context's length varies. Without
    it, a drafter indexing a 1k context drafts less (its structure knows less) than at
    128k, and the comparison would not be of equal work.
    """

    drafter: object
    stream: list[int]
    prompt_len: int
    history: Sequence[int] = ()
    k: int = 5
    context: list[int] = field(default_factory=list)
    steps_run: int = 0
    drafted: int = 0
    accepted: int = 0

    def begin(self) -> None:
        if self.history:
            self.drafter.begin(DraftRequest(tuple(self.history[:64]), group="cost", sample=0, round=0))
            self.drafter.accept(tuple(self.history[64:]))
            self.drafter.end()
        self.context = list(self.stream[: self.prompt_len])
        self.drafter.begin(DraftRequest(tuple(self.context), group="cost", sample=1, round=0))

    def steps(self, n: int) -> None:
        view = TokenView(self.context)
        for _ in range(n):
            draft = self.drafter.propose(view, self.k)
            tokens = accepted_by(draft, self.stream, len(self.context))
            self.steps_run += 1
            self.drafted += len(draft)
            self.accepted += len(tokens) - 1
            self.drafter.accept(tokens)
            self.context.extend(tokens)


class RescanPromptLookup(DrafterBase):
    """Prompt lookup as Hugging Face's generate does it, for contrast: every step
    compares the last n-gram (n = max_ngram..1) with every window of the whole context
    (vectorised, as transformers does with ``unfold``) and copies what followed the
    first match, so a step costs O(context length)."""

    def __init__(self, max_ngram: int = 3):
        self.max_ngram = max_ngram

    def propose(self, context: Sequence[int], k: int) -> Draft:
        ids = torch.tensor(list(context))
        for n in range(self.max_ngram, 0, -1):
            windows = ids[:-1].unfold(0, n, 1) if len(ids) > n else ids[:0].view(0, n)
            hits = (windows == ids[-n:]).all(dim=1).nonzero()
            for start in hits[:, 0].tolist():
                found = ids[start + n:start + n + k].tolist()
                if found:
                    return Draft(tuple(found))
        return Draft()
