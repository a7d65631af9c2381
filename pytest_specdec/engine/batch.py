"""The decode loop over a batch: B sequences, one target forward per step verifying
every open sequence's draft (the N samples of a Best-of-N problem decode together, as
a serving engine runs them). Baseline and speculative decoding share it, as they share
the batch-1 loop, and every sequence's tokens are what plain decoding gives it alone.

Cache discipline: the batch shares one KV cache whose columns are appended together;
which column a row may attend to is explicit, never implied by its index:

- ``valid[b, c]``: row b's column c holds one of its context tokens. A forward appends
  one column per fed slot to every row; a row feeding fewer tokens than the widest is
  left-padded, and pad columns are never valid. Rejected draft tokens (chain tail, tree
  branches off the accepted path) are marked invalid: rolling a row back is a mask
  change, and no key moves.
- ``position[b, c]``: the absolute position of that token in row b's sequence (RoPE
  was applied at it when the key was written), which the sliding-window rule reads.

Sequences accept different lengths and finish at different times; a finished row is
dropped from the cache (``batch_select_indices``, at the next forward), and when the
holes left by rejected drafts outgrow the kept columns the cache is compacted row by row.

Host<->device transfers: ``valid``, ``position`` and the masks live on the device. A step
copies its inputs in once (every row's tokens, positions, node parents, padding and
the rows kept from the last step: :class:`_Slots`), builds the masks there, finds each
row's accepted path there (:func:`pytest_specdec.engine.verify.accepted_nodes`) and
reads every row's choices back once: two transfers a step, whatever the batch's rows,
drafts and trees.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from pytest_specdec.engine import timing, transfer
from pytest_specdec.engine.exact import row_invariant
from pytest_specdec.engine.guard import Attachment, Guard, attach
from pytest_specdec.engine.loop import (SIGNAL_TOP_K, Generation, GenerationRequest, _HiddenStates,
                                        _exact_prefill, _tell_drafter, _until_eos)
from pytest_specdec.engine.metrics import SpecDecodingStats, StepRecord
from pytest_specdec.engine.target import SLIDING, HiddenStateCapture, Target
from pytest_specdec.engine.verify import (StepResult, accepted_nodes, accepted_path, path_index,
                                          slot_attention)
from pytest_specdec.protocol.drafter import (SEQUENCE_METHODS, Draft, DraftError, DraftRequest,
                                             Drafter, missing_methods, node_depths,
                                             serves_concurrent_sequences)

#: the token fed in pad slots (never attended to: its column is never valid)
PAD_TOKEN = 0


@dataclass
class _Row:
    """One open sequence of the batch."""

    index: int  # its place in the requests
    request: GenerationRequest
    context: list[int]
    guard: Guard | None
    needs: frozenset[str]
    cached: int = 0  # context tokens the cache holds for this row
    feed: _HiddenStates = field(default_factory=_HiddenStates)
    new: list[int] = field(default_factory=list)
    stop: str = "budget"
    stats: SpecDecodingStats = field(default_factory=SpecDecodingStats)
    steps: list[StepRecord] = field(default_factory=list)


@dataclass
class _Fed:
    """What one row feeds to a step's forward, and how its slots attend to each other."""

    tokens: list[int]  # the uncached context, then the draft's nodes (probes last)
    positions: list[int]
    parents: list[int]  # per node: -1 (after the last context token) or a node index
    depth: list[int]  # per node: 1 + its parent's depth
    n_draft: int  # nodes that may be accepted (probes follow them)
    scored: "_Scored | None" = None  # after the forward: the row's choices (_score_rows)

    @property
    def uncached(self) -> int:
        return len(self.tokens) - len(self.parents)


