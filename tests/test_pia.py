"""PIA's branch trie drafter against the reference's rules (lookahead_cache.py): exact
tree drafts for hand-made token lists (prompt counts against output counts, the
output threshold of large subtrees, the fallback to the shorter query), the trie's
counts, branch eliminating, per-sequence pruning, bounded work per token, and
losslessness of tree drafts through the engine."""

from __future__ import annotations

import random
from typing import Sequence

import pytest

from conftest import tiny_model
from pytest_specdec.drafters.pia import BranchTrie, PiaTrie
from pytest_specdec.engine import GenerationRequest, generate
from pytest_specdec.engine.target import wrap_model
from pytest_specdec.protocol.drafter import MAX_DRAFT_NODES, Draft, DraftRequest, validate_draft
from pytest_specdec.protocol.sampling import Sampler


def propose(prompt: Sequence[int], accepted: Sequence[int] = (), k: int = 4,
            group: str = "g", drafter: PiaTrie | None = None, **options) -> Draft:
    """Begin a sequence with `prompt`, accept `accepted`, then propose up to k deep."""
    drafter = drafter if drafter is not None else PiaTrie(**options)
    drafter.begin(DraftRequest(tuple(prompt), group))
    if accepted:
        drafter.accept(tuple(accepted))
    return drafter.propose(tuple(prompt) + tuple(accepted), k)


def run(drafter: PiaTrie, prompt: Sequence[int], output: Sequence[int], group: str = "A",
        sample: int = 0) -> None:
    """One whole sequence: prompt, generated tokens, end."""
    drafter.begin(DraftRequest(tuple(prompt), group, sample))
    drafter.accept(tuple(output))
    drafter.end()


def tree(tokens: Sequence[int], parents: Sequence[int]) -> Draft:
    return Draft(tuple(tokens), tuple(parents))


def counts(trie: BranchTrie) -> dict[tuple[int, ...], tuple[float, float]]:
    """(key token, *branch path) -> (prompt count, output count) of every node."""
    found = {}
    stack = [((key,), tree) for key, tree in trie.trees.items()]
    while stack:
        path, node = stack.pop()
        for token, child in node.children.items():
            found[path + (token,)] = (child.prompt, child.output)
            stack.append((path + (token,), child))
    return found


# --- exact drafts ------------------------------------------------------------------------
# Prompts start with 0: the reference inserts input_ids[1:], so the first token is no key.

# history for the fallback case: an output 2 5 2 5 2 5 (output counts 5: 3, 5 2: 2, ...)
HISTORY = [((0,), (2, 5, 2, 5, 2, 5))]

