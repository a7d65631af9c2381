"""One decode loop, for the baseline (no drafter) and for speculative decoding.

The baseline is the same loop with an empty draft at every step, so both are timed
through one code path and differ only in what the drafter proposes.

Cache discipline: positions are explicit. ``cached`` counts the context tokens whose
keys and values the cache holds; each forward feeds ``context[cached:]`` (the whole
prompt at the first step, so prefill and the first verification share one forward;
then the one token emitted last) followed by the draft. Rolling back rejected draft
tokens is a length change (``cache.crop(-n)``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import weakref
from array import array
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence, overload

import torch

from pytest_specdec import timing, torch_state
from pytest_specdec.drafter import (NEEDS, TARGET_RESOURCES, Draft, DraftError, DraftRequest,
                                    Drafter, TargetInfo, TargetSignals, describe_value,
                                    validate_draft)
from pytest_specdec.exact import row_invariant
from pytest_specdec.integrity import digest
from pytest_specdec.metrics import SpecDecodingStats, StepRecord
from pytest_specdec.sampling import Sampler
from pytest_specdec.target import Target

#: Width of the "top_k" signal handed to drafters that declare it.
SIGNAL_TOP_K = 8


@dataclass(frozen=True)
class GenerationRequest:
    """One sequence to generate. group/sample/round only inform the drafter."""

    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    sampler: Sampler = Sampler()
    group: str = ""
    sample: int = 0
    round: int = 0


@dataclass
class Generation:
    tokens: list[int]  # new tokens, prompt excluded, EOS included if reached
    stop: str  # "eos" or "budget"
    stats: SpecDecodingStats
    steps: list[StepRecord] = field(default_factory=list)  # one per target forward


class TokenView(Sequence[int]):
    """A read-only live view of the context: drafters cannot mutate what they read.

    The engine shows each drafter a view of the drafter's own copy of the tokens, never
    its own list; writing to that copy anyway is caught (see :class:`_Guard`)."""

    __slots__ = ("_tokens",)

    def __init__(self, tokens: list[int]):
        self._tokens = tokens

    def __len__(self) -> int:
        return len(self._tokens)

    @overload
    def __getitem__(self, index: int) -> int: ...
    @overload
    def __getitem__(self, index: slice) -> tuple[int, ...]: ...

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return tuple(self._tokens[index])
        return self._tokens[index]

    def __iter__(self) -> Iterator[int]:
        return iter(self._tokens)


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
    """Verify a draft after the context with one target forward; trees and probes
    go through :func:`verify_tree`, chains (the common case) take this fast path.
    In exact mode (see :mod:`pytest_specdec.exact`) every step takes the tree path,
    whose explicit mask the row-invariant attention reads, with at least two rows:
    a lone row would take other matmul kernels than a verify forward's rows.

    Acceptance rule: the forward scores the uncached context and every draft token;
    c_j, the target's choice for absolute position len(context) + j, comes from the
    sampler (argmax at T=0; argmax of Gumbel-perturbed logits keyed by (seed, position)
    at T>0). Draft token d_j is accepted iff d_0..d_{j-1} were and d_j == c_j. At the
    first disagreement, or past the draft's end, the target's own choice is emitted as
    the bonus token. So each emitted token is exactly what plain decoding would have
    chosen at that position: the output cannot depend on the drafter.
    """
    if exact and len(context) - cached + len(draft.tokens) + len(draft.probe_tokens) < 2:
        # a probe after the last token: scored, never accepted, dropped from the cache
        draft = Draft(draft.tokens, draft.parents, (context[-1],), (-1,))
    if exact or not draft.is_chain or draft.probe_tokens:
        return verify_tree(target, sampler, cache, context, cached, draft,
                           hidden_states=hidden_states, top_k=top_k)
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

    Acceptance rule: each node sits at position len(context) - 1 + depth and attends
    to the context and its own ancestors only (on sliding-window layers, those less
    than a window behind it: see :meth:`Target.forward`), so its logits are those its
    root path would give as a chain. From the root (the last context token) the walk moves to
    the first child, in draft order, whose token equals the target's choice for the
    next position, and stops where none does; the choice there is the bonus token.
    A choice depends only on (logits, seed, position), as in plain decoding, so the
    output cannot depend on the tree. The cache keeps the context and that path only.
    """
    n_draft = len(draft.tokens)
    nodes = (*draft.tokens, *draft.probe_tokens)
    parents = [*(draft.parents if draft.parents is not None else range(-1, n_draft - 1)),
               *(p if p < 0 else p + n_draft for p in draft.probe_parents)]
    depth: list[int] = []
    for p in parents:
        depth.append(1 + (depth[p] if p >= 0 else 0))
    last, uncached = len(context) - 1, len(context) - cached
    # who may attend to whom: the context causally, each node to the context and its ancestors
    attend = torch.ones(uncached + len(nodes), len(context) + len(nodes), dtype=torch.bool)
    attend[:uncached] = attend[:uncached].tril(diagonal=cached)
    tree = attend[uncached:, len(context):]
    tree.zero_()
    for i, p in enumerate(parents):
        if p >= 0:
            tree[i] = tree[p]
        tree[i, i] = True
    logits, hidden = target.forward(
        [*context[cached:], *nodes], cache, keep_logits=len(nodes) + 1,
        hidden_states=hidden_states, positions=[*range(cached, len(context)), *(last + d for d in depth)],
        attend=attend)
    # row 0: after the last context token; row 1 + i: after node i
    positions = torch.tensor([last + 1, *(last + 1 + d for d in depth[:n_draft])], device=logits.device)
    scores = sampler.scores(logits[: n_draft + 1], positions)
    choices = scores.argmax(dim=-1).tolist()
    path: list[int] = []
    here = -1
    while True:
        wanted = choices[here + 1]
        here = next((i for i in range(here + 1, n_draft)
                     if parents[i] == here and draft.tokens[i] == wanted), -1)
        if here < 0:
            break
        path.append(here)
    keep_path(cache, len(context), path, len(nodes))
    rows = [0, *(1 + i for i in path)]
    if hidden is not None:  # the uncached context, then the accepted path's nodes
        hidden = hidden[[*range(uncached), *(uncached + i for i in path)]]
    return StepResult(
        emitted=[*(draft.tokens[i] for i in path), choices[rows[-1]]], logits=logits[rows],
        scores=scores[rows], hidden=hidden,
        top_k=logits[: n_draft + 1].topk(top_k, dim=-1).indices if top_k else None,
        probe_choices=tuple(logits[n_draft + 1:].argmax(dim=-1).tolist()))


