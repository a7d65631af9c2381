"""Verifying a draft: one target forward scores it, and the target's own choices decide
what is kept. The decode loop (:mod:`.loop`) calls :func:`speculative_step` once per
step; a chain goes through :func:`verify_chain`, a tree (or probes) through
:func:`verify_tree`.
"""

# The acceptance rule (lossless by construction).
#
# The forward scores the uncached context and every draft token. c_j, the target's
# choice for absolute position len(context) + j, comes from the sampler: the argmax at
# T=0; at T>0 the argmax of logits/T plus Gumbel noise keyed by (seed, position), which
# is exact sampling from softmax(logits/T). Draft token d_j is accepted iff
# d_0..d_{j-1} were and d_j == c_j; at the first disagreement, or past the draft's end,
# c_j itself is emitted as the bonus token. A choice depends only on (logits, seed,
# position), as in plain decoding, so every emitted token is the one plain decoding
# would have chosen there: the output cannot depend on the drafter, only the number of
# forwards can. A tree applies the same rule along each root path.

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from pytest_specdec.engine.target import Target
from pytest_specdec.protocol.drafter import Draft, node_depths
from pytest_specdec.protocol.sampling import Sampler


@dataclass
class StepResult:
    emitted: list[int]  # accepted draft tokens, then the target's bonus token
    logits: torch.Tensor  # target logits at the emitted positions, [len(emitted), vocab]
    scores: torch.Tensor  # the sampler's choice scores there (logits at T=0)
    # hidden states of the newly cached context: the uncached context rows, then the
    # accepted draft tokens' (see TargetSignals.hidden_states)
    hidden: torch.Tensor | None
    # top-k next tokens after the last context token, then after each draft node
    top_k: torch.Tensor | None = None
    probe_choices: tuple[int, ...] = ()  # greedy choice after each probe node


def speculative_step(target: Target, sampler: Sampler, cache: Any, context: list[int],
                     cached: int, draft: Draft, *, hidden_states: bool | Sequence[int] = False,
                     top_k: int = 0, exact: bool = False) -> StepResult:
    """Verify a draft after the context with one target forward: a chain (the common
    case) by :func:`verify_chain`, a tree or probes by :func:`verify_tree`. In exact mode
    (see :mod:`pytest_specdec.engine.exact`) every step takes the tree path, whose
    explicit mask the row-invariant attention reads, with at least two rows: a lone row
    would take other matmul kernels than a verify forward's rows."""
    if exact and len(context) - cached + len(draft.tokens) + len(draft.probe_tokens) < 2:
        # a probe after the last token: scored, never accepted, dropped from the cache
        draft = Draft(draft.tokens, draft.parents, (context[-1],), (-1,))
    if exact or not draft.is_chain or draft.probe_tokens:
        return verify_tree(target, sampler, cache, context, cached, draft,
                           hidden_states=hidden_states, top_k=top_k)
    return verify_chain(target, sampler, cache, context, cached, draft,
                        hidden_states=hidden_states, top_k=top_k)


def verify_chain(target: Target, sampler: Sampler, cache: Any, context: list[int],
                 cached: int, draft: Draft, *, hidden_states: bool | Sequence[int] = False,
                 top_k: int = 0) -> StepResult:
    """Verify a chain draft: the longest prefix the target agrees with, then its bonus
    token (the acceptance rule above: d_j is accepted iff d_0..d_{j-1} were and
    d_j == c_j)."""
    tokens = draft.tokens
    fed = [*context[cached:], *tokens]
    logits, hidden = target.forward(fed, cache, keep_logits=len(tokens) + 1,
                                    hidden_states=hidden_states)
    positions = torch.arange(len(context), len(context) + len(tokens) + 1, device=logits.device)
    scores = sampler.scores(logits, positions)
    choices = scores.argmax(dim=-1).tolist()
    n = 0
    while n < len(tokens) and tokens[n] == choices[n]:
        n += 1
    # the cache now holds context + draft; keep context + the n accepted tokens
    rejected = len(tokens) - n
    if rejected:
        cache.crop(-rejected)
    if hidden is not None:  # the uncached context, then the n accepted tokens
        hidden = hidden[: len(context) - cached + n]
    return StepResult(emitted=[*tokens[:n], choices[n]], logits=logits[: n + 1],
                      scores=scores[: n + 1], hidden=hidden,
                      top_k=logits.topk(top_k, dim=-1).indices if top_k else None)