PIA_CASES = [
    # id, earlier sequences (prompt, output), prompt, accepted, k, options, expected draft
    # after (5, 6): 7 once in the prompt, 8 three times in the output: prompt counts
    # are weighted 0.9999, output counts 0.0001, so the prompt's continuation comes first
    ("prompt-counts-decide", [], [0, 5, 6, 7], [5, 6, 8, 5, 6, 8, 5, 6, 8, 5, 6], 1, {},
     tree((7, 8), (-1, -1))),
    # 7 and 8 once each in the prompt: the output's 8 breaks the tie
    ("output-counts-break-ties", [], [0, 5, 6, 7, 5, 6, 8], [5, 6, 8, 5, 6], 1, {},
     tree((8, 7), (-1, -1))),
    ("equal-scores-in-order-of-creation", [], [0, 5, 6, 7, 5, 6, 8, 5, 6], [], 1, {},
     tree((7, 8), (-1, -1))),
    # depth first: each branch whole before the next sibling
    ("depth-first-branches", [], [0, 1, 2, 3, 4, 1, 2, 5, 6, 1, 2], [], 3, {},
     tree((3, 4, 1, 5, 6, 1), (-1, 0, 1, -1, 3, 4))),
    ("node-budget-cuts-depth-first", [], [0, 1, 2, 3, 4, 1, 2, 5, 6, 1, 2], [], 3,
     {"max_nodes": 4}, tree((3, 4, 1, 5), (-1, 0, 1, -1))),
    # (1, 2) gives 3 nodes, as many as depth 3 - 1 needs: the 2-token query stands
    ("full-draft-keeps-the-2-token-query", [], [0, 1, 2, 3, 4, 5, 9, 2, 6, 1, 2], [], 3, {},
     Draft((3, 4, 5))),
    ("5-nodes-for-depth-5", [], [0, 1, 2, 3, 4, 5, 9, 2, 6, 1, 2], [], 5, {},
     Draft((3, 4, 5, 9, 2))),
    # at depth 12, (1, 2) gives 8 nodes < 11: the query 2 is searched, and its draft
    # replaces the first (it also holds the branch 6 1 2 that followed the other 2)
    ("short-draft-falls-back-to-the-1-token-query", [], [0, 1, 2, 3, 4, 5, 9, 2, 6, 1, 2],
     [], 12, {}, tree((3, 4, 5, 9, 2, 6, 1, 2, 6, 1, 2), (-1, 0, 1, 2, 3, 4, 5, 6, -1, 8, 9))),
    ("max-prefix-1-queries-the-last-token", [], [0, 1, 2, 3, 4, 5, 9, 2, 6, 1, 2], [], 3,
     {"max_prefix": 1}, tree((3, 4, 5, 6, 1, 2), (-1, 0, 1, -1, 3, 4))),
    # (7, 2) gives 8 9 (max_nodes 2; the subtree has 6 live nodes > 3, but no output
    # counts, so the threshold is 0). The fallback's tree of 2 has 11 live nodes > 3:
    # only nodes with an output count >= the largest ((3 + 1) // 2 = 1st) are drafted:
    # 5 (3), not 8 (prompt only), not 5 2 (2). Its 1 node replaces the 2.
    ("fallback-replaces-even-with-fewer-nodes", HISTORY, [0, 7, 2, 8, 9, 10, 11, 7, 2], [],
     12, {"max_nodes": 2}, Draft((5,))),
    ("no-history-same-query", [], [0, 7, 2, 8, 9, 10, 11, 7, 2], [], 12, {"max_nodes": 2},
     Draft((8, 9))),
    # (7, 2) gives 4 nodes < 11, so the tree of 2 is searched: 9 live nodes, no
    # threshold; the prompt's 8 (score 0.9999) before the output's 5 (0.0003)
    ("small-subtree-drafts-every-node", HISTORY, [0, 7, 2, 8, 9, 7, 2], [], 12, {},
     tree((8, 9, 7, 2, 5, 2, 5, 2, 5), (-1, 0, 1, 2, -1, 4, 5, 6, 7))),
    # a 3-token query: the tree of 1 searched for 2 3 (only 4 followed 1 2 3)
    ("3-token-query", [], [0, 1, 2, 3, 4, 9, 2, 3, 5, 1, 2, 3], [], 1, {"max_prefix": 3},
     Draft((4,))),
    ("2-token-query-same-text", [], [0, 1, 2, 3, 4, 9, 2, 3, 5, 1, 2, 3], [], 1, {},
     tree((4, 5), (-1, -1))),
    ("no-tree-for-the-query", [], [0, 1, 2, 3, 4], [], 4, {}, Draft()),
    ("first-prompt-token-is-no-key", [], [5, 6, 7, 9, 5], [], 2, {}, Draft()),
    ("single-token-context", [], [7], [], 4, {}, Draft()),
    ("k-0", [], [0, 1, 2, 3, 1, 2], [], 0, {}, Draft()),
    ("accepted-tokens-are-inserted", [], [0, 1, 2, 3], [4, 1, 2, 3, 1, 2], 3, {}, Draft((3, 1, 2))),
    # branches do not cross from the prompt into the output
    ("no-branch-across-the-prompt-end", [], [0, 5, 6], [7, 8, 5, 6], 2, {}, Draft()),
    # branch_length 2: at most 2 deep, and 2 nodes are a full draft (no fallback)
    ("branch-length-cuts-the-draft", [], [0, 1, 2, 3, 4, 5, 6, 1, 2], [], 12,
     {"branch_length": 2}, Draft((3, 4))),
]


@pytest.mark.parametrize("earlier, prompt, accepted, k, options, expected",
                         [c[1:] for c in PIA_CASES], ids=[c[0] for c in PIA_CASES])
