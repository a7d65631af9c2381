"""The guard around every call into a drafter, and attaching a drafter to a target.

Whatever a drafter raises, returns or does to what it was shown becomes a
:class:`~pytest_specdec.protocol.drafter.DraftError` naming it and the rule it broke
(:class:`Guard`); the tensors a drafter is lent are fingerprinted when it is attached
and checked after its calls (:class:`Attachment`). So a buggy drafter can cost speed,
never change the output; a write to the target fails its case, and the session reloads
the target before the next one.
"""

from __future__ import annotations

import dataclasses
import time
from array import array
from dataclasses import dataclass
from typing import Any, Iterator, Sequence, overload

import torch

from pytest_specdec.engine import torch_state
from pytest_specdec.engine.integrity import digest
from pytest_specdec.engine.target import Target
from pytest_specdec.protocol.drafter import (NEEDS, TARGET_RESOURCES, Draft, DraftError, Drafter,
                                             DrafterUnavailable, MissingPrerequisite,
                                             TargetInfo, describe_value, validate_draft)


class TokenView(Sequence[int]):
    """A read-only live view of the context: drafters cannot mutate what they read.

    The engine shows each drafter a view of the drafter's own copy of the tokens, never
    its own list; writing to that copy anyway is caught (see :class:`Guard`)."""

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
    their bits (:func:`pytest_specdec.engine.integrity.digest`), after ``attach`` and after
    every sequence: a write through ``.data`` leaves the counter alone).

    No copy of a lent tensor is kept, to set it back after a write: a copy per drafter
    instance cost the embeddings (1.2 GB for Qwen3-8B's) once per instance, B times at
    batch B, and even one shared copy is GPU memory a large target cannot spare. A write
    fails the drafter's case (the rule ``the target's tensors are read-only``) and leaves
    the target changed; the session's check after every case
    (``SpecdecSession.check_target_intact``: the lent tensors are parameters of the
    target, fingerprinted with the rest) then finds the change, fails the case with
    ``TargetChanged`` and drops the target, so the next case runs on a fresh load. A
    caller of ``generate`` outside a session reloads the target itself after this
    error."""

    info: TargetInfo
    needs: frozenset[str]
    hidden_layers: tuple[int, ...]
    versions: tuple[int, ...]
    checksums: tuple[tuple[int, ...], ...]

    def lent_changed(self, *, full: bool = False) -> bool:
        """Whether a lent tensor was written to since the attachment was made: its
        version counter moved, or (`full`) the digest of its bits differs."""
        lent = self.info.lent()
        return tuple(t._version for t in lent) != self.versions or (
            full and _checksums(lent) != self.checksums)


def _checksums(tensors: tuple[torch.Tensor, ...]) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(digest(t).tolist()) for t in tensors)


def attach(target: Target, drafter: Drafter, name: str = "drafter", *,
           step_timeout: float = 0.0) -> Attachment:
    """Call ``drafter.attach(info)`` once per drafter instance and target (later calls
    return the first attachment, which the target keeps: :attr:`Target.attached`),
    under the guard: what it raises or breaks fails the drafter's case, named. The
    runner attaches before the timed rounds, so loading a model drafter's weights is
    never timed; ``generate`` attaches a drafter it is given unattached.

    The lent tensors are fingerprinted before ``attach`` runs, so a write inside
    ``attach`` itself is caught like any later one; nothing is copied (see
    :class:`Attachment`)."""
    known = target.attached.get(drafter)
    if known is not None:
        return known
    with torch.inference_mode():  # as every later call: the guard compares grad mode too
        guard = Guard(drafter, name, step_timeout, None)
        needs = guard.needs()
        info = target_info(target, needs)
        lent = info.lent()
        attachment = Attachment(info, needs, (), tuple(t._version for t in lent),
                                _checksums(lent))
        if callable(getattr(drafter, "attach", None)):
            guard.attachment = attachment
            guard.call("attach", info)
    if "hidden_states" in needs:
        attachment = dataclasses.replace(attachment,
                                         hidden_layers=guard.hidden_layers(info.num_layers))
        if target.path == "compiled":  # attaching is untimed: compile the graphs it needs now
            target.compiled_forward().warm_up(hidden=(tuple(attachment.hidden_layers),))
    target.attached.add(drafter, attachment)
    return attachment


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


def _missing_prerequisite(exc: BaseException) -> MissingPrerequisite | None:
    """The MissingPrerequisite behind `exc` (itself, or what a wrapper such as a hybrid's
    part error was raised from), if any."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, MissingPrerequisite):
            return exc
        exc, seen = exc.__cause__, seen + 1
    return None


class Guard:
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
    - Torch's global settings (:mod:`pytest_specdec.engine.torch_state`: default dtype and
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
            if method == "attach" and _missing_prerequisite(exc) is not None:
                raise DrafterUnavailable(self.name, "its prerequisites are present",
                                         str(_missing_prerequisite(exc))) from exc
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
