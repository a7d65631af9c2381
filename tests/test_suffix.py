"""SuffixDecoding: exact draft trees for hand-made token lists (one sequence, then the
global trie of earlier responses), the reference's rule (the best score over every
match length, the current response in the global trie) by hand near the trie depth and
against a brute-force rendering of Arctic Inference's ``speculate``, the suffix trie
against brute-force counts, bounded work per token, and losslessness through the
engine."""

from __future__ import annotations

import random
from collections import Counter
from typing import Sequence

import pytest

from conftest import tiny_model
from pytest_specdec.drafters.suffix import SuffixDecoding, SuffixTrie
from pytest_specdec.engine import Generation, GenerationRequest, generate
from pytest_specdec.engine.target import wrap_model
from pytest_specdec.protocol.drafter import MAX_DRAFT_NODES, Draft, DraftRequest
from pytest_specdec.protocol.registry import RegisteredDrafter
from pytest_specdec.protocol.sampling import Sampler


def propose(prompt: Sequence[int], accepted: Sequence[int] = (), k: int = 4,
            group: str = "g", drafter: SuffixDecoding | None = None, **options) -> Draft:
    """Begin a sequence with `prompt`, accept `accepted`, then propose up to k deep."""
    drafter = drafter if drafter is not None else SuffixDecoding(**options)
    drafter.begin(DraftRequest(tuple(prompt), group))
    if accepted:
        drafter.accept(tuple(accepted))
    return drafter.propose(tuple(prompt) + tuple(accepted), k)


def finished(drafter: SuffixDecoding, *sequences: tuple[Sequence[int], Sequence[int]],
             group: str = "g") -> SuffixDecoding:
    """Run whole (prompt, response) sequences through the drafter."""
    for prompt, response in sequences:
        drafter.begin(DraftRequest(tuple(prompt), group))
        if response:
            drafter.accept(tuple(response))
        drafter.end()
    return drafter


# three "answers" that all say 5, 6 and then 7 once, 8 twice
BRANCHY = [1, 5, 6, 7, 2, 5, 6, 8, 3, 5, 6, 8, 4, 5, 6]

# --- one sequence: exact drafts -----------------------------------------------------------

SINGLE_CASES = [
    # id, prompt, accepted, k, options, expected tokens, expected parents (None = chain)
    # "1 2" occurred once before (and now): p = 1/2 per node; 2 matched tokens -> 2 nodes
    ("repeat-bigram", [1, 2, 3, 4, 1, 2], [], 4, {}, (3, 4), None),
    ("longest-match-wins", [1, 2, 9, 5, 2, 7, 1, 2], [], 4, {}, (9, 5), None),
    ("no-repeat", [1, 2, 3, 4], [], 4, {}, (), None),
    ("single-token", [7], [], 4, {}, (), None),
    ("accepted-tokens-are-added", [1, 2, 3], [4, 1, 2], 4, {}, (3, 4), None),
    ("repeat-only-in-generated-text", [9], [5, 6, 7, 5, 6], 4, {}, (7, 5), None),
    # adaptive length: floor(max_spec_factor * match + max_spec_offset) nodes
    ("one-token-match-one-node", [1, 2, 3, 4, 5, 6, 9, 1], [], 4, {}, (2,), None),
    ("offset-adds-nodes", [1, 2, 3, 4, 5, 6, 9, 1], [], 4, {"max_spec_offset": 2}, (2, 3, 4), None),
    ("factor-scales", [1, 2, 3, 4, 5, 6, 9, 1], [], 4, {"max_spec_factor": 2.0}, (2, 3), None),
    ("fractional-factor", [1, 2, 3, 4, 5, 6, 9, 1, 2, 3], [], 4, {"max_spec_factor": 0.7},
     (4, 5), None),
    ("factor-zero-drafts-nothing", [1, 2, 3, 4, 1, 2], [], 4, {"max_spec_factor": 0.0}, (), None),
    ("negative-offset", [1, 2, 3, 4, 5, 1, 2, 3], [], 4, {"max_spec_offset": -1.0}, (4, 5), None),
    ("three-token-match", [1, 2, 3, 4, 5, 6, 9, 1, 2, 3], [], 4, {}, (4, 5, 6), None),
    ("k-caps-the-depth", [1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4], [], 2, {}, (5, 6), None),
    ("max-tree-depth-caps-the-match", [1, 2, 3, 4, 5, 6, 9, 1, 2, 3], [], 4,
     {"max_tree_depth": 2}, (4,), None),
    # "5 6" seen 4 times: then 8 twice (p 1/2), 7 once (p 1/4), and once now
    ("siblings-by-frequency", BRANCHY, [], 4, {}, (8, 7), (-1, -1)),
    # after "5 6 8": 3 and 4 (p 1/4 each, the recent 4 first); 7's child (p 1/4) is
    # pushed later and misses the budget of 2 + 2
    ("tree-best-first", BRANCHY, [], 4, {"max_spec_offset": 2}, (8, 7, 4, 3), (-1, -1, 0, 0)),
    ("k-1-keeps-the-siblings", BRANCHY, [], 1, {"max_spec_offset": 2}, (8, 7), (-1, -1)),
    ("min-prob-prunes-the-rare", BRANCHY, [], 4, {"max_spec_offset": 2, "min_token_prob": 0.3},
     (8,), None),
    ("min-prob-is-inclusive", BRANCHY, [], 4, {"max_spec_offset": 2, "min_token_prob": 0.5},
     (8,), None),
    ("min-prob-above-all", BRANCHY, [], 4, {"max_spec_offset": 2, "min_token_prob": 0.6}, (), None),
]


