"""The Drafter protocol: the one seam third-party methods plug into.

A drafter proposes; it never verifies. The engine checks every proposed token against
the target, so a buggy drafter can cost speed but can never change the output.

Life cycle of one drafter instance (the engine makes a fresh instance for every
benchmark case, so no state leaks between cases)::

    drafter.begin(request)          # a sequence starts (one sample / one round)
    loop:
        draft = drafter.propose(context, k)   # up to k tokens
        drafter.accept(tokens)      # what verification appended (accepted + bonus)
    drafter.end()                   # the sequence is finished

Between sequences the instance lives on, so a drafter may keep what it learnt from
earlier samples and rounds of the same problem (``request.group``) and use it later:
this is where n-gram methods win on test-time scaling, because later samples repeat
earlier ones.

A drafter that needs target internals declares them in ``needs`` (see
:data:`TARGET_SIGNALS`); the engine then calls ``observe(signals)`` after each target
forward with exactly those, and nothing else about the target reaches the drafter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Protocol, Sequence, runtime_checkable

import torch

#: What a drafter may ask the engine for, by name, in ``Drafter.needs``.
#: ``"top_k"``: the target's top-k token ids at each newly accepted position, shape
#: ``[n, k]`` (Token Recycling); ``"hidden_states"``: the last layer's hidden states at
#: those positions, shape ``[n, hidden]`` (EAGLE-style heads).
TARGET_SIGNALS = frozenset({"top_k", "hidden_states"})


@dataclass(frozen=True)
class DraftRequest:
    """What a drafter learns when a sequence begins.

    ``group`` names the problem; all samples (Best-of-N) and rounds (multi-round
    thinking) of one problem share it, so a drafter can pool what it saw across them.
    """

    prompt_ids: tuple[int, ...]
    group: str
    sample: int = 0
    round: int = 0


@dataclass(frozen=True)
class Draft:
    """Proposed continuation of the context.

    A chain is ``tokens`` alone. A tree gives ``parents[i]``, the index in ``tokens``
    of token i's parent, or -1 for a child of the last accepted token; parents come
    before their children. An empty draft (``Draft()``) is how a drafter says it has
    nothing to propose.
    """

    tokens: tuple[int, ...] = ()
    parents: tuple[int, ...] | None = None

    @property
    def is_chain(self) -> bool:
        return self.parents is None or all(p == i - 1 for i, p in enumerate(self.parents))

    def __len__(self) -> int:
        return len(self.tokens)


@dataclass(frozen=True)
class TargetSignals:
    """What the last target forward produced at the newly accepted positions.

    Only the fields a drafter declared in ``needs`` are filled; the others are None.
    """

    top_k: torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None


@runtime_checkable
class Drafter(Protocol):
    """A speculative-decoding drafter. See the module docstring for the life cycle.

    Register a factory (usually the class itself) under the entry-point group
    ``pytest_specdec.drafters``; its keyword parameters, with defaults and type
    annotations, become the drafter's options (``--specdec-drafter NAME:key=value``).
    """

    needs: ClassVar[frozenset[str]]

    def begin(self, request: DraftRequest) -> None: ...

    def propose(self, context: Sequence[int], k: int) -> Draft: ...

    def accept(self, tokens: Sequence[int]) -> None: ...

    def end(self) -> None: ...


class DrafterBase:
    """Convenience base with no-op hooks; subclasses override what they use."""

    needs: ClassVar[frozenset[str]] = frozenset()

    def begin(self, request: DraftRequest) -> None:
        pass

    def propose(self, context: Sequence[int], k: int) -> Draft:
        return Draft()

    def accept(self, tokens: Sequence[int]) -> None:
        pass

    def observe(self, signals: TargetSignals) -> None:
        pass

    def end(self) -> None:
        pass


@dataclass
class DraftError(Exception):
    """A drafter broke the protocol; fails its own case, never the output."""

    drafter: str
    rule: str
    detail: str = field(default="")

    def __str__(self) -> str:
        tail = f": {self.detail}" if self.detail else ""
        return f"drafter {self.drafter!r} broke the rule '{self.rule}'{tail}"


def validate_draft(draft: object, *, drafter: str, k: int, vocab_size: int) -> Draft:
    """Check a proposal against the protocol; raise DraftError naming the rule broken."""
    if not isinstance(draft, Draft):
        raise DraftError(drafter, "propose returns a Draft", f"got {type(draft).__name__}")
    tokens = draft.tokens
    if not isinstance(tokens, tuple):
        raise DraftError(drafter, "Draft.tokens is a tuple of ints", f"got {type(tokens).__name__}")
    if len(tokens) > k:
        raise DraftError(drafter, "at most k tokens", f"proposed {len(tokens)} with k={k}")
    for i, t in enumerate(tokens):
        if isinstance(t, bool) or not isinstance(t, int):
            raise DraftError(drafter, "token ids are ints", f"token {i} is {t!r}")
        if not 0 <= t < vocab_size:
            raise DraftError(drafter, f"token ids in [0, {vocab_size})", f"token {i} is {t}")
    if draft.parents is not None:
        parents = draft.parents
        if len(parents) != len(tokens):
            raise DraftError(drafter, "one parent per token",
                             f"{len(parents)} parents for {len(tokens)} tokens")
        for i, p in enumerate(parents):
            if isinstance(p, bool) or not isinstance(p, int) or not -1 <= p < i:
                raise DraftError(drafter, "parents come before children (-1 = root)",
                                 f"parents[{i}] = {p!r}")
    return draft
