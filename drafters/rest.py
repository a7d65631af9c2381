"""REST (He et al., NAACL 2024, "REST: Retrieval-Based Speculative Decoding"): draft a
tree of the continuations that most often follow the context's suffix in a datastore.

At each step the longest suffix of the context, from max_suffix down to min_suffix
tokens, that occurs in a datastore with a token after it is looked up in a suffix
array (:mod:`pytest_specdec.datastore`); up to max_matches of its occurrences give
their next k tokens, which are counted in a trie, and the draft is the max_nodes most
frequent trie nodes (the paper's "choosing the draft tokens by frequency").

Two datastores may be searched: a corpus datastore built offline with
``pytest-specdec datastore build`` (``datastore=PATH``), and, with ``share_group``, an
in-memory datastore of the earlier sequences (prompt and output) of the same problem:
the other Best-of-N samples and earlier rounds. With no corpus the group datastore is
the only source, so REST works offline on the default setup (its first sequence of a
problem then drafts nothing). The group's suffix array is rebuilt in ``end()``,
between sequences (O(t log t) for the group's t tokens), never per token.

Per-step cost does not depend on the context length: a proposal reads only the last
max_suffix tokens, makes O(log max_suffix) lookups of O(max_suffix log n) each, and
counts at most max_matches x k continuation tokens; ``accept`` appends the new tokens
to the sequence kept for the group datastore.
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Sequence

import numpy as np

from pytest_specdec.datastore import SEPARATOR, Datastore, build_datastore
from pytest_specdec.drafter import MAX_DRAFT_NODES, Draft, DraftRequest, DrafterBase


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

    Scoring rule: a node's count is how many continuations pass through it. Nodes are
    ranked by count, then depth, then token path, so a parent (count >= its child's,
    one shorter) always ranks before its children: the top nodes form a tree, and
    listing them in rank order puts parents first and likelier alternatives first.
    """
    # sorted distinct rows: the rows sharing a d-token prefix (a trie node at depth d)
    # are a contiguous block, and the blocks of one depth are in path order
    unique, weights = np.unique(rows, axis=0, return_counts=True)
    n, depth = unique.shape
    if n == 0 or depth == 0:
        return Draft()
    shared = np.zeros(n, dtype=np.int64)  # leading tokens row i shares with row i - 1
    shared[1:] = np.argmax(unique[1:] != unique[:-1], axis=1)
    before = np.concatenate(([0], np.cumsum(weights)))  # continuations before row i
    levels, parents_of, previous, offset = [], [], None, 0
    for d in range(depth):
        starts = np.flatnonzero(shared <= d)  # first rows of the depth-(d+1) blocks
        counts = before[np.append(starts[1:], n)] - before[starts]
        # the parent block is the last depth-d block starting at or before this one
        parents_of.append(np.full(len(starts), -1) if previous is None else
                          offset - len(previous) + np.searchsorted(previous, starts, "right") - 1)
        levels.append((np.full(len(starts), d), starts, counts, unique[starts, d]))
        previous, offset = starts, offset + len(starts)
    depths, starts, counts, tokens = (np.concatenate(column) for column in zip(*levels))
    parent = np.concatenate(parents_of)
    ranked = np.lexsort((starts, depths, -counts))
    chosen = ranked[tokens[ranked] != SEPARATOR][:max_nodes]
    slot = np.full(len(tokens), -1)
    slot[chosen] = np.arange(len(chosen))
    parent_slots = np.where(parent[chosen] >= 0, slot[parent[chosen]], -1)
    draft = Draft(tuple(tokens[chosen].tolist()), tuple(parent_slots.tolist()))
    return Draft(draft.tokens) if draft.is_chain else draft


class Rest(DrafterBase):
    """REST: retrieval from suffix-array datastores, drafts a frequency tree.

    datastore: path of a datastore file (``pytest-specdec datastore build``); empty:
        none, only the group datastore is searched.
    share_group: also search the earlier sequences of the same problem (Best-of-N
        samples, earlier rounds), held in an in-memory datastore.
    max_suffix / min_suffix: the longest and shortest context suffix looked up (the
        paper's token spans 16..2).
    max_matches: most occurrences whose continuations are counted (evenly spread over
        all matches when there are more).
    max_nodes: most draft tokens in the tree (the paper's 64 draft tokens).
    """

    def __init__(self, datastore: str = "", share_group: bool = True, max_suffix: int = 16,
                 min_suffix: int = 2, max_matches: int = 256, max_nodes: int = 64):
        if min_suffix < 1 or max_suffix < min_suffix:
            raise ValueError(f"need 1 <= min_suffix <= max_suffix, got min_suffix={min_suffix}, "
                             f"max_suffix={max_suffix}")
        if max_matches < 1:
            raise ValueError(f"max_matches must be >= 1, got {max_matches}")
        if not 1 <= max_nodes <= MAX_DRAFT_NODES:
            raise ValueError(f"max_nodes must be in [1, {MAX_DRAFT_NODES}], got {max_nodes}")
        if not datastore and not share_group:
            raise ValueError("REST needs a source: datastore=PATH, or share_group=true "
                             "(got datastore='' and share_group=False)")
        self.max_suffix, self.min_suffix = max_suffix, min_suffix
        self.max_matches, self.max_nodes, self.share_group = max_matches, max_nodes, share_group
        self.corpus = open_datastore(datastore) if datastore else None
        self._group_key = ""
        self._sequence: list[int] = []
        # per problem: its finished sequences and the datastore over them
        self._group_docs: dict[str, list[np.ndarray]] = {}
        self._group_stores: dict[str, Datastore] = {}

    def begin(self, request: DraftRequest) -> None:
        self._group_key = request.group
        self._sequence = list(request.prompt_ids)

    def propose(self, context: Sequence[int], k: int) -> Draft:
        group = self._group_stores.get(self._group_key) if self.share_group else None
        # the group's own earlier sequences first: they fill max_matches first, being
        # the likelier source; a source with a shorter longest suffix is not used
        sources = [store for store in (group, self.corpus) if store is not None]
        if k < 1 or not sources:
            return Draft()
        found = [(store, *longest_match(store, context, self.min_suffix, self.max_suffix))
                 for store in sources]
        length = max((n for _, n, _ in found), default=0)
        if length == 0:
            return Draft()
        rows, room = [], self.max_matches
        for store, n, matches in found:
            if n == length and room > 0:
                rows.append(store.continuations(matches, length, k, room))
                room -= len(rows[-1])
        return frequency_tree(np.concatenate(rows), self.max_nodes)

    def accept(self, tokens: Sequence[int]) -> None:
        self._sequence.extend(tokens)

    def end(self) -> None:
        if self.share_group and self._sequence:
            docs = self._group_docs.setdefault(self._group_key, [])
            docs.append(np.asarray(self._sequence, dtype=np.int32))
            self._group_stores[self._group_key] = build_datastore(docs)
        self._sequence = []
