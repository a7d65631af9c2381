"""Lookahead decoding (LADE; Fu et al. 2024, "Break the Sequential Dependency of LLM
Inference Using Lookahead Decoding"): n-grams harvested from Jacobi iterations that
the target runs on a window of guessed future tokens, in the same forward that
verifies n-grams harvested earlier.

The two branches of one LADE step map onto a Draft:

- the *lookahead branch* is the draft's probes. Its 2D window has N-1 levels of W
  tokens; token (l, w) (level l, column w) sits at position t+1+w+l, t being the
  position of the last accepted token, and attends to the context, level 0's columns
  0..w and its own column's levels 1..l. That attention pattern is a tree: level 0
  is a chain hanging off the last accepted token, and (l, w) for l >= 1 is a child of
  (l-1, w). A node's position is its depth, 1+w+l, which is LADE's position. Probes
  are listed level by level: (l, w) is probe l*W + w. This is the window of the
  authors' Figure 5 (W=5, N=4), where a 4-gram is the orange token at position 1,
  the green at 2, the red at 3 and the token generated after it.
- the *verification branch* is the draft proper: the pool's n-grams whose first
  token is the last accepted token, their other N-1 tokens merged into a tree by
  common prefixes (LADE verifies them as G separate rows; merging changes no
  outcome and saves nodes).

Jacobi step (``observe``). The target's greedy choice after (N-2, w) is the next
guess at position t+1+w+N-1; with (0, w)..(N-2, w) it is an N-gram, added to the
pool under its first token. The oldest level is dropped and the choices become the
newest, so every level moves one position closer to the context. The pool keeps
at most G n-grams per first token, least recently seen evicted first, and a repeat
moves to the recent end (LADE's LRU guess set). G also bounds how many n-grams one
step verifies, as in LADE, where the whole guess set of the key is verified.

Choices the reference implementation (hao-ai-lab/LookaheadDecoding) makes, kept:

- the window moves one position per step however many tokens were accepted
  (ALWAYS_FWD_ONE, its default): a multi-token step leaves the window behind the
  context, and the next iterations catch up;
- only the lookahead branch feeds the pool (POOL_FROM_PROMPT is off by default);
- W=7, N=5, G=7, the configuration its README gives for a 7B model and the one
  Spec-Bench's ``inference_lookahead.py`` (the test-time-scaling benchmark's harness)
  runs; the paper's A100 setting W=15, N=5, G=15 is an option away;
- the pool starts empty with every generation (``share_pool`` false): it is a local
  of the reference's generate loop.

and where this one differs:

- the reference's oldest row starts with the last accepted token itself (W-1
  guesses, n-gram column 0 keyed by the real token); here level 0 is W guesses as
  in the paper's figure, so the lookahead branch has W*(N-1) probes;
- the reference seeds level 0 with random prompt tokens; here with W prompt tokens
  evenly spaced over the prompt (deterministic);
- while the window fills (the first N-2 steps of a sequence) the reference widens
  its levels so that they stay aligned; here levels are appended without moving,
  and the verification branch is used as soon as the pool has candidates (with a
  shared pool, from the first step) rather than only once the window is full;
- ``share_pool=true`` (the declared ablation) keeps the pool across the sequences of a
  case, so later samples and rounds start with the n-grams of the earlier ones.

Cost per step is O(W*N + G*N): the window and pool updates touch the W columns,
the proposal reads the last context token and at most G pool entries. Nothing
scans or copies the context, so the cost does not grow with its length.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import ClassVar, Sequence

from pytest_specdec.protocol.drafter import (MAX_DRAFT_NODES, MAX_PROBES, Draft, DraftRequest,
                                             DrafterBase, TargetSignals)


class NgramPool:
    """First token -> up to ``capacity`` continuations (tuples), in LRU order."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.grams: dict[int, OrderedDict[tuple[int, ...], None]] = {}

    def add(self, first: int, continuation: tuple[int, ...]) -> None:
        grams = self.grams.setdefault(first, OrderedDict())
        if continuation in grams:
            grams.move_to_end(continuation)
            return
        if len(grams) >= self.capacity:
            grams.popitem(last=False)
        grams[continuation] = None

    def candidates(self, first: int) -> list[tuple[int, ...]]:
        """The continuations of ``first``, most recently seen first."""
        return list(reversed(self.grams.get(first, ())))

    def __len__(self) -> int:
        return sum(len(grams) for grams in self.grams.values())


