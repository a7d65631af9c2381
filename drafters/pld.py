"""Prompt lookup decoding (PLD): draft by copying what followed an earlier occurrence
of the context's last n-gram.

For n from max_ngram down to min_ngram, the suffix n-gram is looked up in an index of
every earlier n-gram of the sequence (prompt and generated text); the tokens that
followed its most recent occurrence are the draft. With ``share_group`` the earlier
sequences of the same problem (the other Best-of-N samples, earlier rounds) are
searched too, after the current sequence, for each n.

The index is extended per accepted token, so a proposal costs O(max_ngram) lookups
whatever the context length (Hugging Face's prompt lookup rescans the sequence).
"""

from __future__ import annotations

from typing import Sequence

from pytest_specdec.drafter import Draft, DraftRequest, DrafterBase


class NgramIndex:
    """n-gram -> end position of its most recent occurrence, for n in [lo, hi].

    ``extend`` adds each token after indexing the n-grams that end just before it, so
    a suffix n-gram of the text is never matched against itself and every indexed
    occurrence has at least one token of continuation.
    """

    def __init__(self, lo: int, hi: int):
        self.lo, self.hi = lo, hi
        self.tokens: list[int] = []
        self.latest: dict[tuple[int, ...], int] = {}

    def extend(self, tokens: Sequence[int]) -> None:
        for token in tokens:
            end = len(self.tokens)
            for n in range(self.lo, min(self.hi, end) + 1):
                self.latest[tuple(self.tokens[end - n:end])] = end
            self.tokens.append(token)

    def continuation(self, ngram: tuple[int, ...], k: int) -> tuple[int, ...]:
        end = self.latest.get(ngram)
        return () if end is None else tuple(self.tokens[end:end + k])


class PromptLookup(DrafterBase):
    """Prompt lookup decoding with an incremental n-gram index.

    max_ngram / min_ngram: the longest and shortest suffix n-gram tried.
    share_group: also search the earlier samples and rounds of the same problem.
    """

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1, share_group: bool = False):
        if min_ngram < 1 or max_ngram < min_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got min_ngram={min_ngram}, "
                             f"max_ngram={max_ngram}")
        self.max_ngram, self.min_ngram, self.share_group = max_ngram, min_ngram, share_group
        self._current = NgramIndex(min_ngram, max_ngram)
        self._group_key = ""
        # finished sequences of each problem, most recent last
        self._groups: dict[str, list[NgramIndex]] = {}

    def begin(self, request: DraftRequest) -> None:
        self._group_key = request.group
        self._current = NgramIndex(self.min_ngram, self.max_ngram)
        self._current.extend(request.prompt_ids)

    def propose(self, context: Sequence[int], k: int) -> Draft:
        earlier = self._groups.get(self._group_key, []) if self.share_group else []
        for n in range(min(self.max_ngram, len(context)), self.min_ngram - 1, -1):
            suffix = tuple(context[-n:])
            for index in (self._current, *reversed(earlier)):
                found = index.continuation(suffix, k)
                if found:
                    return Draft(found)
        return Draft()

    def accept(self, tokens: Sequence[int]) -> None:
        self._current.extend(tokens)

    def end(self) -> None:
        if self.share_group:
            self._groups.setdefault(self._group_key, []).append(self._current)
