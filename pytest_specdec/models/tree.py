"""EAGLE-2/3 dynamic draft trees, as pure functions of the draft model's log-probabilities.

Reference: SafeAILab/EAGLE, ``eagle/model/cnets.py`` ``Model.topK_genrate`` (EAGLE-2's
"context-aware dynamic draft tree", kept by EAGLE-3). A tree grows level by level:

1. the root's ``top_k`` most likely children form level 1, each scored by its
   log-probability; all of them are the frontier;
2. each further level expands every frontier node into its ``top_k`` most likely
   children, scored by the cumulative log-probability of their root path (the parent's
   score plus the child's log-probability); the ``top_k`` best of these ``top_k**2``
   candidates become the next frontier (the others stay candidates, without children);
3. reranking: the ``budget`` best-scored candidates of all levels make the draft.

A path's score never rises along it (log-probabilities are at most 0), so the best
candidates include each one's parent; ties go to the earlier candidate (a parent is
always earlier than its children), and a candidate whose parent was not taken is
skipped, so every node's ancestors are in the draft even for scores that rise.

The draft lists the taken candidates in the order they were made (level by level, and
within a level by frontier node, then child rank), so parents come before children, as
:class:`pytest_specdec.protocol.drafter.Draft` requires; ``parents[i]`` is -1 for a level-1 node
(a child of the last accepted token).

:func:`grow_on_device` grows the same tree with the candidates kept as tensors on the
draft model's device (a model drafter's expansion never leaves it) and reads them once,
at the end: a fixed two host<->device transfers per draft with the drafter's own input
copy, however many levels and candidates (see :mod:`pytest_specdec.engine.transfer`).

Deliberate differences from the reference: ties between equal scores are broken by
candidate order (the reference's ``torch.topk`` leaves them unspecified); ``budget``
counts draft nodes, without the root (the reference's ``total_token`` counts the root).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from pytest_specdec.engine import transfer

#: (token, log-probability) pairs, most likely first
Children = Sequence[tuple[int, float]]
#: the draft model, for a frontier: given the frontier's candidate indices and the tree
#: grown so far (a :class:`DynamicTree`), each node's children, most likely first
Expand = Callable[[Sequence[int], "DynamicTree"], Sequence[Children]]


@dataclass
class DynamicTree:
    """The candidates grown so far (all levels), in the order they were made."""

    tokens: list[int]
    parents: list[int]  # candidate index of the parent, -1 for level 1
    scores: list[float]  # cumulative log-probability of the root path
    depths: list[int]  # 1 for level 1

    def ancestors(self, node: int) -> list[int]:
        """The node's ancestors, nearest first (candidate indices)."""
        path = []
        parent = self.parents[node]
        while parent >= 0:
            path.append(parent)
            parent = self.parents[parent]
        return path


def _best(indices: Sequence[int], scores: Sequence[float], n: int) -> list[int]:
    """The n best of `indices` by score, ties to the earlier index, best first."""
    return sorted(indices, key=lambda i: (-scores[i], i))[:n]


def grow(first: Children, expand: Expand, *, top_k: int, levels: int) -> DynamicTree:
    """All candidates of a tree of at most `levels` levels: `first` holds the root's
    children (only its first `top_k` are used); `expand` is called once per level past
    the first with the frontier (at most `top_k` nodes) and the tree so far, and returns each node's
    children (their first `top_k` are used)."""
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    tree = DynamicTree([], [], [], [])
    if levels < 1:
        return tree
    for token, logp in list(first)[:top_k]:
        tree.tokens.append(int(token))
        tree.parents.append(-1)
        tree.scores.append(float(logp))
        tree.depths.append(1)
    frontier = list(range(len(tree.tokens)))
    for depth in range(2, levels + 1):
        if not frontier:
            break
        children = expand(frontier, tree)
        if len(children) != len(frontier):
            raise ValueError(f"expand returned children for {len(children)} nodes, "
                             f"the frontier has {len(frontier)}")
        made = []
        for node, kids in zip(frontier, children):
            for token, logp in list(kids)[:top_k]:
                made.append(len(tree.tokens))
                tree.tokens.append(int(token))
                tree.parents.append(node)
                tree.scores.append(tree.scores[node] + float(logp))
                tree.depths.append(depth)
        frontier = sorted(_best(made, tree.scores, top_k))
    return tree


