"""SAM-Decoding (Hu et al. 2024, "SAM Decoding: Speculative Decoding via Suffix
Automatons"): draft by copying what followed the longest suffix of the text that
occurred before, found with suffix automatons.

Two automatons are matched against the text: one over the current sequence (prompt
and generated tokens; the paper's dynamic automaton) and, with ``share_group``, one
over the finished sequences of the same problem (the earlier Best-of-N samples and
rounds; the paper's static automaton, which it builds from a corpus). The draft copies
the tokens that followed the first occurrence of the longer of the two matches (on a
tie, the current sequence's), as the paper does.

Each state keeps the end position of its first occurrence (as the paper's min_endpos):
the online construction maintains it exactly in O(1) (a new state's is the new
position, a clone inherits the original's), and the first occurrence leaves the most
text after it to copy. The most recent occurrence would mean updating every state on
the suffix-link path at each token.

Each finished sequence enters the group automaton with its last token replaced by a
separator that no text contains: a match never crosses from one sequence into the
next, and every occurrence a match can reach is followed by at least one token of its
own sequence (the real tokens are kept beside the automaton for the copy). A separator
appended after each sequence would also stop matches crossing, but a match whose first
occurrence ends a sequence would then have nothing to copy.

Cost per step, whatever the context length (amortised O(1); propose never reads the
context, the drafter follows the text through begin and accept):

- accept: the current automaton grows by the online construction, amortised O(1)
  states visited per token (Blumer et al. 1985); the match against the group
  automaton is a (state, length) pair advanced per token by one transition, after
  following suffix links while none exists; each link shortens the match and each
  token lengthens it by at most one, so that walk is amortised O(1) too;
- propose: the current match needs no walk (the longest suffix that occurs earlier is
  the suffix link of the whole text's state); the draft is a slice of at most k tokens.

The group automaton grows by a whole sequence when it ends (``end``), O(1) per token.

Batched (``concurrent_sequences``): the problem's samples open at once are each other's
siblings. Each sequence keeps its match in every sibling's automaton, advanced per
accepted token like the group match, so it copies from a sibling's text as far as the
sibling has come. An automaton that grew since a match was made may have split the
match's state; :meth:`SuffixAutomaton.normalize` moves the match down the suffix links
to the state that now holds it (amortised O(1), and a no-op at batch 1, where nothing
a match points into grows). Per accepted token that is one match step per sibling.
"""

from __future__ import annotations

from bisect import bisect_right
from typing import Iterable, Sequence

from pytest_specdec.protocol.drafter import (ConcurrentDrafterBase, Draft, DraftRequest,
                                             SequenceDrafter)
from pytest_specdec.protocol.drafting import ProblemMemory

#: Never a token id: stands for the last token of each sequence in the group automaton.
SEPARATOR = -1


