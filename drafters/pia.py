"""PIA (Zhao et al., "Lookahead: An Inference Acceleration Framework for Large Language
Model with Lossless Generation Accuracy", KDD 2024; "PIA" after its code base,
PainlessInferenceAcceleration): multi-branch tree drafts retrieved from a trie of the
token branches that followed each token, in the prompts and in the outputs.

Reference: alipay/PainlessInferenceAcceleration, ``lookahead/common/lookahead_cache.py``
(``LookaheadCache.put``/``stream_put``/``hier_get``, ``Tree.get``/``_ravel``/
``squeeze``) as ``pretrained_model.py`` calls it: decoding mode ``hier_mix``, decoding
length 64 (the root and 63 draft nodes), branch length 12, a 2-token query,
``min_input_size`` 0, ``min_output_size`` 32, ``output_weight`` 1e-4.

The trie. For every token, a tree of the branches that followed it: each position of
the text adds the next ``branch_length + 1`` tokens, as a path, to the tree of the
token there. A node counts how many branches passed through it, separately from the
prompt (``prompt``) and from the generated outputs (``output``). The prompt's first
token is not a key (the reference inserts ``input_ids[1:]``), a prompt's branches stop
at the prompt's end, and an output's start at its first token. One trie serves every
sequence the drafter sees: the samples and rounds of one problem and all later
problems, as the reference keeps one cache for all queries. Batched
(``concurrent_sequences``), every open sequence extends that trie per accepted token
through its own open branches, so siblings draft from each other's outputs (and the
other problems' of the batch, as at batch 1) as they are generated.

Retrieval (``hier_get``). With the last ``max_prefix`` tokens q1..qm of the context:
the tree of q1 is searched for q2..qm, then the tree of q2 for q3..qm, and so on; a
search's draft replaces the previous one (even when smaller), and the search stops
once a draft has at least depth - 1 nodes (the reference's ``len(ids) >= branch_length``,
ids counting the root), depth being min(k, branch_length). A search (``Tree.get``)
follows the query tokens from the tree's root, each node needing a count (none is
checked for an empty query); from the node reached:

- *live* nodes are those with a prompt or an output count, reached through live nodes;
- scoring: siblings are ordered by ``(1 - output_weight) * prompt + output_weight *
  output`` (prompt counts decide, output counts break ties; equal scores keep the
  order in which the nodes were created);
- when more than max_nodes + 1 nodes are live, a node is drafted only if its output
  count is at least the ``(max_nodes + 1) // 2``-th largest output count among them
  (what the reference's selection amounts to: its mix fill collects node ids that are
  all None, so only the ``min_output_size`` threshold remains); otherwise every node
  is eligible, even one whose counts were reset to 0;
- the draft lists eligible nodes depth first, each node's subtree before its next
  sibling, at most depth deep and max_nodes nodes.

Updates, the reference's:

- branch inserting: the prompt at ``begin``, each accepted token at ``accept``;
- branch eliminating: at ``end`` the prompt counts of the sequence are reset to 0
  (``reset_input_freqs``; batched, only the sequence's own counts are taken back); the
  nodes stay;
- pruning (``squeeze``), per sequence: at ``end``, once the trees changed since the
  last pruning are at least :data:`SQUEEZE_AFTER_TREES` (1024), every one of them
  holding more than ``max_output_nodes`` output nodes (or :data:`MAX_TREE_NODES`
  nodes) halves its output counts, dropping each node (with its subtree) whose output
  count is at most 1; its node counts are then recounted, all as output nodes.

Deliberate differences from the reference:

- an output's branches are counted as its tokens are accepted; the reference inserts
  a position's branch only once the ``branch_length + 1`` tokens after it exist (and
  the last ones at the end), so here a repeat within the last 13 tokens of the
  output can already be drafted. The counts after a sequence are the same;
- every tree a sequence changed counts toward the pruning's 1024 (the reference's
  prompt insertion leaves out the trees it creates unless it touches them again);
- no stop words and no end-of-sequence cut (the engine's outputs end where they end);
- the reference's drafts hold the last accepted token as their root; here the root
  is implicit (``Draft`` parents of -1), so max_nodes counts draft nodes only.

Cost: ``accept`` extends at most ``branch_length + 1`` open branches by one node each.
``propose`` makes at most max_prefix searches; each counts live nodes until max_nodes
+ 2, finds the output threshold best first (:func:`pytest_specdec.protocol.drafting.best_first`,
at most (max_nodes + 1) // 2 nodes taken) and sorts the children of each node it
visits, as the reference does, so its work follows the fan-out of the matched nodes,
not the context's length. ``visits`` counts the trie nodes each call touches.
"""

