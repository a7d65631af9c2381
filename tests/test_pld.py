"""Prompt lookup decoding: exact drafts for hand-made token lists, the n-gram index,
sharing across the sequences of a problem, and losslessness through the engine."""

from __future__ import annotations

import random
from typing import Sequence

import pytest

from conftest import tiny_model
from pytest_specdec.drafters.pld import NgramIndex, PromptLookup
from pytest_specdec.engine import GenerationRequest, generate
from pytest_specdec.engine.target import wrap_model
from pytest_specdec.protocol.drafter import Draft, DraftRequest
from pytest_specdec.protocol.sampling import Sampler


def propose(prompt: Sequence[int], accepted: Sequence[int] = (), k: int = 4,
            group: str = "g", drafter: PromptLookup | None = None, **options) -> Draft:
    """Begin a sequence with `prompt`, accept `accepted`, then propose up to k tokens."""
    drafter = drafter if drafter is not None else PromptLookup(**options)
    drafter.begin(DraftRequest(tuple(prompt), group))
    if accepted:
        drafter.accept(tuple(accepted))
    return drafter.propose(tuple(prompt) + tuple(accepted), k)


# --- single sequence: exact drafts, the reference's rule --------------------------------
# Worked by hand from Spec-Bench's find_candidate_pred_tokens: for n = max_ngram..1, the
# first window equal to the suffix n-gram whose k following tokens all exist
# (start + k <= len) and start before the suffix n-gram (start < len - n).

PLD_CASES = [
    # id, prompt, accepted, k, options, expected draft
    ("longest-ngram-wins",
     [1, 2, 3, 9, 4, 3, 8, 1, 2, 3], [], 2, {}, (9, 4)),
    ("bigram-beats-a-unigram",
     [5, 6, 7, 1, 6, 8, 5, 6], [], 2, {}, (7, 1)),
    ("first-occurrence-not-the-most-recent",
     [4, 5, 1, 4, 5, 2, 4, 5], [], 1, {}, (1,)),
    ("trigram-with-a-full-continuation",
     [4, 5, 1, 7, 4, 5, 2, 7, 4, 5], [], 3, {}, (2, 7, 4)),
    # (1, 2, 3) occurs once before, 3 tokens from the end: short of k=4, so the bigram
    # (2, 3), first seen at the start, drafts
    ("short-continuation-falls-back-to-a-shorter-ngram",
     [5, 2, 3, 4, 4, 4, 1, 2, 3, 1, 2, 3], [], 4, {}, (4, 4, 4, 1)),
    ("no-full-continuation-at-any-n", [1, 2, 3, 1, 2], [], 4, {}, ()),
    # a period-2 loop: the first (4, 3, 4) leaves the whole loop to copy
    ("period-two-loop-drafts-k", [3, 4] * 6, [], 5, {}, (3, 4, 3, 4, 3)),
    ("period-two-loop-at-the-reference-length", [3, 4] * 8, [], 10, {}, (3, 4) * 5),
    ("period-two-loop-too-short-for-k", [3, 4, 3, 4, 3], [], 5, {}, ()),
    ("k-caps-the-draft", [7, 8, 9, 10, 11, 7], [], 2, {}, (8, 9)),
    ("continuation-exactly-k", [7, 8, 9, 10, 11, 7], [], 5, {}, (8, 9, 10, 11, 7)),
    ("continuation-one-short-of-k", [7, 8, 9, 10, 11, 7], [], 6, {}, ()),
    # the suffix's own overlapping occurrences: (1, 1) at 0 would continue at 2, which is
    # not before the suffix bigram (start < len - n fails); the unigram at 0 drafts
    ("overlaps-the-suffix", [1, 1, 1], [], 2, {}, (1, 1)),
    ("overlaps-the-suffix-k-too-long", [1, 1, 1], [], 3, {}, ()),
    ("no-match", [1, 2, 3, 4], [], 4, {}, ()),
    ("single-token-context", [7], [], 4, {}, ()),
    ("k-zero", [1, 2, 1, 2], [], 0, {}, ()),
    ("min-ngram-2-skips-unigrams", [5, 6, 1, 2, 6], [], 3, {"min_ngram": 2}, ()),
    ("min-ngram-1-takes-the-unigram", [5, 6, 1, 2, 6], [], 3, {}, (1, 2, 6)),
    ("min-ngram-2-bigram", [5, 6, 1, 2, 5, 6], [], 3, {"min_ngram": 2}, (1, 2, 5)),
    ("max-ngram-4", [1, 2, 3, 4, 0, 9, 2, 3, 4, 8, 1, 2, 3, 4], [], 2, {"max_ngram": 4}, (0, 9)),
    # the trigram (2, 3, 4) first occurs at 1: the same continuation as the 4-gram
    ("max-ngram-3-first-trigram",
     [1, 2, 3, 4, 0, 9, 2, 3, 4, 8, 1, 2, 3, 4], [], 2, {"max_ngram": 3}, (0, 9)),
    ("max-ngram-1-first-unigram",
     [1, 2, 3, 9, 4, 3, 8, 1, 2, 3], [], 2, {"max_ngram": 1}, (9, 4)),
    ("accepted-tokens-are-indexed", [1, 2, 3], [4, 1, 2], 3, {}, (3, 4, 1)),
    ("ngram-only-in-generated-text", [9], [5, 6, 7, 5], 3, {}, (6, 7, 5)),
    ("prompt-occurrence-comes-first", [5, 1], [5, 2, 5], 2, {}, (1, 5)),
]