class SuffixAutomaton:
    """The online suffix automaton of a token list: every substring is a path from state
    0 (the empty string), and states group the substrings that end at the same
    positions.

    Per state: outgoing transitions, suffix link (the state of its longest suffix that
    ends at more positions), the length of its longest string, and ``first_end``, the
    end position of its strings' first occurrence. ``visits`` counts the states the
    construction and the matching walk step through (and transitions copied), so tests
    can check the amortised O(1) cost without timing.
    """

    def __init__(self, tokens: Iterable[int] = ()):
        self.transitions: list[dict[int, int]] = [{}]
        self.link: list[int] = [-1]
        self.length: list[int] = [0]
        self.first_end: list[int] = [-1]
        self.last = 0  # the state of the whole text
        self.size = 0  # tokens added
        self.visits = 0
        self.extend(tokens)

    def _new_state(self, length: int, first_end: int, transitions: dict[int, int]) -> int:
        self.transitions.append(transitions)
        self.link.append(0)
        self.length.append(length)
        self.first_end.append(first_end)
        return len(self.length) - 1

    def extend(self, tokens: Iterable[int]) -> None:
        for token in tokens:
            self._append(token)

    def _append(self, token: int) -> None:
        transitions, link, length = self.transitions, self.link, self.length
        cur = self._new_state(length[self.last] + 1, self.size, {})
        self.size += 1
        # every suffix of the old text without a `token` transition now ends here only
        p = self.last
        while p >= 0 and token not in transitions[p]:
            transitions[p][token] = cur
            p = link[p]
            self.visits += 1
        if p >= 0:
            q = transitions[p][token]
            if length[p] + 1 == length[q]:
                link[cur] = q
            else:
                # q holds strings longer than len(p) + 1 that do not end here: split it
                clone = self._new_state(length[p] + 1, self.first_end[q], dict(transitions[q]))
                self.visits += len(transitions[q])
                link[clone] = link[q]
                while p >= 0 and transitions[p][token] == q:
                    transitions[p][token] = clone
                    p = link[p]
                    self.visits += 1
                link[q] = link[cur] = clone
        self.last = cur

    def normalize(self, state: int, length: int) -> tuple[int, int]:
        """(state, length) of a string matched before the text grew, valid now: a state
        split since then (a clone took its shorter strings) is left for the state on its
        suffix-link path that holds strings of that length. A no-op on an automaton that
        did not grow since the match was made."""
        link, lengths = self.link, self.length
        while state > 0 and length <= lengths[link[state]]:
            state = link[state]
            self.visits += 1
        return state, length

    def repeat(self) -> int:
        """The state of the longest suffix of the text that also ends earlier (0: none)."""
        return max(self.link[self.last], 0)

    def step(self, state: int, length: int, token: int) -> tuple[int, int]:
        """From (state, length), the longest suffix of some text that is a substring
        here, to that of the text followed by `token` (the automaton may have grown
        since (state, length) was found: see :meth:`normalize`)."""
        transitions = self.transitions
        state, length = self.normalize(state, length)
        while (after := transitions[state].get(token)) is None:
            if state == 0:
                return 0, 0
            state = self.link[state]
            length = self.length[state]
            self.visits += 1
        return after, length + 1

    def advance(self, match: tuple[int, int], tokens: Iterable[int]) -> tuple[int, int]:
        """:meth:`step` by each of `tokens` from ``match``, (state, length)."""
        state, length = match
        for token in tokens:
            state, length = self.step(state, length, token)
        return state, length

    def match(self, tokens: Iterable[int]) -> tuple[int, int]:
        """(state, length) of the longest suffix of `tokens` that occurs here."""
        return self.advance((0, 0), tokens)


class GroupAutomaton:
    """The finished sequences of one problem, for a new sequence to be matched against."""

    def __init__(self) -> None:
        self.automaton = SuffixAutomaton()
        self.tokens: list[int] = []  # the sequences, concatenated, real last tokens kept
        self.ends: list[int] = []  # where each sequence ends in `tokens` (exclusive)

    def add(self, sequence: Sequence[int]) -> None:
        if not sequence:
            return
        self.automaton.extend(sequence[:-1])
        self.automaton.extend((SEPARATOR,))
        self.tokens.extend(sequence)
        self.ends.append(len(self.tokens))

    def continuation(self, state: int, k: int) -> tuple[int, ...]:
        """Up to k tokens after the first occurrence of `state`, within its sequence."""
        end = self.automaton.first_end[state]
        sequence_end = self.ends[bisect_right(self.ends, end)]
        return tuple(self.tokens[end + 1:min(end + 1 + k, sequence_end)])


def grow_group(previous: GroupAutomaton | None,
               sequences: tuple[tuple[int, ...], ...]) -> GroupAutomaton:
    """The problem's group automaton with its newest finished sequence added (the
    ProblemMemory index of SAM)."""
    group = previous if previous is not None else GroupAutomaton()
    group.add(sequences[-1])
    return group


