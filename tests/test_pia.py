"""PIA's trie drafter: exact tree drafts for hand-made token lists, the trie's counts,
sharing across sequences and problems, prompt branch elimination, node pruning, bounded
work per token, and losslessness of tree drafts through the engine."""

from __future__ import annotations

import random
from typing import Sequence

import pytest

from conftest import tiny_model
from drafters.pia import NgramTrie, PiaTrie
from pytest_specdec.drafter import MAX_DRAFT_NODES, Draft, DraftRequest, validate_draft
from pytest_specdec.engine import GenerationRequest, generate
from pytest_specdec.sampling import Sampler
from pytest_specdec.target import wrap_model


def propose(prompt: Sequence[int], accepted: Sequence[int] = (), k: int = 4,
            group: str = "g", drafter: PiaTrie | None = None, **options) -> Draft:
    """Begin a sequence with `prompt`, accept `accepted`, then propose up to k deep."""
    drafter = drafter if drafter is not None else PiaTrie(**options)
    drafter.begin(DraftRequest(tuple(prompt), group))
    if accepted:
        drafter.accept(tuple(accepted))
    return drafter.propose(tuple(prompt) + tuple(accepted), k)


def tree(tokens: Sequence[int], parents: Sequence[int]) -> Draft:
    return Draft(tuple(tokens), tuple(parents))


# --- single sequence: exact drafts --------------------------------------------------------

# after (1, 2): 3 once, 4 twice; every 4 is followed by 1
FREQ = [1, 2, 3, 1, 2, 4, 1, 2, 4, 1, 2]

PIA_CASES = [
    # id, prompt, accepted, k, options, expected draft
    ("single-branch", [5, 6, 7, 8, 9, 5, 6], [], 3, {}, Draft((7, 8, 9))),
    ("single-branch-runs-to-the-end", [5, 6, 7, 8, 9, 5, 6], [], 9, {}, Draft((7, 8, 9, 5, 6))),
    ("two-branches-most-frequent-first", FREQ, [], 2, {}, tree((4, 1, 3, 1), (-1, 0, -1, 2))),
    ("node-budget-cut", FREQ, [], 2, {"max_nodes": 3}, tree((4, 1, 3), (-1, 0, -1))),
    ("node-budget-1", FREQ, [], 2, {"max_nodes": 1}, Draft((4,))),
    ("depth-k-cut", FREQ, [], 1, {}, tree((4, 3), (-1, -1))),
    # windows of 3 tokens: after a 2-token prefix, one more level
    ("branch-length-cut", FREQ, [], 5, {"branch_length": 2}, tree((4, 3), (-1, -1))),
    # (7, 2) occurred once, followed by 9 3 2; 2 alone is followed by 5 twice
    ("longest-prefix-first", [7, 2, 9, 3, 2, 5, 3, 2, 5, 7, 2], [], 3, {}, Draft((9, 3, 2))),
    ("max-prefix-1-takes-the-unigram", [7, 2, 9, 3, 2, 5, 3, 2, 5, 7, 2], [], 3,
     {"max_prefix": 1}, tree((5, 3, 2, 7, 2, 9, 3, 2), (-1, 0, 1, 0, 3, -1, 5, 6))),
    # (1, 2) gives 3 nodes, fewer than k: the unigram 2 gives more, and is taken
    ("short-prefix-draft-falls-back", [2, 5, 6, 7, 8, 9, 1, 2, 3, 1, 2], [], 5, {},
     tree((5, 6, 7, 8, 9, 3, 1, 2), (-1, 0, 1, 2, 3, -1, 5, 6))),
    ("full-branch-keeps-the-long-prefix", [2, 5, 6, 7, 8, 9, 1, 2, 3, 1, 2], [], 3, {},
     Draft((3, 1, 2))),
    # equal counts: the continuation seen first ranks first, and a deeper node comes
    # before a sibling of its ancestor (whole branches, as in the reference's DFS)
    ("ties-in-order-of-first-sight", [9, 1, 9, 2, 9, 3, 9, 4, 9], [], 1,
     {"max_nodes": 2}, tree((1, 2), (-1, -1))),
    ("root-fan", [9, 1, 9, 2, 9, 3, 9, 4, 9], [], 1, {}, tree((1, 2, 3, 4), (-1, -1, -1, -1))),
    ("no-match", [1, 2, 3, 4], [], 4, {}, Draft()),
    ("single-token-context", [7], [], 4, {}, Draft()),
    ("k-0", FREQ, [], 0, {}, Draft()),
    ("accepted-tokens-are-inserted", [1, 2, 3], [4, 1, 2], 3, {}, Draft((3, 4, 1))),
    ("ngram-only-in-generated-text", [9], [5, 6, 7, 5, 6], 3, {}, Draft((7, 5, 6))),
    ("ngram-across-the-prompt-end", [5, 6], [7, 8, 5, 6], 2, {}, Draft((7, 8))),
]


