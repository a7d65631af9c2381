"""Building blocks for drafters (public API, like :mod:`pytest_specdec.protocol.drafter`).

Two things most n-gram and retrieval drafters need, written once:

- :class:`ProblemMemory`: the per-problem memory. It follows the open sequences (their
  problem, their prompt and accepted tokens) and files every finished sequence under its
  problem (``DraftRequest.group``), so a drafter can search the earlier samples and
  rounds of the problem it is drafting for, optionally through an index it builds
  from them (a suffix automaton, a suffix array) when a sequence ends, and (a
  concurrent drafter) the sibling sequences open beside one.
- :func:`best_first`: the top N nodes of a counted trie with every node after its
  parent, which is what a tree draft needs; :class:`CountedTrie` and
  :func:`tree_draft` build on it for drafts counted from scratch at each step.

A third-party drafter may use them as the built-in ones do::

    from pytest_specdec.protocol.drafting import CountedTrie, ProblemMemory
"""

from __future__ import annotations

import heapq
from typing import Any, Callable, Generic, Iterable, Sequence, TypeVar

from pytest_specdec.protocol.drafter import Draft, DraftRequest

T = TypeVar("T")
N = TypeVar("N")

#: A finished sequence: its prompt, then every token accepted after it.
Tokens = tuple[int, ...]


class OpenSequence:
    """One open sequence of a :class:`ProblemMemory`: its problem, its sample and round,
    and its tokens so far (prompt, then every accepted token)."""

    __slots__ = ("group", "sample", "round", "tokens", "is_open")

    def __init__(self, request: DraftRequest):
        self.group, self.sample, self.round = request.group, request.sample, request.round
        self.tokens: list[int] = list(request.prompt_ids)
        self.is_open = True

    def extend(self, tokens: Iterable[int]) -> None:
        """Tokens accepted into the sequence."""
        self.tokens.extend(tokens)


class ProblemMemory(Generic[T]):
    """The open sequences and the finished sequences of each problem.

    One sequence at a time: call :meth:`begin`, :meth:`extend` and :meth:`end` from the
    drafter's ``begin``, ``accept`` and ``end``. Between them, :attr:`current` is the
    open sequence (prompt and accepted tokens), :attr:`group` its problem, and
    :meth:`sequences` and :meth:`index` what the problem's earlier sequences left.

    Several at once (a concurrent drafter, see
    :class:`pytest_specdec.protocol.drafter.ConcurrentDrafterBase`): :meth:`open` gives
    an :class:`OpenSequence` per sequence, :meth:`close` files it, and
    :meth:`open_sequences` lists a problem's sequences open now (a sequence's siblings).

    index: optional; called when a sequence ends as ``index(previous, sequences)``
        with the problem's previous index (None for its first sequence) and all its
        finished sequences, oldest first, the new one last; its result is the
        problem's new index. Incremental indexes extend ``previous`` by
        ``sequences[-1]``; others rebuild from ``sequences``.
    keep: file finished sequences (false: a drafter whose sharing is turned off keeps
        only the open sequences, and :meth:`sequences` stays empty).
    """

    def __init__(self, index: Callable[[T | None, tuple[Tokens, ...]], T] | None = None,
                 *, keep: bool = True):
        self._index, self.keep = index, keep
        self.group = ""
        self._single: OpenSequence | None = None  # the one of begin/extend/end
        self._open: dict[str, list[OpenSequence]] = {}
        self._sequences: dict[str, list[Tokens]] = {}
        self._indexes: dict[str, T] = {}

    @property
    def current(self) -> list[int]:
        """The tokens of the sequence begun with :meth:`begin` ([] when none is open)."""
        return self._single.tokens if self._single is not None else []

    @property
    def is_open(self) -> bool:
        return self._single is not None

    def begin(self, request: DraftRequest) -> None:
        """A sequence of ``request.group`` starts with ``request.prompt_ids``; a sequence
        begun earlier and never ended is ended (filed) first."""
        self.end()
        self._single = self.open(request)
        self.group = request.group

    def extend(self, tokens: Iterable[int]) -> None:
        """Tokens accepted into the sequence begun with :meth:`begin`."""
        if self._single is not None:
            self._single.extend(tokens)

    def end(self) -> Tokens | None:
        """Close the sequence begun with :meth:`begin` and file it (see :meth:`close`);
        None when none was open (a second ``end``)."""
        single, self._single = self._single, None
        return self.close(single) if single is not None else None

    def open(self, request: DraftRequest) -> OpenSequence:
        """A new open sequence of ``request.group``, beside any already open."""
        sequence = OpenSequence(request)
        self._open.setdefault(sequence.group, []).append(sequence)
        return sequence

    def close(self, sequence: OpenSequence) -> Tokens | None:
        """Close ``sequence`` and file it under its problem (when ``keep`` and not
        empty); returns its tokens, or None when it was closed already."""
        if not sequence.is_open:
            return None
        sequence.is_open = False
        self._open[sequence.group].remove(sequence)
        finished = tuple(sequence.tokens)
        if self.keep and finished:
            filed = self._sequences.setdefault(sequence.group, [])
            filed.append(finished)
            if self._index is not None:
                self._indexes[sequence.group] = self._index(self._indexes.get(sequence.group),
                                                            tuple(filed))
        return finished

    def open_sequences(self, group: str) -> tuple[OpenSequence, ...]:
        """The sequences of ``group`` open now, in the order they were opened."""
        return tuple(self._open.get(group, ()))

    def sequences(self, group: str | None = None) -> tuple[Tokens, ...]:
        """The finished sequences of ``group`` (default: the open sequence's), oldest first."""
        return tuple(self._sequences.get(self.group if group is None else group, ()))

    def index(self, group: str | None = None) -> T | None:
        """The index built from ``group``'s finished sequences (default: the open
        sequence's problem), or None before its first sequence ended."""
        return self._indexes.get(self.group if group is None else group)