def _fed(row: _Row, draft: Draft) -> _Fed:
    n_draft = len(draft.tokens)
    nodes = (*draft.tokens, *draft.probe_tokens)
    parents = [*(draft.parents if draft.parents is not None else range(-1, n_draft - 1)),
               *(p if p < 0 else p + n_draft for p in draft.probe_parents)]
    depth = node_depths(parents)
    last = len(row.context) - 1
    return _Fed([*row.context[row.cached:], *nodes],
                [*range(row.cached, len(row.context)), *(last + d for d in depth)],
                parents, depth, n_draft)


@dataclass
class _Slots:
    """One batched forward's inputs on the device, from one copy: per row, its fed
    tokens left-padded to the widest (``ids``, ``positions``: [rows, width]), each
    node's parent's slot (``parent_slot`` [rows, width], -1 elsewhere), its first
    non-pad slot (``start`` [rows]) and first node's slot (``first_node`` [rows]); the
    new slots' attention built from them (``attention`` [rows, width, width], see
    :func:`pytest_specdec.engine.verify.slot_attention`); the rows of the cache to keep
    (``keep`` [kept], None: all)."""

    ids: torch.Tensor
    positions: torch.Tensor
    parent_slot: torch.Tensor
    start: torch.Tensor
    first_node: torch.Tensor
    attention: torch.Tensor
    keep: torch.Tensor | None


def _slots(fed: list[_Fed], keep: list[int] | None, device: torch.device) -> _Slots:
    """Every row's fed slots and the rows to keep, copied to `device` in one transfer."""
    width = max(len(f.tokens) for f in fed)
    ids, positions, parents, start, first = [], [], [], [], []
    for f in fed:
        pad = width - len(f.tokens)
        node0 = pad + f.uncached
        ids += [PAD_TOKEN] * pad + f.tokens
        positions += [0] * pad + f.positions
        parents += [-1] * node0 + [p if p < 0 else node0 + p for p in f.parents]
        start.append(pad)
        first.append(node0)
    parts = transfer.pack_to_device([ids, positions, parents, start, first, keep or []], device)
    ids_t, positions_t, parents_t = (t.view(len(fed), width) for t in parts[:3])
    levels = max((max(f.depth, default=0) for f in fed), default=0)
    return _Slots(ids_t, positions_t, parents_t, parts[3], parts[4],
                  slot_attention(parts[3], parts[4], parents_t, levels),
                  parts[5] if keep is not None else None)


class BatchCache:
    """The batch's shared KV cache (every layer keeps every column: the sliding
    window is applied by the mask, from the columns' positions) and which columns
    each row may attend to."""

    def __init__(self, rows: int, device: torch.device):
        from transformers import DynamicCache

        self.kv = DynamicCache()
        self.valid = torch.zeros(rows, 0, dtype=torch.bool, device=device)  # [rows, columns]
        self.position = torch.zeros(rows, 0, dtype=torch.long, device=device)  # [rows, columns]
        self.device = device
        self.pending_keep: list[int] | None = None  # rows to keep, dropped at the next forward

    @property
    def columns(self) -> int:
        return self.valid.shape[1]

    def append(self, valid: torch.Tensor, position: torch.Tensor) -> None:
        """valid, position: [rows, q], the columns a forward just wrote."""
        self.valid = torch.cat([self.valid, valid], dim=1)
        self.position = torch.cat([self.position, position], dim=1)

    def keep_rows(self, keep: list[int]) -> None:
        """Drop the rows not in `keep` (finished sequences): done by :meth:`select_rows`
        at the next forward, whose input copy carries the index (no copy of its own)."""
        if self.pending_keep is not None:
            keep = [self.pending_keep[i] for i in keep]
        self.pending_keep = keep

    def select_rows(self, index: torch.Tensor | None) -> None:
        """Keep the rows `index` [kept] (int64, on the device) names; None keeps all."""
        if index is not None:
            self.kv.batch_select_indices(index)
            self.valid, self.position = self.valid[index], self.position[index]
        self.pending_keep = None

    def compact(self, width: int) -> None:
        """Move each row's valid columns to the front (in order) and drop the columns no
        row needs any more; attention never reads a column's index, so nothing else
        changes. `width`: the most valid columns of any row (the host knows it: a row's
        cached tokens). Done when holes outnumber the kept columns, so its cost is
        amortised."""
        if self.columns <= 2 * max(width, 1):
            return
        # per row: its valid columns first (a stable sort keeps their order), then holes
        order = torch.sort((~self.valid).to(torch.int8), dim=1, stable=True).indices[:, :width]
        for layer in self.kv.layers:
            for name in ("keys", "values"):
                states = getattr(layer, name, None)
                if states is None or states.dim() != 4:
                    continue
                heads, dim = states.shape[1], states.shape[3]
                gather = order.to(states.device)[:, None, :, None].expand(-1, heads, -1, dim)
                setattr(layer, name, states.gather(2, gather))
        self.valid = self.valid.gather(1, order)
        self.position = self.position.gather(1, order)


