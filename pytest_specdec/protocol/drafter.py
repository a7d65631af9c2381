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
Before its first sequence the engine calls ``attach(info)`` (optional) with a
:class:`TargetInfo`: the target's shape, device and dtype, its vocabulary, and the
read-only parts named in ``needs`` (:data:`TARGET_RESOURCES`); a model drafter loads its
weights there. A drafter that declares ``"hidden_states"`` picks the layers in
``hidden_layers`` (read after ``attach``): EAGLE-3 fuses a low, a middle and a high one.

A drafter declares its draft depth in ``max_depth``: the k its cases run with (the
depth of the method's reference implementation, for the built-ins), unless
``--specdec-k`` overrides it for every drafter. A drafter without it runs at
:data:`DEFAULT_MAX_DEPTH`; see :func:`draft_depth`.

Several open sequences at once (optional; see :func:`serves_concurrent_sequences`). The
batched engine keeps a batch's sequences open together; a drafter written to the life
cycle above gets one instance per row of the batch. A drafter that declares
``concurrent_sequences = True`` is given one instance for every row instead, and opens a
handle per sequence, so it sees its siblings' text as it is generated::

    handle = drafter.open(request)      # instead of begin; any number open at once
    loop:
        draft = handle.propose(context, k)
        handle.accept(tokens)           # (handle.observe(signals) first, as above)
    handle.end()

Calls on different handles interleave in any order; each handle's calls follow the life
cycle above. The one-sequence loop (batch 1) still calls ``begin``/``propose``/
``accept``/``end`` on the instance: :class:`ConcurrentDrafterBase` implements those
through one handle, so such a drafter writes its method once, in its handles.
"""

from __future__ import annotations

import functools
import operator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Protocol, Sequence, runtime_checkable

import torch

from pytest_specdec.protocol.sampling import Sampler

#: What a drafter may ask the engine for after each forward, by name, in
#: ``Drafter.needs``; the fields of :class:`TargetSignals` say what each holds.
TARGET_SIGNALS = frozenset({"top_k", "hidden_states", "probe_choices"})
#: Read-only parts of the target a drafter may ask for in ``needs``, handed over once in
#: ``attach`` (the fields of :class:`TargetInfo` say what each holds).
TARGET_RESOURCES = frozenset({"embeddings", "output_head"})
#: Everything ``needs`` may name.
NEEDS = TARGET_SIGNALS | TARGET_RESOURCES


@dataclass(frozen=True)
class DraftRequest:
    """What a drafter learns when a sequence begins.

    ``group`` names the problem; all samples (Best-of-N) and rounds (multi-round
    thinking) of one problem share it, so a drafter can pool what it saw across them.

    ``sampler`` is the sequence's coupled sampler (temperature and seed): the target's
    token at absolute position t is ``sampler.choose(logits, t)``. A model drafter that
    drafts with the same rule on its own logits proposes exactly the target's choice
    wherever the two models' logits agree (coupled drafting).
    """

    prompt_ids: tuple[int, ...]
    group: str
    sample: int = 0
    round: int = 0
    sampler: Sampler = Sampler()


@dataclass(frozen=True)
class Draft:
    """Proposed continuation of the context.

    A chain is ``tokens`` alone. A tree gives ``parents[i]``, the index in ``tokens``
    of token i's parent, or -1 for a child of the last accepted token; parents come
    before their children. A node's position is its depth, so siblings are
    alternatives for the same position. An empty draft (``Draft()``) is how a drafter
    says it has nothing to propose.

    Probes (Lookahead decoding's lookahead branch) are extra nodes the target scores in
    the same forward but that are never accepted: ``probe_tokens`` with
    ``probe_parents`` (-1 = the last accepted token, else an index into
    ``probe_tokens``), a tree of its own beside the draft. A drafter that declares
    ``"probe_choices"`` in ``needs`` gets the target's choice after each probe node.
    Probes do not count against k (at most :data:`MAX_PROBES`).
    """

    tokens: tuple[int, ...] = ()
    parents: tuple[int, ...] | None = None
    probe_tokens: tuple[int, ...] = ()
    probe_parents: tuple[int, ...] = ()

    @property
    def is_chain(self) -> bool:
        return self.parents is None or all(p == i - 1 for i, p in enumerate(self.parents))

    def __len__(self) -> int:
        return len(self.tokens)

    @functools.cached_property
    def depth(self) -> int:
        """The longest root path: the most draft tokens one step can accept (computed
        once: validation and the step record both read it)."""
        if self.parents is None:
            return len(self.tokens)
        return max(node_depths(self.parents), default=0)


def node_depths(parents: Sequence[int]) -> list[int]:
    """Each node's depth in a tree given by parent indices (-1: the last accepted
    token, the root; a node's parent comes before it): 1 for the root's children."""
    depths: list[int] = []
    for p in parents:
        depths.append(1 + (depths[p] if 0 <= p < len(depths) else 0))
    return depths


#: Most nodes one draft may carry (a tree's width is not bounded by k, only its depth).
MAX_DRAFT_NODES = 256
#: The draft depth of a drafter that declares no ``max_depth`` (one written for a
#: version of the protocol without it): the k every drafter ran with before.
DEFAULT_MAX_DEPTH = 5
#: Most probe nodes one draft may carry.
MAX_PROBES = 512


@dataclass(frozen=True)
class TargetInfo:
    """What a drafter learns of the target in ``attach``, before its first sequence.

    ``embeddings`` (the input embedding weight) and ``output_head`` (the lm_head
    weight), both [vocab_size, hidden_size], are given only to a drafter that names
    them in ``needs``. They are the target's own tensors, lent read-only: writing to
    them fails the drafter's case ("the target's tensors are read-only").
    ``vocab`` is the tokenizer's vocabulary (token -> id; None for a target without a
    tokenizer): a draft model checks it shares the target's.
    """

    name: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    device: torch.device
    dtype: torch.dtype
    eos_ids: frozenset[int]
    vocab: Mapping[str, int] | None = None
    embeddings: torch.Tensor | None = None
    output_head: torch.Tensor | None = None

    def lent(self) -> tuple[torch.Tensor, ...]:
        """The target tensors handed to the drafter."""
        return tuple(t for t in (self.embeddings, self.output_head) if t is not None)


@dataclass(frozen=True)
class TargetSignals:
    """What the last target forward produced; handed to ``observe`` before ``accept``.

    Only the fields a drafter declared in ``needs`` are filled; the others are None.

    - ``top_k`` [m, K] int64: the target's K most likely next tokens after each scored
      token; ``top_k_after`` (m ids) names those tokens: the last accepted token
      first, then every draft node in draft order, accepted or not (Token Recycling's
      adjacency update).
    - ``hidden_states`` [n, len(hidden_layers) * hidden_size]: the target's hidden
      states at the drafter's ``hidden_layers`` (concatenated in declared order) for the
      n context positions whose states it has not been given yet, the first at position
      ``hidden_start``. Position i's state is computed from tokens 0..i (it predicts
      token i + 1). The first observe of a sequence covers the whole prompt and the
      accepted tokens; each later one, the token emitted last by the previous step and
      this step's accepted draft tokens. The newest token (this step's bonus) has no
      state yet: after each step, states cover positions [0, len(context) - 1).
    - ``probe_choices``: the target's greedy choice after each probe node, in
      ``probe_tokens`` order (Lookahead decoding's Jacobi update).
    """

    top_k: torch.Tensor | None = None
    top_k_after: tuple[int, ...] | None = None
    hidden_states: torch.Tensor | None = None
    hidden_start: int | None = None
    probe_choices: tuple[int, ...] | None = None


#: The methods every drafter has; the rest of the protocol is optional.
REQUIRED_METHODS = ("begin", "propose", "accept", "end")


def missing_methods(drafter: object, required: Sequence[str] = REQUIRED_METHODS) -> list[str]:
    """The `required` methods ``drafter`` (an instance or a class) lacks: a drafter's,
    or an open sequence's (:data:`SEQUENCE_METHODS`)."""
    return [name for name in required if not callable(getattr(drafter, name, None))]


@runtime_checkable
class Drafter(Protocol):
    """A speculative-decoding drafter. See the module docstring for the life cycle.

    Register a factory (usually the class itself) under the entry-point group
    ``pytest_specdec.drafters``; its keyword parameters, with defaults and type
    annotations, become the drafter's options (``--specdec-drafter NAME:key=value``).

    ``max_depth``, declared on the factory (a class attribute), is the draft depth the
    drafter's cases run with: the k every ``propose`` gets (less near the end of the
    token budget), unless ``--specdec-k`` overrides it for every drafter. Optional: a
    factory without it runs at :data:`DEFAULT_MAX_DEPTH`. A method whose depth varies
    per step (SAM-Decoding: min(40, 1 + 4 * match length)) declares the cap and
    applies its own rule inside ``propose``, never proposing deeper than k.
    """

    needs: ClassVar[frozenset[str]]
    max_depth: ClassVar[int]

    # optional: ``record_fields() -> Mapping[str, Any]``, what the drafter adds to its
    # case's record (read after the case's last timed round; see
    # :func:`drafter_record_fields`): ``drafter_note``, a line the report shows beside
    # the row (where the drafts come from when that is not obvious: REST without a
    # datastore, a draft model derived from the target); ``drafter_weights``, a digest
    # of the weights a model drafter loaded; ``hybrid_parts``. DrafterBase's gives its
    # ``report_note``; a drafter without the method may still state ``report_note: str``.
    # optional: ``concurrent_sequences: bool`` with ``open(request) -> handle``, a
    # handle per open sequence with propose/accept/end (and observe): the batched
    # engine then gives one instance every row of a batch (see the module docstring,
    # :class:`ConcurrentDrafterBase`, :func:`serves_concurrent_sequences`).
    # optional (DrafterBase has both): ``attach(info: TargetInfo)``, called once per
    # instance before its first ``begin``; ``hidden_layers: tuple[int, ...]``, read after
    # it: the layers of the "hidden_states" signal, as indices into transformers'
    # ``output_hidden_states`` (0 = the embedding output, i = the output of decoder layer
    # i, num_layers = the final normed output; negative counts from the end). Default:
    # the last, (num_layers,).

    def begin(self, request: DraftRequest) -> None: ...

    def propose(self, context: Sequence[int], k: int) -> Draft:
        """At most k tokens deep (a chain of at most k; a tree of any width up to
        MAX_DRAFT_NODES nodes whose root paths are at most k long)."""
        ...

    def accept(self, tokens: Sequence[int]) -> None: ...

    def end(self) -> None: ...


class SequenceDrafter:
    """One open sequence of a concurrent drafter (what its ``open(request)`` returns):
    the life cycle of a drafter without ``begin``, no-op hooks to override. The engine
    guards a handle's calls exactly as a drafter's (every rule of :class:`Guard` holds,
    and a handle that raises fails its drafter's case)."""

    def propose(self, context: Sequence[int], k: int) -> Draft:
        return Draft()

    def accept(self, tokens: Sequence[int]) -> None:
        pass

    def observe(self, signals: TargetSignals) -> None:
        pass

    def end(self) -> None:
        pass


class DrafterBase(SequenceDrafter):
    """Convenience base with no-op hooks (propose, accept, observe and end are
    :class:`SequenceDrafter`'s: a drafter is one open sequence with a ``begin``);
    subclasses override what they use.

    ``ablations``: option sets (as command-line strings) that the default suite runs
    beside the drafter's defaults, to show what an option is worth, e.g.
    ``({"share_group": "false"},)``.

    ``max_depth``: the draft depth the drafter's cases run with (see :class:`Drafter`);
    :data:`DEFAULT_MAX_DEPTH` unless a subclass declares its method's own.
    """

    needs: ClassVar[frozenset[str]] = frozenset()
    max_depth: ClassVar[int] = DEFAULT_MAX_DEPTH
    #: serves several open sequences at once through ``open`` (see
    #: :class:`ConcurrentDrafterBase`); False: one instance per open sequence
    concurrent_sequences: ClassVar[bool] = False
    ablations: ClassVar[tuple[dict[str, str], ...]] = ()
    #: the layers of the "hidden_states" signal (see :class:`Drafter`); () = the last
    hidden_layers: tuple[int, ...] = ()
    #: what the report should say about this row (see :class:`Drafter`); "" says nothing
    report_note: str = ""

    def attach(self, target: TargetInfo) -> None:
        pass

    def begin(self, request: DraftRequest) -> None:
        pass

    def record_fields(self) -> dict[str, Any]:
        """What this drafter adds to its case's record: its report note, if any."""
        return {"drafter_note": self.report_note} if self.report_note else {}


class ConcurrentDrafterBase(DrafterBase):
    """Base of a drafter that serves several open sequences at once
    (``concurrent_sequences``): subclasses implement ``open(request)``, returning a
    :class:`SequenceDrafter` for that sequence, and keep what sequences share (a
    problem's pooled n-grams) on the instance.

    The one-sequence life cycle is served by one handle: ``begin`` opens it (ending one
    left open), ``propose``/``accept``/``observe``/``end`` go to it; called before any
    ``begin``, they go to a sequence of an empty prompt in group "" (the state a
    drafter starts in). So a drafter's batch-1 drafts and its batched drafts come from
    the same code, and with one sequence open at a time they are the same.
    """

    concurrent_sequences: ClassVar[bool] = True
    #: the handle of the one-sequence life cycle (None: no sequence open)
    _single: SequenceDrafter | None = None

    def open(self, request: DraftRequest) -> SequenceDrafter:
        raise NotImplementedError(f"{type(self).__name__} declares concurrent_sequences "
                                  "but does not implement open(request)")

    def begin(self, request: DraftRequest) -> None:
        self.end()
        self._single = self.open(request)

    def _sequence(self) -> SequenceDrafter:
        if self._single is None:
            self._single = self.open(DraftRequest((), ""))
        return self._single

    def propose(self, context: Sequence[int], k: int) -> Draft:
        return self._sequence().propose(context, k)

    def accept(self, tokens: Sequence[int]) -> None:
        self._sequence().accept(tokens)

    def observe(self, signals: TargetSignals) -> None:
        self._sequence().observe(signals)

    def end(self) -> None:
        single, self._single = self._single, None
        if single is not None:
            single.end()


#: The methods an open sequence (what ``open`` returns) has.
SEQUENCE_METHODS = ("propose", "accept", "end")


def serves_concurrent_sequences(drafter: object, name: str = "drafter") -> bool:
    """Whether ``drafter`` (an instance or a class) declares ``concurrent_sequences``:
    the batched engine then gives it every row of a batch and calls ``open(request)``
    per sequence (see the module docstring). A drafter without the declaration (one
    written before it existed) serves one open sequence at a time.

    A declaration that is not a bool, or True on a drafter without an ``open`` method,
    is a :class:`DraftError` naming ``name``: it fails that drafter's own cases.
    """
    try:
        declared = getattr(drafter, "concurrent_sequences", False)
        opens = callable(getattr(drafter, "open", None))
    except Exception as exc:
        raise DraftError(name, "concurrent_sequences is True or False",
                         f"reading it raised {type(exc).__name__}") from exc
    if type(declared) is not bool:
        raise DraftError(name, "concurrent_sequences is True or False",
                         f"declared {describe_value(declared)}")
    if declared and not opens:
        raise DraftError(name, "a drafter declaring concurrent_sequences has open(request)",
                         "it has no open method")
    return declared


#: The longest drafter note and weights digest a record keeps.
NOTE_LIMIT, DIGEST_LIMIT = 300, 64


def drafter_record_fields(drafter: object) -> dict[str, Any]:
    """What ``drafter`` adds to its case's record, through its ``record_fields()`` (or,
    without one, its ``report_note``), cut to the record's limits. It is decoration: a
    drafter whose method raises, or returns something else than a mapping, adds
    nothing; a value of the wrong type is left out."""
    try:
        method = getattr(drafter, "record_fields", None)
        if callable(method):
            fields = dict(method())
        else:
            fields = {"drafter_note": getattr(drafter, "report_note", "")}
    except Exception:
        return {}
    out: dict[str, Any] = {}
    note = str(fields.get("drafter_note") or "")[:NOTE_LIMIT]
    weights, parts = fields.get("drafter_weights"), fields.get("hybrid_parts")
    if note:
        out["drafter_note"] = note
    if isinstance(weights, str) and weights:
        out["drafter_weights"] = weights[:DIGEST_LIMIT]
    if isinstance(parts, Mapping):
        out["hybrid_parts"] = {str(name): dict(counts) for name, counts in parts.items()}
    return out


#: ``--specdec-depth-profile``: ``reference`` runs each drafter at its reference's depth;
#: ``cpu`` caps it at :data:`CPU_PROFILE_DEPTH`, because on a CPU a verify forward of k
#: tokens costs about 1 + k/4 decode steps, so a deep draft that is mostly wrong (T>0)
#: loses more than it wins; ``auto`` is ``cpu`` for a target on a CPU, else ``reference``.
DEPTH_PROFILES = ("auto", "reference", "cpu")
CPU_PROFILE_DEPTH = 5


def depth_profile(profile: str, device_type: str) -> str:
    """The profile ``auto`` stands for on a device type ("cpu", "cuda", ...)."""
    if profile not in DEPTH_PROFILES:
        raise ValueError(f"depth profile {profile!r} is not one of {', '.join(DEPTH_PROFILES)}")
    if profile == "auto":
        return "cpu" if device_type == "cpu" else "reference"
    return profile


def draft_depth(factory: object, *, override: int | None = None,
                options: Mapping[str, object] | None = None, drafter: str = "drafter",
                profile: str = "reference") -> int:
    """The k a drafter's cases run with: ``override`` (``--specdec-k``) when given;
    else the case's own ``max_depth`` option when the drafter has one and it was set
    (``rest:max_depth=16``: a drafter whose depth is an option names it so); else the
    ``max_depth`` its factory declares; else :data:`DEFAULT_MAX_DEPTH`. Under the
    ``cpu`` profile (see :data:`DEPTH_PROFILES`) the last two are capped at
    :data:`CPU_PROFILE_DEPTH`; an explicit ``--specdec-k`` is not.

    A depth that is not a positive int (bool excluded), or one above
    :data:`MAX_DRAFT_NODES` (no chain that deep fits in one draft), is a
    :class:`DraftError` naming ``drafter``: it fails that drafter's own cases.
    """
    if override is not None:
        return override
    options = options or {}
    depth = options.get("max_depth", getattr(factory, "max_depth", DEFAULT_MAX_DEPTH))
    if type(depth) is not int or not 1 <= depth <= MAX_DRAFT_NODES:
        raise DraftError(drafter, f"max_depth is an int in [1, {MAX_DRAFT_NODES}]",
                         f"declared {describe_value(depth)}")
    return min(depth, CPU_PROFILE_DEPTH) if profile == "cpu" else depth


@dataclass
class DraftError(Exception):
    """A drafter broke the protocol; fails its own case, never the output."""

    drafter: str
    rule: str
    detail: str = field(default="")

    def __str__(self) -> str:
        tail = f": {self.detail}" if self.detail else ""
        return f"drafter {self.drafter!r} broke the rule '{self.rule}'{tail}"


class MissingPrerequisite(FileNotFoundError):
    """Raised by a drafter's ``attach`` when something it needs before it can run is not
    there yet (trained weights, a datastore): not a broken rule but a missing step. The
    message names what is missing and the command that provides it. In the default
    drafter set such a drafter is skipped with that message; named with
    ``--specdec-drafter``, its cases fail with it."""


@dataclass
class DrafterUnavailable(DraftError):
    """A drafter's :class:`MissingPrerequisite`, as the engine reports it."""

    def __str__(self) -> str:
        return f"drafter {self.drafter!r} cannot run: a prerequisite is missing: {self.detail}"


def describe_value(value: object) -> str:
    """A bad value for an error message: its repr (shortened) and its type."""
    kind = type(value)
    module = "" if kind.__module__ == "builtins" else f"{kind.__module__}."
    text = repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{text} ({module}{kind.__qualname__})"


def _ids(value: object, *, drafter: str, field: str, limit: int, what: str) -> tuple[int, ...]:
    """`value` as a plain tuple of at most `limit` entries, types still unchecked.

    A tuple subclass is read through tuple's own methods, so an overridden __len__,
    __iter__ or __getitem__ cannot show the checks one thing and the engine another.
    """
    if not isinstance(value, tuple):
        raise DraftError(drafter, f"Draft.{field} is a tuple of ints",
                         f"got {type(value).__name__}")
    size = tuple.__len__(value)
    if size > limit:
        raise DraftError(drafter, f"at most {limit} {what}", f"proposed {size}")
    return value if type(value) is tuple else tuple(tuple.__iter__(value))


def _check_id(token: object, *, drafter: str, rule: str, where: str, vocab_size: int) -> None:
    # exactly int: bool is an int subclass, and any other subclass could lie in __eq__
    # (the engine compares draft tokens with the target's choices) or in __index__
    if type(token) is not int:
        convertible = hasattr(token, "__index__") and not isinstance(token, bool)
        hint = "; convert numpy or torch values with int()" if convertible else ""
        raise DraftError(drafter, "token ids are ints", f"{where} is {describe_value(token)}{hint}")
    if not 0 <= token < vocab_size:
        raise DraftError(drafter, rule, f"{where} is {token}")


def _plain_ids(values: tuple, vocab_size: int) -> bool:
    """Fast path (C loops): every value an int in [0, vocab_size)."""
    return not values or (set(map(type, values)) == {int}
                          and min(values) >= 0 and max(values) < vocab_size)


def _check_parents(parents: tuple, *, drafter: str, rule: str, field: str) -> None:
    # fast path (C loops): ints, none below -1, each before its child
    if not parents or (set(map(type, parents)) == {int} and min(parents) >= -1
                       and all(map(operator.lt, parents, range(len(parents))))):
        return
    for i, p in enumerate(parents):
        if type(p) is not int or not -1 <= p < i:
            raise DraftError(drafter, rule, f"{field}[{i}] = {p!r}"
                             + ("" if type(p) is int else f" ({type(p).__name__})"))


def validate_draft(draft: object, *, drafter: str, k: int, vocab_size: int) -> Draft:
    """Check a proposal against the protocol; raise DraftError naming the rule broken.

    Returns a plain :class:`Draft` rebuilt from the checked fields, so a subclass
    cannot show the checks one thing and the engine another (an overridden ``depth``
    or ``is_chain``, a tuple subclass with its own ``__iter__``).

    The rules, each named in the error:

    - ``propose`` returns a :class:`Draft` (``Draft()`` when there is nothing to propose);
    - ``tokens`` is a tuple of Python ``int`` (not bool, numpy or torch scalars) in
      ``[0, vocab_size)``, at most :data:`MAX_DRAFT_NODES` of them;
    - ``parents`` is None (a chain) or one int per token, each -1 (a child of the last
      accepted token) or the index of an earlier token: no cycles, no forward or
      out-of-range references;
    - the draft is at most ``k`` tokens deep;
    - ``probe_tokens`` / ``probe_parents`` follow the same rules as a tree of their
      own, at most :data:`MAX_PROBES` nodes.
    """
    if not isinstance(draft, Draft):
        raise DraftError(drafter, "propose returns a Draft", f"got {type(draft).__name__}")
    id_rule = f"token ids in [0, {vocab_size})"
    tokens = _ids(draft.tokens, drafter=drafter, field="tokens", limit=MAX_DRAFT_NODES,
                  what="draft nodes")
    if not _plain_ids(tokens, vocab_size):
        for i, t in enumerate(tokens):
            _check_id(t, drafter=drafter, rule=id_rule, where=f"token {i}", vocab_size=vocab_size)
    parents = draft.parents
    if parents is not None:
        if not isinstance(parents, tuple):
            raise DraftError(drafter, "Draft.parents is None or a tuple of ints",
                             f"got {type(parents).__name__}")
        size = tuple.__len__(parents)
        if size != len(tokens):
            raise DraftError(drafter, "one parent per token",
                             f"{size} parents for {len(tokens)} tokens")
        parents = parents if type(parents) is tuple else tuple(tuple.__iter__(parents))
        _check_parents(parents, drafter=drafter, rule="parents come before children (-1 = root)",
                       field="parents")
    probes = _ids(draft.probe_tokens, drafter=drafter, field="probe_tokens", limit=MAX_PROBES,
                  what="probe nodes")
    probe_parents = _ids(draft.probe_parents, drafter=drafter, field="probe_parents",
                         limit=MAX_PROBES, what="probe nodes")
    if len(probe_parents) != len(probes):
        raise DraftError(drafter, "one probe parent per probe token",
                         f"{len(probe_parents)} parents for {len(probes)} probe tokens")
    for i, t in enumerate(() if _plain_ids(probes, vocab_size) else probes):
        if type(t) is not int or not 0 <= t < vocab_size:
            raise DraftError(drafter, f"probe token ids are ints in [0, {vocab_size})",
                             f"probe token {i} is {t!r}"
                             + ("" if type(t) is int else f" ({type(t).__name__})"))
    _check_parents(probe_parents, drafter=drafter,
                   rule="probe parents come before children (-1 = root)", field="probe_parents")
    plain = Draft(tokens, parents, probes, probe_parents)
    if plain.depth > k:
        raise DraftError(drafter, "at most k tokens deep",
                         f"proposed depth {plain.depth} with k={k}")
    return plain
