"""One decode loop, for the baseline (no drafter) and for speculative decoding.

The baseline is the same loop with an empty draft at every step, so both are timed
through one code path and differ only in what the drafter proposes. A step: the drafter
proposes (through the guard, :mod:`.guard`), one target forward verifies
(:mod:`.verify`), the emitted tokens extend the context and the drafter is told.

Cache discipline: positions are explicit. ``cached`` counts the context tokens whose
keys and values the cache holds; each forward feeds ``context[cached:]`` (the whole
prompt at the first step, so prefill and the first verification share one forward;
then the one token emitted last) followed by the draft. Rolling back rejected draft
tokens is a length change (``cache.crop(-n)``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from pytest_specdec.engine import timing
from pytest_specdec.engine.exact import row_invariant
from pytest_specdec.engine.guard import Guard, attach
from pytest_specdec.engine.metrics import SpecDecodingStats, StepRecord
from pytest_specdec.engine.target import Target
from pytest_specdec.engine.verify import StepResult, speculative_step
from pytest_specdec.protocol.drafter import (NEEDS, TARGET_RESOURCES, Draft, DraftError,
                                             DraftRequest, Drafter, TargetSignals)
from pytest_specdec.protocol.sampling import Sampler

#: Width of the "top_k" signal handed to drafters that declare it.
SIGNAL_TOP_K = 8
#: Cache positions a sequence reserves past its prompt and budget, for the draft nodes
#: of its last step (a static cache grows, recompiling, if a draft needs more)
DRAFT_ROOM = 256


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


@torch.inference_mode()
def generate(target: Target, request: GenerationRequest, drafter: Drafter | None = None,
             *, k: int = 0, drafter_name: str = "drafter", step_timeout: float = 0.0,
             exact: bool = False, on_tokens: Callable[[int], None] | None = None) -> Generation:
    """Decode one sequence; with a drafter, speculatively. Stops at EOS or the budget,
    exactly where plain decoding stops (a draft never runs past either).

    Every call into the drafter goes through a guard (see :class:`Guard`): whatever
    it raises, returns or does to the context it was shown becomes a
    :class:`DraftError` naming ``drafter_name`` and the rule broken. ``step_timeout``
    (seconds, 0 = no limit) bounds each single call (begin, propose, observe, accept,
    end). Python cannot safely interrupt a running call, so the limit is checked when
    the call returns: a drafter that never returns is not stopped by it.

    ``exact`` (``--specdec-lossless exact``): the prompt but its last token is
    prefilled alone, then every forward runs the row-invariant attention of
    :mod:`pytest_specdec.engine.exact`, so that the baseline and every drafter compute each
    position's logits bit for bit alike in any dtype.

    Every span boundary (t0..t3, the start and the end) is a
    :func:`pytest_specdec.engine.timing.boundary`: the device is synchronized before the
    clock is read, so each span holds the device work launched in it. A step makes a
    bounded number of host<->device transfers (:mod:`pytest_specdec.engine.transfer`):
    two for an empty draft or a chain, the same for a tree.

    ``on_tokens`` (the live progress line): told each step's emitted token count after
    the step's timed span ends (t3) and before the next one starts, so its time is in
    no step's ``target_s`` or ``drafter_s``; one call per step, the baseline's and a
    drafter's alike. It must be cheap (the meter rate-limits what it draws).
    """
    prompt = list(request.prompt_ids)
    if not prompt:
        raise ValueError("the prompt is empty: at least one token is needed")
    if request.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {request.max_new_tokens}")
    stats = SpecDecodingStats()
    device = target.device
    started = timing.boundary(device)
    # exact mode's row-invariant forwards run eagerly (a DynamicCache)
    cache = target.new_cache() if exact else \
        target.new_cache(len(prompt) + request.max_new_tokens + DRAFT_ROOM)
    context, new, stop = prompt, [], "budget"
    cached = 0  # context tokens the cache holds
    attachment = attach(target, drafter, drafter_name, step_timeout=step_timeout) \
        if drafter is not None else None
    needs = attachment.needs if attachment is not None else frozenset()
    layers = attachment.hidden_layers if "hidden_states" in needs else False
    feed = _HiddenStates()
    exact_attention = contextlib.nullcontext()
    if exact:
        cached, feed.prefilled = _exact_prefill(target, prompt, cache, layers)
        exact_attention = row_invariant(target.model)
    steps: list[StepRecord] = []
    # why the target cannot verify trees ("" if it can; exact mode asked already)
    tree_refusal: str | None = "" if exact else None
    guarded = Guard(drafter, drafter_name, step_timeout, context, attachment) \
        if drafter is not None else None
    if guarded is not None:
        guarded.call("begin", DraftRequest(tuple(prompt), request.group, request.sample,
                                           request.round, request.sampler))
    with exact_attention:
        while len(new) < request.max_new_tokens:
            # each step emits at most len(draft) + 1 tokens: cap the draft by the budget
            room = min(k, request.max_new_tokens - len(new) - 1)
            t0 = timing.boundary(device)
            draft = Draft()
            if guarded is not None and room > 0:
                draft = guarded.propose(room, target.vocab_size)
            t1 = timing.boundary(device)  # the drafter's device work is its own
            fed = len(context) - cached + len(draft.tokens) + len(draft.probe_tokens)
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
            t2 = timing.boundary(device)  # the forward has run, not only been launched
            emitted, stop = _until_eos(step.emitted, target.eos_ids)
            context.extend(emitted)
            new.extend(emitted)
            if guarded is not None:
                _tell_drafter(guarded, step, draft, emitted, context, needs, feed)
            t3 = timing.boundary(device)  # observe/accept's device work is the drafter's
            # draft tokens past an EOS are agreed with but never output: not counted
            accepted = min(len(step.emitted) - 1, len(emitted))
            record = StepRecord(drafted=len(draft), depth=draft.depth, accepted=accepted,
                                emitted=len(emitted), drafter_s=(t1 - t0) + (t3 - t2),
                                target_s=t2 - t1, fed=fed)
            steps.append(record)
            stats.add_step(record)
            if on_tokens is not None:  # between this step's t3 and the next t0: in no span
                on_tokens(len(emitted))
            if stop == "eos":
                break
    if guarded is not None:
        guarded.call("end")
        guarded.check_whole_context()
    stats.wall_s = timing.boundary(device) - started
    return Generation(tokens=new, stop=stop, stats=stats, steps=steps)


def _exact_prefill(target: Target, prompt: list[int], cache: Any,
                   layers: bool | Sequence[int]) -> tuple[int, torch.Tensor | None]:
    """Exact mode's start: the prompt but its last token prefilled alone (the same
    forward in every path, so any kernel will do); returns the tokens cached and their
    hidden states (None: none asked for, or a one-token prompt)."""
    if refusal := target.tree_support():
        raise ValueError(f"--specdec-lossless exact needs a target whose forward takes an "
                         f"explicit mask; target {target.name!r} cannot: {refusal}")
    if len(prompt) < 2:
        return 0, None
    _, prefilled = target.forward(prompt[:-1], cache, keep_logits=1, hidden_states=layers)
    return len(prompt) - 1, prefilled


def _until_eos(emitted: list[int], eos_ids: frozenset[int]) -> tuple[list[int], str]:
    """The tokens a step outputs (up to and including an EOS) and why decoding stops
    there ("eos"; "budget": it goes on while the budget lasts)."""
    eos_at = next((i for i, t in enumerate(emitted) if t in eos_ids), None)
    if eos_at is None:
        return emitted, "budget"
    return emitted[: eos_at + 1], "eos"


@dataclass
class _HiddenStates:
    """What a drafter reading hidden states has been handed so far: the positions up to
    ``given``; exact mode's separate prefill, handed with the first step's."""

    prefilled: torch.Tensor | None = None
    given: int = 0


def _tell_drafter(guarded: Guard, step: StepResult, draft: Draft, emitted: list[int],
                  context: list[int], needs: frozenset[str], feed: _HiddenStates) -> None:
    """After a step: the drafter's copy of the context grows, then it observes the
    signals it declared (if any) and is told the tokens appended."""
    guarded.appended(emitted)
    if needs & NEEDS - TARGET_RESOURCES:
        hidden = step.hidden
        if feed.prefilled is not None and hidden is not None:
            hidden, feed.prefilled = torch.cat([feed.prefilled, hidden]), None
        signals = _signals(step, needs, context[-len(emitted) - 1], draft, hidden,
                           feed.given, len(context) - 1)
        feed.given = len(context) - 1
        guarded.call("observe", signals)
    guarded.call("accept", tuple(emitted))


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