@pytest.mark.parametrize("prompt, accepted, k, options, tokens, parents",
                         [c[1:] for c in SINGLE_CASES], ids=[c[0] for c in SINGLE_CASES])
def test_suffix_drafts(prompt, accepted, k, options, tokens, parents):
    draft = propose(prompt, accepted, k, **options)
    assert draft == Draft(tokens, parents)
    assert draft.depth <= k


def test_accepting_in_pieces_equals_accepting_at_once():
    pieces = SuffixDecoding(max_spec_offset=2)
    pieces.begin(DraftRequest((1, 5, 6), "g"))
    for chunk in [(7,), (2, 5), (6, 8, 3), (5, 6, 8), (4, 5), (6,)]:
        pieces.accept(chunk)
    assert pieces.propose(tuple(BRANCHY), 4) == propose(BRANCHY[:3], BRANCHY[3:], 4,
                                                        max_spec_offset=2)


def test_begin_resets_the_current_sequence():
    drafter = SuffixDecoding(use_global=False)
    assert propose([1, 2, 9, 1, 2], k=2, drafter=drafter) == Draft((9, 1))
    drafter.end()
    assert propose([3, 1, 2], k=2, drafter=drafter) == Draft()


@pytest.mark.parametrize("options, message", [
    ({"max_tree_depth": 0}, "max_tree_depth must be an int >= 1, got 0"),
    ({"max_tree_depth": 2.5}, "max_tree_depth must be an int >= 1, got 2.5"),
    ({"max_tree_depth": True}, "max_tree_depth must be an int >= 1, got True"),
    ({"max_spec_factor": -0.5}, "max_spec_factor must be a finite number >= 0, got -0.5"),
    ({"max_spec_factor": float("nan")}, "max_spec_factor must be a finite number >= 0, got nan"),
    ({"max_spec_offset": float("inf")}, "max_spec_offset must be a finite number, got inf"),
    ({"min_token_prob": 0.0}, r"min_token_prob must be in \(0, 1\], got 0.0"),
    ({"min_token_prob": 1.5}, r"min_token_prob must be in \(0, 1\], got 1.5"),
    ({"use_global": "yes"}, "use_global must be True or False, got 'yes'"),
])
def test_invalid_parameters_raise_naming_the_values(options, message):
    with pytest.raises(ValueError, match=message):
        SuffixDecoding(**options)


def test_command_line_options_and_the_declared_ablation_build_the_drafter():
    registered = RegisteredDrafter("suffix", SuffixDecoding, "test")
    options = registered.convert_options({"max_tree_depth": "32", "max_spec_factor": "1.5",
                                          "max_spec_offset": "-1", "min_token_prob": "0.2"})
    drafter = registered.create(**options)
    assert (drafter.max_tree_depth, drafter.max_spec_factor, drafter.max_spec_offset,
            drafter.min_token_prob) == (32, 1.5, -1.0, 0.2)
    for variant in SuffixDecoding.ablations:
        assert registered.create(**registered.convert_options(variant)).use_global is False


