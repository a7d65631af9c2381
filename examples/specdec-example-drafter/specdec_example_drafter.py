"""A bigram-cache drafter: an example of a third-party pytest-specdec drafter.

It remembers, for every token, the token that most recently followed it (in the
prompt, in what was generated, and with ``share_group`` in the earlier samples and
rounds of the same problem), and drafts by following that chain from the last token
for up to k steps. The engine verifies every drafted token against the target, so
however wrong the guesses, the output is exactly plain decoding's.
"""

from __future__ import annotations

from typing import Sequence

from pytest_specdec.drafter import Draft, DraftRequest, DrafterBase


class BigramCache(DrafterBase):
    """Follow the most recent successor of each token.

    share_group: keep one table per problem, shared by its samples and rounds
    (otherwise each sequence starts from its prompt alone).
    """

    # the default suite also runs bigram:share_group=false, to show what sharing is worth
    ablations = ({"share_group": "false"},)

    def __init__(self, share_group: bool = True):
        self.share_group = share_group
        self._tables: dict[str, dict[int, int]] = {}  # problem -> token -> next token
        self._next: dict[int, int] = {}
        self._last: int | None = None

    def begin(self, request: DraftRequest) -> None:
        self._next = self._tables.setdefault(request.group, {}) if self.share_group else {}
        self._last = None
        self._learn(request.prompt_ids)

    def propose(self, context: Sequence[int], k: int) -> Draft:
        draft: list[int] = []
        token = context[-1]
        while len(draft) < k and token in self._next:
            token = self._next[token]
            draft.append(token)
        return Draft(tuple(draft))

    def accept(self, tokens: Sequence[int]) -> None:
        self._learn(tokens)

    def _learn(self, tokens: Sequence[int]) -> None:
        for token in tokens:
            if self._last is not None:
                self._next[self._last] = token
            self._last = token
