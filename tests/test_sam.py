"""SAM-Decoding: exact drafts for hand-made token lists, sharing across the sequences of
a problem, the suffix automaton against brute force, O(1) work per step, and
losslessness through the engine."""

from __future__ import annotations

import random
from typing import Sequence

import pytest

from conftest import tiny_model
from pytest_specdec.drafters.sam import SEPARATOR, GroupAutomaton, SamDecoding, SuffixAutomaton
from pytest_specdec.engine import GenerationRequest, generate
from pytest_specdec.engine.target import wrap_model
from pytest_specdec.protocol.drafter import Draft, DraftRequest
from pytest_specdec.protocol.sampling import Sampler


def propose(prompt: Sequence[int], accepted: Sequence[int] = (), k: int = 4,
            group: str = "g", drafter: SamDecoding | None = None, **options) -> Draft:
    """Begin a sequence with `prompt`, accept `accepted`, then propose up to k tokens."""
    drafter = drafter if drafter is not None else SamDecoding(**options)
    drafter.begin(DraftRequest(tuple(prompt), group))
    if accepted:
        drafter.accept(tuple(accepted))
    return drafter.propose(tuple(prompt) + tuple(accepted), k)


# --- single sequence: exact drafts --------------------------------------------------------

SAM_CASES = [
    # id, prompt, accepted, k, options, expected draft
    ("longest-match-wins", [1, 2, 3, 9, 4, 3, 8, 1, 2, 3], [], 2, {}, (9, 4)),
    # no n-gram cap: the 6-token match beats a more recent 5-token one
    ("match-length-is-unbounded",
     [5, 1, 2, 3, 4, 5, 6, 8, 2, 3, 4, 5, 6, 7, 1, 2, 3, 4, 5, 6], [], 1, {}, (8,)),
    ("first-occurrence", [4, 5, 1, 4, 5, 2, 4, 5], [], 1, {}, (1,)),
    ("first-occurrence-long", [4, 5, 1, 4, 5, 2, 4, 5], [], 3, {}, (1, 4, 5)),
    ("match-shrinks-to-the-longest-repeat", [1, 2, 3, 1, 2, 4, 1, 2, 3], [], 3, {}, (1, 2, 4)),
    ("no-match", [1, 2, 3, 4], [], 4, {}, ()),
    ("single-token-context", [7], [], 4, {}, ()),
    ("k-caps-the-draft", [7, 8, 9, 10, 11, 7], [], 2, {}, (8, 9)),
    ("runs-to-the-end-of-text", [7, 8, 9, 10, 11, 7], [], 10, {}, (8, 9, 10, 11, 7)),
    ("k-zero", [7, 8, 9, 10, 11, 7], [], 0, {}, ()),
    ("overlaps-the-suffix", [1, 1, 1], [], 3, {}, (1,)),
    ("period-two", [3, 4, 3, 4, 3], [], 5, {}, (4, 3)),
    ("min-match-2-skips-single-tokens", [5, 6, 1, 2, 6], [], 3, {"min_match": 2}, ()),
    ("min-match-1-takes-the-single-token", [5, 6, 1, 2, 6], [], 3, {}, (1, 2, 6)),
    ("min-match-2-pair", [5, 6, 1, 2, 5, 6], [], 3, {"min_match": 2}, (1, 2, 5)),
    ("min-match-equal-to-the-match", [9, 5, 6, 7, 1, 5, 6, 7], [], 2, {"min_match": 3}, (1, 5)),
    ("min-match-above-the-match", [9, 5, 6, 7, 1, 5, 6, 7], [], 2, {"min_match": 4}, ()),
    ("accepted-tokens-are-indexed", [1, 2, 3], [4, 1, 2], 3, {}, (3, 4, 1)),
    ("match-only-in-generated-text", [9], [5, 6, 7, 5], 3, {}, (6, 7, 5)),
    ("first-occurrence-in-the-prompt", [5, 1], [5, 2, 5], 2, {}, (1, 5)),
]


