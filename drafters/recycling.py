"""Token Recycling (Luo et al. 2024, "Turning Trash into Treasure"): draft a tree from
the candidate tokens that earlier target forwards produced and plain decoding throws
away.

Every target forward scores the last accepted token and each draft node; the target's
top-K next tokens after each of them are "recycled" into an adjacency matrix
M[token] = its latest top-K successors, best first. A row is overwritten whenever its
token is scored again, and when one forward scores a token twice the later row wins (as
in the paper, whose scatter update keeps the last write).

A proposal fills a static tree template breadth-first from the last context token: a
template node of rank r under a node holding token t holds M[t][r], the target's
r-th choice after t when t was last scored. A node whose parent's token has no row yet
is dropped with its subtree. The default template is the authors' released 80-node
tree (depth 6, wide at the top and narrowing with depth, biased to rank 0: the paths
of top-1 choices are the likeliest to be accepted).

The matrix is never reset within a benchmark case, so what one sequence taught serves
the next samples and rounds (the paper likewise keeps it across queries).

Cost per step: observe overwrites at most max_nodes + 1 rows of K tokens; propose
visits the template (at most max_nodes nodes) with one row lookup each; the context is
only read at its last token. Nothing depends on the context length.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

from pytest_specdec.engine.loop import SIGNAL_TOP_K
from pytest_specdec.protocol.drafter import (MAX_DRAFT_NODES, Draft, DraftRequest, DrafterBase,
                                             TargetSignals)

#: The authors' tree (Spec-Bench's Token Recycling template "2.2.2"), as the number of
#: children of each node, breadth-first, one tuple per depth; the children of a node are
#: always its ranks 0..n-1. 8 + 21 + 25 + 15 + 8 + 3 = 80 nodes below the root.
PAPER_TREE = (
    (8,),                                                                    # the root
    (8, 4, 3, 2, 1, 1, 1, 1),                                                # depth 1
    (8, 3, 2, 1, 1, 1, 1, 1, 2, 1, 0, 0, 1, 0, 0, 1, 0, 1, 1, 0, 0),         # depth 2
    (5, 2, 1, 1, 1, 0, 0, 0, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, 0, 0, 1, 1, 0, 0),  # depth 3
    (3, 1, 1, 0, 0, 1, 0, 0, 0, 0, 1, 0, 1, 0, 0),                           # depth 4
    (2, 0, 0, 1, 0, 0, 0, 0),                                                # depth 5
)


class TreeNode(NamedTuple):
    """One template node: its rank among its parent's children, which is the rank of
    its token among the successors of the parent's token."""

    parent: int  # index in the template; -1 = the root (the last context token)
    rank: int
    depth: int


def build_template(children: Callable[[int, int], int], max_nodes: int) -> tuple[TreeNode, ...]:
    """The first max_nodes nodes, breadth-first, of the tree in which node i (-1 = the
    root) at depth d has children(i, d) children of ranks 0, 1, ...; parents come first."""
    nodes: list[TreeNode] = []
    expanding = -1
    while expanding < len(nodes) and len(nodes) < max_nodes:
        depth = nodes[expanding].depth if expanding >= 0 else 0
        for rank in range(min(children(expanding, depth), max_nodes - len(nodes))):
            nodes.append(TreeNode(expanding, rank, depth + 1))
        expanding += 1
    return tuple(nodes)


_PAPER_CHILDREN = tuple(n for level in PAPER_TREE for n in level)


def paper_children(node: int, depth: int) -> int:
    return _PAPER_CHILDREN[node + 1] if node + 1 < len(_PAPER_CHILDREN) else 0


def parse_branching(branching: str) -> Callable[[int, int], int]:
    """The template's children function for "paper", or for per-depth branching factors
    such as "8,4,2,1" (every node at depth d gets the first factors[d] successors)."""
    if branching == "paper":
        return paper_children
    try:
        factors = tuple(int(part) for part in branching.split(","))
    except ValueError:
        factors = ()
    if not factors or not all(1 <= f <= SIGNAL_TOP_K for f in factors):
        raise ValueError(f"branching must be 'paper' or comma-separated integers in "
                         f"[1, {SIGNAL_TOP_K}] (one per depth, e.g. '8,4,2,1'), got {branching!r}")
    return lambda node, depth: factors[depth] if depth < len(factors) else 0


class TokenRecycling(DrafterBase):
    """Token Recycling: a static draft tree filled from the target's recycled top-K.

    max_nodes: most nodes in a draft; the template is cut to its first max_nodes nodes
        breadth-first (1 to MAX_DRAFT_NODES).
    branching: the tree template: "paper" (the authors' 80-node tree) or per-depth
        branching factors such as "8,4,2,2,1,1", each in [1, SIGNAL_TOP_K].
    share_across_sequences: keep the matrix from one sequence to the next within a
        case (the paper's setting); when false it is cleared when a sequence begins.
    """

    needs = frozenset({"top_k"})
    max_depth = 6  # the paper's static tree is 6 deep

    def __init__(self, max_nodes: int = 80, branching: str = "paper",
                 share_across_sequences: bool = True):
        if isinstance(max_nodes, bool) or not isinstance(max_nodes, int) \
                or not 1 <= max_nodes <= MAX_DRAFT_NODES:
            raise ValueError(f"max_nodes must be an integer in [1, {MAX_DRAFT_NODES}], "
                             f"got {max_nodes!r}")
        if not isinstance(share_across_sequences, bool):
            raise ValueError(f"share_across_sequences must be true or false, "
                             f"got {share_across_sequences!r}")
        self.max_nodes, self.branching = max_nodes, branching
        self.share_across_sequences = share_across_sequences
        self.template = build_template(parse_branching(branching), max_nodes)
        # token -> the target's top-K next tokens the last time it was scored
        self.successors: dict[int, tuple[int, ...]] = {}

    def begin(self, request: DraftRequest) -> None:
        if not self.share_across_sequences:
            self.successors = {}

    def observe(self, signals: TargetSignals) -> None:
        if signals.top_k is None or signals.top_k_after is None:
            return
        # in order, so the later row wins for a token scored twice in one forward
        for token, row in zip(signals.top_k_after, signals.top_k.tolist(), strict=True):
            self.successors[token] = tuple(row)

    def propose(self, context: Sequence[int], k: int) -> Draft:
        if not context or k < 1:
            return Draft()
        root = context[-1]
        tokens: list[int] = []
        parents: list[int] = []
        # draft index of each template node visited so far, None where it was dropped
        placed: list[int | None] = []
        for node in self.template:
            if node.depth > k:
                break  # breadth-first: every later node is at least as deep
            slot = None
            at = -1 if node.parent < 0 else placed[node.parent]
            if at is not None:
                row = self.successors.get(root if at < 0 else tokens[at])
                if row is not None and node.rank < len(row):
                    slot = len(tokens)
                    tokens.append(row[node.rank])
                    parents.append(at)
            placed.append(slot)
        return Draft(tuple(tokens), tuple(parents)) if tokens else Draft()