@pytest.mark.parametrize("prompt, accepted, k, options, expected",
                         [c[1:] for c in PIA_CASES], ids=[c[0] for c in PIA_CASES])
def test_pia_drafts(prompt, accepted, k, options, expected):
    draft = propose(prompt, accepted, k, **options)
    assert draft == expected
    validate_draft(draft, drafter="pia", k=max(k, 1), vocab_size=100)


def test_accepting_in_pieces_equals_accepting_at_once():
    pieces = PiaTrie(branch_length=3)
    pieces.begin(DraftRequest((1, 2, 3), "g"))
    for chunk in [(4,), (1, 2), (3, 5, 1), (2,)]:
        pieces.accept(chunk)
    context = (1, 2, 3, 4, 1, 2, 3, 5, 1, 2)
    at_once = PiaTrie(branch_length=3)
    expected = propose((1, 2, 3), context[3:], 3, drafter=at_once)
    assert pieces.propose(context, 3) == expected == tree((3, 4, 5), (-1, 0, 0))
    assert counts(pieces.trie) == counts(at_once.trie)


# --- the trie ----------------------------------------------------------------------------

def counts(trie: NgramTrie) -> dict[tuple[int, ...], tuple[float, int]]:
    """Every n-gram in the trie -> (output count, prompt count)."""
    found = {}
    stack = [((), trie.root)]
    while stack:
        path, node = stack.pop()
        for token, child in node.children.items():
            found[path + (token,)] = (child.output, child.prompt)
            stack.append((path + (token,), child))
    return found


def check_trie(trie: NgramTrie) -> None:
    """Structure and ranking invariants: sizes agree, every node is live and knows its
    parent, and each ranked list holds the top `width` children by count, best first."""
    nodes, stack = 0, [trie.root]
    while stack:
        node = stack.pop()
        children = list(node.children.values())
        nodes += len(children)
        top = sorted((c.count for c in children), reverse=True)[:trie.width]
        assert [c.count for c in node.ranked] == top
        assert all(c.is_ranked == any(c is r for r in node.ranked) for c in children)
        assert all(not c.dead and c.parent is node and c.depth == node.depth + 1
                   for c in children)
        assert all(c.depth <= trie.branch_length + 1 for c in children)
        stack.extend(children)
    assert nodes == trie.size


def test_counts_are_occurrences_of_every_ngram_up_to_branch_length_plus_1():
    trie = NgramTrie(branch_length=2, width=8, capacity=1000)
    for token in (1, 2, 1, 2, 3):
        trie.extend(token, prompt=False)
    assert counts(trie) == {
        (1,): (2.0, 0), (2,): (2.0, 0), (3,): (1.0, 0),
        (1, 2): (2.0, 0), (2, 1): (1.0, 0), (2, 3): (1.0, 0),
        (1, 2, 1): (1.0, 0), (1, 2, 3): (1.0, 0), (2, 1, 2): (1.0, 0),
    }
    check_trie(trie)


def test_an_occurrence_counts_as_prompt_or_output_by_its_last_token():
    drafter = PiaTrie(branch_length=2)
    drafter.begin(DraftRequest((1, 2), "g"))
    drafter.accept((3,))
    assert counts(drafter.trie) == {
        (1,): (0.0, 1), (2,): (0.0, 1), (1, 2): (0.0, 1),
        (3,): (1.0, 0), (2, 3): (1.0, 0), (1, 2, 3): (1.0, 0),
    }