def test_pia_drafts(earlier, prompt, accepted, k, options, expected):
    drafter = PiaTrie(**options)
    for earlier_prompt, output in earlier:
        run(drafter, earlier_prompt, output)
    draft = propose(prompt, accepted, k, drafter=drafter)
    assert draft == expected
    validate_draft(draft, drafter="pia", k=max(k, 1), vocab_size=100)


def test_accepting_in_pieces_equals_accepting_at_once():
    pieces = PiaTrie(branch_length=3)
    pieces.begin(DraftRequest((0, 1, 2, 3), "g"))
    for chunk in [(4,), (1, 2), (3, 5, 1), (2,)]:
        pieces.accept(chunk)
    at_once = PiaTrie(branch_length=3)
    context = (0, 1, 2, 3, 4, 1, 2, 3, 5, 1, 2)
    expected = propose(context[:4], context[4:], 3, drafter=at_once)
    assert pieces.propose(context, 3) == expected
    assert counts(pieces.trie) == counts(at_once.trie)


# --- the trie ----------------------------------------------------------------------------

def test_counts_separate_prompt_and_output_branches():
    drafter = PiaTrie(branch_length=1)  # branches of 2 tokens after their key
    drafter.begin(DraftRequest((0, 1, 2, 1, 2), "g"))
    drafter.accept((3, 4, 3))
    assert counts(drafter.trie) == {
        # the prompt without its first token: 1 2 1 2, branches stop at its end
        (1, 2): (2, 0), (1, 2, 1): (1, 0), (2, 1): (1, 0), (2, 1, 2): (1, 0),
        # the output 3 4 3: its branches start at its first token
        (3, 4): (0, 1), (3, 4, 3): (0, 1), (4, 3): (0, 1),
    }
    drafter.end()  # branch eliminating: prompt counts reset, the nodes stay
    assert counts(drafter.trie) == {
        (1, 2): (0, 0), (1, 2, 1): (0, 0), (2, 1): (0, 0), (2, 1, 2): (0, 0),
        (3, 4): (0, 1), (3, 4, 3): (0, 1), (4, 3): (0, 1),
    }


def test_eliminated_prompt_branches_are_still_drafted_where_the_subtree_is_small():
    # as in the reference: reset counts leave the nodes, which rank last
    drafter = PiaTrie()
    run(drafter, (0, 4, 5, 6), ())
    assert propose((4, 9, 4), k=2, group="B", drafter=drafter) == Draft((5, 6))


def test_outputs_add_up_across_samples():
    drafter = PiaTrie()
    for sample, output in enumerate([(1, 41, 42, 43), (1, 41, 42, 50), (1, 41, 42, 43)]):
        run(drafter, (0,), output, sample=sample)
    # 42 43 twice, 42 50 once: equal prompt counts (0), the output counts decide
    assert propose((0, 9, 1, 41), k=2, drafter=drafter) == tree((42, 43, 50), (-1, 0, 0))
    assert counts(drafter.trie)[(1, 41, 42, 43)] == (0, 2)


def test_begin_without_end_ends_the_open_sequence():
    drafter = PiaTrie()
    drafter.begin(DraftRequest((0, 10, 11, 12), "A"))
    drafter.begin(DraftRequest((0, 50), "B"))
    assert counts(drafter.trie)[(10, 11)] == (0, 0)  # the first prompt was eliminated
    drafter.end()
    drafter.end()  # a second end is harmless


def test_drafts_obey_the_protocol_on_random_text():
    rng = random.Random(1)
    drafter = PiaTrie(max_nodes=20, max_prefix=3)
    context = [rng.randrange(8) for _ in range(30)]
    drafter.begin(DraftRequest(tuple(context), "g"))
    for _ in range(200):
        k = rng.randrange(1, 13)
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
    ({"max_prefix": 0}, "max_prefix must be in [1, branch_length + 1 = 13], got 0"),
    ({"max_prefix": 6, "branch_length": 4},
     "max_prefix must be in [1, branch_length + 1 = 5], got 6"),
    ({"max_output_nodes": 0}, "max_output_nodes must be >= 1, got 0"),
])
def test_invalid_parameters_raise_naming_the_values(options, message):
    with pytest.raises(ValueError) as info:
        PiaTrie(**options)
    assert str(info.value) == message