# --- the global trie: earlier responses of this case --------------------------------------

GLOBAL_CASES = [
    # id, earlier (prompt, response) in order, now (prompt, accepted), k, options, tokens, parents
    ("branches-ordered-by-frequency",
     [([0], [1, 5, 6, 7, 10]), ([0], [2, 5, 6, 8, 11]), ([0], [3, 5, 6, 8, 11])],
     ([4, 5, 6], []), 4, {"max_spec_offset": 2}, (8, 11, 7, 10), (-1, 0, -1, 2)),
    # 11 after 8 (p 2/3) beats the sibling 7 (p 1/3) for the second node
    ("budget-of-two-takes-the-likely-path",
     [([0], [1, 5, 6, 7, 10]), ([0], [2, 5, 6, 8, 11]), ([0], [3, 5, 6, 8, 11])],
     ([4, 5, 6], []), 4, {}, (8, 11), None),
    ("a-tie-goes-to-the-most-recent", [([0], [5, 6, 7]), ([0], [5, 6, 8])],
     ([9, 5, 6], []), 4, {}, (8, 7), (-1, -1)),
    ("default-min-prob-keeps-one-in-five",
     [([0], [5, 6, 7])] + [([0], [5, 6, 8])] * 4, ([9, 5, 6], []), 4, {}, (8, 7), (-1, -1)),
    ("min-prob-prunes-one-in-five",
     [([0], [5, 6, 7])] + [([0], [5, 6, 8])] * 4, ([9, 5, 6], []), 4,
     {"min_token_prob": 0.25}, (8,), None),
    ("use-global-off", [([0], [1, 5, 6, 7, 8])], ([9, 5, 6], []), 4, {"use_global": False},
     (), None),
    ("prompts-stay-out", [([5, 6, 7, 8], [1])], ([9, 5, 6], []), 4, {}, (), None),
    ("response-match-through-the-prompt-end", [([0], [1, 5, 6, 7, 8])], ([9, 5], [6]), 4, {},
     (7, 8), None),
    # the longest global match "4 5 6" ends its response: the next shorter one drafts
    ("deepest-match-with-a-continuation", [([0], [4, 5, 6]), ([0], [1, 5, 6, 9])],
     ([4, 5, 6], []), 4, {}, (9,), None),
    # request: (3, 1) at p 1/2, score 1; global: (7, 8) at p 1, score 2
    ("global-wins-on-score", [([0], [1, 2, 7, 8])], ([1, 2, 3, 1, 2], []), 4, {}, (7, 8), None),
    # global (7,) at p 1 scores 1, as the request's (3, 1): a tie goes to the current text
    ("a-tie-goes-to-the-current-text", [([0], [1, 2, 7])], ([1, 2, 3, 1, 2], []), 4, {},
     (3, 1), None),
    ("request-wins-on-score", [([0], [3, 7])], ([1, 2, 3, 4, 5, 9, 1, 2, 3], []), 4, {},
     (4, 5, 9), None),
]


@pytest.mark.parametrize("earlier, now, k, options, tokens, parents",
                         [c[1:] for c in GLOBAL_CASES], ids=[c[0] for c in GLOBAL_CASES])
def test_global_drafts(earlier, now, k, options, tokens, parents):
    drafter = finished(SuffixDecoding(**options), *earlier)
    prompt, accepted = now
    assert propose(prompt, accepted, k, drafter=drafter) == Draft(tokens, parents)


def test_the_global_trie_spans_problems():
    drafter = finished(SuffixDecoding(), ([0], [1, 5, 6, 7, 8]), group="A")
    assert propose([9, 5, 6], k=4, group="B", drafter=drafter) == Draft((7, 8))


@pytest.mark.parametrize("use_global", [True, False])
def test_a_later_sample_drafts_from_an_earlier_one(use_global):
    drafter = SuffixDecoding(use_global=use_global)
    prompt, response = (40, 41, 42), (10, 11, 12, 13, 14, 15, 16, 17)
    drafter.begin(DraftRequest(prompt, "p", sample=0))
    for token in response:
        drafter.accept((token,))
    drafter.end()

    drafter.begin(DraftRequest(prompt, "p", sample=1))
    context = list(prompt)
    # only responses are learnt, so the prompt end matches nothing; then each accepted
    # token lengthens the match, and the draft with it
    drafts = [drafter.propose(context, 4)]
    for token in response[:4]:
        drafter.accept((token,))
        context.append(token)
        drafts.append(drafter.propose(context, 4))
    if use_global:
        assert drafts == [Draft(), Draft((11,)), Draft((12, 13)), Draft((13, 14, 15)),
                          Draft((14, 15, 16, 17))]
    else:
        assert drafts == [Draft()] * 5