@pytest.mark.parametrize("prompt, accepted, k, options, expected",
                         [c[1:] for c in SAM_CASES], ids=[c[0] for c in SAM_CASES])
def test_sam_drafts(prompt, accepted, k, options, expected):
    draft = propose(prompt, accepted, k, **options)
    assert isinstance(draft, Draft)
    assert draft == Draft(expected)
    assert draft.is_chain and len(draft) <= k


def test_accepting_in_pieces_equals_accepting_at_once():
    pieces = SamDecoding()
    pieces.begin(DraftRequest((1, 2, 3), "g"))
    for chunk in [(4,), (1, 2), (3, 5, 1), (2,)]:
        pieces.accept(chunk)
    context = (1, 2, 3, 4, 1, 2, 3, 5, 1, 2)
    assert pieces.propose(context, 3) == propose(context, k=3) == Draft((3, 4, 1))


class Untouchable(Sequence[int]):
    """A context that fails the test if the drafter reads it."""

    def __getitem__(self, index):
        raise AssertionError("propose read the context")

    def __len__(self) -> int:
        raise AssertionError("propose read the context")


def test_propose_never_reads_the_context():
    drafter = SamDecoding()
    drafter.begin(DraftRequest((1, 2, 3, 1, 2), "g"))
    assert drafter.propose(Untouchable(), 2) == Draft((3, 1))


def test_begin_resets_the_current_sequence():
    drafter = SamDecoding()
    assert propose([1, 2, 9, 1, 2], k=1, drafter=drafter) == Draft((9,))
    drafter.end()
    # a new sequence of another problem does not see the old text
    assert propose([3, 1, 2], k=1, group="other", drafter=drafter) == Draft()


@pytest.mark.parametrize("options, message", [
    ({"min_match": 0}, "min_match must be an integer >= 1, got 0"),
    ({"min_match": -3}, "min_match must be an integer >= 1, got -3"),
    ({"min_match": 1.5}, "min_match must be an integer >= 1, got 1.5"),
    ({"min_match": True}, "min_match must be an integer >= 1, got True"),
    ({"share_group": "yes"}, "share_group must be True or False, got 'yes'"),
])
def test_invalid_parameters_raise_naming_the_values(options, message):
    with pytest.raises(ValueError) as info:
        SamDecoding(**options)
    assert str(info.value) == message


# --- sharing across the sequences of one problem -------------------------------------------

def finished(drafter: SamDecoding, group: str, *sequences: Sequence[int]) -> SamDecoding:
    """Run whole sequences through the drafter (prompt only, then end)."""
    for tokens in sequences:
        drafter.begin(DraftRequest(tuple(tokens), group))
        drafter.end()
    return drafter


SHARE_CASES = [
    # id, share_group, earlier (group, tokens) in order, now (group, prompt), k, expected
    ("same-group", True, [("A", [10, 11, 20, 21, 22, 23, 24])], ("A", [30, 20, 21]), 3,
     (22, 23, 24)),
    ("other-group", True, [("A", [10, 11, 20, 21, 22, 23, 24])], ("B", [30, 20, 21]), 3, ()),
    ("sharing-off", False, [("A", [10, 11, 20, 21, 22, 23, 24])], ("A", [30, 20, 21]), 3, ()),
    ("tie-goes-to-the-current-sequence", True, [("A", [20, 21, 22])],
     ("A", [20, 21, 99, 20, 21]), 3, (99, 20, 21)),
    ("longer-group-match-wins", True, [("A", [7, 20, 21, 5])], ("A", [21, 8, 20, 21]), 1, (5,)),
    ("longer-current-match-wins", True, [("A", [21, 5])], ("A", [20, 21, 8, 20, 21]), 1, (8,)),
    ("first-sequence-first", True,
     [("A", [20, 21, 1]), ("A", [20, 21, 2]), ("B", [20, 21, 3])], ("A", [0, 20, 21]), 1, (1,)),
    ("later-sequence-when-it-matches-longer", True,
     [("A", [20, 21, 1]), ("A", [19, 20, 21, 2])], ("A", [19, 20, 21]), 1, (2,)),
    ("the-last-token-is-copied", True, [("A", [1, 2, 3])], ("A", [9, 1, 2]), 3, (3,)),
    # a sequence's last token has nothing after it: matches ending there do not count
    ("the-last-token-is-not-matched", True, [("A", [1, 2, 3])], ("A", [9, 2, 3]), 3, ()),
    ("matched-elsewhere-than-at-the-end", True, [("A", [2, 3]), ("A", [5, 2, 3, 4])],
     ("A", [9, 2, 3]), 3, (4,)),
    ("the-draft-stops-at-the-end-of-its-sequence", True, [("A", [5, 6, 7]), ("A", [8, 9])],
     ("A", [0, 5, 6]), 4, (7,)),
    # were [5, 8] and [7, 3, 6] joined, (8, 7) would be a 2-token group match beating the
    # current sequence's (7,)
    ("no-match-across-sequences", True, [("A", [5, 8]), ("A", [7, 3, 6])], ("A", [7, 4, 8, 7]), 1,
     (4,)),
]


