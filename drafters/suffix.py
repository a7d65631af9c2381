"""SuffixDecoding (Oliaro et al. 2024; Snowflake's Arctic Inference, vLLM's "suffix"
method): draft a tree of the continuations seen most often after the context's suffix.

Two tries hold every substring of at most ``max_tree_depth`` tokens with its number of
occurrences: a per-request trie over the current prompt and response, and a global trie
over the responses finished earlier in this benchmark case (every sample, round and
problem; prompts stay out of it, as in the method). In each trie, the longest suffix of
the context that occurred before and has a continuation is the match. From the match a
draft tree is grown best first (see ``SuffixTrie.grow``); the two candidates compete by
score, the sum of their nodes' probabilities, and the better one is proposed.

Cost per step does not grow with the context:

- extending a trie by one token touches only the "active" nodes, the suffixes of the
  text that occurred before (at most ``max_tree_depth``). A string seen once is not
  stored node by node but as its first node plus a reference into its sequence (a lazy
  chain), which is also why a new token costs nothing for the suffixes seen only once;
  a lazy node gets explicit children when its string occurs a second time.
- the per-request trie's active nodes are its match set; for the global trie a set of
  at most ``max_tree_depth`` cursors is advanced per accepted token.
- growing a draft emits at most MAX_DRAFT_NODES nodes, each pushing at most
  1/min_token_prob children, found without a scan: children are kept sorted by count
  (O(1) per increment, as in Arctic Inference's sibling groups).

The global trie learns a response when its sequence ends (the same per-token
extension), so a sequence never matches its own unfinished text there.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import ClassVar, Sequence

from pytest_specdec.drafter import MAX_DRAFT_NODES, Draft, DraftRequest, DrafterBase


class _Node:
    """The string that ends at ``seq[end]`` and starts ``depth - 1`` tokens before.

    ``children`` is None while the string occurred once (count 1): the node is then a
    lazy chain, and what followed it is read from ``seq`` itself.
    """

    __slots__ = ("count", "depth", "seq", "end", "seen", "children", "order", "rank",
                 "group_head")

    def __init__(self, depth: int, seq: Sequence[int], end: int, seen: int):
        self.count, self.depth, self.seq, self.end, self.seen = 1, depth, seq, end, seen
        self.rank = 0  # index in the parent's order
        # set once the string occurs twice: children by token, children by count
        # (highest first), and count -> first index in order with that count
        self.children: dict[int, _Node] | None = None
        self.order: list[_Node] | None = None
        self.group_head: dict[int, int] | None = None

    def materialize(self) -> None:
        self.children, self.order, self.group_head = {}, [], {}


#: A position in a trie: a node and how many tokens into its lazy chain (0 = the node).
Cursor = tuple[_Node, int]


@dataclass
class Candidate:
    tokens: list[int]
    parents: list[int]
    score: float = 0.0


class SuffixTrie:
    """Counts of every substring of at most ``max_depth`` tokens of the sequences added.

    ``visits`` counts the nodes touched by extension, cursor steps and draft growth:
    the measure of work that must not grow with the context.
    """

    def __init__(self, max_depth: int):
        self.max_depth = max_depth
        self.root = _Node(0, (), -1, 0)
        self.root.materialize()
        self.root.count = 0
        self.clock = 0  # tokens added so far: when a node was last seen, for ties
        self.visits = 0

    def extend(self, seq: Sequence[int], end: int, active: list[_Node]) -> list[_Node]:
        """Add the token ``seq[end]`` after the text whose active nodes (the suffixes
        that occurred before, root first) are ``active``; return the new active nodes."""
        token = seq[end]
        self.clock += 1
        self.root.count += 1
        deeper = [self.root]
        for node in active:
            self.visits += 1
            child = node.children.get(token)
            if child is None:
                self._add_child(node, _Node(node.depth + 1, seq, end, self.clock))
                continue
            if child.children is None:
                self._materialize(child)
            self._promote(node, child)
            child.seen = self.clock
            if child.depth < self.max_depth:
                deeper.append(child)
        return deeper

    def add_sequence(self, seq: Sequence[int]) -> None:
        active = [self.root]
        for end in range(len(seq)):
            active = self.extend(seq, end, active)

    def _add_child(self, parent: _Node, child: _Node) -> None:
        parent.children[child.seq[child.end]] = child
        child.rank = len(parent.order)
        parent.order.append(child)
        parent.group_head.setdefault(1, child.rank)  # count 1 is the last group

    def _materialize(self, node: _Node) -> None:
        # the string occurs a second time: its first occurrence's continuation becomes
        # an explicit (lazy) child
        node.materialize()
        following = node.end + 1
        if node.depth < self.max_depth and following < len(node.seq):
            self._add_child(node, _Node(node.depth + 1, node.seq, following, node.seen))

    def _promote(self, parent: _Node, child: _Node) -> None:
        # swap the child to the head of its count group, then count it once more: the
        # order stays sorted in O(1)
        count, order, heads = child.count, parent.order, parent.group_head
        head = heads[count]
        if head != child.rank:
            other = order[head]
            order[head], order[child.rank] = child, other
            other.rank, child.rank = child.rank, head
        if head + 1 < len(order) and order[head + 1].count == count:
            heads[count] = head + 1
        else:
            del heads[count]
        child.count = count + 1
        heads.setdefault(count + 1, head)

    # --- cursors ------------------------------------------------------------------------

    def step(self, cursor: Cursor, token: int) -> Cursor | None:
        """The cursor one token further along ``token``, or None if the trie lacks it."""
        self.visits += 1
        node, offset = cursor
        if node.depth + offset >= self.max_depth:
            return None
        if offset == 0 and node.children is not None:
            child = node.children.get(token)
            return None if child is None else (child, 0)
        following = node.end + offset + 1
        if following < len(node.seq) and node.seq[following] == token:
            return node, offset + 1
        return None

    def continuations(self, cursor: Cursor, prob: float,
                      min_prob: float) -> list[tuple[Cursor, float]]:
        """Children of a cursor with probability (prob * child count / count) at least
        min_prob: the most frequent first, ties to the most recently seen."""
        node, offset = cursor
        if offset == 0 and node.children is not None:
            found = []
            for child in node.order:
                child_prob = prob * child.count / node.count
                if child_prob < min_prob * (1 - 1e-9):  # sorted: the rest are rarer
                    break
                self.visits += 1
                found.append(((child, 0), child_prob))
            found.sort(key=lambda item: (-item[0][0].count, -item[0][0].seen))
            return found
        following = node.end + offset + 1
        if node.depth + offset < self.max_depth and following < len(node.seq):
            return [((node, offset + 1), prob)]  # a string seen once goes on for sure
        return []

    def has_continuation(self, cursor: Cursor) -> bool:
        node, offset = cursor
        if offset == 0 and node.children is not None:
            return bool(node.order)
        return node.depth + offset < self.max_depth and node.end + offset + 1 < len(node.seq)

    def count(self, tokens: Sequence[int]) -> int:
        """Occurrences of a string of at most max_depth tokens (0 if absent)."""
        cursor: Cursor | None = (self.root, 0)
        for token in tokens:
            cursor = self.step(cursor, token)
            if cursor is None:
                return 0
        node, offset = cursor
        return node.count if offset == 0 else 1

    def grow(self, start: Cursor, budget: int, max_depth: int, min_prob: float) -> Candidate:
        """Draft tree from a match.

        Scoring rule: a node's probability is the product of child count / parent
        count along its path from the match. Nodes are emitted most probable first
        (ties: the earlier pushed) until ``budget`` nodes are out or no node left has
        probability >= min_prob; nodes deeper than max_depth are not grown. The score
        is the sum of the emitted nodes' probabilities (the expected accepted length
        if the counts were the target's probabilities).
        """
        out = Candidate([], [])
        heap: list[tuple[float, int, Cursor, int, int]] = []
        pushed = 0
        for cursor, prob in self.continuations(start, 1.0, min_prob):
            heapq.heappush(heap, (-prob, pushed, cursor, -1, 1))
            pushed += 1
        while heap and len(out.tokens) < budget:
            neg_prob, _, (node, offset), parent, depth = heapq.heappop(heap)
            out.tokens.append(node.seq[node.end + offset])
            out.parents.append(parent)
            out.score += -neg_prob
            if depth < max_depth:
                index = len(out.tokens) - 1
                for cursor, prob in self.continuations((node, offset), -neg_prob, min_prob):
                    heapq.heappush(heap, (-prob, pushed, cursor, index, depth + 1))
                    pushed += 1
        return out


class SuffixDecoding(DrafterBase):
    """SuffixDecoding with a per-request and a global suffix trie.

    max_tree_depth: the longest substring counted, so the longest match (the method's 64).
    max_spec_factor / max_spec_offset: a match of m tokens may draft
        floor(max_spec_factor * m + max_spec_offset) nodes (at most MAX_DRAFT_NODES,
        at most k deep): longer matches are trusted with bigger drafts.
    min_token_prob: a draft node needs an empirical probability of at least this.
    use_global: also draft from the responses of earlier sequences in this case (every
        sample, round and problem); prompts are never added to the global trie.
    """

    # what the earlier responses are worth (the method's global tree)
    ablations: ClassVar[tuple[dict[str, str], ...]] = ({"use_global": "false"},)

    def __init__(self, max_tree_depth: int = 64, max_spec_factor: float = 1.0,
                 max_spec_offset: float = 0.0, min_token_prob: float = 0.1,
                 use_global: bool = True):
        if isinstance(max_tree_depth, bool) or not isinstance(max_tree_depth, int) \
                or max_tree_depth < 1:
            raise ValueError(f"max_tree_depth must be an int >= 1, got {max_tree_depth!r}")
        if not _is_number(max_spec_factor) or not max_spec_factor >= 0:
            raise ValueError("max_spec_factor must be a finite number >= 0, "
                             f"got {max_spec_factor!r}")
        if not _is_number(max_spec_offset):
            raise ValueError(f"max_spec_offset must be a finite number, got {max_spec_offset!r}")
        if not _is_number(min_token_prob) or not 0 < min_token_prob <= 1:
            raise ValueError(f"min_token_prob must be in (0, 1], got {min_token_prob!r}")
        if not isinstance(use_global, bool):
            raise ValueError(f"use_global must be True or False, got {use_global!r}")
        self.max_tree_depth, self.use_global = max_tree_depth, use_global
        self.max_spec_factor, self.max_spec_offset = float(max_spec_factor), float(max_spec_offset)
        self.min_token_prob = float(min_token_prob)
        self.global_trie = SuffixTrie(max_tree_depth)
        self.begin(DraftRequest((), ""))

    def begin(self, request: DraftRequest) -> None:
        self.request_trie = SuffixTrie(self.max_tree_depth)
        self._text: list[int] = []  # prompt + response, extended per accepted token
        self._prompt_len = len(request.prompt_ids)
        self._active = [self.request_trie.root]
        # cursors of the context's suffixes in the global trie, deepest first; only the
        # last max_tree_depth tokens can be part of a match
        self._global_cursors: list[Cursor] = []
        for token in request.prompt_ids:
            self._add_to_request(token)
        for token in request.prompt_ids[-self.max_tree_depth:]:
            self._advance_global(token)

    def accept(self, tokens: Sequence[int]) -> None:
        for token in tokens:
            self._add_to_request(token)
            self._advance_global(token)

    def _add_to_request(self, token: int) -> None:
        self._text.append(token)
        self._active = self.request_trie.extend(self._text, len(self._text) - 1, self._active)

    def _advance_global(self, token: int) -> None:
        if self.use_global:
            trie = self.global_trie
            moved = [trie.step(cursor, token) for cursor in self._global_cursors]
            moved.append(trie.step((trie.root, 0), token))
            self._global_cursors = [cursor for cursor in moved if cursor is not None]

    def end(self) -> None:
        response = self._text[self._prompt_len:]
        if self.use_global and response:
            self.global_trie.add_sequence(response)
        self.begin(DraftRequest((), ""))

    def propose(self, context: Sequence[int], k: int) -> Draft:
        # the tries and cursors already hold the context (extended in begin and accept)
        if k < 1:
            return Draft()
        # per-request: the deepest active node (root excluded) occurred before, earlier
        # in this text, so it has a continuation
        candidates = []
        if len(self._active) > 1:
            candidates.append(self._grow(self.request_trie, (self._active[-1], 0), k))
        if self.use_global:
            trie = self.global_trie
            match = next((c for c in self._global_cursors if trie.has_continuation(c)), None)
            if match is not None:
                candidates.append(self._grow(trie, match, k))
        # the higher score wins; a tie goes to the current text (listed first)
        best = max(candidates, key=lambda c: c.score, default=None)
        if best is None or not best.tokens:
            return Draft()
        if all(p == i - 1 for i, p in enumerate(best.parents)):
            return Draft(tuple(best.tokens))
        return Draft(tuple(best.tokens), tuple(best.parents))

    def _grow(self, trie: SuffixTrie, match: Cursor, k: int) -> Candidate:
        node, offset = match
        match_len = node.depth + offset
        # the method's adaptive length; 1e-6 keeps e.g. 0.7 * 10 from flooring to 6
        budget = math.floor(self.max_spec_factor * match_len + self.max_spec_offset + 1e-6)
        budget = max(0, min(budget, MAX_DRAFT_NODES))
        return trie.grow(match, budget, k, self.min_token_prob)


def _is_number(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
