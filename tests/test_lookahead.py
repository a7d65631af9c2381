"""Lookahead decoding: the probe tree, the pool, prefix merging, exact drafts and probes
for scripted Jacobi steps (synthetic probe choices), and losslessness through the
engine on a tiny Llama."""

from __future__ import annotations

from typing import Sequence

import pytest

from conftest import tiny_model
from pytest_specdec.drafters.lookahead import (LookaheadDecoding, NgramPool, merge_prefixes,
                                               window_parents)
from pytest_specdec.engine import GenerationRequest, generate
from pytest_specdec.engine.target import wrap_model
from pytest_specdec.protocol.drafter import (MAX_DRAFT_NODES, MAX_PROBES, Draft, DraftRequest,
                                             TargetSignals, validate_draft)
from pytest_specdec.protocol.registry import RegisteredDrafter
from pytest_specdec.protocol.sampling import Sampler

# --- the window's probe tree ----------------------------------------------------------------

WINDOW_CASES = [
    # id, width, levels, expected parents (level by level: (l, w) is probe l*width + w)
    ("no-levels", 3, 0, ()),
    ("one-column-one-level", 1, 1, (-1,)),
    ("one-column-is-a-chain", 1, 4, (-1, 0, 1, 2)),
    ("one-level-is-a-chain", 4, 1, (-1, 0, 1, 2)),
    ("two-levels", 3, 2, (-1, 0, 1, 0, 1, 2)),
    ("paper-figure-W5-N4", 5, 3, (-1, 0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9)),
    ("two-columns-four-levels", 2, 4, (-1, 0, 0, 1, 2, 3, 4, 5)),
]


@pytest.mark.parametrize("width, levels, expected", [c[1:] for c in WINDOW_CASES],
                         ids=[c[0] for c in WINDOW_CASES])
def test_window_parents(width, levels, expected):
    parents = window_parents(width, levels)
    assert parents == expected
    # depth of (l, w) is 1 + w + l: LADE's position relative to the last accepted token
    depths: list[int] = []
    for p in parents:
        depths.append(1 + (depths[p] if p >= 0 else 0))
    assert depths == [1 + w + l for l in range(levels) for w in range(width)]


# --- the n-gram pool ------------------------------------------------------------------------

POOL_CASES = [
    # id, capacity, added (first, continuation) in order, first, expected candidates
    ("most-recent-first", 3, [(7, (1, 2)), (7, (3, 4))], 7, [(3, 4), (1, 2)]),
    ("keyed-by-first-token", 3, [(7, (1, 2)), (8, (3, 4))], 8, [(3, 4)]),
    ("unknown-key", 3, [(7, (1, 2))], 9, []),
    ("oldest-evicted", 2, [(7, (1, 2)), (7, (3, 4)), (7, (5, 6))], 7, [(5, 6), (3, 4)]),
    ("repeat-refreshes", 2, [(7, (1, 2)), (7, (3, 4)), (7, (1, 2)), (7, (5, 6))], 7,
     [(5, 6), (1, 2)]),
    ("repeat-is-stored-once", 3, [(7, (1, 2)), (7, (1, 2)), (7, (1, 2))], 7, [(1, 2)]),
    ("capacity-is-per-key", 1, [(7, (1, 2)), (8, (3, 4)), (7, (5, 6))], 8, [(3, 4)]),
    ("capacity-one-keeps-the-latest", 1, [(7, (1, 2)), (8, (3, 4)), (7, (5, 6))], 7, [(5, 6)]),
]


@pytest.mark.parametrize("capacity, added, first, expected", [c[1:] for c in POOL_CASES],
                         ids=[c[0] for c in POOL_CASES])
def test_ngram_pool(capacity, added, first, expected):
    pool = NgramPool(capacity)
    for key, continuation in added:
        pool.add(key, continuation)
    assert pool.candidates(first) == expected
    assert all(len(grams) <= capacity for grams in pool.grams.values())


# --- the verification tree ------------------------------------------------------------------