from __future__ import annotations

from typing import Sequence

from pytest_specdec.protocol.drafter import (MAX_DRAFT_NODES, ConcurrentDrafterBase, Draft,
                                             DraftRequest, SequenceDrafter)
from pytest_specdec.protocol.drafting import best_first, tree_draft

#: The reference's weight of output counts against prompt counts (``output_weight``).
OUTPUT_WEIGHT = 1e-4
#: Pruning waits until this many trees changed since the last one (the reference's
#: ``squeeze_branch_counts``).
SQUEEZE_AFTER_TREES = 1024
#: A tree with more nodes than this is pruned too (the reference's ``max_node``).
MAX_TREE_NODES = 65536


class TrieNode:
    """A token of a branch: its children and how many branches passed through it."""

    __slots__ = ("children", "prompt", "output")

    def __init__(self) -> None:
        self.children: dict[int, TrieNode] = {}
        self.prompt = 0.0  # branches from the current prompts (reset when they end)
        self.output = 0.0  # branches from outputs (halved by pruning)

    def live(self) -> bool:
        return self.prompt > 0 or self.output > 0

    def score(self) -> float:
        """The reference's mix score: prompt counts decide, output counts break ties."""
        return (1.0 - OUTPUT_WEIGHT) * self.prompt + OUTPUT_WEIGHT * self.output


class KeyTree(TrieNode):
    """The branches that followed one token (the reference's ``Tree``); ``nodes`` and
    ``output_nodes`` count its nodes as the reference does, for pruning."""

    __slots__ = ("nodes", "output_nodes")

    def __init__(self) -> None:
        super().__init__()
        self.nodes = 0
        self.output_nodes = 0  # created by outputs since the last pruning, then all


class Branches:
    """What one open sequence has in a :class:`BranchTrie`: its open branches (per
    branch: its key token, the node it reached (None: none yet, the key's tree is made
    by the branch's first token) and its length so far) and the nodes its prompt
    counted, uncounted at its end."""

    __slots__ = ("open", "prompt_nodes")

    def __init__(self) -> None:
        self.open: list[tuple[int, TrieNode | None, int]] = []
        self.prompt_nodes: list[TrieNode] = []