# --- the reference's rule: every match length scored --------------------------------------
# Worked by hand from Arctic Inference's SuffixTree::speculate: for each suffix of the
# context (length m = 1, 2, ... while it occurs), grow a tree of at most
# floor(factor * m + offset) nodes best first and score it by the sum of its node
# probabilities; the best score wins, a tie to the longer match.

REFERENCE_CASES = [
    # id, prompt, accepted, k, options, expected tokens, expected parents (None = chain)
    # D=4: "1 2 3" (m=3) leaves room for one token (4, p 1/2); "2 3" (m=2) drafts 4 then
    # 5 (p 1/2 each, score 1.0 > 0.5)
    ("longest-match-leaves-one-token", [1, 2, 3, 4, 5, 1, 2, 3], [], 4, {"max_tree_depth": 4},
     (4, 5), None),
    # a period-3 loop at D=4: m=3 drafts (1,) at 2/3; m=2 drafts (1, 2) at 2/3 each
    ("loop-near-the-trie-depth", [1, 2, 3] * 3, [], 3, {"max_tree_depth": 4}, (1, 2), None),
    # "1 2" (m=2) splits 6 / 7 (1/3 each, score 2/3); "2" (m=1) goes on with 8 seven
    # times in ten (0.7): the shorter match scores higher
    ("a-shorter-match-scores-higher", [1, 2, 6, 1, 2, 7] + [9, 2, 8] * 7 + [1, 2], [], 4, {},
     (8,), None),
    # six in nine (2/3) ties the longer match's 2/3: the longer one wins the tie
    ("a-tie-goes-to-the-longer-match", [1, 2, 6, 1, 2, 7] + [9, 2, 8] * 6 + [1, 2], [], 4, {},
     (7, 6), (-1, -1)),
]


@pytest.mark.parametrize("prompt, accepted, k, options, tokens, parents",
                         [c[1:] for c in REFERENCE_CASES], ids=[c[0] for c in REFERENCE_CASES])
def test_every_match_length_is_scored(prompt, accepted, k, options, tokens, parents):
    assert propose(prompt, accepted, k, **options) == Draft(tokens, parents)


REFERENCE_GLOBAL_CASES = [
    # id, earlier (prompt, response), now (prompt, accepted), k, options, tokens, parents
    # D=4: the earlier response holds "1 2 3 4 5 6"; "1 2 3" leaves room for 4 only,
    # "2 3" drafts 4, 5 (p 1 each)
    ("global-longest-match-leaves-one-token", [([0], [1, 2, 3, 4, 5, 6])], ([9, 1, 2, 3], []),
     4, {"max_tree_depth": 4}, (4, 5), None),
    # the current response is in the global trie as it is generated: "5 6" is seen 3
    # times there (7 and 8 at 1/3, score 2/3), so the request's 8, 5 (1/2 each, score 1)
    # wins; with the earlier response alone the global trie would draft 7, 9 at p 1
    ("current-response-counts-in-the-global-trie", [([0], [5, 6, 7, 9])],
     ([0], [5, 6, 8, 5, 6]), 4, {}, (8, 5), None),
]


@pytest.mark.parametrize("earlier, now, k, options, tokens, parents",
                         [c[1:] for c in REFERENCE_GLOBAL_CASES],
                         ids=[c[0] for c in REFERENCE_GLOBAL_CASES])
def test_every_match_length_is_scored_in_the_global_trie(earlier, now, k, options, tokens,
                                                         parents):
    drafter = finished(SuffixDecoding(**options), *earlier)
    prompt, accepted = now
    assert propose(prompt, accepted, k, drafter=drafter) == Draft(tokens, parents)