def keep_path(cache: Any, base: int, path: list[int], fed: int) -> None:
    """The cache holds `base` context positions then `fed` tree nodes: keep the nodes of
    `path` (increasing indices), moved to base, base + 1, ..., and drop the rest.

    A sliding-window layer holds fewer context positions than a full one (only those
    its window still needs), but every layer holds the `fed` nodes last, so they are
    indexed from the end of each layer. A sliding layer must record the past (as
    :meth:`Target.new_cache` sets it up): one that trims to its window on update may
    have dropped context the path still needs, or nodes themselves."""
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


def target_info(target: Target, needs: frozenset[str] = frozenset()) -> TargetInfo:
    """What ``attach`` tells a drafter of `target`, with the read-only parts it named in
    `needs` (detached views of the target's own weights: no copy)."""
    model = target.model
    embeddings = model.get_input_embeddings().weight
    return TargetInfo(
        name=target.name, vocab_size=target.vocab_size, hidden_size=int(embeddings.shape[-1]),
        num_layers=target.num_layers, device=target.device, dtype=target.dtype,
        eos_ids=target.eos_ids,
        vocab=target.vocab,
        embeddings=embeddings.detach() if "embeddings" in needs else None,
        output_head=(model.get_output_embeddings().weight.detach()
                     if "output_head" in needs else None))