@pytest.mark.parametrize("share_group, earlier, now, k, expected",
                         [c[1:] for c in SHARE_CASES], ids=[c[0] for c in SHARE_CASES])
def test_share_group(share_group, earlier, now, k, expected):
    drafter = SamDecoding(share_group=share_group)
    for group, tokens in earlier:
        finished(drafter, group, tokens)
    group, prompt = now
    assert propose(prompt, k=k, group=group, drafter=drafter) == Draft(expected)


def test_the_problem_memory_holds_the_finished_sequences():
    drafter = finished(SamDecoding(), "A", [1, 2, 3], [4, 5])
    assert drafter.memory.sequences("A") == ((1, 2, 3), (4, 5))
    # a sequence begun without end() is filed when the next one begins
    drafter.begin(DraftRequest((7, 8, 9), "A"))
    assert propose([0, 7, 8], k=1, group="A", drafter=drafter) == Draft((9,))
    assert drafter.memory.sequences("A")[-1] == (7, 8, 9)
    # without sharing nothing is kept
    alone = finished(SamDecoding(share_group=False), "A", [1, 2, 3])
    assert alone.memory.sequences("A") == ()


def test_min_match_applies_to_the_group_match():
    drafter = finished(SamDecoding(min_match=3), "A", [7, 20, 21, 5])
    assert propose([30, 20, 21], k=1, group="A", drafter=drafter) == Draft()
    drafter = finished(SamDecoding(min_match=3), "A", [7, 20, 21, 5])
    assert propose([7, 20, 21], k=1, group="A", drafter=drafter) == Draft((5,))


def test_a_second_sample_drafts_the_first_samples_answer():
    drafter = SamDecoding()
    drafter.begin(DraftRequest((1, 2, 3), "A"))
    drafter.accept((40, 41, 42))
    drafter.accept((43, 44))
    drafter.end()
    # same prompt: the whole prompt matches, and the earlier answer is the draft
    assert propose([1, 2, 3], k=4, group="A", drafter=drafter) == Draft((40, 41, 42, 43))
    # and the match follows the new sample as it repeats the earlier one
    assert drafter.propose((), 2) == Draft((40, 41))
    drafter.accept((40, 41))
    assert drafter.propose((), 5) == Draft((42, 43, 44))


def test_the_group_match_is_followed_through_accepts():
    drafter = finished(SamDecoding(), "A", [1, 2, 3, 4, 5, 6, 1, 2, 3, 9])
    drafter.begin(DraftRequest((0, 1, 2), "A"))
    assert drafter.propose((), 2) == Draft((3, 4))
    drafter.accept((3, 9))  # off the first occurrence, onto the second
    assert drafter.propose((), 2) == Draft()  # (1 2 3 9) ends that sequence
    drafter.accept((7, 5))  # no match for 7; then 5 matches again
    assert drafter.propose((), 2) == Draft((6, 1))


# --- the automatons against brute force ---------------------------------------------------

