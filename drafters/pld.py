"""Prompt lookup decoding (PLD): draft by copying what followed an earlier occurrence
of the context's last n-gram.

Reference: Spec-Bench's ``inference_pld.py`` (``find_candidate_pred_tokens``, after
Saxena's prompt-lookup-decoding), the PLD the test-time-scaling benchmark runs. For n
from 3 down to 1 it scans the sequence from the start for the suffix n-gram and takes
the FIRST occurrence whose continuation is full: the draft length (10) of tokens
follow it, all of them before the end of the text, and it does not start inside the
suffix n-gram itself (continuation start < len - n). Its default here
(``match="first_full"``) is that rule, with the draft length being the k the engine
asks for (``max_depth`` 10, the reference's; smaller near the end of the token budget
or under ``--specdec-k``).

Since the text only grows, occurrences are ordered by end position and both
conditions bound that position from above: if any occurrence has a full continuation,
the first one does. So the index keeps, per n-gram, the end of its first occurrence,
and a proposal costs O(max_ngram) lookups whatever the context length (the reference
rescans the sequence every step); the drafts are the reference's.

Deliberate differences, each an option (off or at the reference's value by default):

- ``match="most_recent"``: copy after the most recent occurrence, however few tokens
  follow it (at least one). It adapts faster to the latest text but on a loop drafts
  only what the last period left: on ``a b a b a b`` it drafts 2 tokens, not k.
- ``share_group``: also search the earlier samples and rounds of the same problem
  (after the current sequence, most recent first, for each n); the reference sees one
  sequence.
- ``min_ngram`` (1 in the reference) and ``max_ngram`` (3) are options.
- with nothing found the reference verifies one dummy token; here the draft is empty.
"""

from __future__ import annotations

from typing import Sequence

from pytest_specdec.protocol.drafter import Draft, DraftRequest, DrafterBase
from pytest_specdec.protocol.drafting import ProblemMemory

#: The occurrence a draft copies after: the reference's rule first.
MATCH_RULES = ("first_full", "most_recent")


class NgramIndex:
    """n-gram -> end position of its first (``keep="first"``) or most recent
    (``keep="latest"``) occurrence, for n in [lo, hi].

    ``extend`` adds each token after indexing the n-grams that end just before it, so
    a suffix n-gram of the text is never matched against itself and every indexed
    occurrence has at least one token of continuation.
    """

    def __init__(self, lo: int, hi: int, keep: str = "latest"):
        if keep not in ("first", "latest"):
            raise ValueError(f"keep must be 'first' or 'latest', got {keep!r}")
        self.lo, self.hi, self.keep = lo, hi, keep
        self.tokens: list[int] = []
        self.ends: dict[tuple[int, ...], int] = {}

    def extend(self, tokens: Sequence[int]) -> None:
        first = self.keep == "first"
        for token in tokens:
            end = len(self.tokens)
            for n in range(self.lo, min(self.hi, end) + 1):
                if first:
                    self.ends.setdefault(tuple(self.tokens[end - n:end]), end)
                else:
                    self.ends[tuple(self.tokens[end - n:end])] = end
            self.tokens.append(token)

    def continuation(self, ngram: tuple[int, ...], k: int) -> tuple[int, ...]:
        """Up to k tokens after the kept occurrence of ``ngram`` (empty if none)."""
        end = self.ends.get(ngram)
        return () if end is None else tuple(self.tokens[end:end + k])

    def full_continuation(self, ngram: tuple[int, ...], k: int) -> tuple[int, ...]:
        """The k tokens after the first occurrence of ``ngram`` when all k exist and
        they start before the text's own suffix n-gram (the reference's two
        conditions); else empty. Needs ``keep="first"``."""
        end = self.ends.get(ngram)
        size = len(self.tokens)
        if end is None or end + k > size or end >= size - len(ngram):
            return ()
        return tuple(self.tokens[end:end + k])


class PromptLookup(DrafterBase):
    """Prompt lookup decoding with an incremental n-gram index.

    max_ngram / min_ngram: the longest and shortest suffix n-gram tried (3 and 1, as
        Spec-Bench).
    match: ``first_full`` (the reference: the first occurrence with k tokens after it)
        or ``most_recent`` (the latest occurrence, however short its continuation).
    share_group: also search the earlier samples and rounds of the same problem.
    """

    max_depth = 10  # Spec-Bench's inference_pld.py drafts up to 10 tokens

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1, match: str = "first_full",
                 share_group: bool = False):
        if min_ngram < 1 or max_ngram < min_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got min_ngram={min_ngram}, "
                             f"max_ngram={max_ngram}")
        if match not in MATCH_RULES:
            raise ValueError(f"match must be one of {', '.join(MATCH_RULES)}, got {match!r}")
        self.max_ngram, self.min_ngram, self.share_group = max_ngram, min_ngram, share_group
        self.match = match
        self._keep = "first" if match == "first_full" else "latest"
        self._current = self._new_index()
        # the open sequence's problem and, per problem, the indexes of its finished
        # sequences (most recent last), filed when a sequence ends
        self.memory: ProblemMemory[list[NgramIndex]] = ProblemMemory(self._file,
                                                                     keep=share_group)

    def _new_index(self) -> NgramIndex:
        return NgramIndex(self.min_ngram, self.max_ngram, self._keep)

    def _file(self, previous: list[NgramIndex] | None,
              sequences: tuple[tuple[int, ...], ...]) -> list[NgramIndex]:
        """The ProblemMemory index: the problem's list of n-gram indexes with the one of
        its newest finished sequence added. That sequence's index is the live one (it
        ends before begin replaces it), so nothing is rebuilt."""
        assert self._current.tokens == list(sequences[-1])
        filed = previous if previous is not None else []
        filed.append(self._current)
        return filed

    def begin(self, request: DraftRequest) -> None:
        self.memory.begin(request)  # files a sequence left open, with its live index
        self._current = self._new_index()
        self._current.extend(request.prompt_ids)

    def propose(self, context: Sequence[int], k: int) -> Draft:
        if k < 1:
            return Draft()
        earlier = self.memory.index() or []
        for n in range(min(self.max_ngram, len(context)), self.min_ngram - 1, -1):
            suffix = tuple(context[-n:])
            for index in (self._current, *reversed(earlier)):
                if self.match == "most_recent":
                    found = index.continuation(suffix, k)
                elif index is self._current:
                    found = index.full_continuation(suffix, k)
                else:  # a finished sequence: its suffix n-gram is no match of ours
                    found = index.continuation(suffix, k)
                    found = found if len(found) == k else ()
                if found:
                    return Draft(found)
        return Draft()

    def accept(self, tokens: Sequence[int]) -> None:
        self.memory.extend(tokens)
        self._current.extend(tokens)

    def end(self) -> None:
        self.memory.end()