@dataclass(frozen=True)
class Attachment:
    """A drafter attached to a target: what ``attach`` told it, the layers its
    "hidden_states" signal carries, and the lent tensors' fingerprints, taken before
    ``attach`` runs (the version counter, checked after every call; an exact digest of
    their bits (:func:`pytest_specdec.integrity.digest`), after ``attach`` and after
    every sequence: a write through ``.data`` leaves the counter alone)."""

    info: TargetInfo
    needs: frozenset[str]
    hidden_layers: tuple[int, ...]
    versions: tuple[int, ...]
    checksums: tuple[tuple[int, ...], ...]
    originals: tuple[torch.Tensor, ...]  # copies, to undo a write

    def lent_changed(self, *, full: bool = False) -> bool:
        """Whether a lent tensor was written to; if so, it is set back first, so the
        target stays intact for the cases after."""
        lent = self.info.lent()
        changed = tuple(t._version for t in lent) != self.versions or (
            full and _checksums(lent) != self.checksums)
        if changed:
            with torch.inference_mode():
                for tensor, original in zip(lent, self.originals):
                    tensor.copy_(original)
        return changed


def _checksums(tensors: tuple[torch.Tensor, ...]) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(digest(t).tolist()) for t in tensors)


# id(drafter) -> (id(target), its attachment): attach runs once per drafter instance
_ATTACHED: dict[int, tuple[int, Attachment]] = {}


def attach(target: Target, drafter: Drafter, name: str = "drafter", *,
           step_timeout: float = 0.0) -> Attachment:
    """Call ``drafter.attach(info)`` once per drafter instance and target (later calls
    return the first attachment), under the guard: what it raises or breaks fails the
    drafter's case, named. The runner attaches before the timed rounds, so loading a
    model drafter's weights is never timed; ``generate`` attaches a drafter it is given
    unattached.

    The lent tensors are fingerprinted (and copied, to undo a write) before ``attach``
    runs, so a write inside ``attach`` itself is caught like any later one."""
    known = _ATTACHED.get(id(drafter))
    if known is not None and known[0] == id(target):
        return known[1]
    with torch.inference_mode():  # as every later call: the guard compares grad mode too
        guard = _Guard(drafter, name, step_timeout, None)
        needs = guard.needs()
        info = target_info(target, needs)
        lent = info.lent()
        attachment = Attachment(info, needs, (), tuple(t._version for t in lent),
                                _checksums(lent), tuple(t.clone() for t in lent))
        if callable(getattr(drafter, "attach", None)):
            guard.attachment = attachment
            guard.call("attach", info)
    if "hidden_states" in needs:
        attachment = dataclasses.replace(attachment,
                                         hidden_layers=guard.hidden_layers(info.num_layers))
    try:  # forget it with the drafter (an object without weak references re-attaches)
        weakref.finalize(drafter, _ATTACHED.pop, id(drafter), None)
        _ATTACHED[id(drafter)] = (id(target), attachment)
    except TypeError:
        pass
    return attachment