MERGE_CASES = [
    # id, grams (most recent first), depth, expected tokens, expected parents
    ("nothing", [], 4, (), None),
    ("one-gram-is-a-chain", [(1, 2, 3)], 4, (1, 2, 3), (-1, 0, 1)),
    ("depth-cuts", [(1, 2, 3)], 2, (1, 2), (-1, 0)),
    ("shared-prefix", [(1, 2, 3), (1, 2, 4)], 3, (1, 2, 3, 4), (-1, 0, 1, 1)),
    ("shared-first-token", [(1, 2, 3), (1, 5, 6)], 3, (1, 2, 3, 5, 6), (-1, 0, 1, 0, 3)),
    ("disjoint", [(1, 2), (3, 4)], 2, (1, 2, 3, 4), (-1, 0, -1, 2)),
    ("same-after-the-cut", [(1, 2, 3), (1, 2, 4)], 2, (1, 2), (-1, 0)),
    ("same-token-under-other-parents", [(1, 2, 2), (2, 2, 2)], 3, (1, 2, 2, 2, 2, 2),
     (-1, 0, 1, -1, 3, 4)),
    ("three-grams", [(8, 9, 1, 2), (1, 2, 5, 6), (1, 2, 3, 4)], 4,
     (8, 9, 1, 2, 1, 2, 5, 6, 3, 4), (-1, 0, 1, 2, -1, 4, 5, 6, 5, 8)),
]


@pytest.mark.parametrize("grams, depth, tokens, parents", [c[1:] for c in MERGE_CASES],
                         ids=[c[0] for c in MERGE_CASES])
def test_merge_prefixes(grams, depth, tokens, parents):
    draft = merge_prefixes(grams, depth)
    assert draft == Draft(tokens, parents)
    assert draft.depth <= depth


# --- scripted Jacobi steps: exact drafts and probes -----------------------------------------

def run_script(drafter: LookaheadDecoding, prompt: Sequence[int], script) -> list[int]:
    """Begin a sequence, then for each (k, expected draft, probe choices, accepted) step:
    propose, compare, observe the choices and accept. Returns the context."""
    context = list(prompt)
    drafter.begin(DraftRequest(tuple(prompt), "g"))
    for i, (k, expected, choices, accepted) in enumerate(script):
        draft = drafter.propose(tuple(context), k)
        assert draft == expected, f"step {i}"
        validate_draft(draft, drafter="lookahead", k=k, vocab_size=1000)
        drafter.observe(TargetSignals(probe_choices=tuple(choices)))
        drafter.accept(tuple(accepted))
        context.extend(accepted)
    return context


def step(tokens=(), parents=None, probes=(), probe_parents=()):
    return Draft(tuple(tokens), None if parents is None else tuple(parents), tuple(probes),
                 tuple(probe_parents))


PROMPT = (10, 11, 12, 13, 14, 15)  # W=3 seeds level 0 with prompt[0], [2], [4]

