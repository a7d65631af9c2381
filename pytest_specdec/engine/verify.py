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

from pytest_specdec.engine import transfer
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
    d_j == c_j). Two host<->device transfers: the fed tokens in, the choices out."""
    tokens = draft.tokens
    fed = [*context[cached:], *tokens]
    logits, hidden = target.forward(fed, cache, keep_logits=len(tokens) + 1,
                                    hidden_states=hidden_states)
    positions = torch.arange(len(context), len(context) + len(tokens) + 1, device=logits.device)
    scores = sampler.scores(logits, positions)
    choices = transfer.to_host(scores.argmax(dim=-1))
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

    Two host<->device transfers whatever the tree's size: the fed tokens, positions
    and parents in one copy (the mask is built from them on the device), and the
    choices (probes' included) read once; the accepted path is found on the device too
    (:func:`accepted_nodes`), so moving it into place copies nothing.
    """
    n_draft = len(draft.tokens)
    nodes = (*draft.tokens, *draft.probe_tokens)
    parents = [*(draft.parents if draft.parents is not None else range(-1, n_draft - 1)),
               *(p if p < 0 else p + n_draft for p in draft.probe_parents)]
    depth = node_depths(parents)
    last, uncached = len(context) - 1, len(context) - cached
    ids, positions, node_parents = transfer.pack_to_device(
        [[*context[cached:], *nodes], [*range(cached, len(context)), *(last + d for d in depth)],
         parents], target.device)
    first_node = torch.full((1,), uncached, dtype=torch.long, device=ids.device)
    slot_parents = torch.cat([torch.full((uncached,), -1, dtype=torch.long, device=ids.device),
                              torch.where(node_parents >= 0, node_parents + uncached, -1)])
    block = slot_attention(first_node - uncached, first_node, slot_parents[None],
                           max(depth, default=0))[0]  # [fed, fed]
    attend = torch.cat([torch.ones(len(slot_parents), cached, dtype=torch.bool,
                                   device=ids.device), block], dim=1)
    logits, hidden = target.forward(ids, cache, keep_logits=len(nodes) + 1,
                                    hidden_states=hidden_states, positions=positions, attend=attend)
    # row 0: after the last context token (at positions[uncached - 1]); row 1 + i: after node i
    at = positions[uncached - 1: uncached + n_draft] + 1
    scores = sampler.scores(logits[: n_draft + 1], at)
    chosen = scores.argmax(dim=-1)  # [1 + n_draft]
    read = transfer.to_host(torch.cat([chosen, logits[n_draft + 1:].argmax(dim=-1)]))
    choices, probe_choices = read[: n_draft + 1], read[n_draft + 1:]
    path = accepted_path(draft.tokens, parents, choices)
    on_path = accepted_nodes(ids[uncached: uncached + n_draft], node_parents[:n_draft], chosen,
                             block[uncached: uncached + n_draft, uncached: uncached + n_draft])
    index = path_index(on_path, len(path))
    keep_path(cache, len(context), path, len(nodes), index=index)
    rows = torch.cat([torch.zeros(1, dtype=torch.long, device=index.device), 1 + index])
    if hidden is not None:  # the uncached context, then the accepted path's nodes
        hidden = hidden[torch.cat([torch.arange(uncached, device=hidden.device),
                                   uncached + index.to(hidden.device)])]
    return StepResult(
        emitted=[*(draft.tokens[i] for i in path), choices[1 + path[-1] if path else 0]],
        logits=logits[rows.to(logits.device)], scores=scores[rows.to(scores.device)],
        hidden=hidden,
        top_k=logits[: n_draft + 1].topk(top_k, dim=-1).indices if top_k else None,
        probe_choices=tuple(probe_choices))