@torch.inference_mode()
def generate(target: Target, request: GenerationRequest, drafter: Drafter | None = None,
             *, k: int = 0, drafter_name: str = "drafter", step_timeout: float = 0.0,
             exact: bool = False) -> Generation:
    """Decode one sequence; with a drafter, speculatively. Stops at EOS or the budget,
    exactly where plain decoding stops (a draft never runs past either).

    Every call into the drafter goes through a guard (see :class:`_Guard`): whatever
    it raises, returns or does to the context it was shown becomes a
    :class:`DraftError` naming ``drafter_name`` and the rule broken. ``step_timeout``
    (seconds, 0 = no limit) bounds each single call (begin, propose, observe, accept,
    end). Python cannot safely interrupt a running call, so the limit is checked when
    the call returns: a drafter that never returns is not stopped by it.

    ``exact`` (``--specdec-lossless exact``): the prompt but its last token is
    prefilled alone, then every forward runs the row-invariant attention of
    :mod:`pytest_specdec.exact`, so that the baseline and every drafter compute each
    position's logits bit for bit alike in any dtype.
    """
    prompt = list(request.prompt_ids)
    if not prompt:
        raise ValueError("the prompt is empty: at least one token is needed")
    if request.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {request.max_new_tokens}")
    stats = SpecDecodingStats()
    started = timing.now()
    cache = target.new_cache()
    context, new, stop = prompt, [], "budget"
    cached = 0  # context tokens the cache holds
    attachment = attach(target, drafter, drafter_name, step_timeout=step_timeout) \
        if drafter is not None else None
    needs = attachment.needs if attachment is not None else frozenset()
    layers = attachment.hidden_layers if "hidden_states" in needs else False
    prefilled: torch.Tensor | None = None  # exact mode's separate prefill's hidden states
    exact_attention = contextlib.nullcontext()
    if exact:
        if refusal := target.tree_support():
            raise ValueError(f"--specdec-lossless exact needs a target whose forward takes an "
                             f"explicit mask; target {target.name!r} cannot: {refusal}")
        if len(prompt) > 1:  # the same forward in every path, so any kernel will do
            _, prefilled = target.forward(prompt[:-1], cache, keep_logits=1, hidden_states=layers)
            cached = len(prompt) - 1
        exact_attention = row_invariant(target.model)
    steps: list[StepRecord] = []
    # why the target cannot verify trees ("" if it can; exact mode asked already)
    tree_refusal: str | None = "" if exact else None
    guarded = _Guard(drafter, drafter_name, step_timeout, context, attachment) \
        if drafter is not None else None
    given = 0  # context positions whose hidden states the drafter has been given
    if guarded is not None:
        guarded.call("begin", DraftRequest(tuple(prompt), request.group, request.sample,
                                           request.round, request.sampler))
    with exact_attention:
        while len(new) < request.max_new_tokens:
            # each step emits at most len(draft) + 1 tokens: cap the draft by the budget
            room = min(k, request.max_new_tokens - len(new) - 1)
            t0 = timing.now()
            draft = Draft()
            if guarded is not None and room > 0:
                draft = guarded.propose(room, target.vocab_size)
            t1 = timing.now()
            if not draft.is_chain or draft.probe_tokens:
                if tree_refusal is None:  # asked once per sequence, at its first tree
                    tree_refusal = target.tree_support()
                if tree_refusal:
                    raise DraftError(drafter_name, "tree drafts need a target that can verify them",
                                     f"target {target.name!r} cannot: {tree_refusal}")
            step = speculative_step(target, request.sampler, cache, context, cached, draft,
                                    hidden_states=layers,
                                    top_k=SIGNAL_TOP_K if "top_k" in needs else 0, exact=exact)
            cached = len(context) + len(step.emitted) - 1  # all but the bonus token
            t2 = timing.now()
            emitted = step.emitted
            eos_at = next((i for i, t in enumerate(emitted) if t in target.eos_ids), None)
            if eos_at is not None:
                emitted, stop = emitted[: eos_at + 1], "eos"
            context.extend(emitted)
            new.extend(emitted)
            if guarded is not None:
                guarded.appended(emitted)
                if needs & NEEDS - TARGET_RESOURCES:
                    hidden = step.hidden
                    if prefilled is not None and hidden is not None:
                        hidden, prefilled = torch.cat([prefilled, hidden]), None
                    signals = _signals(step, needs, context[-len(emitted) - 1], draft, hidden,
                                       given, len(context) - 1)
                    given = len(context) - 1
                    guarded.call("observe", signals)
                guarded.call("accept", tuple(emitted))
            t3 = timing.now()
            # draft tokens past an EOS are agreed with but never output: not counted
            accepted = min(len(step.emitted) - 1, len(emitted))
            record = StepRecord(drafted=len(draft), depth=draft.depth, accepted=accepted,
                                emitted=len(emitted), drafter_s=(t1 - t0) + (t3 - t2),
                                target_s=t2 - t1)
            steps.append(record)
            stats.add_step(record)
            if stop == "eos":
                break
    if guarded is not None:
        guarded.call("end")
        guarded.check_whole_context()
    stats.wall_s = timing.now() - started
    return Generation(tokens=new, stop=stop, stats=stats, steps=steps)