SCRIPTS = [
    ("W3-N3-fill-then-harvest", dict(window=3, ngram=3, guess_set=2), PROMPT, [
        # the window starts as one level seeded from the prompt; the pool is empty
        (4, step(probes=(10, 12, 14), probe_parents=(-1, 0, 1)), (20, 21, 22), (5,)),
        # the choices became level 1: the window is full (N-1 = 2 levels)
        (4, step(probes=(10, 12, 14, 20, 21, 22), probe_parents=(-1, 0, 1, 0, 1, 2)),
         (90, 91, 92, 30, 31, 32), (12,)),
        # columns (10,20,30) (12,21,31) (14,22,32) went into the pool; level 0 was dropped.
        # The last token is 12: its n-gram is verified, the window moved on
        (4, step((21, 31), (-1, 0), (20, 21, 22, 30, 31, 32), (-1, 0, 1, 0, 1, 2)),
         (0, 0, 0, 40, 41, 42), (21, 31, 9)),
        # a 3-token step moves the window one level only (ALWAYS_FWD_ONE)
        (4, step(probes=(30, 31, 32, 40, 41, 42), probe_parents=(-1, 0, 1, 0, 1, 2)),
         (0, 0, 0, 50, 51, 52), (22,)),
        # 22 was keyed with (32, 42) one step earlier
        (4, step((32, 42), (-1, 0), (40, 41, 42, 50, 51, 52), (-1, 0, 1, 0, 1, 2)),
         (0, 0, 0, 60, 61, 62), (7,)),
    ]),
    ("k-cuts-the-draft-not-the-probes", dict(window=3, ngram=3, guess_set=2), PROMPT, [
        (4, step(probes=(10, 12, 14), probe_parents=(-1, 0, 1)), (20, 21, 22), (5,)),
        (4, step(probes=(10, 12, 14, 20, 21, 22), probe_parents=(-1, 0, 1, 0, 1, 2)),
         (0, 0, 0, 30, 31, 32), (14,)),
        (1, step((22,), (-1,), (20, 21, 22, 30, 31, 32), (-1, 0, 1, 0, 1, 2)),
         (0, 0, 0, 40, 41, 42), (1,)),
    ]),
    ("N2-is-jacobi-decoding", dict(window=2, ngram=2, guess_set=3), (7, 8), [
        # one level: each step's choices replace it, and (token, choice) pairs are pooled
        (4, step(probes=(7, 8), probe_parents=(-1, 0)), (3, 4), (8,)),
        (4, step((4,), (-1,), (3, 4), (-1, 0)), (4, 5), (4, 5)),
        (4, step(probes=(4, 5), probe_parents=(-1, 0)), (6, 6), (4,)),
        # 4 was followed by 5 (earlier), then by 6 (latest): most recent first
        (4, step((6, 5), (-1, -1), (6, 6), (-1, 0)), (6, 6), (6,)),
        (4, step((6,), (-1,), (6, 6), (-1, 0)), (6, 6), (6,)),
    ]),
    ("guess-set-caps-the-key", dict(window=1, ngram=3, guess_set=2), (9,), [
        # one column: the n-gram of column 0 is keyed by its level-0 token
        (3, step(probes=(9,), probe_parents=(-1,)), (1,), (2,)),
        (3, step(probes=(9, 1), probe_parents=(-1, 0)), (0, 2), (3,)),  # pooled 9 -> (1, 2)
        (3, step(probes=(1, 2), probe_parents=(-1, 0)), (0, 9), (1,)),  # 1 -> (2, 9)
        (3, step((2, 9), (-1, 0), (2, 9), (-1, 0)), (0, 1), (8,)),      # 2 -> (9, 1)
        (3, step(probes=(9, 1), probe_parents=(-1, 0)), (0, 3), (9,)),  # 9 -> (1, 3)
        (3, step((1, 3, 2), (-1, 0, 0), (1, 3), (-1, 0)), (0, 9), (3,)),  # 1 -> (3, 9)
        (3, step(probes=(3, 9), probe_parents=(-1, 0)), (0, 4), (9,)),  # 3 -> (9, 4)
        # 9 -> (4, 5) is a third n-gram for 9: the least recently seen, (1, 2), goes
        (3, step((1, 3, 2), (-1, 0, 0), (9, 4), (-1, 0)), (0, 5), (9,)),
        (3, step((4, 5, 1, 3), (-1, 0, -1, 2), (4, 5), (-1, 0)), (0, 0), (1,)),
    ]),
]


@pytest.mark.parametrize("options, prompt, script", [c[1:] for c in SCRIPTS],
                         ids=[c[0] for c in SCRIPTS])
def test_scripted_steps(options, prompt, script):
    run_script(LookaheadDecoding(**options), prompt, script)


def test_pool_after_a_script():
    drafter = LookaheadDecoding(window=3, ngram=3, guess_set=2)
    run_script(drafter, PROMPT, SCRIPTS[0][3])
    assert drafter.pool.candidates(10) == [(20, 30)]
    assert drafter.pool.candidates(12) == [(21, 31)]
    assert drafter.pool.candidates(22) == [(32, 42)]
    assert drafter.pool.candidates(40) == [(50, 60)]
    assert len(drafter.pool) == 12  # 4 harvests of 3 columns, all distinct
    assert drafter.levels == [(50, 51, 52), (60, 61, 62)]