def rerank(tree: DynamicTree, budget: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The draft of the `budget` best candidates: (tokens, parents) with parents as
    indices into the draft (-1 for level 1), parents before children. A candidate is
    taken only after its parent (see the module docstring)."""
    taken: set[int] = set()
    for node in _best(range(len(tree.tokens)), tree.scores, len(tree.tokens)):
        if len(taken) >= budget:
            break
        parent = tree.parents[node]
        if parent < 0 or parent in taken:
            taken.add(node)
    order = sorted(taken)
    where = {node: i for i, node in enumerate(order)}
    tokens = tuple(tree.tokens[node] for node in order)
    parents = tuple(where[tree.parents[node]] if tree.parents[node] >= 0 else -1
                    for node in order)
    return tokens, parents


def dynamic_tree(first: Children, expand: Expand, *, top_k: int, levels: int,
                 budget: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """EAGLE-2/3's draft: :func:`grow` then :func:`rerank`."""
    if budget < 1:
        return (), ()
    return rerank(grow(first, expand, top_k=top_k, levels=levels), budget)


@dataclass(frozen=True)
class Frontier:
    """One level's frontier, on the device: its candidates' indices, their parents'
    (-1 for level 1) and tokens (each [n]), and their level (``depth``)."""

    nodes: torch.Tensor
    parents: torch.Tensor
    tokens: torch.Tensor
    depth: int


#: the draft model, for a frontier: each node's children as (tokens, log-probabilities),
#: both [n, children] on the device, most likely first
ExpandOnDevice = Callable[[Frontier], tuple[torch.Tensor, torch.Tensor]]


def grow_on_device(first_tokens: torch.Tensor, first_logp: torch.Tensor, expand: ExpandOnDevice,
                   *, top_k: int, levels: int) -> DynamicTree:
    """:func:`grow`'s tree from tensors: `first_tokens`, `first_logp` [children] the
    root's children, most likely first; `expand` is called once per level past the
    first. Scores add up in float64 on the device, as :func:`grow` adds Python floats,
    and the next frontier is chosen there by a stable sort (ties to the earlier
    candidate), so the tree is :func:`grow`'s; the candidates are read back in one
    transfer at the end."""
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if levels < 1:
        return DynamicTree([], [], [], [])
    tokens = first_tokens[:top_k].long()
    scores = first_logp[:top_k].double()
    parents = torch.full_like(tokens, -1)
    sizes = [tokens.shape[0]]  # candidates per level
    frontier = torch.arange(sizes[0], device=tokens.device)
    for depth in range(2, levels + 1):
        if frontier.shape[0] == 0:
            break
        kid_tokens, kid_logp = expand(Frontier(frontier, parents[frontier], tokens[frontier],
                                               depth - 1))
        if kid_tokens.shape[0] != frontier.shape[0]:
            raise ValueError(f"expand returned children for {kid_tokens.shape[0]} nodes, "
                             f"the frontier has {frontier.shape[0]}")
        kid_tokens, kid_logp = kid_tokens[:, :top_k], kid_logp[:, :top_k]
        made = (scores[frontier][:, None] + kid_logp.double()).reshape(-1)
        first_made = tokens.shape[0]
        tokens = torch.cat([tokens, kid_tokens.reshape(-1).long()])
        parents = torch.cat([parents, frontier.repeat_interleave(kid_tokens.shape[1])])
        scores = torch.cat([scores, made])
        sizes.append(made.shape[0])
        best = torch.sort(made, descending=True, stable=True).indices[:top_k]
        frontier = first_made + torch.sort(best).values
    read = transfer.to_host(torch.cat([tokens.double(), parents.double(), scores]))
    n = tokens.shape[0]
    depths = [level + 1 for level, size in enumerate(sizes) for _ in range(size)]
    return DynamicTree([int(t) for t in read[:n]], [int(p) for p in read[n:2 * n]],
                       read[2 * n:], depths)