def _signals(step: StepResult, needs: frozenset[str], root: int, draft: Draft,
             hidden: torch.Tensor | None, given: int, known: int) -> TargetSignals:
    """What the drafter declared it needs from this step; `root` is the last context
    token before the step; `hidden` holds states from position `given` on, of which
    those before `known` (the newest token has none yet) are handed over."""
    top_k = after = probes = start = None
    if "top_k" in needs:
        top_k, after = step.top_k, (root, *draft.tokens)
    if "probe_choices" in needs:  # not the probe exact mode may add to a lone row
        probes = step.probe_choices[:len(draft.probe_tokens)]
    if hidden is not None:  # an EOS cuts the step short: rows past it are dropped
        hidden, start = hidden[: known - given], given
    return TargetSignals(top_k=top_k, top_k_after=after, hidden_states=hidden,
                         hidden_start=start, probe_choices=probes)


class _ReadOnlyTokens(list):
    """The drafter's own copy of the context, behind its TokenView. Its mutating
    methods refuse and leave a mark; the engine extends it through ``list.extend``."""

    __slots__ = ("tampered",)

    def __init__(self, tokens: list[int]):
        super().__init__(tokens)
        self.tampered = False

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        self.tampered = True
        raise TypeError("the context is read-only")

    append = extend = insert = pop = remove = clear = sort = reverse = _refuse
    __setitem__ = __delitem__ = __iadd__ = __imul__ = _refuse


READ_ONLY = "the context is read-only"
LENT = "the target's tensors are read-only"
TORCH_STATE = "torch's global state is left unchanged"


def _exception_text(exc: BaseException, limit: int = 300) -> str:
    """``Type: message`` of a drafter's exception, safe against a hostile ``__str__``
    and cut to `limit` characters."""
    try:
        message = str(exc)
    except Exception:
        message = "<the exception's message cannot be shown>"
    text = f"{type(exc).__name__}: {message}"
    return text if len(text) <= limit else text[:limit - 3] + "..."