# the same lists under match="most_recent": copy after the latest occurrence, however
# few tokens follow it
MOST_RECENT_CASES = [
    ("longest-ngram-wins",
     [1, 2, 3, 9, 4, 3, 8, 1, 2, 3], [], 2, {}, (9, 4)),
    ("bigram-beats-recent-unigram",
     [5, 6, 7, 1, 6, 8, 5, 6], [], 2, {}, (7, 1)),
    ("max-ngram-1-takes-recent-unigram",
     [1, 2, 3, 9, 4, 3, 8, 1, 2, 3], [], 2, {"max_ngram": 1}, (8, 1)),
    ("max-ngram-2",
     [1, 2, 3, 9, 4, 2, 3, 8, 1, 2, 3], [], 2, {"max_ngram": 2}, (8, 1)),
    ("most-recent-occurrence",
     [4, 5, 1, 4, 5, 2, 4, 5], [], 1, {}, (2,)),
    ("most-recent-occurrence-long",
     [4, 5, 1, 7, 4, 5, 2, 7, 4, 5], [], 3, {}, (2, 7, 4)),
    ("short-continuation-is-taken",
     [5, 2, 3, 4, 4, 4, 1, 2, 3, 1, 2, 3], [], 4, {}, (1, 2, 3)),
    ("no-match", [1, 2, 3, 4], [], 4, {}, ()),
    ("single-token-context", [7], [], 4, {}, ()),
    ("k-caps-the-draft", [7, 8, 9, 10, 11, 7], [], 2, {}, (8, 9)),
    ("runs-to-the-end-of-text", [7, 8, 9, 10, 11, 7], [], 10, {}, (8, 9, 10, 11, 7)),
    ("overlaps-the-suffix", [1, 1, 1], [], 3, {}, (1,)),
    ("period-two", [3, 4, 3, 4, 3], [], 5, {}, (4, 3)),
    # the loop's last period is all that follows the latest (4, 3, 4)
    ("period-two-loop-drafts-two", [3, 4] * 6, [], 5, {}, (3, 4)),
    ("min-ngram-2-skips-unigrams", [5, 6, 1, 2, 6], [], 3, {"min_ngram": 2}, ()),
    ("min-ngram-1-takes-the-unigram", [5, 6, 1, 2, 6], [], 3, {}, (1, 2, 6)),
    ("min-ngram-2-bigram", [5, 6, 1, 2, 5, 6], [], 3, {"min_ngram": 2}, (1, 2, 5)),
    ("max-ngram-4", [1, 2, 3, 4, 0, 9, 2, 3, 4, 8, 1, 2, 3, 4], [], 2, {"max_ngram": 4}, (0, 9)),
    ("max-ngram-3-misses-the-4gram",
     [1, 2, 3, 4, 0, 9, 2, 3, 4, 8, 1, 2, 3, 4], [], 2, {"max_ngram": 3}, (8, 1)),
    ("accepted-tokens-are-indexed", [1, 2, 3], [4, 1, 2], 3, {}, (3, 4, 1)),
    ("ngram-only-in-generated-text", [9], [5, 6, 7, 5], 3, {}, (6, 7, 5)),
    ("generated-occurrence-is-more-recent", [5, 1], [5, 2, 5], 2, {}, (2, 5)),
]