def _mask(target: Target, cache: BatchCache, fed: list[_Fed], width: int,
          slots: _Slots) -> Any:
    """The additive attention masks of one batched forward, built on the device: [rows,
    1, width, columns + width] per layer type (one tensor when all layers share a
    type). Row b's slot i attends to b's valid past columns and, among the new slots,
    to its own uncached context causally and to its draft node's ancestors
    (``slots.attention``); a pad slot to itself only. On sliding-window layers, also
    only to keys less than a window behind it."""
    real_query = torch.arange(width, device=cache.device)[None, :] >= slots.start[:, None]
    past = cache.valid[:, None, :] & real_query[:, :, None]  # [rows, width, columns]
    allowed = torch.cat([past, slots.attention], dim=2)
    types, window = target.layer_types()
    masks = {}
    for kind in dict.fromkeys(types):
        kept = allowed
        if kind == SLIDING:
            key_at = torch.cat([cache.position, slots.positions], dim=1)  # [rows, past + width]
            kept = allowed & (slots.positions[:, :, None] - key_at[:, None, :] < window)
        mask = torch.zeros(kept.shape, dtype=target.dtype, device=kept.device)
        masks[kind] = mask.masked_fill_(~kept, torch.finfo(target.dtype).min)[:, None] \
            .to(target.device)
    return next(iter(masks.values())) if len(masks) == 1 else masks


@dataclass
class _Scored:
    """One row after the batch's forward: its sampler's scores [1 + n_draft, vocab] and
    their argmax [1 + n_draft] on the device, the choices and the probes' greedy
    choices as read (one read for every row: :func:`_score_rows`), and what its
    acceptance reads on the device: its draft's tokens and parents (-1: a child of the
    last context token) [n_draft] and their lineage [n_draft, n_draft]."""

    scores: torch.Tensor
    chosen: torch.Tensor
    choices: list[int]
    probe_choices: list[int]
    tokens: torch.Tensor
    parents: torch.Tensor
    lineage: torch.Tensor


def _score_rows(rows: list[_Row], fed: list[_Fed], logits: torch.Tensor, slots: _Slots) -> None:
    """Every row's choices from one forward's logits [rows, keep, vocab] (right-aligned),
    each by its own sampler (the acceptance rule is batch 1's, see
    :mod:`pytest_specdec.engine.verify`: nothing of another row enters it), all rows'
    read in ONE transfer; sets each row's ``scored``."""
    width = slots.ids.shape[1]
    device_side = []
    for b, (row, f) in enumerate(zip(rows, fed)):
        n = len(f.parents)
        row_logits = logits[b, logits.shape[1] - n - 1:]  # the last context token, then nodes
        at = slots.positions[b, width - n - 1: width - n + f.n_draft] + 1
        scores = row.request.sampler.scores(row_logits[: f.n_draft + 1], at)
        device_side.append((scores, scores.argmax(dim=-1), row_logits[f.n_draft + 1:].argmax(dim=-1)))
    read = transfer.to_host(torch.cat([c for _, chosen, probes in device_side
                                       for c in (chosen, probes)]))
    for b, (f, (scores, chosen, _)) in enumerate(zip(fed, device_side)):
        n, node0 = len(f.parents), width - len(f.parents)
        nodes = slice(node0, node0 + f.n_draft)
        parents = slots.parent_slot[b, nodes]
        f.scored = _Scored(scores, chosen, read[: f.n_draft + 1], read[f.n_draft + 1: n + 1],
                           slots.ids[b, nodes], torch.where(parents >= 0, parents - node0, -1),
                           slots.attention[b, nodes, nodes])
        read = read[n + 1:]