class _Guard:
    """Calls into a drafter; anything it raises, or breaks, becomes a DraftError naming it.

    - Exceptions (SystemExit included; KeyboardInterrupt passes through) become
      "<method> does not raise".
    - Each call is timed; past ``timeout`` seconds (0: no limit) it is
      "each call returns within S s". The check runs when the call returns: Python
      cannot pre-empt it safely.
    - The context: the drafter sees a :class:`TokenView` of its own copy of the
      tokens, never the engine's list, so nothing it does can reach the output.
      Tampering with that copy (through the view's private list, or a reference kept
      from an earlier call) is "the context is read-only": after each call the copy is
      checked in O(1) (same list, no refused write, same length, same last token), and
      once per sequence, after ``end``, token by token.
    - Torch's global settings (:mod:`pytest_specdec.torch_state`: default dtype and
      device, thread counts, grad mode, matmul precision and the backend flags) are
      compared after each call with those the sequence started with (a few µs); a
      change is undone and is "torch's global state is left unchanged". A call that
      raises has its changes undone too.
    """

    def __init__(self, drafter: Any, name: str, timeout: float, context: list[int] | None,
                 attachment: Attachment | None = None):
        self.drafter, self.name, self.timeout = drafter, name, timeout
        # the engine's own list: never shown to the drafter (None: before a sequence)
        self.context = context
        self.shadow = _ReadOnlyTokens(context if context is not None else [])
        self.view = TokenView(self.shadow)
        self.torch_state = torch_state.capture()
        self.attachment = attachment

    def needs(self) -> frozenset[str]:
        try:
            needs = frozenset(getattr(self.drafter, "needs", ()))
        except Exception as exc:
            raise DraftError(self.name, "needs is a set of target signal names",
                             _exception_text(exc)) from exc
        if unknown := needs - NEEDS:
            raise DraftError(self.name, "needs is a set of target signal names",
                             f"unknown {sorted(map(str, unknown))}; "
                             f"available: {sorted(NEEDS)}")
        return needs

    def hidden_layers(self, num_layers: int) -> tuple[int, ...]:
        """The drafter's ``hidden_layers``, as non-negative indices ((num_layers,) if empty)."""
        rule = (f"hidden_layers is a tuple of layer indices in [{-num_layers - 1}, {num_layers}] "
                "(transformers' output_hidden_states numbering)")
        try:
            layers = getattr(self.drafter, "hidden_layers", ())
            layers = tuple(layers) if isinstance(layers, (tuple, list)) else layers
        except Exception as exc:
            raise DraftError(self.name, rule, _exception_text(exc)) from exc
        if not isinstance(layers, tuple) or not all(
                type(i) is int and -num_layers - 1 <= i <= num_layers for i in layers):
            raise DraftError(self.name, rule, f"got {describe_value(layers)}")
        return tuple(i % (num_layers + 1) for i in layers) or (num_layers,)

    def call(self, method: str, *args: Any) -> Any:
        started = time.perf_counter()
        try:
            result = getattr(self.drafter, method)(*args)
        except (Exception, SystemExit) as exc:
            torch_state.restore(self.torch_state)
            if self.attachment is not None and self.attachment.lent_changed(full=True):
                raise DraftError(self.name, LENT, f"{method} wrote to the target's "
                                 f"{self.lent_names()} ({_exception_text(exc)})") from exc
            if self.shadow.tampered:
                raise DraftError(self.name, READ_ONLY,
                                 f"{method} tried to change it ({_exception_text(exc)})") from exc
            raise DraftError(self.name, f"{method} does not raise", _exception_text(exc)) from exc
        elapsed = time.perf_counter() - started
        if not torch_state.unchanged(self.torch_state):
            self.torch_state_changed(method)
        if self.attachment is not None and self.attachment.lent_changed(
                full=method in ("attach", "end")):
            raise DraftError(self.name, LENT, f"{method} wrote to the target's {self.lent_names()}")
        if self.context is not None:
            self.check_context(method)
        if self.timeout and elapsed > self.timeout:
            raise DraftError(self.name, f"each call returns within {self.timeout:g} s",
                             f"{method} took {elapsed:.3g} s")
        return result

    def lent_names(self) -> str:
        return " or ".join(sorted(self.attachment.needs & TARGET_RESOURCES))

    def torch_state_changed(self, method: str) -> None:
        """Undo what the call changed in torch's global state, and fail the drafter."""
        changes = torch_state.diff(self.torch_state, torch_state.capture())
        kept = torch_state.restore(self.torch_state)
        detail = f"{method} changed {torch_state.describe(changes)}"
        if kept:
            detail += "; torch refused to set back " + "; ".join(f"{n} ({why})" for n, why in kept)
        raise DraftError(self.name, TORCH_STATE, detail)

    def propose(self, k: int, vocab_size: int) -> Draft:
        draft = self.call("propose", self.view, k)
        try:
            return validate_draft(draft, drafter=self.name, k=k, vocab_size=vocab_size)
        except DraftError:
            raise
        except Exception as exc:  # a Draft subclass whose fields raise when read
            raise DraftError(self.name, "propose returns a Draft",
                             f"reading it raised {_exception_text(exc)}") from exc

    def appended(self, tokens: list[int]) -> None:
        """The engine's append, mirrored into the drafter's copy."""
        list.extend(self.shadow, tokens)

    def check_context(self, method: str) -> None:
        shadow, context = self.shadow, self.context
        size = list.__len__(shadow)
        if getattr(self.view, "_tokens", None) is not shadow:
            detail = "the view's token list was replaced"
        elif shadow.tampered:
            detail = "a write to it was refused"
        elif size != len(context):
            detail = f"its length is {size}, the sequence has {len(context)} tokens"
        elif type(last := list.__getitem__(shadow, -1)) is not int or last != context[-1]:
            detail = f"its last token is {last!r}, the sequence's is {context[-1]}"
        else:
            return
        raise DraftError(self.name, READ_ONLY, f"after {method}: {detail}")

    def check_whole_context(self) -> None:
        """Token by token, once per sequence (C speed; amortised O(1) per step)."""
        try:
            same = array("q", self.shadow) == array("q", self.context)
        except Exception:  # something that is not an int was put in
            same = False
        if not same:
            at = next((i for i, (a, b) in enumerate(zip(self.shadow, self.context))
                       if type(a) is not int or a != b), len(self.context))
            raise DraftError(self.name, READ_ONLY,
                             f"token {at} of the context was changed "
                             "(found at the end of the sequence)")