@pytest.mark.parametrize("prompt, accepted, k, options, expected",
                         [c[1:] for c in PLD_CASES], ids=[c[0] for c in PLD_CASES])
def test_prompt_lookup_drafts(prompt, accepted, k, options, expected):
    draft = propose(prompt, accepted, k, **options)
    assert isinstance(draft, Draft)
    assert draft == Draft(expected)
    assert draft.is_chain and len(draft) <= k


@pytest.mark.parametrize("prompt, accepted, k, options, expected",
                         [c[1:] for c in MOST_RECENT_CASES],
                         ids=[c[0] for c in MOST_RECENT_CASES])
def test_most_recent_drafts(prompt, accepted, k, options, expected):
    draft = propose(prompt, accepted, k, match="most_recent", **options)
    assert draft == Draft(expected)


def reference_pld(tokens: Sequence[int], max_ngram: int, k: int) -> tuple[int, ...]:
    """Spec-Bench's scan, written out plainly: every window from the start, each step."""
    size = len(tokens)
    for n in range(min(max_ngram, size), 0, -1):
        suffix = list(tokens[-n:])
        for i in range(size - n + 1):
            start = i + n
            if list(tokens[i:i + n]) == suffix and start + k <= size and start < size - n:
                return tuple(tokens[start:start + k])
    return ()


@pytest.mark.parametrize("seed", range(3))
def test_first_full_equals_the_rescanning_reference_step_by_step(seed):
    # small vocabularies give many repeats, loops and short continuations
    rng = random.Random(seed)
    for _ in range(20):
        vocab, k, max_ngram = rng.randint(2, 5), rng.randint(1, 10), rng.randint(1, 4)
        text = [rng.randrange(vocab) for _ in range(rng.randint(1, 60))]
        drafter = PromptLookup(max_ngram=max_ngram)
        drafter.begin(DraftRequest(tuple(text[:3]), "g"))
        for end in range(3, len(text) + 1):
            context = text[:end]
            assert drafter.propose(context, k) == Draft(reference_pld(context, max_ngram, k)), \
                (context, k, max_ngram)
            if end < len(text):
                drafter.accept((text[end],))


def test_accepting_in_pieces_equals_accepting_at_once():
    pieces = PromptLookup()
    pieces.begin(DraftRequest((1, 2, 3), "g"))
    for chunk in [(4,), (1, 2), (3, 5, 1), (2,)]:
        pieces.accept(chunk)
    context = (1, 2, 3, 4, 1, 2, 3, 5, 1, 2)
    assert pieces.propose(context, 3) == propose((1, 2, 3), context[3:], 3) == Draft((3, 4, 1))


def test_begin_resets_the_current_sequence():
    drafter = PromptLookup()
    assert propose([1, 2, 9, 1, 2], k=1, drafter=drafter) == Draft((9,))
    drafter.end()
    # a new sequence of another problem does not see the old text
    assert propose([3, 1, 2], k=1, group="other", drafter=drafter) == Draft()


