"""Hybrid drafters: ``A+B`` drafts with A when A's draft is deep enough, else with B.

Reference: SAM-Decoding's hybrid (Hu et al. 2024; github.com/hyx1999/SAM-Decoding,
``samd/draft.py``, ``DraftModel.lookup``), run as SAM[EAGLE-3] in the reference
benchmark: when the suffix automaton's match is at least ``len_threshold`` tokens long
(5 by default) the draft is the automaton's copy, else it is the auxiliary model's tree
(EAGLE-2/3 or Token Recycling). Both sides are updated with every accepted token, so
the model side keeps its state (its KV cache, its hidden states) in step whichever
side drafted.

Here the rule is written over what the Drafter protocol shows of any drafter, its
proposal, so that any pair of registered drafters composes (``--specdec-drafter
sam+eagle3``, ``suffix+eagle3``, ``pld+sps``):

    draft A at depth max(min(k, A's max_depth), threshold);
    if that draft is at least ``threshold`` deep: A's draft, cut to depth k;
    else B's draft (at most min(k, B's max_depth) deep);
    if B proposes nothing: A's shorter draft, if it has one.

The threshold is a draft depth, not a match length, since a match length is private
to A. For ``sam`` the two map exactly: SAM drafts min(k, 1 + 4 * match length)
tokens (fewer only when its copy reaches the end of the text), so asking A for
``threshold`` tokens and comparing the depth with ``1 + 4 * L`` is the reference's
``match >= L``. The default threshold, 21 = 1 + 4 * 5, is the reference's
``len_threshold`` 5, capped at A's own ``max_depth`` for an A that never drafts that
deep (``pld``: 10, i.e. "PLD drafts its full depth"). A is asked for at least
``threshold`` tokens even when the case's k is smaller (the ``cpu`` depth profile), so
the rule judges the same match at every k, and the draft is then cut to k.

Deliberate differences from the reference:

- SAM's copy ends where the text ends, so its depth is also capped by the tokens that
  follow the match's first occurrence: in text that repeats with a period p, ``sam``
  drafts at most p tokens however long the match, and a loop shorter than the
  threshold (21) goes to B, where the reference (match >= 5) picks SAM and pads its
  draft; a lower ``threshold`` catches such loops;
- the reference compares the group (static) automaton's match after subtracting
  ``len_bias`` (5); ``sam`` here takes the longer of its two matches unbiased, and the
  hybrid sees only the depth of the draft that ``sam`` picked;
- the reference's SAM side drafts a fixed 40 tokens once chosen (zero-padded); ``sam``
  here drafts its own min(40, 1 + 4 * match) of real tokens;
- when B proposes nothing, A's shorter draft is used (the reference's model side always
  drafts, so it never meets this case);
- probes (Lookahead decoding) of both parts travel with the chosen draft, so a part
  that probes keeps its window in step; each part gets the target's choices for its
  own probes only.

Every part sees every ``begin``, ``observe``, ``accept`` and ``end``, and ``attach``
once; ``propose`` is called on A every step and on B only when A's draft is too
shallow (the protocol never promises a propose per step: the engine skips it when the
token budget leaves no room). ``needs`` is the union of the parts' needs; each part's
``observe`` gets only the signals it declared, the hidden states of its own
``hidden_layers`` (the hybrid asks the engine for the union of both parts' layers and
splits the tensor), and ``attach`` lends each part only the target tensors it named.
A part that raises fails the hybrid's case with a :class:`HybridPartError` naming the
part and the call.

``parts`` records, per part name, the ``propose`` steps whose draft came from that
part and the draft tokens it proposed in them, e.g. ``{"sam": {"steps": 3, "tokens":
63}, "eagle3": {"steps": 12, "tokens": 60}}``: plain ints, ready for a JSON report.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from pytest_specdec.protocol.drafter import (MAX_PROBES, TARGET_RESOURCES, TARGET_SIGNALS, Draft,
                                             DraftRequest, TargetInfo, TargetSignals, draft_depth,
                                             drafter_record_fields, missing_methods, node_depths,
                                             validate_draft)
from pytest_specdec.protocol.registered import RegisteredDrafter

#: The reference's ``len_threshold``: the shortest SAM match whose copy is drafted.
REFERENCE_MATCH = 5


def sam_depth(match_length: int) -> int:
    """SAM-Decoding's draft depth for a match of `match_length` tokens (before the
    cap of 40): the threshold that stands for a match length."""
    return 1 + 4 * match_length


#: The default threshold: the reference's match length 5 as a ``sam`` draft depth.
DEFAULT_THRESHOLD = sam_depth(REFERENCE_MATCH)

#: What ``pytest-specdec list`` says of hybrids.
LIST_NOTE = ("any two registered drafters combine as A+B (e.g. sam+pld): A's draft when "
             "it is at least `threshold` deep, else B's; options: threshold, max_depth, "
             "and each part's own prefixed by its name (A.key=value)")


class HybridPartError(RuntimeError):
    """A part of a hybrid raised or broke the protocol: names the part and the call."""


def _depth_of(part: Any, name: str) -> int:
    """A part's own draft depth (its ``max_depth``, else the protocol's default)."""
    return draft_depth(part, drafter=name)


def cut(draft: Draft, k: int) -> Draft:
    """`draft` without its nodes deeper than k (probes kept)."""
    if draft.depth <= k:
        return draft
    if draft.parents is None:
        return dataclasses.replace(draft, tokens=draft.tokens[:k])
    kept, index = [], {}
    for i, depth in enumerate(node_depths(draft.parents)):
        if depth <= k:
            index[i] = len(kept)
            kept.append(i)
    return Draft(tuple(draft.tokens[i] for i in kept),
                 tuple(index[draft.parents[i]] if draft.parents[i] >= 0 else -1 for i in kept),
                 draft.probe_tokens, draft.probe_parents)


class Hybrid:
    """Two drafters as one: A's draft when it is at least ``threshold`` deep, else B's.

    See the module docstring for the rule, its reference (SAM-Decoding's SAM[EAGLE])
    and the differences. Third parties compose instances directly::

        Hybrid(SamDecoding(), MyHead(), names=("sam", "head"))

    threshold: the depth A's draft must reach (>= 1); 0 = :data:`DEFAULT_THRESHOLD`
        capped at A's ``max_depth``. A threshold above A's ``max_depth`` is an error
        (A would never be chosen).
    max_depth: the hybrid's draft depth; 0 = the deeper part's. Each part is still asked
        for at most its own ``max_depth``, within the k the hybrid is given.
    names: the parts' names in errors and in ``parts`` (default: their class names).
    """

    def __init__(self, first: Any, second: Any, *, threshold: int = 0, max_depth: int = 0,
                 names: tuple[str, str] | None = None):
        self.names = tuple(names) if names else (type(first).__name__, type(second).__name__)
        if len(self.names) != 2 or self.names[0] == self.names[1]:
            raise ValueError(f"a hybrid names two different parts, got {self.names!r}")
        self.label = "+".join(self.names)
        self.part_list = (first, second)
        for name, part in zip(self.names, self.part_list):
            missing = missing_methods(part)
            if missing:
                raise TypeError(f"hybrid {self.label}: part {name!r} lacks {', '.join(missing)}")
        self._needs = tuple(frozenset(getattr(p, "needs", frozenset())) for p in self.part_list)
        self.needs = self._needs[0] | self._needs[1]
        self.depths = tuple(_depth_of(p, n) for p, n in zip(self.part_list, self.names))
        for what, value in (("threshold", threshold), ("max_depth", max_depth)):
            if type(value) is not int or value < 0:
                raise ValueError(f"hybrid {self.label}: {what} must be an integer >= 0 "
                                 f"(0: the default), got {value!r}")
        if threshold > self.depths[0]:
            raise ValueError(f"hybrid {self.label}: threshold {threshold} is deeper than "
                             f"{self.names[0]!r} ever drafts (its max_depth is "
                             f"{self.depths[0]}), so it would never be chosen; use at most "
                             f"{self.depths[0]}")
        self.threshold = threshold or min(DEFAULT_THRESHOLD, self.depths[0])
        self.max_depth = max_depth or max(self.depths)
        self.hidden_layers: tuple[int, ...] = ()
        self.parts = {name: {"steps": 0, "tokens": 0} for name in self.names}
        self._vocab_size = sys.maxsize  # known after attach
        self._columns: tuple[torch.Tensor | None, ...] = (None, None)  # per part, after attach
        self._attached = False
        self._probes: tuple[tuple[int, int] | None, ...] = (None, None)  # this step's probes

    # -- calls into the parts --------------------------------------------------------

    def _call(self, i: int, method: str, *args: Any) -> Any:
        try:
            return getattr(self.part_list[i], method)(*args)
        except (Exception, SystemExit) as exc:
            raise HybridPartError(f"part {self.names[i]!r} of {self.label} raised in {method}: "
                                  f"{type(exc).__name__}: {exc}") from exc

    def _propose(self, i: int, context: Sequence[int], k: int) -> Draft:
        draft = self._call(i, "propose", context, k)
        try:
            return validate_draft(draft, drafter=self.names[i], k=k, vocab_size=self._vocab_size)
        except Exception as exc:
            raise HybridPartError(f"part {self.names[i]!r} of {self.label} proposed a bad "
                                  f"draft: {exc}") from exc

    def _both(self, method: str, *args: Any) -> None:
        for i in range(2):
            self._call(i, method, *args)

    # -- the protocol ----------------------------------------------------------------

    def attach(self, target: TargetInfo) -> None:
        """Attach each part with the target tensors it named; gather their layers."""
        self._vocab_size, self._attached = target.vocab_size, True
        layers_per_part: list[tuple[int, ...]] = []
        for i, part in enumerate(self.part_list):
            lent = {r: getattr(target, r) if r in self._needs[i] else None
                    for r in sorted(TARGET_RESOURCES)}
            if callable(getattr(part, "attach", None)):
                self._call(i, "attach", dataclasses.replace(target, **lent))
            layers_per_part.append(self._layers(i, target.num_layers)
                                   if "hidden_states" in self._needs[i] else ())
        union = tuple(dict.fromkeys(layers_per_part[0] + layers_per_part[1]))
        self.hidden_layers = union
        h = target.hidden_size
        self._columns = tuple(
            None if not layers or layers == union else
            torch.cat([torch.arange(union.index(l) * h, (union.index(l) + 1) * h)
                       for l in layers]).to(target.device)
            for layers in layers_per_part)

    def _layers(self, i: int, num_layers: int) -> tuple[int, ...]:
        """Part i's ``hidden_layers`` as the engine reads them: non-negative, (L,) if empty."""
        layers = getattr(self.part_list[i], "hidden_layers", ())
        layers = tuple(layers) if isinstance(layers, (tuple, list)) else layers
        if not isinstance(layers, tuple) or not all(
                type(j) is int and -num_layers - 1 <= j <= num_layers for j in layers):
            raise HybridPartError(f"part {self.names[i]!r} of {self.label}: hidden_layers is a "
                                  f"tuple of layer indices in [{-num_layers - 1}, {num_layers}], "
                                  f"got {layers!r}")
        return tuple(j % (num_layers + 1) for j in layers) or (num_layers,)

    def begin(self, request: DraftRequest) -> None:
        self._probes = (None, None)
        self._both("begin", request)

    def propose(self, context: Sequence[int], k: int) -> Draft:
        self._probes = (None, None)
        if k < 1:
            return Draft()
        first = self._propose(0, context, max(min(k, self.depths[0]), self.threshold))
        chosen, second = 0, None
        if first.depth < self.threshold:
            second = self._propose(1, context, min(k, self.depths[1]))
            if len(second) or not len(first):
                chosen = 1
        draft = cut(first, k) if chosen == 0 else second
        assert draft is not None
        self.parts[self.names[chosen]]["steps"] += 1
        self.parts[self.names[chosen]]["tokens"] += len(draft)
        return self._with_probes(draft, first, second)

    def _with_probes(self, draft: Draft, first: Draft, second: Draft | None) -> Draft:
        """`draft` carrying both parts' probes (A's first), each range remembered."""
        tokens: list[int] = []
        parents: list[int] = []
        ranges: list[tuple[int, int] | None] = []
        for part in (first, second):
            if part is None:
                ranges.append(None)
                continue
            offset = len(tokens)
            tokens.extend(part.probe_tokens)
            parents.extend(p + offset if p >= 0 else -1 for p in part.probe_parents)
            ranges.append((offset, len(tokens)))
        if len(tokens) > MAX_PROBES:
            raise HybridPartError(f"{self.label}: the parts' probes together exceed "
                                  f"{MAX_PROBES} nodes ({len(tokens)})")
        self._probes = tuple(ranges)
        return Draft(draft.tokens, draft.parents, tuple(tokens), tuple(parents))

    def observe(self, signals: TargetSignals) -> None:
        """Each part gets the signals it declared: its own layers, its own probes."""
        for i, part in enumerate(self.part_list):
            wanted = self._needs[i] & TARGET_SIGNALS
            if not wanted or not callable(getattr(part, "observe", None)):
                continue
            self._call(i, "observe", self._signals_for(i, wanted, signals))
        self._probes = (None, None)

    def _signals_for(self, i: int, wanted: frozenset[str], signals: TargetSignals) -> TargetSignals:
        hidden, start = None, None
        if "hidden_states" in wanted and signals.hidden_states is not None:
            if not self._attached and all("hidden_states" in n for n in self._needs):
                raise HybridPartError(f"{self.label}: both parts take hidden states, so the "
                                      "hybrid must be attached (attach(info)) to split them")
            columns = self._columns[i]
            hidden = signals.hidden_states if columns is None else \
                signals.hidden_states.index_select(-1, columns)
            start = signals.hidden_start
        choices = None
        if "probe_choices" in wanted and signals.probe_choices is not None:
            span = self._probes[i]
            choices = tuple(signals.probe_choices[span[0]:span[1]]) if span else ()
        top = "top_k" in wanted
        return TargetSignals(top_k=signals.top_k if top else None,
                             top_k_after=signals.top_k_after if top else None,
                             hidden_states=hidden, hidden_start=start, probe_choices=choices)

    def accept(self, tokens: Sequence[int]) -> None:
        self._probes = (None, None)
        self._both("accept", tokens)

    def end(self) -> None:
        self._both("end")

    def record_fields(self) -> dict[str, Any]:
        """The parts' notes, how many steps and tokens each part drafted, and the digests
        of the weights its model parts loaded, each named (``eagle3:a41e4609...``), so
        `compare` sees a hybrid's weights change too."""
        weights = []
        for name, part in zip(self.names, self.part_list):
            digest = drafter_record_fields(part).get("drafter_weights")
            if digest:
                weights.append(f"{name}:{digest}")
        fields = {"drafter_note": self.report_note, "hybrid_parts": self.parts}
        return dict(fields, drafter_weights=",".join(weights)) if weights else fields

    @property
    def report_note(self) -> str:
        """The parts' own report notes, each named."""
        notes = []
        for name, part in zip(self.names, self.part_list):
            try:
                note = str(getattr(part, "report_note", "") or "")
            except Exception:  # a note is decoration: a broken one is left out
                note = ""
            if note:
                notes.append(f"{name}: {note}")
        return "; ".join(notes)


# ------------------------------------------------------------------ the registry's side

#: The hybrid's own options (its factory's keyword parameters besides the parts').
OWN_OPTIONS = ("threshold", "max_depth")


def split_name(name: str) -> tuple[str, str] | None:
    """``"A+B"`` -> ("A", "B"); a name without "+" -> None; ValueError for other shapes."""
    if "+" not in name:
        return None
    pieces = name.split("+")
    if len(pieces) != 2 or not all(pieces):
        raise ValueError(f"a hybrid names two drafters, A+B, got {name!r}")
    if pieces[0] == pieces[1]:
        raise ValueError(f"a hybrid names two different drafters, got {name!r}")
    return pieces[0], pieces[1]


def owner(names: Sequence[str], key: str) -> int | None:
    """Which part a prefixed option key ("sam.min_match") belongs to: the part with the
    longest name that prefixes it ("a.b.key" is part "a.b"'s even beside a part "a")."""
    owners = [i for i, n in enumerate(names) if key.startswith(n + ".") and len(key) > len(n) + 1]
    return max(owners, key=lambda i: len(names[i]), default=None)


@dataclass(frozen=True)
class RegisteredHybrid(RegisteredDrafter):
    """``A+B`` as the registry hands it out: its options are the hybrid's own
    (``threshold``, ``max_depth``) and each part's prefixed by the part's name
    (``sam.min_match=2``). No ablations: the parts' are not inherited."""

    parts: tuple[RegisteredDrafter, RegisteredDrafter] = ()  # type: ignore[assignment]

    def parameters(self) -> dict[str, inspect.Parameter]:
        own = inspect.signature(_own_options).parameters
        out = dict(own)
        for part in self.parts:
            for key, parameter in part.parameters().items():
                out[f"{part.name}.{key}"] = parameter
        return out

    def accepted(self) -> str:
        return ", ".join(OWN_OPTIONS + tuple(f"{p.name}.{key}" for p in self.parts
                                             for key in p.parameters()))

    def convert_options(self, raw: Mapping[str, str]) -> dict[str, Any]:
        """Own options typed, part options routed and typed by the part; ``max_depth``
        filled in (the deeper part's, with its options) so the case's k sees it."""
        own: dict[str, str] = {}
        routed: list[dict[str, str]] = [{}, {}]
        names = [p.name for p in self.parts]
        for key, text in raw.items():
            if key in OWN_OPTIONS:
                own[key] = text
                continue
            i = owner(names, key)
            if i is not None:
                routed[i][key[len(names[i]) + 1:]] = text
            else:
                hint = "".join(f"; prefix it with the part's name: {p.name}.{key}"
                               for p in self.parts if key in p.parameters())
                raise ValueError(f"drafter {self.name!r} has no option {key!r} (accepted: "
                                 f"{self.accepted()}){hint}")
        out = RegisteredDrafter(self.name, _own_options, self.origin).convert_options(own)
        depths = []
        for part, options in zip(self.parts, routed):
            converted = part.convert_options(options)
            out.update({f"{part.name}.{key}": value for key, value in converted.items()})
            depths.append(draft_depth(part.factory, options=converted, drafter=part.name))
        if not out.get("max_depth"):
            out["max_depth"] = max(depths)
        return out


def _own_options(threshold: int = 0, max_depth: int = 0) -> None:
    """The hybrid's own options (their schema only; see :class:`Hybrid`)."""


def registered_hybrid(name: str, lookup: Callable[[str], RegisteredDrafter]) -> RegisteredHybrid:
    """The registry entry of hybrid `name` ("A+B"), its parts found with `lookup`
    (``Registry.get``, whose KeyError lists the registered names)."""
    pair = split_name(name)
    if pair is None:
        raise ValueError(f"{name!r} is not a hybrid name (A+B)")
    try:
        first, second = (lookup(n) for n in pair)
    except KeyError as exc:
        raise KeyError(f"hybrid {name!r}: {exc.args[0]}") from None

    def factory(threshold: int = 0, max_depth: int = 0, **part_options: Any) -> Hybrid:
        names, made = (first.name, second.name), []
        unknown = [key for key in part_options if owner(names, key) is None]
        if unknown:
            raise TypeError(f"hybrid {name}: unknown option(s) {', '.join(unknown)}")
        for i, part in enumerate((first, second)):
            options = {key[len(part.name) + 1:]: value for key, value in part_options.items()
                       if owner(names, key) == i}
            try:
                made.append(part.create(**options))
            except (ValueError, TypeError) as exc:
                raise type(exc)(f"hybrid {name}: part {part.name!r}: {exc}") from exc
        return Hybrid(made[0], made[1], threshold=threshold, max_depth=max_depth,
                      names=(first.name, second.name))

    factory.max_depth = max(draft_depth(p.factory, drafter=p.name)  # type: ignore[attr-defined]
                            for p in (first, second))
    factory.__name__ = factory.__qualname__ = f"hybrid[{name}]"
    origin = f"hybrid of {first.name} ({first.origin}) and {second.name} ({second.origin})"
    return RegisteredHybrid(name, factory, origin, parts=(first, second))
