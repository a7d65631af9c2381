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
  (after the current sequence, most recent first, for each n) and, in a batch, the
  problem's samples open beside it as far as they have come (before the finished ones);
  the reference sees one sequence.
- ``min_ngram`` (1 in the reference) and ``max_ngram`` (3) are options.
- with nothing found the reference verifies one dummy token; here the draft is empty.
"""

from __future__ import annotations

from typing import Sequence

from pytest_specdec.protocol.drafter import (ConcurrentDrafterBase, Draft, DraftRequest,
                                             SequenceDrafter)

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


class PromptLookup(ConcurrentDrafterBase):
    """Prompt lookup decoding with an incremental n-gram index.

    max_ngram / min_ngram: the longest and shortest suffix n-gram tried (3 and 1, as
        Spec-Bench).
    match: ``first_full`` (the reference: the first occurrence with k tokens after it)
        or ``most_recent`` (the latest occurrence, however short its continuation).
    share_group: also search the earlier samples and rounds of the same problem, and
        (batched) its samples open beside the sequence, as far as they have come.

    Concurrent (``concurrent_sequences``): each open sequence is a :class:`_Lookup`
    with its own index; with ``share_group`` a sequence searches, after its own text,
    the problem's other open sequences (the latest opened first), then its finished
    ones (most recent first).
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
        # per problem: the indexes of its finished sequences (most recent last), filed
        # when a sequence ends (with share_group), and those of its open sequences
        self.finished: dict[str, list[NgramIndex]] = {}
        self.opened: dict[str, list[_Lookup]] = {}

    def _new_index(self) -> NgramIndex:
        return NgramIndex(self.min_ngram, self.max_ngram, self._keep)

    def open(self, request: DraftRequest) -> "_Lookup":
        sequence = _Lookup(self, request.group, self._new_index())
        sequence.index.extend(request.prompt_ids)
        self.opened.setdefault(request.group, []).append(sequence)
        return sequence


class _Lookup(SequenceDrafter):
    """One open sequence of a :class:`PromptLookup`: its n-gram index, filed under its
    problem when it ends (the live index: nothing is rebuilt)."""

    def __init__(self, drafter: PromptLookup, group: str, index: NgramIndex):
        self.drafter, self.group, self.index = drafter, group, index
        self.is_open = True

    def propose(self, context: Sequence[int], k: int) -> Draft:
        drafter = self.drafter
        if k < 1:
            return Draft()
        others: list[NgramIndex] = []
        if drafter.share_group:
            opened = drafter.opened.get(self.group, ())
            others += [s.index for s in reversed(opened) if s is not self]
            others += reversed(drafter.finished.get(self.group, ()))
        for n in range(min(drafter.max_ngram, len(context)), drafter.min_ngram - 1, -1):
            suffix = tuple(context[-n:])
            for index in (self.index, *others):
                if drafter.match == "most_recent":
                    found = index.continuation(suffix, k)
                elif index is self.index:
                    found = index.full_continuation(suffix, k)
                else:  # another sequence: its suffix n-gram is no match of ours
                    found = index.continuation(suffix, k)
                    found = found if len(found) == k else ()
                if found:
                    return Draft(found)
        return Draft()

    def accept(self, tokens: Sequence[int]) -> None:
        self.index.extend(tokens)

    def end(self) -> None:
        if not self.is_open:
            return
        self.is_open = False
        self.drafter.opened[self.group].remove(self)
        if self.drafter.share_group and self.index.tokens:
            self.drafter.finished.setdefault(self.group, []).append(self.index)