@pytest.mark.parametrize("options, message", [
    ({"min_ngram": 0}, "min_ngram=0, max_ngram=3"),
    ({"min_ngram": -1, "max_ngram": 2}, "min_ngram=-1, max_ngram=2"),
    ({"min_ngram": 2, "max_ngram": 1}, "min_ngram=2, max_ngram=1"),
    ({"max_ngram": 0}, "min_ngram=1, max_ngram=0"),
])
def test_invalid_parameters_raise_naming_the_values(options, message):
    with pytest.raises(ValueError, match="1 <= min_ngram <= max_ngram") as info:
        PromptLookup(**options)
    assert message in str(info.value)


@pytest.mark.parametrize("match", ["first", "latest", "", None])
def test_an_unknown_match_rule_names_the_value_and_the_choices(match):
    with pytest.raises(ValueError) as info:
        PromptLookup(match=match)
    assert str(info.value) == f"match must be one of first_full, most_recent, got {match!r}"


def test_defaults_are_the_references():
    drafter = PromptLookup()
    assert (drafter.max_ngram, drafter.min_ngram, drafter.match, drafter.share_group) == \
        (3, 1, "first_full", False)
    assert PromptLookup.max_depth == 10


# --- sharing across the sequences of one problem -------------------------------------------

def finished(drafter: PromptLookup, group: str, *sequences: Sequence[int]) -> PromptLookup:
    """Run whole sequences through the drafter (prompt only, then end)."""
    for tokens in sequences:
        drafter.begin(DraftRequest(tuple(tokens), group))
        drafter.end()
    return drafter


SHARE_CASES = [
    # id, share_group, earlier (group, tokens) in order, now (group, prompt), k, expected
    ("same-group", True, [("A", [10, 11, 20, 21, 22, 23, 24])], ("A", [30, 20, 21]), 3, (22, 23, 24)),
    ("other-group", True, [("A", [10, 11, 20, 21, 22, 23, 24])], ("B", [30, 20, 21]), 3, ()),
    ("sharing-off", False, [("A", [10, 11, 20, 21, 22, 23, 24])], ("A", [30, 20, 21]), 3, ()),
    ("current-first", True, [("A", [20, 21, 22])], ("A", [20, 21, 99, 20, 21]), 3, (99, 20, 21)),
    ("most-recent-sequence-first", True, [("A", [20, 21, 1]), ("A", [20, 21, 2]), ("B", [20, 21, 3])],
     ("A", [0, 20, 21]), 1, (2,)),
    ("longer-ngram-in-earlier-beats-shorter-in-current", True, [("A", [7, 20, 21, 5])],
     ("A", [21, 8, 20, 21]), 1, (5,)),
    ("falls-back-to-shorter-ngram-in-earlier", True, [("A", [7, 21, 5])],
     ("A", [30, 20, 21]), 1, (5,)),
    # one token follows 21 in the earlier sequence: not a full continuation for k=2
    ("earlier-short-continuation-is-not-full", True, [("A", [7, 21, 5])],
     ("A", [30, 20, 21]), 2, ()),
    ("earlier-first-occurrence", True, [("A", [20, 21, 1, 2, 20, 21, 3])],
     ("A", [0, 20, 21]), 2, (1, 2)),
]


@pytest.mark.parametrize("share_group, earlier, now, k, expected",
                         [c[1:] for c in SHARE_CASES], ids=[c[0] for c in SHARE_CASES])
def test_share_group(share_group, earlier, now, k, expected):
    drafter = PromptLookup(share_group=share_group)
    for group, tokens in earlier:
        finished(drafter, group, tokens)
    group, prompt = now
    assert propose(prompt, k=k, group=group, drafter=drafter) == Draft(expected)