def test_the_global_trie_learns_the_response_per_accepted_token():
    drafter = SuffixDecoding()
    drafter.begin(DraftRequest((1, 2, 3), "g"))
    drafter.accept((5, 6))
    drafter.accept((5,))
    assert drafter.global_trie.count((5, 6)) == 1 and drafter.global_trie.count((5,)) == 2
    assert drafter.global_trie.count((3, 5)) == 0  # prompts stay out
    drafter.end()  # nothing is added twice
    assert drafter.global_trie.count((5,)) == 2
    off = SuffixDecoding(use_global=False)
    off.begin(DraftRequest((1, 2, 3), "g"))
    off.accept((5, 6))
    off.end()
    assert off.global_trie.count((5,)) == 0


def perfect_target_run(drafter: SuffixDecoding, prompt: Sequence[int], text: Sequence[int],
                       k: int) -> list[int]:
    """Generate `text` after `prompt` with a target that always continues it: each step
    accepts the draft's path that matches the text, plus the next token. Returns each
    step's draft depth."""
    drafter.begin(DraftRequest(tuple(prompt), "g"))
    context, depths = list(prompt), []
    while len(context) < len(prompt) + len(text):
        draft = drafter.propose(tuple(context), k)
        depths.append(draft.depth)
        parents = draft.parents or tuple(range(-1, len(draft) - 1))
        node, step = -1, []
        for token in text[len(context) - len(prompt):]:
            node = next((i for i, p in enumerate(parents)
                         if p == node and draft.tokens[i] == token), None)
            step.append(token)
            if node is None:
                break
        drafter.accept(tuple(step))
        context.extend(step)
    return depths


PASSAGE = list(range(100, 140))  # 40 distinct tokens


@pytest.mark.parametrize("use_global", [True, False])
@pytest.mark.parametrize("k", [5, 8])
def test_a_repeated_passage_drafts_full_depth(k, use_global):
    # the passage is the prompt and is generated three more times (160 tokens): once a
    # copy has started, matches grow past the trie depth of 64, where the longest match
    # leaves room for one token; shorter matches still draft k
    depths = perfect_target_run(SuffixDecoding(use_global=use_global), PASSAGE, PASSAGE * 3, k)
    # the method's length rule: a match of m tokens drafts m nodes, so the first copy
    # ramps up (m = 0, 1, 3, 7, ...); from then on every draft is k deep
    ramp = [0, 1, 3, 7][:[0, 1, 3, 7, 15].index(next(m for m in [0, 1, 3, 7, 15] if m >= k))]
    assert depths[:len(ramp)] == ramp
    assert depths[len(ramp):] == [k] * (len(depths) - len(ramp))
    drafting = [d for d in depths if d]
    if k == 5:
        assert sum(d == k for d in drafting) >= 0.9 * len(drafting)


def test_a_repeated_passage_at_the_default_depth():
    # k = max_depth (64): a draft from a match of m tokens is at most min(m, 64 - m)
    # deep (the length rule, and what the trie holds past the match), so 32 at most
    assert SuffixDecoding.max_depth == 64
    depths = perfect_target_run(SuffixDecoding(), PASSAGE, PASSAGE * 3, 64)
    assert depths == [0, 1, 3, 7, 15, 31, 32, 32]


def reference_speculate(sequences: Sequence[Sequence[int]], context: Sequence[int], depth: int,
                        factor: float, offset: float, min_prob: float) -> tuple[float, int]:
    """Arctic Inference's speculate written out over brute-force substring counts:
    (best score, its match length); for every m = 1 .. len(context) - 1 (context cut to
    its last `depth` tokens) while the suffix occurs, the tree of at most
    floor(factor * m + offset) nodes grown best first from it scores the sum of the
    largest node probabilities (best first emits exactly those: a child is never more
    probable than its parent)."""
    counts = substring_counts(sequences, depth)
    context = list(context)[-depth:]
    best = (0.0, 0)
    for m in range(1, len(context)):
        match = tuple(context[-m:])
        if counts[match] == 0:
            break
        budget = max(0, int(m * factor + offset + 1e-6))
        probs, frontier = [], [(match, 1.0)]
        while frontier:
            string, prob = frontier.pop()
            for (longer, count) in counts.items():
                if len(longer) == len(string) + 1 and longer[:-1] == string:
                    p = prob * count / counts[string]
                    if p >= min_prob * (1 - 1e-9):
                        probs.append(p)
                        frontier.append((longer, p))
        score = sum(sorted(probs, reverse=True)[:budget])
        if score >= best[0] - 1e-9:
            best = (max(score, best[0]), m)
    return best