def _verify(row: _Row, f: _Fed, draft: Draft, logits: torch.Tensor,
            hidden: torch.Tensor | None, top_k: int) -> tuple[StepResult, torch.Tensor]:
    """One row's acceptance, from its slots' logits (the last context token's, then
    each node's: [1 + nodes, vocab]), its slots' hidden states [fed, hidden] and its
    choices (``f.scored``); returns the step and its draft nodes on the accepted path,
    [n_draft] bool on the device: the path is walked on the host for the tokens and
    found on the device (:func:`accepted_nodes`) for the logits, hidden states and
    cache columns kept, so nothing is copied."""
    scored = f.scored
    path = accepted_path(draft.tokens, f.parents, scored.choices)
    on_path = accepted_nodes(scored.tokens, scored.parents, scored.chosen, scored.lineage)
    index = path_index(on_path, len(path))
    kept = torch.cat([torch.zeros(1, dtype=torch.long, device=index.device), 1 + index])
    if hidden is not None:  # the uncached context, then the accepted path's nodes
        hidden = hidden[torch.cat([torch.arange(f.uncached, device=index.device),
                                   f.uncached + index]).to(hidden.device)]
    step = StepResult(
        emitted=[*(draft.tokens[i] for i in path), scored.choices[1 + path[-1] if path else 0]],
        logits=logits[kept.to(logits.device)], scores=scored.scores[kept], hidden=hidden,
        top_k=logits[: f.n_draft + 1].topk(top_k, dim=-1).indices if top_k else None,
        probe_choices=tuple(scored.probe_choices))
    return step, on_path