@pytest.mark.parametrize("prompt, window, expected", [
    ((10, 11, 12, 13, 14, 15), 3, (10, 12, 14)),
    ((10, 11, 12, 13, 14, 15), 6, (10, 11, 12, 13, 14, 15)),
    ((10, 11, 12, 13, 14, 15), 4, (10, 11, 13, 14)),
    ((10, 11), 5, (10, 10, 10, 11, 11)),
    ((7,), 3, (7, 7, 7)),
])
def test_window_is_seeded_evenly_from_the_prompt(prompt, window, expected):
    drafter = LookaheadDecoding(window=window, ngram=3)
    drafter.begin(DraftRequest(prompt, "g"))
    assert drafter.propose(prompt, 4).probe_tokens == expected


def test_an_empty_prompt_gives_no_window():
    drafter = LookaheadDecoding(window=3, ngram=3)
    drafter.begin(DraftRequest((), "g"))
    assert drafter.propose((4,), 2) == Draft()


def test_choices_not_for_this_window_are_ignored():
    drafter = LookaheadDecoding(window=2, ngram=3)
    drafter.begin(DraftRequest((5, 6), "g"))
    before = list(drafter.levels)
    drafter.observe(TargetSignals(probe_choices=(1, 2)))  # no propose yet
    drafter.propose((5, 6), 4)
    drafter.observe(TargetSignals(probe_choices=None))    # the engine scored no probes
    drafter.propose((5, 6), 4)
    drafter.observe(TargetSignals(probe_choices=(1, 2, 3)))  # wrong count
    assert drafter.levels == before and len(drafter.pool) == 0
    drafter.propose((5, 6), 4)
    drafter.observe(TargetSignals(probe_choices=(1, 2)))
    drafter.observe(TargetSignals(probe_choices=(3, 4)))   # once per propose only
    assert drafter.levels == [(5, 6), (1, 2)]


@pytest.mark.parametrize("share_pool, expected",
                         [(True, Draft((21, 31), (-1, 0))), (False, Draft()), (None, Draft())],
                         ids=["shared", "per-generation", "default-per-generation"])
def test_share_pool_keeps_ngrams_across_sequences(share_pool, expected):
    options = {} if share_pool is None else {"share_pool": share_pool}
    drafter = LookaheadDecoding(window=3, ngram=3, guess_set=2, **options)
    run_script(drafter, PROMPT, SCRIPTS[0][3][:3])
    drafter.end()
    drafter.begin(DraftRequest((40, 41, 12), "other", sample=1))
    draft = drafter.propose((40, 41, 12), 4)
    assert draft.tokens == expected.tokens and draft.parents == expected.parents
    # the window always restarts from the new prompt
    assert (draft.probe_tokens, draft.probe_parents) == ((40, 41, 12), (-1, 0, 1))


class LastTokenOnly(Sequence[int]):
    """A context that allows reading its last token only: proposing must not scan it."""

    def __init__(self, last: int):
        self.last = last

    def __len__(self) -> int:
        raise AssertionError("propose took the context's length")

    def __getitem__(self, index):
        if index != -1:
            raise AssertionError(f"propose read context[{index!r}]")
        return self.last

    def __iter__(self):
        raise AssertionError("propose iterated the context")


def test_propose_reads_only_the_last_token():
    drafter = LookaheadDecoding(window=3, ngram=3, guess_set=2)
    run_script(drafter, PROMPT, SCRIPTS[0][3][:2])
    assert drafter.propose(LastTokenOnly(12), 4).tokens == (21, 31)