def slot_attention(start: torch.Tensor, first_node: torch.Tensor, parent_slot: torch.Tensor,
                   levels: int) -> torch.Tensor:
    """Who may attend to whom among the slots one forward feeds, per row, built on the
    device from compact per-row data: start [rows], the first slot that is not padding;
    first_node [rows], the first draft node's slot (the uncached context lies between);
    parent_slot [rows, slots], each node's parent's slot, -1 for a child of the last
    context token and for every other slot; `levels`, the deepest node's depth.

    Returns [rows, slots, slots] bool: a pad slot attends to itself only; a context
    slot to the context slots up to itself; a node to the whole uncached context, its
    ancestors and itself (the ancestor matrix, one gather per level)."""
    slots = parent_slot.shape[-1]
    at = torch.arange(slots, device=parent_slot.device)
    itself = (at[:, None] == at[None, :]).expand(parent_slot.shape[0], -1, -1)
    lineage = itself  # [rows, slots, slots]: j is an ancestor of i, or i itself
    has_parent = (parent_slot >= 0)[:, :, None]
    gather_at = parent_slot.clamp(min=0)[:, :, None].expand(-1, -1, slots)
    for _ in range(max(levels - 1, 0)):
        lineage = itself | (lineage.gather(1, gather_at) & has_parent)
    context_key = (at[None, :] >= start[:, None]) & (at[None, :] < first_node[:, None])
    real_query = at[None, :] >= start[:, None]  # [rows, slots]
    causal = at[:, None] >= at[None, :]
    return lineage | (context_key[:, None, :] & causal[None] & real_query[:, :, None])


def accepted_nodes(tokens: torch.Tensor, parents: torch.Tensor, choices: torch.Tensor,
                   lineage: torch.Tensor) -> torch.Tensor:
    """The accepted path as a mask, on the device (the rule of :func:`accepted_path`):
    tokens [n] and parents [n] (-1: a child of the last context token) of the nodes that
    may be accepted, choices [1 + n] (the target's choice after the last context token,
    then after each node), lineage [n, n] (j is an ancestor of i, or i itself). A node is
    on the path when it and each of its ancestors is the first child, in draft order,
    whose token is the choice after its parent. Returns [n] bool."""
    n = tokens.shape[0]
    matches = tokens == choices[parents + 1]
    earlier = torch.ones(n, n, dtype=torch.bool, device=tokens.device).tril(-1)
    siblings = parents[:, None] == parents[None, :]
    first = matches & ~(siblings & earlier & matches[None, :]).any(dim=-1)
    return ~(lineage & ~first[None, :]).any(dim=-1)


def path_index(on_path: torch.Tensor, length: int) -> torch.Tensor:
    """The nodes of `on_path` [n] bool, increasing, as an int64 index on its device;
    `length` (how many there are) comes from the host's own walk, so nothing is read."""
    return torch.sort((~on_path).to(torch.int8), stable=True).indices[:length]


def accepted_path(tokens: Sequence[int], parents: Sequence[int],
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


def keep_path(cache: Any, base: int, path: list[int], fed: int, *,
              index: torch.Tensor | None = None) -> None:
    """The cache holds `base` context positions then `fed` tree nodes: keep the nodes of
    `path` (increasing indices), moved to base, base + 1, ..., and drop the rest.
    `index` [len(path)]: the same nodes as an int64 tensor on the cache's device (None:
    `path` is copied there once, counted); one index serves every layer.

    A cache with a ``keep_path(base, path, fed)`` of its own does it itself.

    A sliding-window layer holds fewer context positions than a full one (only those
    its window still needs), but every layer holds the `fed` nodes last, so they are
    indexed from the end of each layer. A sliding layer must record the past (as
    :meth:`Target.new_cache` sets it up): one that trims to its window on update may
    have dropped context the path still needs, or nodes themselves.

    A cache with a ``keep_path`` of its own (the compiled path's static cache) does it."""
    own = getattr(cache, "keep_path", None)
    if callable(own):
        return own(base, path, fed, index=index)
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
            if index is None:
                index = transfer.to_device(path, layer.keys.device)
            source = start + index.to(layer.keys.device)
            for name in ("keys", "values"):
                states = getattr(layer, name)
                states[..., start:start + len(path), :] = states[..., source, :]
    if fed > len(path):
        cache.crop(-(fed - len(path)))
    return None