def _forward(target: Target, cache: BatchCache, fed: list[_Fed],
             layers: bool | Sequence[int], slots: _Slots) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One forward of every open row (left-padded to the widest; `slots`: its inputs on
    the device); returns, per row, the logits of its last context token and its nodes,
    right-aligned: [rows, keep, vocab], and, if asked, the hidden states of every slot
    [rows, width, hidden]. Drops the rows finished at the last step, then appends the
    new columns, valid where a slot is not a pad (the caller invalidates rejected
    nodes)."""
    width = slots.ids.shape[1]
    cache.select_rows(slots.keep)
    keep = max(len(f.parents) for f in fed) + 1
    with HiddenStateCapture(target.model, layers, target.num_layers) as capture:
        out = target.model(input_ids=slots.ids.to(target.device),
                           position_ids=slots.positions.to(target.device),
                           attention_mask=_mask(target, cache, fed, width, slots),
                           cache=cache.kv, use_cache=True, logits_to_keep=keep,
                           **capture.forward_options)
    valid = torch.arange(width, device=cache.device)[None, :] >= slots.start[:, None]
    cache.append(valid, slots.positions)
    return out.logits, capture.states(out)


@torch.inference_mode()
def generate_batch(target: Target, requests: Sequence[GenerationRequest],
                   drafters: Sequence[Drafter | None] | None = None, *, k: int = 0,
                   drafter_name: str = "drafter", step_timeout: float = 0.0,
                   exact: bool = False,
                   on_tokens: Callable[[int], None] | None = None) -> list[Generation]:
    """Decode every request together; with drafters, speculatively: ``drafters[i]``
    serves request i (None: no drafter, as plain decoding). A drafter instance serves
    one open sequence at a time (``begin`` ... ``end``): the same instance for two
    requests of one batch is refused (the batch keeps them all open at once), unless it
    declares ``concurrent_sequences``: such a drafter gets ``open(request)`` for each of
    its rows and serves each row through the handle it returns (one instance may serve
    every row). Each call into a drafter or a handle goes through the same guard as at
    batch 1 (see :func:`pytest_specdec.engine.loop.generate`).

    Returns one Generation per request, in order, each stopped exactly where plain
    decoding stops it (EOS or its budget). Every row's step records carry the shared
    forward's time as ``target_s`` and its own drafting time as ``drafter_s``.

    ``exact`` (``--specdec-lossless exact``): as at batch 1, each row's prompt but its
    last token is prefilled alone (:func:`_exact_prefill_rows`), then every forward runs
    the row-invariant attention and pinned linear layers of
    :mod:`pytest_specdec.engine.exact`, each row against its own mask row, and a forward
    left with one row gets batch 1's probe: a sequence's logits, and so its tokens, are
    bit-identical to batch 1's in exact mode whatever else the batch holds.

    ``on_tokens``: told, after each step's timed spans, the tokens all rows emitted in
    it (as at batch 1, :func:`pytest_specdec.engine.loop.generate`)."""
    if not requests:
        raise ValueError("generate_batch needs at least one request")
    drafters = list(drafters) if drafters is not None else [None] * len(requests)
    if len(drafters) != len(requests):
        raise ValueError(f"{len(drafters)} drafters for {len(requests)} requests: give one per "
                         "request (None for plain decoding)")
    given = [d for d in drafters if d is not None]
    concurrent = {id(d): serves_concurrent_sequences(d, drafter_name) for d in given}
    repeated = [d for d in given if not concurrent[id(d)]]
    if len({id(d) for d in repeated}) != len(repeated):
        raise ValueError("the same drafter instance serves two requests of one batch: a drafter "
                         "instance serves one open sequence at a time, so give each its own "
                         "(or declare concurrent_sequences)")
    for request in requests:
        if not request.prompt_ids:
            raise ValueError("a prompt is empty: at least one token is needed")
        if request.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {request.max_new_tokens}")
    if refusal := target.tree_support():
        raise ValueError(f"a batched run needs a target whose forward takes an explicit mask; "
                         f"target {target.name!r} cannot: {refusal}")
    rows: list[_Row] = []
    for index, (request, drafter) in enumerate(zip(requests, drafters)):
        context = list(request.prompt_ids)
        guard, needs = None, frozenset()
        if drafter is not None:
            attachment = attach(target, drafter, drafter_name, step_timeout=step_timeout)
            needs = attachment.needs
            begun = DraftRequest(tuple(context), request.group, request.sample, request.round,
                                 request.sampler)
            if concurrent[id(drafter)]:
                handle = _open(drafter, begun, drafter_name, step_timeout, attachment)
                guard = Guard(handle, drafter_name, step_timeout, context, attachment)
            else:
                guard = Guard(drafter, drafter_name, step_timeout, context, attachment)
                guard.call("begin", begun)
        rows.append(_Row(index, request, context, guard, needs))
    layer_sets = {r.guard.attachment.hidden_layers for r in rows if "hidden_states" in r.needs}
    if len(layer_sets) > 1:
        raise ValueError(f"the batch's drafters ask for different hidden layers {sorted(layer_sets)}")
    layers: bool | Sequence[int] = next(iter(layer_sets), False)
    top_k = SIGNAL_TOP_K if any("top_k" in r.needs for r in rows) else 0
    cache = BatchCache(len(rows), target.device)
    exact_forwards: Any = contextlib.nullcontext()
    if exact:
        _exact_prefill_rows(target, rows, cache, layers)
        exact_forwards = row_invariant(target.model)
    with exact_forwards:
        return _decode(target, rows, cache, k=k, layers=layers, top_k=top_k, exact=exact,
                       on_tokens=on_tokens)


def _decode(target: Target, rows: list[_Row], cache: BatchCache, *, k: int,
            layers: bool | Sequence[int], top_k: int, exact: bool,
            on_tokens: Callable[[int], None] | None = None) -> list[Generation]:
    """The batch's steps, until every row has stopped; one Generation per row.

    Spans, each bounded by :func:`pytest_specdec.engine.timing.boundary` (the device
    synchronized before the clock is read): each row's propose; the verify span, from
    the forward's launch through every row's acceptance (as at batch 1); each row's
    observe and accept (:func:`_finish_step`)."""
    done: dict[int, Generation] = {}
    open_rows = rows
    device = target.device
    while open_rows:
        drafts, fed, drafting = [], [], []
        for row in open_rows:
            room = min(k, row.request.max_new_tokens - len(row.new) - 1)
            t0 = timing.boundary(device)
            draft = row.guard.propose(room, target.vocab_size) \
                if row.guard is not None and room > 0 else Draft()
            drafting.append(timing.boundary(device) - t0)
            drafts.append(draft)
            fed.append(_fed(row, draft))
        if exact and len(fed[0].tokens) < 2 and len(fed) == 1:
            # a forward of one row takes other matmul kernels: batch 1's probe after the
            # last token (scored, never accepted, its column dropped)
            fed[0] = _fed(open_rows[0], Draft((), None, (open_rows[0].context[-1],), (-1,)))
        t1 = timing.boundary(device)
        slots = _slots(fed, cache.pending_keep, cache.device)
        logits, hidden = _forward(target, cache, fed, layers, slots)
        _score_rows(open_rows, fed, logits, slots)
        width, steps = slots.ids.shape[1], []
        for b, (row, f, draft) in enumerate(zip(open_rows, fed, drafts)):
            row_logits = logits[b, logits.shape[1] - len(f.parents) - 1:]
            row_hidden = hidden[b, width - len(f.tokens):] if hidden is not None else None
            step, on_path = _verify(row, f, draft, row_logits, row_hidden, top_k)
            # the row's rejected nodes (chain tail, tree branches, probes) drop out
            nodes = cache.columns - len(f.parents)
            cache.valid[b, nodes: nodes + f.n_draft] = on_path
            cache.valid[b, nodes + f.n_draft:] = False
            steps.append(step)
        forward_s = timing.boundary(device) - t1
        for b, (row, step, draft) in enumerate(zip(open_rows, steps, drafts)):
            _finish_step(target, row, step, draft, forward_s, len(open_rows), width,
                         drafting[b])
        cache.compact(max(row.cached for row in open_rows))
        if on_tokens is not None:  # after every row's step record: in no step's spans
            on_tokens(sum(row.steps[-1].emitted for row in open_rows))
        still = [b for b, row in enumerate(open_rows) if row.stop != "eos"
                 and len(row.new) < row.request.max_new_tokens]
        for b, row in enumerate(open_rows):
            if b not in still:
                done[row.index] = _close(row)
        if still and len(still) < len(open_rows):
            cache.keep_rows(still)
        open_rows = [open_rows[b] for b in still]
    return [done[i] for i in range(len(rows))]


def _exact_prefill_rows(target: Target, rows: list[_Row], cache: BatchCache,
                        layers: bool | Sequence[int]) -> None:
    """Exact mode's start, batch 1's (:func:`pytest_specdec.engine.loop._exact_prefill`)
    for each row: its prompt but the last token prefilled alone in a cache of its own,
    so its keys, values and hidden states are those batch 1 computes; then left-padded
    (pad columns invalid) into the batch's cache."""
    own = []
    for row in rows:
        one = target.new_cache()
        row.cached, row.feed.prefilled = _exact_prefill(target, row.context, one, layers)
        own.append(one)
    width = max(row.cached for row in rows)
    if width == 0:
        return  # every prompt is one token: nothing to prefill
    filled = next(one for row, one in zip(rows, own) if row.cached)
    for i, layer in enumerate(filled.layers):
        if getattr(layer, "keys", None) is None:
            raise RuntimeError(f"exact mode cannot batch this target: its cache layer {i} "
                               "(shared or uninitialised) holds no keys after the prefill")
        keys, values = [], []
        for row, one in zip(rows, own):
            k, v = (one.layers[i].keys, one.layers[i].values) if row.cached else \
                (layer.keys[:, :, :0], layer.values[:, :, :0])
            if k.shape[2] != row.cached:
                raise RuntimeError(f"cache layer {i} holds {k.shape[2]} positions after "
                                   f"prefilling {row.cached}: exact mode needs them all")
            pad = width - row.cached
            keys.append(torch.nn.functional.pad(k, (0, 0, pad, 0)))
            values.append(torch.nn.functional.pad(v, (0, 0, pad, 0)))
        cache.kv.update(torch.cat(keys), torch.cat(values), i)
    # built on the device (no host-built tensor is copied)
    valid = torch.zeros(len(rows), width, dtype=torch.bool, device=cache.device)
    position = torch.zeros(len(rows), width, dtype=torch.long, device=cache.device)
    for b, row in enumerate(rows):
        valid[b, width - row.cached:] = True
        position[b, width - row.cached:] = torch.arange(row.cached, device=cache.device)
    cache.append(valid, position)