def test_defaults_are_the_reference_configuration():
    drafter = PiaTrie()
    assert (drafter.branch_length, drafter.max_nodes, drafter.max_prefix,
            drafter.max_output_nodes, drafter.trie.squeeze_after) == (12, 63, 2, 512, 1024)


# --- pruning, per sequence -----------------------------------------------------------------

PRUNED = {  # output 5 6 5 6 5 7 with branches of 2, after one squeeze
    (5, 6): (0, 1.0), (5, 6, 5): (0, 1.0),  # 5 6: 2 -> 1, 5 6 5: 2 -> 1; 5 7 (1) dropped
    (6, 5): (0, 1.0),  # 6 5: 2 -> 1; 6 5 6 (1) and 6 5 7 (1) dropped
}
UNPRUNED = {(5, 6): (0, 2), (5, 6, 5): (0, 2), (5, 7): (0, 1),
            (6, 5): (0, 2), (6, 5, 6): (0, 1), (6, 5, 7): (0, 1)}


@pytest.mark.parametrize("squeeze_after, max_output_nodes, expected, nodes, changed", [
    # 2 trees changed, each with 3 output nodes > 2: both pruned, recounted
    (2, 2, PRUNED, [2, 1], set()),
    # pruning waits for 3 changed trees: the 2 are remembered
    (3, 2, UNPRUNED, [3, 3], {5, 6}),
    # due, but no tree holds more than 3 output nodes: nothing pruned, the set restarts
    (2, 3, UNPRUNED, [3, 3], set()),
])
def test_pruning_halves_output_counts_at_the_end_of_a_sequence(squeeze_after, max_output_nodes,
                                                               expected, nodes, changed):
    drafter = PiaTrie(branch_length=1, max_output_nodes=max_output_nodes)
    drafter.trie.squeeze_after = squeeze_after
    drafter.begin(DraftRequest((0,), "g"))
    drafter.accept((5, 6, 5, 6, 5, 7))
    assert counts(drafter.trie) == UNPRUNED  # never during a sequence
    drafter.end()
    assert counts(drafter.trie) == expected
    assert [drafter.trie.trees[key].nodes for key in (5, 6)] == nodes
    assert drafter.trie.changed == changed


def test_pruning_after_many_sequences_keeps_the_trees_small():
    rng = random.Random(2)
    outputs = [[rng.randrange(12) for _ in range(60)] for _ in range(40)]
    pruned, kept = PiaTrie(branch_length=4, max_output_nodes=20), PiaTrie(branch_length=4)
    pruned.trie.squeeze_after = 5
    for sample, output in enumerate(outputs):
        for drafter in (pruned, kept):
            run(drafter, (0,), output, sample=sample)
        assert len(pruned.trie.changed) < 5  # due at every sequence's end: all 12 changed
    for drafter in (pruned, kept):
        for tree in drafter.trie.trees.values():
            assert tree.nodes == sum(1 for path in counts(drafter.trie) if path[0] is not None
                                     and tree is drafter.trie.trees[path[0]])
    sizes = [sum(t.nodes for t in d.trie.trees.values()) for d in (pruned, kept)]
    assert sizes[0] < sizes[1] // 2
    # what stays was output more than once since the last pruning: every count positive
    assert all(output > 0 for _, output in counts(pruned.trie).values())


# --- bounded work per token --------------------------------------------------------------------

def visits(drafter: PiaTrie, call, *args) -> int:
    before = drafter.visits
    call(*args)
    return drafter.visits - before


@pytest.mark.parametrize("length", [1_000, 10_000])
def test_accept_touches_one_node_per_open_branch(length):
    rng = random.Random(3)
    drafter = PiaTrie(branch_length=12)
    drafter.begin(DraftRequest((0,), "g"))
    drafter.accept(tuple(rng.randrange(100) for _ in range(length)))
    # 13 branches are open (each holds 13 tokens after its key), at any length
    assert [visits(drafter, drafter.accept, (rng.randrange(100),)) for _ in range(5)] == [13] * 5
    assert visits(drafter, drafter.accept, (1, 2, 3)) == 39


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