def test_ranking_stays_exact_under_random_updates():
    rng = random.Random(0)
    drafter = PiaTrie(branch_length=3, max_nodes=4, capacity=120)
    for sequence in range(12):
        prompt = tuple(rng.randrange(6) for _ in range(rng.randrange(1, 20)))
        drafter.begin(DraftRequest(prompt, f"p{sequence % 3}", sample=sequence))
        check_trie(drafter.trie)
        for _ in range(rng.randrange(10, 60)):
            drafter.accept(tuple(rng.randrange(6) for _ in range(rng.randrange(1, 4))))
            assert drafter.trie.size <= drafter.trie.limit
        check_trie(drafter.trie)
        drafter.end()
        check_trie(drafter.trie)
        assert all(node.prompt == 0 for node in iter_nodes(drafter.trie))


def iter_nodes(trie: NgramTrie):
    stack = list(trie.root.children.values())
    while stack:
        node = stack.pop()
        yield node
        stack.extend(node.children.values())


def test_drafts_obey_the_protocol_on_random_text():
    rng = random.Random(1)
    drafter = PiaTrie(max_nodes=20, max_prefix=3)
    context = [rng.randrange(8) for _ in range(30)]
    drafter.begin(DraftRequest(tuple(context), "g"))
    for _ in range(200):
        k = rng.randrange(1, 9)
        draft = validate_draft(drafter.propose(context, k), drafter="pia", k=k, vocab_size=8)
        assert len(draft) <= 20
        # siblings are distinct tokens, so each root path is one candidate continuation
        for parent in set(draft.parents or ()):
            siblings = [t for t, p in zip(draft.tokens, draft.parents) if p == parent]
            assert len(siblings) == len(set(siblings))
        step = [rng.randrange(8) for _ in range(rng.randrange(1, 4))]
        context.extend(step)
        drafter.accept(step)


@pytest.mark.parametrize("options, message", [
    ({"branch_length": 0}, "branch_length must be in [1, 256], got 0"),
    ({"branch_length": 257}, "branch_length must be in [1, 256], got 257"),
    ({"max_nodes": 0}, "max_nodes must be in [1, 256], got 0"),
    ({"max_nodes": MAX_DRAFT_NODES + 1}, "max_nodes must be in [1, 256], got 257"),
    ({"max_prefix": 0}, "max_prefix must be in [1, branch_length=12], got 0"),
    ({"max_prefix": 5, "branch_length": 4}, "max_prefix must be in [1, branch_length=4], got 5"),
    ({"capacity": 25}, "capacity must be at least 2 * (branch_length + 1) = 26 nodes, got 25"),
])
def test_invalid_parameters_raise_naming_the_values(options, message):
    with pytest.raises(ValueError) as info:
        PiaTrie(**options)
    assert str(info.value) == message


# --- sharing across sequences and problems ---------------------------------------------------

def run(drafter: PiaTrie, prompt: Sequence[int], output: Sequence[int], group: str = "A",
        sample: int = 0, round: int = 0) -> None:
    """One whole sequence: prompt, generated tokens, end."""
    drafter.begin(DraftRequest(tuple(prompt), group, sample, round))
    drafter.accept(tuple(output))
    drafter.end()


SHARE_CASES = [
    # id, earlier sequences (group, sample, round, prompt, output), now (group, prompt), k, expected
    ("next-sample", [("A", 0, 0, [1, 2], [40, 41, 42, 43, 44])], ("A", [1, 2, 40, 41]), 3,
     Draft((42, 43, 44))),
    ("next-round", [("A", 0, 0, [1, 2], [40, 41, 42, 43, 44])], ("A", [1, 2, 9, 41]), 3,
     Draft((42, 43, 44))),
    ("next-problem", [("A", 0, 0, [1, 2], [40, 41, 42, 43, 44])], ("B", [7, 40, 41]), 3,
     Draft((42, 43, 44))),
    # two earlier samples agree on 42 43, one goes 42 50: the majority first
    ("samples-add-up", [("A", 0, 0, [1], [41, 42, 43]), ("A", 1, 0, [1], [41, 42, 50]),
                        ("A", 2, 0, [1], [41, 42, 43])], ("A", [1, 41]), 2,
     tree((42, 43, 50), (-1, 0, 0))),
]