@pytest.mark.parametrize("seed", range(3))
def test_scores_equal_the_brute_force_reference(seed):
    # small vocabularies and a small trie depth: many repeats, matches at the depth,
    # branches; k = the trie depth, so the depth never binds before the trie does
    rng = random.Random(seed)
    for _ in range(6):
        depth, vocab = rng.randint(2, 6), rng.randint(2, 4)
        options = {"max_tree_depth": depth, "max_spec_offset": float(rng.choice([0, 1, 2])),
                   "min_token_prob": rng.choice([0.1, 0.3])}
        drafter = SuffixDecoding(**options)
        responses = []
        for _ in range(2):
            prompt = [rng.randrange(vocab) for _ in range(rng.randint(1, 6))]
            response = [rng.randrange(vocab) for _ in range(rng.randint(1, 25))]
            drafter.begin(DraftRequest(tuple(prompt), "g"))
            for i, token in enumerate(response):
                context = prompt + response[:i]
                drafter.propose(tuple(context), depth)
                got = drafter.last_match
                ref_request = reference_speculate([context], context, depth, 1.0,
                                                  options["max_spec_offset"],
                                                  options["min_token_prob"])
                ref_global = reference_speculate(responses + [response[:i]], context, depth,
                                                 1.0, options["max_spec_offset"],
                                                 options["min_token_prob"])
                want = ref_request if ref_request[0] >= ref_global[0] - 1e-9 else ref_global
                source = "request" if want is ref_request else "global"
                if want[0] == 0:
                    assert got is None, (context, got)
                else:
                    assert got is not None and got[0] == source and got[1] == want[1] and \
                        got[2] == pytest.approx(want[0]), (responses, context, got, want)
                drafter.accept((token,))
            drafter.end()
            responses.append(response)


# --- the suffix trie ----------------------------------------------------------------------

def substring_counts(sequences: Sequence[Sequence[int]], depth: int) -> Counter:
    counts: Counter = Counter()
    for seq in sequences:
        for i in range(len(seq)):
            for j in range(i + 1, min(len(seq), i + depth) + 1):
                counts[tuple(seq[i:j])] += 1
    return counts


@pytest.mark.parametrize("seed", range(4))
def test_trie_counts_equal_brute_force(seed):
    rng = random.Random(seed)
    for _ in range(40):
        depth, vocab = rng.randint(1, 6), rng.randint(1, 4)
        sequences = [[rng.randrange(vocab) for _ in range(rng.randint(0, 25))]
                     for _ in range(rng.randint(1, 3))]
        trie = SuffixTrie(depth)
        for seq in sequences:
            trie.add_sequence(seq)
        want = substring_counts(sequences, depth)
        for string, count in want.items():
            assert trie.count(string) == count, (sequences, string)
        for _ in range(10):
            string = tuple(rng.randrange(vocab + 1) for _ in range(rng.randint(1, depth)))
            assert trie.count(string) == want.get(string, 0)


def test_trie_extended_token_by_token_keeps_counts_and_active_nodes():
    rng = random.Random(7)
    depth, text = 5, []
    trie = SuffixTrie(depth)
    active = [trie.root]
    for _ in range(60):
        text.append(rng.randrange(3))
        active = trie.extend(text, len(text) - 1, active)
        want = substring_counts([text], depth)
        assert all(trie.count(s) == c for s, c in want.items())
        # active: the suffixes shorter than the depth that occurred before, root first
        assert [node.depth for node in active] == [0] + [
            d for d in range(1, min(depth, len(text) + 1)) if want[tuple(text[-d:])] >= 2]


def test_a_string_seen_once_is_one_node():
    trie = SuffixTrie(64)
    trie.add_sequence(list(range(1000)))
    # no token repeats: one lazy node per token under the root, not 64 per token
    assert len(trie.root.children) == 1000
    assert all(node.children is None for node in trie.root.children.values())
    assert trie.count(range(500, 564)) == 1 and trie.count(range(500, 565)) == 0