def test_defaults_are_the_benchmark_references():
    # LADE's README for a 7B model and Spec-Bench: W=7, N=5, G=7, a pool per generation;
    # the draft depth is N-1
    drafter = LookaheadDecoding()
    options = (drafter.window, drafter.ngram, drafter.guess_set, drafter.share_pool)
    assert options == (7, 5, 7, False)
    assert LookaheadDecoding.max_depth == drafter.ngram - 1 == 4
    assert drafter.needs == frozenset({"probe_choices"})
    drafter.begin(DraftRequest(tuple(range(100)), "g"))
    for _ in range(6):
        draft = drafter.propose(tuple(range(100)), 8)
        drafter.observe(TargetSignals(probe_choices=tuple(range(len(draft.probe_tokens)))))
    assert len(draft.probe_tokens) == 7 * 4 <= MAX_PROBES


@pytest.mark.parametrize("options", [{}, {"window": "15", "guess_set": "15"}])
def test_the_paper_setting_and_the_declared_ablation_build(options):
    registered = RegisteredDrafter("lookahead", LookaheadDecoding, "test")
    drafter = registered.create(**registered.convert_options(options))
    assert (drafter.window, drafter.guess_set) == ((15, 15) if options else (7, 7))
    assert LookaheadDecoding.ablations == ({"share_pool": "true"},)
    for variant in LookaheadDecoding.ablations:
        assert registered.create(**registered.convert_options(variant)).share_pool is True


def test_share_pool_must_be_a_bool():
    with pytest.raises(ValueError, match="share_pool must be True or False, got 'yes'"):
        LookaheadDecoding(share_pool="yes")


@pytest.mark.parametrize("options, message", [
    ({"window": 0}, "window must be >= 1, got window=0"),
    ({"ngram": 1}, "ngram must be >= 2, got ngram=1"),
    ({"guess_set": 0}, "guess_set must be >= 1, got guess_set=0"),
    ({"window": 200, "ngram": 4}, f"window * (ngram - 1) must be <= {MAX_PROBES}"),
    ({"guess_set": 100, "ngram": 4}, f"guess_set * (ngram - 1) must be <= {MAX_DRAFT_NODES}"),
])
def test_invalid_options_raise_naming_the_values(options, message):
    with pytest.raises(ValueError) as info:
        LookaheadDecoding(**options)
    assert message in str(info.value)
    for key, value in options.items():
        assert f"{key}={value}" in str(info.value)


# --- through the engine ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_llama():
    return wrap_model(tiny_model("llama"), name="tiny-llama")


@pytest.mark.parametrize("temperature, seed", [(0.0, 0), (0.6, 7)])
def test_lookahead_is_lossless(tiny_llama, temperature, seed):
    prompt = (1, 17, 42, 99, 250, 3, 77, 42, 99)
    drafter = LookaheadDecoding(window=4, ngram=4, guess_set=4, share_pool=True)
    drafted = 0
    for sample in range(2):  # the second sample starts with the first one's pool (shared)
        request = GenerationRequest(prompt, 40, Sampler(temperature, seed + sample),
                                    group="p", sample=sample)
        baseline = generate(tiny_llama, request)
        lookahead = generate(tiny_llama, request, drafter, k=3, drafter_name="lookahead")
        assert lookahead.tokens == baseline.tokens
        assert lookahead.stop == baseline.stop
        assert lookahead.stats.new_tokens == len(lookahead.tokens)
        drafted += lookahead.stats.drafted
    # trees were verified at both temperatures (a random model rarely agrees at T>0)
    assert len(drafter.pool) > 0 and drafted > 0


def test_pool_learns_from_the_target(tiny_llama):
    # a tiny random model decoding greedily soon repeats itself: the Jacobi window finds
    # the repeated n-grams, and verifying them saves target forwards
    prompt = (5, 6, 7, 8) * 4
    drafter = LookaheadDecoding(window=5, ngram=4, guess_set=5)
    request = GenerationRequest(prompt, 60, Sampler(0.0, 0))
    baseline = generate(tiny_llama, request)
    lookahead = generate(tiny_llama, request, drafter, k=3, drafter_name="lookahead")
    assert lookahead.tokens == baseline.tokens
    assert len(drafter.pool) > 0
    assert lookahead.stats.drafted > 0
    assert lookahead.stats.accepted > 0
    assert lookahead.stats.steps < baseline.stats.steps