class BranchTrie:
    """The trees of every key token, with the reference's updates (see the module
    docstring); ``visits`` counts the nodes touched. Every open sequence extends it
    through its own :class:`Branches`."""

    def __init__(self, branch_length: int, max_output_nodes: int = 512,
                 squeeze_after: int = SQUEEZE_AFTER_TREES,
                 max_tree_nodes: int = MAX_TREE_NODES):
        self.length = branch_length + 1  # tokens in a branch after its key
        self.max_output_nodes, self.max_tree_nodes = max_output_nodes, max_tree_nodes
        self.squeeze_after = squeeze_after
        self.trees: dict[int, KeyTree] = {}
        self.changed: set[int] = set()  # key tokens whose trees changed since pruning
        self.visits = 0

    def extend(self, token: int, branches: Branches, *, prompt: bool) -> None:
        """A sequence's text grew by `token`: every open branch of it takes it, and one
        opens at it."""
        grown = []
        for key, node, depth in branches.open:
            tree = self.trees.get(key)
            if tree is None:
                tree = self.trees[key] = KeyTree()
            if node is None:
                node = tree
            self.changed.add(key)
            child = node.children.get(token)
            if child is None:
                child = node.children[token] = TrieNode()
                tree.nodes += 1
                if not prompt:
                    tree.output_nodes += 1
            if prompt:
                child.prompt += 1
                branches.prompt_nodes.append(child)
            else:
                child.output += 1
            self.visits += 1
            if depth + 1 < self.length:
                grown.append((key, child, depth + 1))
        grown.append((token, None, 0))
        branches.open = grown

    def close(self, branches: Branches) -> None:
        """A sequence's branches stop here (the end of a prompt or of an output)."""
        branches.open = []

    def end_sequence(self, branches: Branches) -> None:
        """Branch eliminating, then pruning when due (the reference's ``final`` put).

        The sequence's own prompt counts are taken back (the reference sets them to 0,
        the same at batch 1, where no other prompt is counted then; a sibling's open
        prompt keeps its counts)."""
        self.close(branches)
        for node in branches.prompt_nodes:
            node.prompt -= 1.0
        branches.prompt_nodes = []
        if len(self.changed) >= self.squeeze_after:
            for key in self.changed:
                tree = self.trees[key]
                if tree.nodes > self.max_tree_nodes or tree.output_nodes > self.max_output_nodes:
                    self._squeeze(tree)
                    tree.nodes = tree.output_nodes = self._count(tree)
            self.changed = set()

    def _squeeze(self, node: TrieNode) -> None:
        for token, child in list(node.children.items()):
            self.visits += 1
            if child.output > 1.0:
                child.output *= 0.5
                self._squeeze(child)
            else:
                del node.children[token]

    def _count(self, node: TrieNode) -> int:
        stack, total = [node], 0
        while stack:
            children = stack.pop().children
            total += len(children)
            stack.extend(children.values())
        return total

    # --- retrieval -----------------------------------------------------------------------

    def get(self, query: Sequence[int], max_nodes: int, depth: int) -> list[tuple[int, int]] | None:
        """``hier_get``: the draft, as (token, parent) pairs, of the last search that
        found a tree; None when no query token has one."""
        found = None
        for i, token in enumerate(query):
            tree = self.trees.get(token)
            if tree is None:
                continue
            found = self.search(tree, query[i + 1:], max_nodes, depth)
            if len(found) + 1 >= depth:  # the reference counts the root: len(ids)
                break
        return found

    def search(self, tree: KeyTree, rest: Sequence[int], max_nodes: int,
               depth: int) -> list[tuple[int, int]]:
        """``Tree.get``: from the node spelling `rest` in `tree`, the draft nodes."""
        children = tree.children
        for token in rest:
            node = children.get(token)
            self.visits += 1
            if node is None or not node.live():
                return []
            children = node.children
        if not children:
            return []
        threshold = None
        if self._live_more_than(children, max_nodes + 1):
            threshold = self._output_threshold(children, max(1, (max_nodes + 1) // 2))
        out: list[tuple[int, int]] = []
        self._ravel(children, -1, depth, max_nodes, threshold, out)
        return out

    def _live_more_than(self, children: dict[int, TrieNode], limit: int) -> bool:
        """Whether more than `limit` nodes under `children` are live (stops counting
        there)."""
        stack, live = [children], 0
        while stack:
            for node in stack.pop().values():
                self.visits += 1
                if node.live():
                    live += 1
                    if live > limit:
                        return True
                    stack.append(node.children)
        return False

    def _output_threshold(self, children: dict[int, TrieNode], rank: int) -> float:
        """The `rank`-th largest output count under `children` (0 if fewer nodes have
        one). An output count is never above its parent's, so the largest are found
        best first, without reading the rest."""
        def by_output(nodes: dict[int, TrieNode]) -> list[TrieNode]:
            self.visits += len(nodes)
            return sorted((n for n in nodes.values() if n.output > 0),
                          key=lambda n: n.output, reverse=True)

        top, _ = best_first(by_output(children), lambda n: by_output(n.children),
                            lambda n: -n.output, rank, self.length + 1)
        return top[-1].output if len(top) == rank else 0.0

    def _ravel(self, children: dict[int, TrieNode], parent: int, depth: int, max_nodes: int,
               threshold: float | None, out: list[tuple[int, int]]) -> None:
        """``Tree._ravel``: eligible nodes depth first, siblings by score."""
        if len(out) >= max_nodes or depth <= 0:
            return
        self.visits += len(children)
        ranked = sorted(children.items(), key=lambda item: item[1].score(), reverse=True)
        for token, node in ranked:
            if len(out) >= max_nodes:
                return
            if threshold is not None and node.output < threshold:
                continue
            out.append((token, parent))
            if node.children:
                self._ravel(node.children, len(out) - 1, depth - 1, max_nodes, threshold, out)


class PiaTrie(ConcurrentDrafterBase):
    """PIA: depth-first tree drafts of the branches that followed the last tokens.

    branch_length: the reference's branch length: the deepest draft (a branch holds
        branch_length + 1 tokens after its key), and the draft size at which a
        shorter query is no longer tried.
    max_nodes: most nodes in a draft (the reference's decoding length 64 counts the
        last accepted token too); at most MAX_DRAFT_NODES.
    max_prefix: the query, the last max_prefix context tokens (the reference's 2); at
        most branch_length + 1 (the key and all but one token of a branch).
    max_output_nodes: a changed tree with more output nodes than this is pruned at
        the end of a sequence, once SQUEEZE_AFTER_TREES trees changed (the
        reference's ``max_output_node``, 512).
    """

    max_depth = 12  # the reference's branch length, the deepest draft

    def __init__(self, branch_length: int = 12, max_nodes: int = 63, max_prefix: int = 2,
                 max_output_nodes: int = 512):
        if not 1 <= branch_length <= MAX_DRAFT_NODES:
            raise ValueError(f"branch_length must be in [1, {MAX_DRAFT_NODES}], "
                             f"got {branch_length}")
        if not 1 <= max_nodes <= MAX_DRAFT_NODES:
            raise ValueError(f"max_nodes must be in [1, {MAX_DRAFT_NODES}], got {max_nodes}")
        if not 1 <= max_prefix <= branch_length + 1:  # a query must leave a branch token
            raise ValueError(f"max_prefix must be in [1, branch_length + 1 = "
                             f"{branch_length + 1}], got {max_prefix}")
        if max_output_nodes < 1:
            raise ValueError(f"max_output_nodes must be >= 1, got {max_output_nodes}")
        self.branch_length, self.max_nodes, self.max_prefix = branch_length, max_nodes, max_prefix
        self.max_output_nodes = max_output_nodes
        self.trie = BranchTrie(branch_length, max_output_nodes)

    @property
    def visits(self) -> int:
        """Trie nodes touched so far (the work measure of the cost bound)."""
        return self.trie.visits

    def open(self, request: DraftRequest) -> "_PiaSequence":
        return _PiaSequence(self, request)


class _PiaSequence(SequenceDrafter):
    """One open sequence of a :class:`PiaTrie`: its branches in the shared trie."""

    def __init__(self, drafter: PiaTrie, request: DraftRequest):
        self.drafter, self.trie = drafter, drafter.trie
        self.branches = Branches()
        self.is_open = True
        for token in request.prompt_ids[1:]:
            self.trie.extend(token, self.branches, prompt=True)
        self.trie.close(self.branches)

    def propose(self, context: Sequence[int], k: int) -> Draft:
        drafter = self.drafter
        depth = min(k, drafter.branch_length)
        if depth < 1 or not context:
            return Draft()
        query = list(context[max(0, len(context) - drafter.max_prefix):])
        found = self.trie.get(query, drafter.max_nodes, depth)
        if not found:
            return Draft()
        return tree_draft([token for token, _ in found], [parent for _, parent in found])

    def accept(self, tokens: Sequence[int]) -> None:
        for token in tokens:
            self.trie.extend(token, self.branches, prompt=False)

    def end(self) -> None:
        if not self.is_open:
            return
        self.is_open = False
        self.trie.end_sequence(self.branches)
