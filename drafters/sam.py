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
"""

from __future__ import annotations

from bisect import bisect_right
from typing import Iterable, Sequence

from pytest_specdec.protocol.drafter import Draft, DraftRequest, DrafterBase
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

    def repeat(self) -> int:
        """The state of the longest suffix of the text that also ends earlier (0: none)."""
        return max(self.link[self.last], 0)

    def step(self, state: int, length: int, token: int) -> tuple[int, int]:
        """From (state, length), the longest suffix of some text that is a substring
        here, to that of the text followed by `token`."""
        transitions = self.transitions
        while (after := transitions[state].get(token)) is None:
            if state == 0:
                return 0, 0
            state = self.link[state]
            length = self.length[state]
            self.visits += 1
        return after, length + 1


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


class SamDecoding(DrafterBase):
    """SAM-Decoding: longest-suffix matching with suffix automatons, built incrementally.

    min_match: the shortest suffix match that gives a draft (shorter matches are too
        weak to copy from).
    share_group: also match against the earlier samples and rounds of the same problem.
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
        # the current sequence (prompt, then accepted tokens) and, per problem, the group
        # automaton of its finished sequences
        self.memory: ProblemMemory[GroupAutomaton] = ProblemMemory(grow_group,
                                                                   keep=share_group)
        self._current = SuffixAutomaton()
        self._earlier: GroupAutomaton | None = None  # this problem's finished sequences
        self._group_match = (0, 0)  # (state, length) of the text's match in _earlier

    def begin(self, request: DraftRequest) -> None:
        self.memory.begin(request)
        self._current = SuffixAutomaton()
        self._earlier = self.memory.index() if self.share_group else None
        self._group_match = (0, 0)
        self._follow(request.prompt_ids)

    def accept(self, tokens: Sequence[int]) -> None:
        self.memory.extend(tokens)
        self._follow(tokens)

    def _follow(self, tokens: Sequence[int]) -> None:
        """The text grew by `tokens`: extend the automaton, advance the group match."""
        self._current.extend(tokens)
        if self._earlier is not None:
            automaton, (state, length) = self._earlier.automaton, self._group_match
            for token in tokens:
                state, length = automaton.step(state, length, token)
            self._group_match = (state, length)

    def propose(self, context: Sequence[int], k: int) -> Draft:
        # Scoring rule (the paper's): the longer match is the better predictor; on a tie
        # the current sequence wins, being the text that is continued. A match shorter
        # than min_match gives nothing. Both kinds of match always have a continuation.
        current = self._current.repeat()
        current_length = self._current.length[current]
        group_state, group_length = self._group_match
        if k < 1 or max(current_length, group_length) < self.min_match:
            return Draft()
        # the reference's depth per step: 1 + 4 per matched token, capped by k (max_depth 40)
        k = min(k, 1 + 4 * max(current_length, group_length))
        if group_length > current_length and self._earlier is not None:
            return Draft(self._earlier.continuation(group_state, k))
        end = self._current.first_end[current]
        return Draft(tuple(self.memory.current[end + 1:end + 1 + k]))

    def end(self) -> None:
        self.memory.end()
        self._earlier = None
