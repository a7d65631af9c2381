"""REST (He et al., NAACL 2024, "REST: Retrieval-Based Speculative Decoding"): draft a
tree of the continuations that most often follow the context's suffix in a datastore.

Reference: FasterDecoding/REST, its DraftRetriever (``Reader.search``) and
``generate_candidates_and_draft_buffer``. At each step the longest suffix of the
context, from max_suffix down to min_suffix tokens (the reference's token spans 16..2),
is looked up in a suffix array (:mod:`pytest_specdec.protocol.datastore`); the continuations of
its occurrences, at most max_depth tokens each (the reference's 10), are counted in a
trie, and the draft is the max_nodes most frequent trie nodes (64, the reference's
``choices``), parents first.

**Sources.** By default there is no corpus datastore: ``source`` is ``"group"``, and
REST retrieves only from the problem's earlier sequences (prompt and output of the
earlier Best-of-N samples and rounds), held in an in-memory datastore, so the first
sequence of each problem drafts nothing. A corpus datastore built offline with
``pytest-specdec datastore build`` (``datastore=PATH``, e.g. from a chat dataset as in
the paper) is searched too (``"corpus+group"``), or alone with ``share_group=false``
(``"corpus"``). The group's suffix array is rebuilt in ``end()``, between sequences
(O(t log t) for the group's t tokens), never per token.

Batched (``concurrent_sequences``): the problem's samples open beside a sequence are a
source too, after its finished sequences: a datastore over their text so far, rebuilt
once they have grown by 16 tokens or an eighth of its size (so their newest tokens may
not be searchable yet). At batch 1 no sibling is open and nothing changes.

Deliberate differences from the reference:

- it searches one corpus datastore; here the problem's earlier sequences are a source
  too, and the only one by default (see above);
- the reference takes the longest span with any match; here the longest suffix with a
  match followed by at least one token (a span found only at document ends drafts
  nothing there, so a shorter one is tried);
- the reference counts the first 5000 matches in suffix-array order; here at most
  max_matches (256) spread evenly over all matches, which keeps their frequencies
  (the range is sorted by continuation, so its first entries are biased);
- continuations stop at their document's end;
- the reference keeps the 64 most counted nodes through a heap (ties in hash order)
  and then drops whole paths to fit; here ties rank by depth, then token path
  (:meth:`pytest_specdec.protocol.drafting.CountedTrie.top`), so the draft is deterministic;
- the reference drafts one arbitrary token when nothing matches; here the draft is
  empty.

Per-step cost does not depend on the context length: a proposal reads only the last
max_suffix tokens, makes O(log max_suffix) lookups of O(max_suffix log n) each, and
counts at most max_matches x max_depth continuation tokens; ``accept`` appends the new
tokens to the open sequence, kept for the group datastore.
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Sequence

import numpy as np

from pytest_specdec.protocol.datastore import SEPARATOR, Datastore, build_datastore
from pytest_specdec.protocol.drafter import (MAX_DRAFT_NODES, ConcurrentDrafterBase, Draft,
                                             DraftRequest, SequenceDrafter)
from pytest_specdec.protocol.drafting import CountedTrie, OpenSequence, ProblemMemory


@lru_cache(maxsize=2)
def _load(path: str, mtime_ns: int, size: int) -> Datastore:
    """Load once per file version: the engine makes a drafter per case and round, and a
    corpus datastore is read-only, so instances share it."""
    return Datastore.load(path)


def open_datastore(path: str) -> Datastore:
    """The datastore at `path`; DatastoreError (a ValueError) naming it if unusable."""
    resolved = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(resolved):
        return Datastore.load(resolved)  # raises, naming the path
    stat = os.stat(resolved)
    return _load(resolved, stat.st_mtime_ns, stat.st_size)


def longest_match(store: Datastore, context: Sequence[int], shortest: int,
                  longest: int) -> tuple[int, range]:
    """The longest suffix length in [shortest, longest] whose suffix occurs in `store`
    followed by a token, with its matches; (0, empty) when none does.

    Binary search over the length: if the last L tokens occur with a follower, so do
    the last L - 1 (one position later, same follower), so occurrence is monotone.
    """
    best: tuple[int, range] = (0, range(0))
    lo, hi = shortest, min(longest, len(context))
    while lo <= hi:
        length = (lo + hi) // 2
        matches = store.lookup(context[len(context) - length:])
        if store.continues(matches, length):
            best, lo = (length, matches), length + 1
        else:
            hi = length - 1
    return best


def frequency_tree(rows: np.ndarray, max_nodes: int) -> Draft:
    """The `max_nodes` most frequent nodes of the trie of `rows` (continuations, cut
    at the first SEPARATOR) as a draft; a chain when the tree has no branches.

    Scoring rule (:meth:`CountedTrie.top`): a node's count is how many continuations
    pass through it; nodes rank by count, then depth, then token path, so parents come
    first and likelier alternatives first. Equal rows are counted once, with their
    number as the weight (np.unique), so the trie sees each distinct row once.
    """
    if rows.size == 0:
        return Draft()
    unique, weights = np.unique(rows, axis=0, return_counts=True)
    trie = CountedTrie()
    for row, weight in zip(unique.tolist(), weights.tolist()):
        end = row.index(SEPARATOR) if SEPARATOR in row else len(row)
        trie.add(row[:end], weight)
    return trie.top(max_nodes, rows.shape[1])


class Rest(ConcurrentDrafterBase):
    """REST: retrieval from suffix-array datastores, drafts a frequency tree.

    By default (no ``datastore``) it retrieves only from the problem's earlier
    sequences (``source == "group"``): the first sequence of each problem drafts
    nothing. See the module docstring for the reference and the differences.

    datastore: path of a corpus datastore file (``pytest-specdec datastore build``);
        empty: none, only the group datastore is searched.
    share_group: also search the earlier sequences of the same problem (Best-of-N
        samples, earlier rounds), held in an in-memory datastore.
    max_suffix / min_suffix: the longest and shortest context suffix looked up (the
        reference's token spans 16..2).
    max_depth: the deepest draft (the reference's 10), within the engine's k.
    max_matches: most occurrences whose continuations are counted (evenly spread over
        all matches when there are more).
    max_nodes: most draft tokens in the tree (the reference's 64).
    """

    max_depth = 10  # the k its cases run with; rest:max_depth=N sets it per case

    def __init__(self, datastore: str = "", share_group: bool = True, max_suffix: int = 16,
                 min_suffix: int = 2, max_depth: int = 10, max_matches: int = 256,
                 max_nodes: int = 64):
        if min_suffix < 1 or max_suffix < min_suffix:
            raise ValueError(f"need 1 <= min_suffix <= max_suffix, got min_suffix={min_suffix}, "
                             f"max_suffix={max_suffix}")
        if max_depth < 1:
            raise ValueError(f"max_depth must be >= 1, got {max_depth}")
        if max_matches < 1:
            raise ValueError(f"max_matches must be >= 1, got {max_matches}")
        if not 1 <= max_nodes <= MAX_DRAFT_NODES:
            raise ValueError(f"max_nodes must be in [1, {MAX_DRAFT_NODES}], got {max_nodes}")
        if not datastore and not share_group:
            raise ValueError("REST needs a source: datastore=PATH, or share_group=true "
                             "(got datastore='' and share_group=False)")
        self.max_suffix, self.min_suffix, self.max_depth = max_suffix, min_suffix, max_depth
        self.max_matches, self.max_nodes, self.share_group = max_matches, max_nodes, share_group
        self.corpus = open_datastore(datastore) if datastore else None
        self.datastore_name = os.path.basename(datastore) if datastore else ""
        # per problem: its finished sequences and the datastore over them (rebuilt at end)
        self.memory: ProblemMemory[Datastore] = ProblemMemory(
            lambda previous, sequences: build_datastore(sequences), keep=share_group)

    @property
    def source(self) -> str:
        """Where drafts come from: "group" (the problem's earlier sequences only, the
        default), "corpus" (the datastore file only) or "corpus+group"."""
        return "+".join(name for name, used in (("corpus", self.corpus is not None),
                                                ("group", self.share_group)) if used)

    @property
    def report_note(self) -> str:
        if self.corpus is None:
            return ("no datastore: retrieves only from the problem's earlier sequences "
                    "(each problem's first sequence drafts nothing)")
        return f"datastore {self.datastore_name}" + (
            " and the problem's earlier sequences" if self.share_group else "")

    def open(self, request: DraftRequest) -> "_Retrieval":
        return _Retrieval(self, self.memory.open(request))


#: The siblings' datastore is rebuilt once they have grown by this many tokens, or by an
#: eighth of what it holds if more: amortised O(log t) per token for t sibling tokens.
SIBLING_REFRESH = 16


class _Retrieval(SequenceDrafter):
    """One open sequence of a :class:`Rest`: its tokens (filed into the group datastore
    at its end) and a datastore over its open siblings' text, rebuilt as they grow."""

    def __init__(self, drafter: Rest, sequence: OpenSequence):
        self.drafter, self.sequence = drafter, sequence
        self._siblings: Datastore | None = None
        # what the siblings' datastore was built from: the siblings, their total length
        self._built: tuple[tuple[int, ...], int] = ((), 0)

    def _sibling_store(self) -> Datastore | None:
        """The problem's other open sequences as a datastore (None: there are none),
        rebuilt when the set changed or they grew by SIBLING_REFRESH (see there)."""
        siblings = [s for s in self.drafter.memory.open_sequences(self.sequence.group)
                    if s is not self.sequence]
        if not siblings:
            return None
        ids, size = tuple(map(id, siblings)), sum(len(s.tokens) for s in siblings)
        built_ids, built_size = self._built
        if ids != built_ids or size - built_size >= max(SIBLING_REFRESH, built_size // 8):
            self._siblings = build_datastore([s.tokens for s in siblings])
            self._built = (ids, size)
        return self._siblings

    def propose(self, context: Sequence[int], k: int) -> Draft:
        drafter = self.drafter
        group = drafter.memory.index(self.sequence.group) if drafter.share_group else None
        siblings = self._sibling_store() if drafter.share_group else None
        # the group's own earlier sequences first: they fill max_matches first, being
        # the likelier source, then its open siblings; a source with a shorter longest
        # suffix is not used
        sources = [store for store in (group, siblings, drafter.corpus) if store is not None]
        depth = min(k, drafter.max_depth)
        if depth < 1 or not sources:
            return Draft()
        found = [(store, *longest_match(store, context, drafter.min_suffix, drafter.max_suffix))
                 for store in sources]
        length = max((n for _, n, _ in found), default=0)
        if length == 0:
            return Draft()
        rows, room = [], drafter.max_matches
        for store, n, matches in found:
            if n == length and room > 0:
                rows.append(store.continuations(matches, length, depth, room))
                room -= len(rows[-1])
        return frequency_tree(np.concatenate(rows), drafter.max_nodes)

    def accept(self, tokens: Sequence[int]) -> None:
        self.sequence.extend(tokens)

    def end(self) -> None:
        self.drafter.memory.close(self.sequence)