def merge_prefixes(grams: Sequence[tuple[int, ...]], depth: int) -> Draft:
    """A tree of the grams cut to ``depth`` tokens, common prefixes shared. Nodes are
    numbered in order of first appearance, so parents come before children."""
    tokens: list[int] = []
    parents: list[int] = []
    node_of: dict[tuple[int, int], int] = {}  # (parent node, token) -> node
    for gram in grams:
        parent = -1
        for token in gram[:depth]:
            node = node_of.get((parent, token))
            if node is None:
                node = node_of[(parent, token)] = len(tokens)
                tokens.append(token)
                parents.append(parent)
            parent = node
    return Draft(tuple(tokens), tuple(parents)) if tokens else Draft()


def window_parents(width: int, levels: int) -> tuple[int, ...]:
    """Probe parents of a window of ``levels`` levels of ``width`` columns, listed
    level by level: level 0 is a chain off the last accepted token, (l, w) a child
    of (l-1, w)."""
    if levels == 0:
        return ()
    chain = (-1, *range(width - 1))
    return chain + tuple(range((levels - 1) * width))


class LookaheadDecoding(DrafterBase):
    """Lookahead decoding: a Jacobi window as probes, pooled n-grams as a tree draft.

    window: W, the window's columns (future positions decoded in parallel).
    ngram: N, the n-gram size; the window has N-1 levels.
    guess_set: G, the most n-grams kept per first token and verified per step.
    share_pool: keep the n-gram pool across the sequences of a case (the window
        restarts with every sequence either way); off as in the reference, where the
        pool lives for one generation.

    Defaults are the benchmark references' (LADE's README for a 7B model, Spec-Bench):
    W=7, N=5, G=7, a pool per generation. A step scores W*(N-1) probes plus at most
    G*(N-1) draft nodes.
    """

    needs = frozenset({"probe_choices"})
    max_depth = 4  # N-1 with the default N=5: an n-gram drafts its last N-1 tokens
    # what a pool shared across the samples and rounds of a problem is worth
    ablations: ClassVar[tuple[dict[str, str], ...]] = ({"share_pool": "true"},)

    def __init__(self, window: int = 7, ngram: int = 5, guess_set: int = 7,
                 share_pool: bool = False):
        if window < 1:
            raise ValueError(f"window must be >= 1, got window={window}")
        if ngram < 2:
            raise ValueError(f"ngram must be >= 2, got ngram={ngram}")
        if guess_set < 1:
            raise ValueError(f"guess_set must be >= 1, got guess_set={guess_set}")
        if window * (ngram - 1) > MAX_PROBES:
            raise ValueError(f"window * (ngram - 1) must be <= {MAX_PROBES} (the probe cap), "
                             f"got window={window}, ngram={ngram}")
        if guess_set * (ngram - 1) > MAX_DRAFT_NODES:
            raise ValueError(f"guess_set * (ngram - 1) must be <= {MAX_DRAFT_NODES} (the draft "
                             f"node cap), got guess_set={guess_set}, ngram={ngram}")
        if not isinstance(share_pool, bool):
            raise ValueError(f"share_pool must be True or False, got {share_pool!r}")
        self.window, self.ngram, self.guess_set = window, ngram, guess_set
        self.share_pool = share_pool
        self.pool = NgramPool(guess_set)
        self.levels: list[tuple[int, ...]] = []  # oldest first; each `window` tokens
        self._probed = 0  # probes sent by the last propose, awaiting their choices

    def begin(self, request: DraftRequest) -> None:
        if not self.share_pool:
            self.pool = NgramPool(self.guess_set)
        prompt, w = request.prompt_ids, self.window
        self.levels = [tuple(prompt[i * len(prompt) // w] for i in range(w))] if prompt else []
        self._probed = 0

    def propose(self, context: Sequence[int], k: int) -> Draft:
        verify = merge_prefixes(self.pool.candidates(context[-1]), min(self.ngram - 1, k))
        probes = tuple(token for level in self.levels for token in level)
        self._probed = len(probes)
        return Draft(verify.tokens, verify.parents, probes,
                     window_parents(self.window, len(self.levels)))

    def observe(self, signals: TargetSignals) -> None:
        choices, probed, self._probed = signals.probe_choices, self._probed, 0
        if not probed or choices is None or len(choices) != probed:
            return  # no window was scored this step
        newest = tuple(choices[-self.window:])
        if len(self.levels) == self.ngram - 1:
            # column w of the full window plus its choice is an N-gram
            for w, first in enumerate(self.levels[0]):
                rest = tuple(level[w] for level in self.levels[1:])
                self.pool.add(first, rest + (newest[w],))
            del self.levels[0]
        self.levels.append(newest)

    def end(self) -> None:
        self._probed = 0