def test_children_stay_sorted_by_count():
    trie = SuffixTrie(3)
    rng = random.Random(3)
    for _ in range(5):
        trie.add_sequence([rng.randrange(6) for _ in range(200)])
    stack = [trie.root]
    while stack:
        node = stack.pop()
        if node.children is None:
            continue
        counts = [child.count for child in node.order]
        assert counts == sorted(counts, reverse=True)
        assert all(node.order[child.rank] is child for child in node.order)
        stack.extend(node.children.values())


# --- bounded work per token ---------------------------------------------------------------

def test_work_per_token_does_not_grow_with_the_context():
    depth, k, min_prob = 16, 8, 0.1
    drafter = SuffixDecoding(max_tree_depth=depth, max_spec_offset=4, min_token_prob=min_prob)
    rng = random.Random(0)
    # a looping answer with small variations: long matches, full active sets, branches
    loop = [rng.randrange(50) for _ in range(40)]
    text = [t if rng.random() > 0.05 else rng.randrange(50) for t in loop * 100]
    finished(drafter, ([0], text[:2000]))  # a global trie to match too
    drafter.begin(DraftRequest((1, 2, 3), "g"))
    tries = (drafter.request_trie, drafter.global_trie)
    work, context, tree_drafts = [], [1, 2, 3], 0
    for token in text[:4000]:
        before = sum(trie.visits for trie in tries)
        draft = drafter.propose(context, k)
        drafter.accept((token,))
        context.append(token)
        work.append(sum(trie.visits for trie in tries) - before)
        tree_drafts += not draft.is_chain
    # accept: <= depth active nodes in each trie + depth + 1 global cursors; propose, in
    # each trie: <= depth matches, each bounded by a look at <= 1/min_prob children and
    # perhaps grown, every emitted node looking at <= 1/min_prob children
    budget = min(depth + 4, MAX_DRAFT_NODES)
    per_trie = depth * (1 + round(1 / min_prob)) * (budget + 2)
    assert max(work) <= 3 * depth + 1 + 2 * per_trie
    assert max(work[-1000:]) <= max(work[:1000]) * 1.5
    assert sum(work[-1000:]) <= sum(work[:1000]) * 1.5
    assert tree_drafts > 0  # the variations made real trees


# --- losslessness through the engine ------------------------------------------------------

class Recording(SuffixDecoding):
    """Keeps every draft it proposes, and counts the accepted paths that left the
    first-listed (most probable) branch of a tree."""

    def __init__(self, **options):
        super().__init__(**options)
        self.drafts: list[Draft] = []
        self.off_first_branch = 0

    def propose(self, context, k):
        draft = super().propose(context, k)
        self.drafts.append(draft)
        return draft

    def accept(self, tokens):
        draft = self.drafts[-1] if self.drafts else Draft()
        if not draft.is_chain:
            here = -1
            for token in tokens[:-1]:  # the accepted draft nodes, then the bonus token
                children = [i for i, p in enumerate(draft.parents) if p == here]
                here = next(i for i in children if draft.tokens[i] == token)
                self.off_first_branch += here != children[0]
        super().accept(tokens)


@pytest.mark.parametrize("temperature", [0.0, 0.6])
def test_suffix_decoding_is_lossless_across_samples(temperature):
    # a small vocabulary makes the random model's texts share contexts, so the tries
    # branch; samples 3 and 4 reuse the seeds of 0 and 1 (the same text at T=0.6 too),
    # so their drafts are accepted, through the branches
    target = wrap_model(tiny_model("llama", vocab_size=32), name="tiny-llama-32")
    drafter = Recording(max_spec_offset=4)
    prompt = (1, 7, 4, 9, 3, 5, 2)
    drafted = accepted = 0
    baselines: dict[int, Generation] = {}
    for sample, seed in enumerate([100, 101, 102, 100, 101]):
        request = GenerationRequest(prompt, 40, Sampler(temperature, seed), group="p",
                                    sample=sample)
        if seed not in baselines:
            baselines[seed] = generate(target, request)
        baseline = baselines[seed]
        speculative = generate(target, request, drafter, k=5, drafter_name="suffix")
        assert speculative.tokens == baseline.tokens
        assert speculative.stop == baseline.stop
        drafted += speculative.stats.drafted
        accepted += speculative.stats.accepted
    assert accepted > 0 and drafted > accepted
    assert sum(not draft.is_chain for draft in drafter.drafts) > 0
    # verification took a branch other than the most probable one
    assert drafter.off_first_branch > 0