def first_end(text: Sequence[int], pattern: Sequence[int], before: int) -> int | None:
    """End position of the first occurrence of `pattern` in `text` that ends before `before`."""
    n = len(pattern)
    return next((e for e in range(n - 1, before) if list(text[e - n + 1:e + 1]) == list(pattern)),
                None)


def substrings(text: Sequence[int]) -> set[tuple[int, ...]]:
    return {tuple(text[i:j]) for i in range(len(text)) for j in range(i + 1, len(text) + 1)}


def random_text(rng: random.Random, longest: int) -> list[int]:
    alphabet = rng.randint(1, 4)
    return [rng.randrange(alphabet) for _ in range(rng.randint(0, longest))]


def test_the_automaton_recognises_exactly_the_substrings_with_their_first_end():
    rng = random.Random(0)
    for _ in range(200):
        text = random_text(rng, 24)
        automaton = SuffixAutomaton(text)
        present = substrings(text)
        for pattern in present:
            state = 0
            for token in pattern:
                state = automaton.transitions[state][token]
            assert automaton.first_end[state] == first_end(text, pattern, len(text))
            assert automaton.length[automaton.link[state]] < len(pattern) <= automaton.length[state]
        # one token more than any substring, or a token never seen: no path
        for pattern in [(*p, t) for p in present for t in range(4)] + [(9,)]:
            if pattern not in present:
                state = 0
                for token in pattern[:-1]:
                    state = automaton.transitions[state][token]
                assert pattern[-1] not in automaton.transitions[state]
        # the classic size bounds (Blumer et al.): for n >= 3 tokens, at most 2n - 1
        # states and 3n - 4 transitions
        if len(text) >= 3:
            assert len(automaton.length) <= 2 * len(text) - 1
            assert sum(map(len, automaton.transitions)) <= 3 * len(text) - 4


def test_extending_incrementally_equals_building_at_once():
    rng = random.Random(1)
    for _ in range(100):
        text = random_text(rng, 40)
        at_once, pieces = SuffixAutomaton(text), SuffixAutomaton()
        start = 0
        while start < len(text):
            stop = start + rng.randint(1, 5)
            pieces.extend(text[start:stop])
            start = stop
        for field in ("transitions", "link", "length", "first_end", "last", "size"):
            assert getattr(pieces, field) == getattr(at_once, field)


def reference_draft(earlier: list[list[int]], text: list[int], k: int, min_match: int) -> tuple:
    """The drafter's rule, by brute force: the longest suffix of `text` that occurs
    earlier in it, and the longest that occurs in an earlier sequence followed by a
    token of that sequence; the longer wins (ties: the text), and the draft copies what
    followed its first occurrence."""
    current = next(((n, e) for n in range(len(text) - 1, 0, -1)
                    if (e := first_end(text, text[-n:], len(text) - 1)) is not None), (0, None))
    group = (0, None, None)
    for n in range(len(text), 0, -1):
        found = next(((seq, e) for seq in earlier
                      if (e := first_end(seq, text[-n:], len(seq) - 1)) is not None), None)
        if found:
            group = (n, *found)
            break
    if max(current[0], group[0]) < min_match or k < 1:
        return ()
    if group[0] > current[0]:
        _, seq, e = group
        return tuple(seq[e + 1:e + 1 + k])
    return tuple(text[current[1] + 1:current[1] + 1 + k])


def test_drafts_match_brute_force_longest_suffix_matching():
    rng = random.Random(2)
    for case in range(300):
        min_match, share_group = rng.randint(1, 3), rng.random() < 0.8
        drafter = SamDecoding(min_match=min_match, share_group=share_group)
        earlier: list[list[int]] = []
        for _ in range(rng.randint(0, 3)):
            group = rng.choice("AB")
            tokens = random_text(rng, 12) or [0]
            finished(drafter, group, tokens)
            if group == "A" and share_group:
                earlier.append(tokens)
        text = random_text(rng, 8) or [1]
        drafter.begin(DraftRequest(tuple(text), "A"))
        for _ in range(6):
            k = rng.randint(1, 5)
            expected = reference_draft(earlier, text, k, min_match)
            assert drafter.propose(tuple(text), k) == Draft(expected), (case, earlier, text, k)
            accepted = random_text(rng, 3) or [2]
            drafter.accept(accepted)
            text = text + accepted