MOST_RECENT_SHARE_CASES = [
    ("short-continuation-is-taken", [("A", [7, 21, 5])], ("A", [30, 20, 21]), 2, (5,)),
    ("earlier-most-recent-occurrence", [("A", [20, 21, 1, 2, 20, 21, 3])],
     ("A", [0, 20, 21]), 2, (3,)),
]


@pytest.mark.parametrize("earlier, now, k, expected", [c[1:] for c in MOST_RECENT_SHARE_CASES],
                         ids=[c[0] for c in MOST_RECENT_SHARE_CASES])
def test_share_group_most_recent(earlier, now, k, expected):
    drafter = PromptLookup(share_group=True, match="most_recent")
    for group, tokens in earlier:
        finished(drafter, group, tokens)
    group, prompt = now
    assert propose(prompt, k=k, group=group, drafter=drafter) == Draft(expected)


def test_share_group_sees_generated_tokens_of_earlier_sequences():
    drafter = PromptLookup(share_group=True)
    drafter.begin(DraftRequest((1, 2), "A"))
    drafter.accept((40, 41, 42))
    drafter.accept((43, 44))
    drafter.end()
    assert propose([9, 41, 42], k=2, group="A", drafter=drafter) == Draft((43, 44))


def test_share_group_uses_an_ngram_that_also_ends_the_earlier_sequence():
    # in one sequence, (5, 6) -> (7, 8, 5, 6): its last occurrence has no continuation yet
    assert propose([10, 11, 5, 6, 7, 8, 5, 6], k=4) == Draft((7, 8, 5, 6))
    # the same text as an earlier sequence of the problem should give the same draft
    drafter = finished(PromptLookup(share_group=True), "A", [10, 11, 5, 6, 7, 8, 5, 6])
    assert propose([40, 5, 6], k=4, group="A", drafter=drafter) == Draft((7, 8, 5, 6))


# --- the n-gram index ---------------------------------------------------------------------

INDEX_CASES = [
    # id, lo, hi, tokens, ngram, k, expected continuation
    ("bigram", 1, 2, [1, 2, 3, 1, 2], (1, 2), 5, (3, 1, 2)),
    ("unigram-most-recent", 1, 2, [1, 2, 3, 1, 2], (1,), 5, (2,)),
    ("k-caps", 1, 2, [1, 2, 3, 1, 2], (1, 2), 1, (3,)),
    ("suffix-not-indexed", 1, 2, [1, 2, 3, 1, 2], (2,), 5, (3, 1, 2)),
    ("final-token-unseen", 1, 2, [1, 2, 3, 4], (4,), 5, ()),
    ("absent", 1, 2, [1, 2, 3, 1, 2], (9,), 5, ()),
    ("too-long-for-hi", 1, 2, [1, 2, 3, 1, 2], (1, 2, 3), 5, ()),
    ("too-short-for-lo", 2, 3, [1, 2, 3, 1, 2], (1,), 5, ()),
    ("trigram", 2, 3, [1, 2, 3, 4, 2, 3, 5, 1, 2, 3], (1, 2, 3), 2, (4, 2)),
    ("bigram-most-recent", 2, 3, [1, 2, 3, 4, 2, 3, 5, 1, 2, 3], (2, 3), 2, (5, 1)),
    ("empty", 1, 3, [], (1,), 3, ()),
]


@pytest.mark.parametrize("lo, hi, tokens, ngram, k, expected",
                         [c[1:] for c in INDEX_CASES], ids=[c[0] for c in INDEX_CASES])
def test_ngram_index(lo, hi, tokens, ngram, k, expected):
    index = NgramIndex(lo, hi)
    index.extend(tokens)
    assert index.tokens == tokens
    assert index.continuation(ngram, k) == expected


def test_ngram_index_latest_positions():
    index = NgramIndex(1, 2)
    index.extend([1, 2, 3, 1, 2])
    assert index.ends == {(1,): 4, (2,): 2, (3,): 3, (1, 2): 2, (2, 3): 3, (3, 1): 4}