@pytest.mark.parametrize("earlier, now, k, expected",
                         [c[1:] for c in SHARE_CASES], ids=[c[0] for c in SHARE_CASES])
def test_outputs_are_shared(earlier, now, k, expected):
    drafter = PiaTrie()
    for group, sample, round_, prompt, output in earlier:
        run(drafter, prompt, output, group, sample, round_)
    group, prompt = now
    assert propose(prompt, k=k, group=group, drafter=drafter) == expected


def test_prompt_branches_are_eliminated_when_the_sequence_ends():
    drafter = PiaTrie()
    assert propose([10, 11, 12, 13, 10, 11], k=2, drafter=drafter) == Draft((12, 13))
    drafter.end()
    assert drafter.trie.size == 0 and counts(drafter.trie) == {}
    assert propose([50, 10, 11], k=2, group="B", drafter=drafter) == Draft()


def test_kept_prompt_branches_become_history():
    drafter = PiaTrie(eliminate_prompt_branches=False)
    propose([10, 11, 12, 13], drafter=drafter)
    drafter.end()
    assert counts(drafter.trie)[(10, 11, 12)] == (1.0, 0)
    assert propose([50, 10, 11], k=2, group="B", drafter=drafter) == Draft((12, 13))


def test_output_ngrams_that_start_in_the_prompt_survive_elimination():
    drafter = PiaTrie(branch_length=3)
    run(drafter, [7, 8], [9, 10])
    found = counts(drafter.trie)
    assert found[(7, 8, 9)] == found[(8, 9, 10)] == (1.0, 0)
    assert found[(7, 8)] == (0.0, 0)  # kept as the path to (7, 8, 9), with no count
    assert (7,) in found and (8,) in found and (8, 7) not in found
    check_trie(drafter.trie)
    assert propose([1, 7, 8], k=2, group="B", drafter=drafter) == Draft((9, 10))


def test_the_current_prompt_counts_with_the_history():
    drafter = PiaTrie(max_prefix=1)
    run(drafter, [1], [5, 6, 5, 7, 5, 7])  # history: 5 -> 7 twice, 5 -> 6 once
    # this prompt adds 5 -> 6 twice: 3 against 2
    assert propose([5, 6, 5, 6, 5], k=1, drafter=drafter) == tree((6, 7), (-1, -1))


def test_begin_without_end_ends_the_open_sequence():
    drafter = PiaTrie()
    propose([10, 11, 12], drafter=drafter)
    assert propose([50, 10, 11], k=2, group="B", drafter=drafter) == Draft()
    drafter.end()
    drafter.end()  # a second end is harmless
    assert drafter.trie.size == 0


# --- node pruning ------------------------------------------------------------------------------

def test_pruning_halves_counts_and_drops_the_rare_ngrams():
    drafter = PiaTrie(branch_length=1, max_prefix=1, capacity=8)
    drafter.begin(DraftRequest((), "g"))
    drafter.accept((5, 6) * 8 + (7, 8))
    assert drafter.trie.size == 8  # 5, 6, 7, 8, (5 6), (6 5), (6 7), (7 8): at capacity
    drafter.accept((9,))  # 10 nodes: one round of halving leaves the repeated ones
    assert counts(drafter.trie) == {(5,): (4.0, 0), (6,): (4.0, 0), (5, 6): (4.0, 0),
                                    (6, 5): (3.5, 0)}
    check_trie(drafter.trie)
    # the window that started at 9 was pruned with it: no (9, 5)
    drafter.accept((5,))
    assert counts(drafter.trie)[(5,)] == (5.0, 0) and (9,) not in counts(drafter.trie)
    assert drafter.propose([5], 1) == Draft((6,))