def best_first(roots: Sequence[N], children: Callable[[N], Sequence[N]],
               key: Callable[[N], Any], max_nodes: int,
               max_depth: int) -> tuple[list[N], list[int]]:
    """The ``max_nodes`` best nodes of a tree, best first, each after its parent.

    roots: the nodes at depth 1, best first. children(node): its children, best first.
    key(node): nodes with smaller keys are better; a node's key must never be better
        than its parent's (counts shrink from parent to child), so the best nodes form
        a tree. With equal keys, the node offered first wins (a taken node offers its
        next sibling, then its first child); a key that orders every node (e.g. count,
        then depth, then path) makes the result the first ``max_nodes`` in key order.
    max_depth: nodes deeper than this are not taken (roots are at depth 1).

    Returns ``(nodes, parents)``: ``parents[i]`` is the index in ``nodes`` of node i's
    parent, -1 for a root. Work: at most 2 * max_nodes heap pushes plus the
    ``children`` calls of the nodes taken; nothing else of the tree is read.
    """
    nodes: list[N] = []
    parents: list[int] = []
    if max_nodes < 1 or max_depth < 1:
        return nodes, parents
    heap: list[tuple[Any, int, int, int, Sequence[N], int]] = []
    offered = 0

    def offer(siblings: Sequence[N], rank: int, parent: int, depth: int) -> None:
        nonlocal offered
        if rank < len(siblings):
            heapq.heappush(heap, (key(siblings[rank]), offered, depth, parent, siblings, rank))
            offered += 1

    offer(roots, 0, -1, 1)
    while heap and len(nodes) < max_nodes:
        _, _, depth, parent, siblings, rank = heapq.heappop(heap)
        node = siblings[rank]
        nodes.append(node)
        parents.append(parent)
        offer(siblings, rank + 1, parent, depth)
        if depth < max_depth:
            offer(children(node), 0, len(nodes) - 1, depth + 1)
    return nodes, parents


def tree_draft(tokens: Sequence[int], parents: Sequence[int]) -> Draft:
    """A Draft of these nodes: a chain when every node's parent is the node before it
    (so chain drafters and trees compare equal when they are the same), else a tree."""
    if all(p == i - 1 for i, p in enumerate(parents)):
        return Draft(tuple(tokens))
    return Draft(tuple(tokens), tuple(parents))


class CountedTrie:
    """Token paths with counts: ``add(path, weight)`` adds ``weight`` to every prefix
    of ``path``, so a node's count is the weight of the paths through it.

    For drafts counted afresh at each step (REST counts the continuations of a match);
    :meth:`top` is the frequency tree of the paper: the most counted nodes.
    """

    class Node:
        __slots__ = ("token", "count", "depth", "parent", "children", "_ranked")

        def __init__(self, token: int, depth: int, parent: CountedTrie.Node | None):
            self.token, self.count, self.depth, self.parent = token, 0, depth, parent
            self.children: dict[int, CountedTrie.Node] = {}
            self._ranked: list[CountedTrie.Node] | None = None

        def path(self) -> tuple[int, ...]:
            """The tokens from the root to this node."""
            tokens, node = [], self
            while node.parent is not None:
                tokens.append(node.token)
                node = node.parent
            return tuple(reversed(tokens))

    def __init__(self) -> None:
        self.root = CountedTrie.Node(-1, 0, None)

    def add(self, path: Iterable[int], weight: int = 1) -> None:
        node = self.root
        node.count += weight
        for token in path:
            child = node.children.get(token)
            if child is None:
                child = node.children[token] = CountedTrie.Node(token, node.depth + 1, node)
            child.count += weight
            node = child

    def ranked(self, node: CountedTrie.Node) -> list[CountedTrie.Node]:
        """node's children, most counted first, equal counts by token."""
        if node._ranked is None:
            node._ranked = sorted(node.children.values(), key=lambda c: (-c.count, c.token))
        return node._ranked

    def top(self, max_nodes: int, max_depth: int) -> Draft:
        """The ``max_nodes`` most counted nodes at most ``max_depth`` deep as a draft.

        Scoring rule: a node ranks by its count, then by depth (shallower first), then
        by its token path; a parent's count is at least its child's, so parents come
        first and the nodes form a tree, listed in rank order (likelier alternatives
        first). Call after the last :meth:`add` (children are ranked once).
        """
        nodes, parents = best_first(self.ranked(self.root), self.ranked,
                                    lambda n: (-n.count, n.depth, n.path()),
                                    max_nodes, max_depth)
        return tree_draft([n.token for n in nodes], parents) if nodes else Draft()