def _open(drafter: Drafter, request: DraftRequest, name: str, step_timeout: float,
          attachment: Attachment) -> Any:
    """A concurrent drafter's handle for one sequence: ``open(request)`` under the guard
    (what it raises or breaks fails the drafter's case, as ``begin`` would); a handle
    without the methods of an open sequence is a DraftError too."""
    handle = Guard(drafter, name, step_timeout, None, attachment).call("open", request)
    try:
        missing = missing_methods(handle, SEQUENCE_METHODS)
    except Exception:  # a handle whose attributes raise when read
        missing = list(SEQUENCE_METHODS)
    if missing:
        raise DraftError(name, "open returns a sequence with propose, accept and end",
                         f"it returned {type(handle).__name__}, without {', '.join(missing)}")
    return handle


def _finish_step(target: Target, row: _Row, step: StepResult, draft: Draft,
                 forward_s: float, rows: int, width: int, propose_s: float) -> None:
    """Append one row's emitted tokens (cut at EOS), tell its drafter, and record the
    step: the shared forward's seconds, the row's own drafting (propose, then observe
    and accept), the rows the forward verified and its slots per row (`width`)."""
    t0 = timing.boundary(target.device)
    emitted, row.stop = _until_eos(step.emitted, target.eos_ids)
    # all but the bonus token are cached: the next forward feeds it first
    row.cached = len(row.context) + len(step.emitted) - 1
    row.context.extend(emitted)
    row.new.extend(emitted)
    if row.guard is not None:
        _tell_drafter(row.guard, step, draft, emitted, row.context, row.needs, row.feed)
    drafter_s = propose_s + timing.boundary(target.device) - t0
    accepted = min(len(step.emitted) - 1, len(emitted))
    record = StepRecord(drafted=len(draft), depth=draft.depth, accepted=accepted,
                        emitted=len(emitted), drafter_s=drafter_s,
                        target_s=forward_s, rows=rows, fed=rows * width)
    row.steps.append(record)
    row.stats.add_step(record)


def _close(row: _Row) -> Generation:
    if row.guard is not None:
        row.guard.call("end")
        row.guard.check_whole_context()
    return Generation(tokens=row.new, stop=row.stop, stats=row.stats, steps=row.steps)