def test_group_automaton_separates_sequences():
    group = GroupAutomaton()
    group.add([4, 5, 6])
    group.add([7])
    group.add([])
    assert group.tokens == [4, 5, 6, 7]
    assert group.ends == [3, 4]
    # the automaton sees each sequence without its last token
    assert group.automaton.size == 4
    assert SEPARATOR in group.automaton.transitions[0]
    assert 6 not in group.automaton.transitions[0] and 7 not in group.automaton.transitions[0]
    state = group.automaton.transitions[0][5]
    assert group.continuation(state, 5) == (6,)


# --- work per step ------------------------------------------------------------------------

def llm_like_text(rng: random.Random, n: int, vocab: int = 2000) -> list[int]:
    """Fresh tokens mixed with copies of earlier spans, as generated text repeats itself."""
    text = [rng.randrange(vocab) for _ in range(20)]
    while len(text) < n:
        if rng.random() < 0.5:
            start = rng.randrange(len(text))
            text.extend(text[start:start + rng.randint(2, 40)])
        else:
            text.extend(rng.randrange(vocab) for _ in range(rng.randint(1, 8)))
    return text[:n]


def test_work_per_step_does_not_grow_with_the_context():
    """Automaton states visited (construction walks, matching walks, transitions copied)
    per propose + accept, counted in windows along a 30k-token sequence that follows a
    20k-token earlier sample of the same problem: bounded, and no larger late than early."""
    rng = random.Random(3)
    drafter = finished(SamDecoding(), "A", llm_like_text(rng, 20_000))
    text = llm_like_text(rng, 30_000)
    drafter.begin(DraftRequest(tuple(text[:10]), "A"))
    current, group = drafter._current, drafter._earlier.automaton

    def visits() -> int:
        return current.visits + group.visits

    window, per_window, position, counted = 3_000, [], 10, visits()
    while position < len(text):
        drafter.propose((), 5)
        step = rng.randint(1, 4)
        drafter.accept(text[position:position + step])
        position += step
        if position // window != (position - step) // window:
            per_window.append((visits() - counted) / window)
            counted = visits()
    assert len(per_window) == 10
    assert max(per_window) <= 6  # amortised O(1): a few states per token
    assert per_window[-1] <= 1.5 * per_window[0]


# --- losslessness through the engine ------------------------------------------------------

PROMPT = (1, 17, 42, 99, 250, 3, 77)


@pytest.fixture(scope="module")
def llama():
    return wrap_model(tiny_model("llama"), name="tiny-llama")


@pytest.mark.parametrize("temperature", [0.0, 0.6])
def test_sam_is_lossless_across_the_samples_of_a_problem(llama, temperature):
    # sample 1 reuses sample 0's seed, so it repeats it at any temperature (coupled
    # sampling): the group automaton then drafts it; sample 2 goes its own way
    drafter = SamDecoding()
    for sample, seed in enumerate([100, 100, 101]):
        request = GenerationRequest(PROMPT, 24, Sampler(temperature, seed), group="p",
                                    sample=sample)
        baseline = generate(llama, request)
        sam = generate(llama, request, drafter, k=4, drafter_name="sam")
        assert sam.tokens == baseline.tokens
        assert sam.stop == baseline.stop
        assert sam.stats.new_tokens == len(baseline.tokens) == 24
        if sample == 1:
            # the whole of sample 0 is drafted and accepted, k tokens a step; without
            # the group, the same sample takes more steps
            assert sam.stats.accepted >= 18
            assert sam.stats.steps <= 6
            alone = generate(llama, request, SamDecoding(share_group=False), k=4)
            assert alone.tokens == baseline.tokens
            assert alone.stats.steps > 6