def test_pruning_keeps_the_current_prompt():
    drafter = PiaTrie(branch_length=1, max_prefix=1, capacity=4)
    drafter.begin(DraftRequest((1, 2, 3), "g"))  # 5 nodes, all the prompt's
    assert drafter.trie.size == 5 and drafter.propose([1, 2, 3, 1], 1) == Draft((2,))
    # it cannot be pruned: the next prune waits for capacity / 2 more nodes
    assert drafter.trie.limit == 7
    drafter.accept((9, 8))  # 9 nodes: the generated ones go, the prompt's stay
    assert counts(drafter.trie) == {(1,): (0.0, 1), (2,): (0.0, 1), (3,): (0.0, 1),
                                    (1, 2): (0.0, 1), (2, 3): (0.0, 1)}
    check_trie(drafter.trie)


def test_capacity_bounds_the_trie_over_a_long_stream():
    rng = random.Random(2)
    drafter = PiaTrie(branch_length=4, capacity=200)
    drafter.begin(DraftRequest((0,), "g"))
    for _ in range(3000):
        drafter.accept((rng.randrange(50),))
        assert drafter.trie.size <= 200
    check_trie(drafter.trie)


# --- bounded work per token --------------------------------------------------------------------

def visits(drafter: PiaTrie, call, *args) -> int:
    before = drafter.visits
    call(*args)
    return drafter.visits - before


@pytest.mark.parametrize("length", [1_000, 10_000])
def test_accept_touches_one_node_per_open_window(length):
    rng = random.Random(3)
    drafter = PiaTrie(branch_length=12)
    prompt = tuple(rng.randrange(100) for _ in range(length))
    drafter.begin(DraftRequest(prompt, "g"))
    # 12 windows are open, and each new token opens one more: 13 nodes, at any length
    assert [visits(drafter, drafter.accept, (rng.randrange(100),)) for _ in range(5)] == [13] * 5
    assert visits(drafter, drafter.accept, (1, 2, 3)) == 39


@pytest.mark.parametrize("length", [1_000, 10_000])
def test_propose_work_does_not_grow_with_the_context_or_the_fan_out(length):
    rng = random.Random(4)
    # token 0 is followed by up to `length` / 2 different tokens
    prompt = [t for _ in range(length // 2) for t in (0, rng.randrange(1, 50_000))]
    prompt += [50_001, 0]
    drafter = PiaTrie()
    drafter.begin(DraftRequest(tuple(prompt), "g"))
    # prefix walks (50_001, 0), which has no continuation, then (0): 2 + 1 nodes, and
    # one gather of max_nodes pops
    work = visits(drafter, drafter.propose, prompt, 8)
    draft = drafter.propose(prompt, 8)
    assert len(draft) == 63 and draft.depth <= 8
    assert work == 3 + 63


# --- losslessness through the engine ------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_llama():
    return wrap_model(tiny_model("llama"), name="tiny-llama")


@pytest.mark.parametrize("temperature, seeds", [(0.0, (100, 101, 102)), (0.6, (100, 101, 100))])
def test_pia_trees_are_lossless_across_samples(tiny_llama, temperature, seeds):
    # the repeated seed at T=0.6 repeats a sample, so tree paths are accepted there too
    target = tiny_llama
    drafter = PiaTrie()
    prompt = (1, 17, 42, 99, 250, 3, 77, 17, 42)
    trees = accepted_in_trees = 0
    for sample, seed in enumerate(seeds):
        request = GenerationRequest(prompt, 24, Sampler(temperature, seed), group="p",
                                    sample=sample)
        baseline = generate(target, request)
        speculative = generate(target, request, drafter, k=6, drafter_name="pia")
        assert speculative.tokens == baseline.tokens
        assert speculative.stop == baseline.stop
        trees += sum(step.drafted > step.depth for step in speculative.steps)
        accepted_in_trees += sum(step.accepted for step in speculative.steps
                                 if step.drafted > step.depth)
    assert trees > 0 and accepted_in_trees > 0