class SamDecoding(ConcurrentDrafterBase):
    """SAM-Decoding: longest-suffix matching with suffix automatons, built incrementally.

    min_match: the shortest suffix match that gives a draft (shorter matches are too
        weak to copy from).
    share_group: also match against the earlier samples and rounds of the same problem,
        and (batched) against its samples open beside the sequence, as they grow.

    Concurrent (``concurrent_sequences``): each open sequence is a :class:`_SamSequence`
    with its own automaton; with ``share_group`` it also follows its match in every
    sibling's automaton (the problem's other sequences open while it is, each extended
    per accepted token), and the longest of all matches is copied from (ties: the
    sequence itself, then the finished sequences, then the siblings in opening order).
    """

    # the default suite also runs SAM without the group automaton: what sharing is worth
    ablations = ({"share_group": "false"},)
    max_depth = 40  # the cap; per step the reference drafts min(40, 1 + 4 * match length)

    def __init__(self, min_match: int = 1, share_group: bool = True):
        if isinstance(min_match, bool) or not isinstance(min_match, int) or min_match < 1:
            raise ValueError(f"min_match must be an integer >= 1, got {min_match!r}")
        if not isinstance(share_group, bool):
            raise ValueError(f"share_group must be True or False, got {share_group!r}")
        self.min_match, self.share_group = min_match, share_group
        # per problem, the group automaton of its finished sequences
        self.memory: ProblemMemory[GroupAutomaton] = ProblemMemory(grow_group,
                                                                   keep=share_group)
        self.opened: dict[str, list[_SamSequence]] = {}  # per problem, its open sequences

    def open(self, request: DraftRequest) -> "_SamSequence":
        sequence = _SamSequence(self, request)
        siblings = self.opened.setdefault(request.group, [])
        if self.share_group:
            for sibling in siblings:  # each follows its match in the other's automaton
                sequence.siblings.append((sibling, sibling.automaton.match(sequence.text)))
                sibling.siblings.append((sequence, sequence.automaton.match(sibling.text)))
        siblings.append(sequence)
        return sequence

    @property
    def _current(self) -> SuffixAutomaton:
        """The automaton of the sequence begun with ``begin`` (tests read it)."""
        return self._single.automaton

    @property
    def _earlier(self) -> GroupAutomaton | None:
        return self._single.earlier


class _SamSequence(SequenceDrafter):
    """One open sequence of a :class:`SamDecoding`: its automaton (the paper's dynamic
    one), its match in the problem's group automaton and in each sibling's automaton."""

    def __init__(self, drafter: SamDecoding, request: DraftRequest):
        self.drafter = drafter
        self.sequence = drafter.memory.open(request)
        self.automaton = SuffixAutomaton(request.prompt_ids)
        self.earlier = drafter.memory.index(request.group) if drafter.share_group else None
        self.group_match = (0, 0)  # (state, length) of the text's match in `earlier`
        # per sibling: it, and (state, length) of this text's match in its automaton
        self.siblings: list[tuple[_SamSequence, tuple[int, int]]] = []
        self._follow_group(request.prompt_ids)

    @property
    def text(self) -> list[int]:
        """The sequence so far: prompt, then accepted tokens."""
        return self.sequence.tokens

    def accept(self, tokens: Sequence[int]) -> None:
        self.sequence.extend(tokens)
        self.automaton.extend(tokens)
        self._follow_group(tokens)
        self.siblings = [(sibling, sibling.automaton.advance(match, tokens))
                         for sibling, match in self.siblings]

    def _follow_group(self, tokens: Sequence[int]) -> None:
        """The text grew by `tokens`: advance the group match."""
        if self.earlier is not None:
            self.group_match = self.earlier.automaton.advance(self.group_match, tokens)

    def propose(self, context: Sequence[int], k: int) -> Draft:
        # Scoring rule (the paper's): the longer match is the better predictor; on a tie
        # the current sequence wins, being the text that is continued, then the finished
        # sequences, then the siblings. A match shorter than min_match gives nothing.
        # The sequence's and the group's matches always have a continuation; a sibling's
        # only once the sibling has gone past it.
        current = self.automaton.repeat()
        length = self.automaton.length[current]
        source: tuple[str, object, int] = ("current", self, current)
        if self.earlier is not None:
            state, group_length = self.earlier.automaton.normalize(*self.group_match)
            if group_length > length:
                length, source = group_length, ("group", self.earlier, state)
        for sibling, match in self.siblings:
            state, sibling_length = sibling.automaton.normalize(*match)
            follows = sibling.automaton.first_end[state] + 1 < len(sibling.text)
            if sibling_length > length and follows:
                length, source = sibling_length, ("sibling", sibling, state)
        if k < 1 or length < self.drafter.min_match:
            return Draft()
        # the reference's depth per step: 1 + 4 per matched token, capped by k (max_depth 40)
        k = min(k, 1 + 4 * length)
        kind, where, state = source
        if kind == "group":
            return Draft(where.continuation(state, k))
        end = where.automaton.first_end[state]
        return Draft(tuple(where.text[end + 1:end + 1 + k]))

    def end(self) -> None:
        if not self.sequence.is_open:
            return
        self.drafter.memory.close(self.sequence)
        self.drafter.opened[self.sequence.group].remove(self)
        self.earlier, self.siblings = None, []