def verify_tree(target: Target, sampler: Sampler, cache: Any, context: list[int],
                cached: int, draft: Draft, *, hidden_states: bool | Sequence[int] = False,
                top_k: int = 0) -> StepResult:
    """Verify a tree draft, and score its probes, with one target forward.

    Each node sits at position len(context) - 1 + depth and attends to the context and
    its own ancestors only (on sliding-window layers, those less than a window behind
    it: see :meth:`Target.forward`), so its logits are those its root path would give as
    a chain. From the root (the last context token) the walk moves to the first child,
    in draft order, whose token equals the target's choice for the next position, and
    stops where none does; the choice there is the bonus token. The cache keeps the
    context and that path only.
    """
    n_draft = len(draft.tokens)
    nodes = (*draft.tokens, *draft.probe_tokens)
    parents = [*(draft.parents if draft.parents is not None else range(-1, n_draft - 1)),
               *(p if p < 0 else p + n_draft for p in draft.probe_parents)]
    depth = node_depths(parents)
    last, uncached = len(context) - 1, len(context) - cached
    logits, hidden = target.forward(
        [*context[cached:], *nodes], cache, keep_logits=len(nodes) + 1,
        hidden_states=hidden_states, positions=[*range(cached, len(context)), *(last + d for d in depth)],
        attend=_tree_mask(len(context), cached, parents))
    # row 0: after the last context token; row 1 + i: after node i
    positions = torch.tensor([last + 1, *(last + 1 + d for d in depth[:n_draft])], device=logits.device)
    scores = sampler.scores(logits[: n_draft + 1], positions)
    choices = scores.argmax(dim=-1).tolist()
    path = _accepted_path(draft.tokens, parents, choices)
    keep_path(cache, len(context), path, len(nodes))
    rows = [0, *(1 + i for i in path)]
    if hidden is not None:  # the uncached context, then the accepted path's nodes
        hidden = hidden[[*range(uncached), *(uncached + i for i in path)]]
    return StepResult(
        emitted=[*(draft.tokens[i] for i in path), choices[rows[-1]]],
        logits=logits[rows], scores=scores[rows], hidden=hidden,
        top_k=logits[: n_draft + 1].topk(top_k, dim=-1).indices if top_k else None,
        probe_choices=tuple(logits[n_draft + 1:].argmax(dim=-1).tolist()))


def _tree_mask(context: int, cached: int, parents: Sequence[int]) -> torch.Tensor:
    """Who may attend to whom in a tree forward: the uncached context causally, each
    node the whole context and its own ancestors (rows: fed tokens; columns: context
    then nodes)."""
    uncached = context - cached
    attend = torch.ones(uncached + len(parents), context + len(parents), dtype=torch.bool)
    attend[:uncached] = attend[:uncached].tril(diagonal=cached)
    tree = attend[uncached:, context:]
    tree.zero_()
    for i, p in enumerate(parents):
        if p >= 0:
            tree[i] = tree[p]
        tree[i, i] = True
    return attend


def _accepted_path(tokens: Sequence[int], parents: Sequence[int],
                   choices: Sequence[int]) -> list[int]:
    """The nodes accepted, root down: at each node (-1: the root) the first child, in
    draft order, whose token is the target's choice after it; none ends the path.
    ``choices[0]`` follows the root, ``choices[1 + i]`` node i."""
    path: list[int] = []
    here = -1
    while True:
        wanted = choices[here + 1]
        here = next((i for i in range(here + 1, len(tokens))
                     if parents[i] == here and tokens[i] == wanted), -1)
        if here < 0:
            return path
        path.append(here)


def keep_path(cache: Any, base: int, path: list[int], fed: int) -> None:
    """The cache holds `base` context positions then `fed` tree nodes: keep the nodes of
    `path` (increasing indices), moved to base, base + 1, ..., and drop the rest.

    A sliding-window layer holds fewer context positions than a full one (only those
    its window still needs), but every layer holds the `fed` nodes last, so they are
    indexed from the end of each layer. A sliding layer must record the past (as
    :meth:`Target.new_cache` sets it up): one that trims to its window on update may
    have dropped context the path still needs, or nodes themselves.

    A cache with a ``keep_path`` of its own (the compiled path's static cache) does it."""
    own = getattr(cache, "keep_path", None)
    if callable(own):
        return own(base, path, fed)
    if path != list(range(len(path))):
        for layer in cache.layers:
            if getattr(layer, "is_sliding", False) and not getattr(layer, "record_past", False):
                raise RuntimeError(f"{type(layer).__name__} does not record past states, so a "
                                   "tree's path cannot be moved into place; call "
                                   "cache.activate_past_recording() before the tree forward")
            if getattr(layer, "keys", None) is None:
                continue  # a layer that stores nothing (an uninitialised or shared one)
            start = layer.keys.shape[-2] - fed
            if start < 0 or (not getattr(layer, "is_sliding", False) and start != base):
                raise RuntimeError(f"a cache layer holds {layer.keys.shape[-2]} positions; "
                                   f"expected {base} context positions then {fed} tree nodes")
            source = torch.tensor([start + i for i in path], device=layer.keys.device)
            for name in ("keys", "values"):
                states = getattr(layer, name)
                states[..., start:start + len(path), :] = states[..., source, :]
    if fed > len(path):
        cache.crop(-(fed - len(path)))
