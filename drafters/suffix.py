"""SuffixDecoding (Oliaro et al. 2024; Snowflake's Arctic Inference, vLLM's "suffix"
method): draft a tree of the continuations seen most often after the context's suffix.

Reference: snowflakedb/ArcticInference, ``csrc/suffix_decoding/suffix_tree.cc``
(``SuffixTree::speculate``, ``_speculate_tree``) and ``suffix_decoding/cache.py``
(``SuffixDecodingCache``), with its defaults: trie depth 64, ``max_spec_factor`` 1.0,
``max_spec_offset`` 0, ``min_token_prob`` 0.1.

Two tries hold every substring of at most ``max_tree_depth`` tokens with its number of
occurrences: a per-request trie over the current prompt and response, and a global trie
over the responses of this benchmark case (every sample, round and problem, the
current response included, added token by token as it is accepted, as the reference's
``add_active_response`` does; prompts stay out of it). As in ``speculate``, every
suffix of the context that occurs in a trie is a match: from a match of m tokens a
draft tree of at most floor(max_spec_factor * m + max_spec_offset) nodes is grown best
first (see ``SuffixTrie.grow``), scored by the sum of its nodes' probabilities, and the
best score over all match lengths wins (a tie to the longer match). The request trie's
best and the global trie's best then compete the same way (a tie to the request).
Scoring every match length matters near the trie depth: on a passage that repeats, the
longest match is almost ``max_tree_depth`` tokens and leaves room for one token, while
a shorter match drafts the full depth.

Deliberate differences from the reference:

- draft depth: the engine's k bounds a draft's depth (``max_depth`` 64, the trie
  depth, unless ``--specdec-k``); the node count follows the adaptive rule, at most
  MAX_DRAFT_NODES. The reference bounds the node count by ``max_spec_tokens`` (64).
- trees: drafts are ``_speculate_tree``'s trees (the paper's method). The reference's
  vLLM integration calls ``speculate`` with ``use_tree_spec`` off, a single path.
- ties between nodes of equal probability go to the earlier pushed (the reference's
  heap order is unspecified), siblings to the more frequent, then the more recently
  seen; scores are summed in float64, not float32.
- the global trie keeps every response of the case (the reference evicts the oldest
  beyond ``max_cached_requests``).
- match lengths are found per accepted token, not by rematching each suffix of the
  context's last 64 tokens from the root on every step; the candidates are the same.

Batched (``concurrent_sequences``): one instance serves every open sequence, and each
open response grows the global trie per accepted token, so siblings draft from each
other's responses as far as they have come. A response still growing may be caught up
by another: a string seen once, ending at the growing response's last token, that
another response repeats becomes one of the growing response's active nodes
(``SuffixTrie.track``), so its next token is counted under it. At batch 1 only the
current response grows and that never happens.

Cost per step does not grow with the context:

- extending a trie by one token touches only the "active" nodes, the suffixes of the
  text that occurred before (at most ``max_tree_depth``). A string seen once is not
  stored node by node but as its first node plus a reference into its sequence (a lazy
  chain), which is also why a new token costs nothing for the suffixes seen only once;
  a lazy node gets explicit children when its string occurs a second time.
- the per-request trie's active nodes are its match set. In the global trie the
  current response's active nodes are the matches of up to len(response) tokens; the
  longer ones begin in the prompt (which that trie lacks) and are followed by at most
  ``max_tree_depth`` cursors, set up in ``begin`` and advanced per accepted token
  until they fall off (at the latest when the response is ``max_tree_depth`` long).
- growing a draft emits at most MAX_DRAFT_NODES nodes, each pushing at most
  1/min_token_prob children, found without a scan: children are kept sorted by count
  (O(1) per increment, as in Arctic Inference's sibling groups). At most
  ``max_tree_depth`` matches per trie are grown, and fewer in practice: a draft from a
  match of m tokens scores at most min(its node budget, k, max_tree_depth - m) (each
  level's probabilities sum to at most 1), so matches are tried in order of that bound
  and the search stops once no bound can beat the best score.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import ClassVar, Sequence

from pytest_specdec.protocol.drafter import (MAX_DRAFT_NODES, ConcurrentDrafterBase, Draft,
                                             DraftRequest, SequenceDrafter)
from pytest_specdec.protocol.drafting import tree_draft


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
        # per sequence still growing (by id), its active nodes: see _materialize
        self.growing: dict[int, list[_Node]] = {}

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
        if id(seq) in self.growing:
            self.growing[id(seq)] = deeper
        return deeper

    def track(self, seq: Sequence[int], active: list[_Node]) -> None:
        """`seq` grows through :meth:`extend` while other sequences grow too (batched
        sequences): see :meth:`_materialize`."""
        self.growing[id(seq)] = active

    def untrack(self, seq: Sequence[int]) -> None:
        self.growing.pop(id(seq), None)

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
        elif node.depth < self.max_depth and (tip := self.growing.get(id(node.seq))) is not None:
            # the string ends where its (growing) sequence ends now: it is one of that
            # sequence's suffixes that now occurred before, so an active node of it;
            # without this, its next token would never be counted under it. Happens
            # only when another sequence catches up with a growing one (batched)
            tip.append(node)

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

    def normalize(self, cursor: Cursor) -> Cursor:
        """The same string as a cursor valid now: a lazy chain that got explicit
        children since the cursor was made is followed into them."""
        node, offset = cursor
        while offset and node.children is not None:
            self.visits += 1
            node, offset = node.children[node.seq[node.end + 1]], offset - 1
        return node, offset

    def step(self, cursor: Cursor, token: int) -> Cursor | None:
        """The cursor one token further along ``token``, or None if the trie lacks it."""
        self.visits += 1
        node, offset = self.normalize(cursor)
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

    def first_level(self, cursor: Cursor, min_prob: float) -> tuple[float, float]:
        """(largest, total) probability of the cursor's children with probability at
        least min_prob, as ``continuations`` finds them, without building the list."""
        node, offset = cursor
        if offset == 0 and node.children is not None:
            top = total = 0.0
            for child in node.order:  # sorted by count: the first is the likeliest
                prob = child.count / node.count
                if prob < min_prob * (1 - 1e-9):
                    break
                self.visits += 1
                top = max(top, prob)
                total += prob
            return top, total
        if node.depth + offset < self.max_depth and node.end + offset + 1 < len(node.seq):
            return 1.0, 1.0
        return 0.0, 0.0

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


class SuffixDecoding(ConcurrentDrafterBase):
    """SuffixDecoding with a per-request and a global suffix trie.

    max_tree_depth: the longest substring counted, so the longest match (the method's 64).
    max_spec_factor / max_spec_offset: a match of m tokens may draft
        floor(max_spec_factor * m + max_spec_offset) nodes (at most MAX_DRAFT_NODES,
        at most k deep): longer matches are trusted with bigger drafts.
    min_token_prob: a draft node needs an empirical probability of at least this.
    use_global: also draft from the global trie of this case's responses (every
        sample, round and problem, the current response as it is generated); prompts
        are never added to it.

    Concurrent (``concurrent_sequences``): each open sequence is a :class:`_Speculation`
    with its own request trie; every open response grows the one global trie per
    accepted token, so a sequence drafts from its siblings' responses as they are
    generated (as the reference's ``add_active_response`` for concurrent requests).
    """

    # what the earlier responses are worth (the method's global tree)
    ablations: ClassVar[tuple[dict[str, str], ...]] = ({"use_global": "false"},)
    max_depth: ClassVar[int] = 64  # the cap: the tree depth; the adaptive size rules

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

    def open(self, request: DraftRequest) -> "_Speculation":
        return _Speculation(self, request)

    @property
    def request_trie(self) -> SuffixTrie | None:
        """The request trie of the sequence begun with ``begin`` (tests read it)."""
        return self._single.request_trie if self._single is not None else None

    @property
    def last_match(self) -> tuple[str, int, float] | None:
        """What the last proposal of the sequence begun with ``begin`` came from."""
        return self._single.last_match if self._single is not None else None


    # --- drafting rules, shared by every open sequence ---------------------------------

    def budget(self, match_len: int) -> int:
        """Draft nodes a match of ``match_len`` tokens may grow: the method's adaptive
        rule; 1e-6 keeps e.g. 0.7 * 10 from flooring to 6 (as the reference)."""
        budget = math.floor(self.max_spec_factor * match_len + self.max_spec_offset + 1e-6)
        return max(0, min(budget, MAX_DRAFT_NODES))

    def _best(self, trie: SuffixTrie, matches: list[tuple[Cursor, int]], k: int,
              longest: int) -> tuple[int, Candidate | None]:
        """The best-scoring draft over every match (cursor, length), a tie to the longer
        match: the reference's loop over match lengths, pruned by an upper bound on a
        draft's score read off the match's children (see ``score_bound``). Returns
        (match length, draft), (0, None) without a match that drafts."""
        bounded = []
        for cursor, length in matches:
            if 1 <= length <= longest:
                bound = self.score_bound(trie, cursor, length, k)
                if bound > 0:
                    bounded.append((bound, length, cursor))
        bounded.sort(key=lambda item: (item[0], item[1]), reverse=True)
        best: Candidate | None = None
        best_len = 0
        for bound, length, cursor in bounded:
            if best is not None:
                if bound < best.score - _TIE:
                    break  # sorted by bound: nothing after can win either
                if bound <= best.score + _TIE and length < best_len:
                    continue  # at best a tie, and a tie goes to the longer match
            draft = trie.grow(cursor, self.budget(length), k, self.min_token_prob)
            if best is None or draft.score > best.score + _TIE or (
                    draft.score >= best.score - _TIE and length > best_len):
                best, best_len = draft, length
        return best_len, best

    def score_bound(self, trie: SuffixTrie, cursor: Cursor, length: int, k: int) -> float:
        """At least the score of the draft grown from a match of ``length`` tokens.

        Every node descends from a child of the match with probability >= min_prob, so
        its probability is at most the likeliest child's (``top``), and the nodes of one
        depth sum to at most those children's total (``mass``: occurrences of a string
        split among its children). Hence score <= min(budget * top, room * mass), the
        room being the depth a draft may use: k, and what the trie holds past the match.
        """
        budget = self.budget(length)
        room = min(k, self.max_tree_depth - length)
        if budget <= 0 or room <= 0:
            return 0.0
        top, mass = trie.first_level(cursor, self.min_token_prob)
        return min(budget * top, room * mass)

class _Speculation(SequenceDrafter):
    """One open sequence of a :class:`SuffixDecoding`: its request trie, and its
    response's place in the global trie (active nodes, prompt cursors)."""

    def __init__(self, drafter: SuffixDecoding, request: DraftRequest):
        self.drafter = drafter
        self.request_trie = SuffixTrie(drafter.max_tree_depth)
        self._text: list[int] = []  # prompt + response, extended per accepted token
        self._active = [self.request_trie.root]
        # the current response, added to the global trie token by token, and its
        # active nodes there: the context's suffixes within the response that occurred
        # before, the global matches of up to len(response) tokens
        self._response: list[int] = []
        self._response_active = [drafter.global_trie.root]
        # cursors of the context's longer suffixes (they begin in the prompt) in the
        # global trie; only the last max_tree_depth tokens can be part of a match
        self._global_cursors: list[Cursor] = []
        # what the last proposal came from: (trie, match length, score); None if empty
        self.last_match: tuple[str, int, float] | None = None
        self.is_open = True
        for token in request.prompt_ids:
            self._add_to_request(token)
        if drafter.use_global:
            trie = drafter.global_trie
            trie.track(self._response, self._response_active)
            for token in request.prompt_ids[-drafter.max_tree_depth:]:
                moved = [trie.step(cursor, token) for cursor in self._global_cursors]
                moved.append(trie.step((trie.root, 0), token))
                self._global_cursors = [cursor for cursor in moved if cursor is not None]

    def accept(self, tokens: Sequence[int]) -> None:
        use_global, trie = self.drafter.use_global, self.drafter.global_trie
        for token in tokens:
            self._add_to_request(token)
            if use_global:
                self._response.append(token)
                self._response_active = trie.extend(self._response, len(self._response) - 1,
                                                    self._response_active)
                # a suffix that begins in the prompt stays one, a token longer (the
                # shorter ones are the response's active nodes)
                if self._global_cursors:
                    moved = [trie.step(cursor, token) for cursor in self._global_cursors]
                    self._global_cursors = [cursor for cursor in moved if cursor is not None]

    def _add_to_request(self, token: int) -> None:
        self._text.append(token)
        self._active = self.request_trie.extend(self._text, len(self._text) - 1, self._active)

    def end(self) -> None:
        # the response is in the global trie already (added per accepted token)
        if self.is_open:
            self.is_open = False
            self.drafter.global_trie.untrack(self._response)

    def propose(self, context: Sequence[int], k: int) -> Draft:
        # the tries and cursors already hold the context (extended in begin and accept)
        drafter = self.drafter
        self.last_match = None
        if k < 1 or not self.is_open:
            return Draft()
        # a match is a proper suffix of the context (the reference matches lengths
        # 1 .. len(context) - 1); request: the active nodes (root excluded) are the
        # suffixes that occurred before, earlier in this text
        longest = len(self._text) - 1
        request = [((node, 0), node.depth) for node in self._active[1:]]
        candidates = [("request", *drafter._best(self.request_trie, request, k, longest))]
        if drafter.use_global:
            trie = drafter.global_trie
            cursors = [trie.normalize(cursor) for cursor in self._global_cursors]
            matches = [(cursor, cursor[0].depth + cursor[1]) for cursor in cursors]
            matches += [((node, 0), node.depth) for node in self._response_active[1:]]
            candidates.append(("global", *drafter._best(trie, matches, k, longest)))
        # the higher score wins; a tie goes to the current text (listed first)
        source, length, best = candidates[0]
        for other in candidates[1:]:
            if other[2] is not None and (best is None or other[2].score > best.score + _TIE):
                source, length, best = other
        if best is None or not best.tokens:
            return Draft()
        self.last_match = (source, length, best.score)
        return tree_draft(best.tokens, best.parents)


#: Scores closer than this are a tie (they are sums of float ratios).
_TIE = 1e-9


def _is_number(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
