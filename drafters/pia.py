"""PIA (Zhao et al., "Lookahead: An Inference Acceleration Framework for Large Language
Model with Lossless Generation Accuracy", KDD 2024; "PIA" after its code base,
PainlessInferenceAcceleration): multi-branch tree drafts retrieved from a global trie
of token n-grams.

The trie. Every window of ``branch_length + 1`` consecutive tokens, from the prompts
and from the generated outputs, is a path from the root; a node counts the
occurrences of the n-gram its path spells (an occurrence counts as prompt or output
by its last token). One trie serves every sequence the drafter sees: the samples and
rounds of one problem and all later problems, as the paper keeps one trie for all
queries.

Updates, the paper's three:
- branch inserting: the prompt at ``begin``, each accepted token at ``accept``;
- branch eliminating: the current prompt's counts are removed at ``end`` (they help
  the sequence that copies from its prompt, not the next problem), and nodes left
  with no count and no children are deleted;
- node pruning: past ``capacity`` nodes, childless nodes with an output count of at
  most 1 (and none from the current prompt) are deleted and the other output counts
  halved, round after round, until half the capacity is left (the reference code's
  squeeze).

Retrieval, the paper's multi-stage retrieval: the last ``max_prefix`` tokens of the
context are looked up as a path, longest first; a shorter prefix is tried only while
the draft has fewer nodes than one full branch (min(k, branch_length)), and it
replaces the longer prefix's draft only when it is larger. From the matched node the
draft is the best-first tree of its descendants: the ``max_nodes`` most frequent
nodes, each one only after its parent, at most min(k, branch_length) deep.

Cost per step does not grow with the context: ``accept`` extends the (at most
branch_length + 1) open windows by one node each, a dict lookup and a re-rank in the
parent's sorted child list; ``propose`` walks at most max_prefix prefixes and pops at
most max_nodes heap entries per prefix, reading children from those sorted lists, so
a node with thousands of children costs no more than one with two. Pruning touches
the whole trie but runs once per capacity / (2 * (branch_length + 1)) tokens at the
soonest: amortized, bounded. ``visits`` counts the trie nodes each call touches.
"""

from __future__ import annotations

import heapq
from bisect import bisect_right
from typing import Sequence

from pytest_specdec.drafter import MAX_DRAFT_NODES, Draft, DraftRequest, DrafterBase


class TrieNode:
    __slots__ = ("token", "parent", "depth", "children", "ranked", "is_ranked",
                 "output", "prompt", "dead")

    def __init__(self, token: int, parent: TrieNode | None, depth: int):
        self.token, self.parent, self.depth = token, parent, depth
        self.children: dict[int, TrieNode] = {}
        # the highest-count children, most frequent first (ties: first to get there)
        self.ranked: list[TrieNode] = []
        self.is_ranked = False  # in the parent's ranked list
        self.output = 0.0  # occurrences ending in generated text (halved by pruning)
        self.prompt = 0  # occurrences ending in the current prompt
        self.dead = False  # removed from the trie

    @property
    def count(self) -> float:
        return self.output + self.prompt


def _minus_count(node: TrieNode) -> float:
    return -node.count