def test_ngram_index_first_positions():
    index = NgramIndex(1, 2, keep="first")
    index.extend([1, 2, 3, 1, 2, 3])
    assert index.ends == {(1,): 1, (2,): 2, (3,): 3, (1, 2): 2, (2, 3): 3, (3, 1): 4}


FULL_CASES = [
    # id, tokens, ngram, k, expected: k tokens after the first occurrence, starting
    # before the text's last len(ngram) tokens
    ("full", [1, 2, 3, 4, 1, 2], (1, 2), 3, (3, 4, 1)),
    ("one-short", [1, 2, 3, 4, 1, 2], (1, 2), 5, ()),
    ("exactly-to-the-end", [1, 2, 3, 4, 1, 2], (1, 2), 4, (3, 4, 1, 2)),
    ("first-not-latest", [1, 5, 1, 6, 1], (1,), 1, (5,)),
    ("starts-inside-the-suffix", [1, 1, 1], (1, 1), 1, ()),
    ("absent", [1, 2, 3], (4,), 1, ()),
]


@pytest.mark.parametrize("tokens, ngram, k, expected", [c[1:] for c in FULL_CASES],
                         ids=[c[0] for c in FULL_CASES])
def test_ngram_index_full_continuation(tokens, ngram, k, expected):
    index = NgramIndex(1, 3, keep="first")
    index.extend(tokens)
    assert index.full_continuation(ngram, k) == expected


def test_ngram_index_rejects_an_unknown_keep():
    with pytest.raises(ValueError, match="keep must be 'first' or 'latest', got 'oldest'"):
        NgramIndex(1, 2, keep="oldest")


@pytest.mark.parametrize("keep", ["first", "latest"])
def test_ngram_index_extends_incrementally(keep):
    at_once, pieces = NgramIndex(1, 3, keep), NgramIndex(1, 3, keep)
    tokens = [5, 1, 5, 1, 2, 5, 1, 3, 3, 3]
    at_once.extend(tokens)
    for i in range(0, len(tokens), 3):
        pieces.extend(tokens[i:i + 3])
    assert pieces.tokens == at_once.tokens == tokens
    assert pieces.ends == at_once.ends


# --- losslessness through the engine ------------------------------------------------------

QUESTION = "Tom has 12 apples and buys 35 more apples. How many apples does Tom have now?"


@pytest.fixture(scope="module")
def question_ids(default_target) -> tuple[int, ...]:
    return tuple(default_target.encode_prompt(QUESTION))


@pytest.mark.parametrize("temperature, seed", [(0.0, 0), (0.6, 1)])
def test_pld_is_lossless_on_the_default_model(default_target, question_ids, temperature, seed):
    def request() -> GenerationRequest:
        return GenerationRequest(question_ids, 32, Sampler(temperature, seed), group="apples")

    baseline = generate(default_target, request())
    pld = generate(default_target, request(), PromptLookup(), k=5, drafter_name="pld")
    assert len(baseline.tokens) == len(pld.tokens) > 0
    assert pld.tokens == baseline.tokens
    assert pld.stop == baseline.stop
    assert pld.stats.new_tokens == len(pld.tokens)
    # the answer restates the question: drafts are made and, at both temperatures,
    # some are accepted, so verification really took the multi-token path
    assert pld.stats.drafted > 0
    assert pld.stats.accepted > 0
    assert pld.stats.steps < baseline.stats.steps == 32
    assert pld.stats.mat > 1.0


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_shared_pld_is_lossless_across_samples(temperature):
    target = wrap_model(tiny_model("qwen2"), name="tiny-qwen2")
    drafter = PromptLookup(max_ngram=2, share_group=True)
    prompt = (1, 17, 42, 99, 250, 3, 77)
    for sample in range(3):
        request = GenerationRequest(prompt, 30, Sampler(temperature, 100 + sample),
                                    group="p", sample=sample)
        baseline = generate(target, request)
        assert generate(target, request, drafter, k=4).tokens == baseline.tokens