class NgramTrie:
    """Token windows of ``branch_length + 1`` with occurrence counts; ``width`` children
    of each node are kept ranked by count, ``capacity`` bounds the node count."""

    def __init__(self, branch_length: int, width: int, capacity: int):
        self.branch_length, self.width, self.capacity = branch_length, width, capacity
        self.root = TrieNode(-1, None, 0)
        self.size = 0  # nodes, root excluded
        self.limit = capacity  # prune past this many nodes
        self.windows: list[TrieNode] = []  # last node of each open window, oldest first
        self.prompt_nodes: set[TrieNode] = set()  # nodes the current prompt counted
        self.visits = 0

    def extend(self, token: int, *, prompt: bool) -> None:
        """Append one token to the text: every open window, and a new one, grows by it."""
        grown = []
        for node in (*self.windows, self.root):
            child = node.children.get(token)
            if child is None:
                child = node.children[token] = TrieNode(token, node, node.depth + 1)
                self.size += 1
            if prompt:
                child.prompt += 1
                self.prompt_nodes.add(child)
            else:
                child.output += 1.0
            self._rerank(node, child)
            self.visits += 1
            if child.depth <= self.branch_length:  # a window closes at branch_length + 1
                grown.append(child)
        self.windows = grown
        if self.size > self.limit:
            self.prune()

    def _rerank(self, node: TrieNode, child: TrieNode) -> None:
        """child's count just grew: move it up node.ranked, or into it."""
        ranked = node.ranked
        if child.is_ranked:
            ranked.remove(child)
        elif len(ranked) >= self.width:
            if ranked[-1].count >= child.count:
                return
            ranked.pop().is_ranked = False
        ranked.insert(bisect_right(ranked, -child.count, key=_minus_count), child)
        child.is_ranked = True

    def _rank_all(self, node: TrieNode) -> None:
        for child in node.ranked:
            child.is_ranked = False
        if len(node.children) > 1:
            node.ranked = heapq.nlargest(self.width, node.children.values(),
                                         key=lambda n: n.count)
        else:
            node.ranked = list(node.children.values())
        for child in node.ranked:
            child.is_ranked = True

    def _detach(self, node: TrieNode) -> TrieNode:
        """Remove a childless node; returns its parent. Dropping the parent link breaks
        the reference cycle, so the node is freed at once, not by a garbage collection."""
        parent = node.parent
        del parent.children[node.token]
        node.parent, node.ranked, node.dead = None, [], True
        self.size -= 1
        return parent

    def find(self, tokens: Sequence[int], start: int) -> TrieNode | None:
        """The node spelling tokens[start:], or None."""
        node = self.root
        for i in range(start, len(tokens)):
            node = node.children.get(tokens[i])
            self.visits += 1
            if node is None:
                return None
        return node

    def eliminate_prompt(self) -> None:
        """Branch eliminating: drop the current prompt's counts, then the nodes left
        with no count and no children."""
        touched = set()
        for node in self.prompt_nodes:
            node.prompt = 0
        for node in self.prompt_nodes:
            if node.dead:
                continue
            touched.add(node.parent)
            while node.parent is not None and not node.children and node.output <= 0:
                node = self._detach(node)
                touched.add(node)
        for node in touched:
            if not node.dead:
                self._rank_all(node)
        self.prompt_nodes = set()

    def keep_prompt(self) -> None:
        """The current prompt's counts become ordinary history."""
        for node in self.prompt_nodes:
            node.output += node.prompt
            node.prompt = 0
        self.prompt_nodes = set()

    def prune(self) -> None:
        """Node pruning: halve output counts, deleting childless nodes that had at most
        1 and no prompt count, until the trie is down to half its capacity or only
        nodes of the current prompt (and their ancestors) are left."""
        while self.size > self.capacity // 2:
            if self._decay(self.root) <= 1.0:
                break  # every output count was at most 1: nothing more can go
        self._rank_subtree(self.root)
        self.windows = [node for node in self.windows if not node.dead]
        self.prompt_nodes = {node for node in self.prompt_nodes if not node.dead}
        # a prompt larger than the capacity cannot be pruned away: wait for as many
        # new nodes as a normal prune frees, so pruning stays amortized O(1) per node
        self.limit = max(self.capacity, self.size + self.capacity // 2)

    def _decay(self, node: TrieNode) -> float:
        """One halving round under node; returns the largest output count it saw."""
        largest = 0.0
        for child in list(node.children.values()):
            largest = max(largest, self._decay(child), child.output)
            self.visits += 1
            if child.output <= 1.0 and child.prompt == 0 and not child.children:
                self._detach(child)
            else:
                child.output /= 2
        return largest

    def _rank_subtree(self, node: TrieNode) -> None:
        self._rank_all(node)
        for child in node.children.values():
            self._rank_subtree(child)


class PiaTrie(DrafterBase):
    """PIA: tree drafts of the most frequent continuations in a global n-gram trie.

    branch_length: tokens inserted after each position (the paper's branch length);
        also the deepest draft.
    max_nodes: most nodes in a draft tree (the paper's decoding length, 64, counts the
        last accepted token too); at most MAX_DRAFT_NODES.
    max_prefix: longest context suffix matched in the trie (the reference code queries
        with the last 2 tokens); at most branch_length.
    capacity: most trie nodes before node pruning.
    eliminate_prompt_branches: remove a prompt's counts when its sequence ends (the
        paper's branch eliminating); off, they stay as ordinary history.
    """

    def __init__(self, branch_length: int = 12, max_nodes: int = 63, max_prefix: int = 2,
                 capacity: int = 1 << 19, eliminate_prompt_branches: bool = True):
        if not 1 <= branch_length <= MAX_DRAFT_NODES:
            raise ValueError(f"branch_length must be in [1, {MAX_DRAFT_NODES}], "
                             f"got {branch_length}")
        if not 1 <= max_nodes <= MAX_DRAFT_NODES:
            raise ValueError(f"max_nodes must be in [1, {MAX_DRAFT_NODES}], got {max_nodes}")
        if not 1 <= max_prefix <= branch_length:
            raise ValueError(f"max_prefix must be in [1, branch_length={branch_length}], "
                             f"got {max_prefix}")
        if capacity < 2 * (branch_length + 1):
            raise ValueError(f"capacity must be at least 2 * (branch_length + 1) = "
                             f"{2 * (branch_length + 1)} nodes, got {capacity}")
        self.branch_length, self.max_nodes, self.max_prefix = branch_length, max_nodes, max_prefix
        self.eliminate_prompt_branches = eliminate_prompt_branches
        # max_nodes ranked children per node: enough for the exact top max_nodes tree
        self.trie = NgramTrie(branch_length, max_nodes, capacity)
        self._open = False

    @property
    def visits(self) -> int:
        """Trie nodes touched so far (the work measure of the cost bound)."""
        return self.trie.visits

    def begin(self, request: DraftRequest) -> None:
        if self._open:
            self.end()
        self._open = True
        self.trie.windows = []
        for token in request.prompt_ids:
            self.trie.extend(token, prompt=True)

    def propose(self, context: Sequence[int], k: int) -> Draft:
        depth = min(k, self.branch_length)
        best: tuple[list[int], list[int]] = ([], [])
        for m in range(min(self.max_prefix, len(context)), 0, -1):
            if len(best[0]) >= depth:  # a full branch's worth: no need for a shorter prefix
                break
            node = self.trie.find(context, len(context) - m)
            if node is not None:
                found = self._gather(node, depth)
                if len(found[0]) > len(best[0]):
                    best = found
        tokens, parents = best
        if all(p == i - 1 for i, p in enumerate(parents)):
            return Draft(tuple(tokens))
        return Draft(tuple(tokens), tuple(parents))

    # Scoring rule: a node's score is its count (prompt + output occurrences). Best-first
    # from the matched node: the heap holds, for each drafted node, its best undrafted
    # child, and for each drafted child its next sibling, so the draft is the max_nodes
    # highest-count descendants with every node after its parent. Equal counts: the
    # deeper node first (an occurrence's continuation is drafted as a whole branch, the
    # reference code's depth-first order), then the one offered first.
    def _gather(self, start: TrieNode, depth: int) -> tuple[list[int], list[int]]:
        tokens: list[int] = []
        parents: list[int] = []
        heap: list[tuple[float, int, int, int, TrieNode, int]] = []
        offered = 0

        def offer(node: TrieNode, rank: int, parent_index: int, level: int) -> None:
            nonlocal offered
            if rank < len(node.ranked) and node.ranked[rank].count > 0:
                heapq.heappush(heap, (-node.ranked[rank].count, -level, offered, rank, node,
                                      parent_index))
                offered += 1

        offer(start, 0, -1, 1)
        while heap and len(tokens) < self.max_nodes:
            _, minus_level, _, rank, node, parent_index = heapq.heappop(heap)
            level = -minus_level
            child = node.ranked[rank]
            self.trie.visits += 1
            tokens.append(child.token)
            parents.append(parent_index)
            offer(node, rank + 1, parent_index, level)
            if level < depth:
                offer(child, 0, len(tokens) - 1, level + 1)
        return tokens, parents

    def accept(self, tokens: Sequence[int]) -> None:
        for token in tokens:
            self.trie.extend(token, prompt=False)

    def end(self) -> None:
        if not self._open:
            return
        self._open = False
        if self.eliminate_prompt_branches:
            self.trie.eliminate_prompt()
        else:
            self.trie.keep_prompt()
        self.trie.windows = []
