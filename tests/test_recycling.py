"""Token Recycling: exact trees from hand-filled adjacency matrices, the paper's
template, matrix update and sharing semantics, and losslessness through the engine."""

from __future__ import annotations

from typing import Sequence

import pytest
import torch

from conftest import tiny_model
from pytest_specdec.drafters.recycling import (PAPER_TREE, TokenRecycling, build_template,
                                               paper_children)
from pytest_specdec.engine import SIGNAL_TOP_K, GenerationRequest, generate
from pytest_specdec.engine.target import wrap_model
from pytest_specdec.protocol.drafter import MAX_DRAFT_NODES, Draft, DraftRequest, TargetSignals
from pytest_specdec.protocol.sampling import Sampler


def signals(rows: Sequence[tuple[int, Sequence[int]]]) -> TargetSignals:
    """What one target forward reports: (scored token, its top-K successors) per row."""
    return TargetSignals(top_k=torch.tensor([list(top) for _, top in rows], dtype=torch.int64),
                         top_k_after=tuple(token for token, _ in rows))


def filled(rows: Sequence[tuple[int, Sequence[int]]], **options) -> TokenRecycling:
    drafter = TokenRecycling(**options)
    drafter.begin(DraftRequest((0,), "g"))
    drafter.observe(signals(rows))
    return drafter


# token -> its top-3 successors; 13, 21, 22, 30, ... have no row
MATRIX = [
    (1, (10, 11, 12)),
    (10, (20, 21, 22)),
    (11, (30, 31, 32)),
    (12, (50, 51, 52)),
    (20, (40, 41, 42)),
    (40, (1, 10, 11)),
    (5, (10, 13, 12)),
]

# --- exact trees ----------------------------------------------------------------------------

TREE_CASES = [
    # id, options, context, k, expected tokens, expected parents
    ("top1-chain", {"branching": "1,1,1"}, [7, 1], 3, (10, 20, 40), (-1, 0, 1)),
    ("root-fan", {"branching": "3"}, [1], 4, (10, 11, 12), (-1, -1, -1)),
    ("two-by-two", {"branching": "2,2"}, [1], 2,
     (10, 11, 20, 21, 30, 31), (-1, -1, 0, 0, 1, 1)),
    ("children-of-unknown-tokens-dropped", {"branching": "2,2,1"}, [1], 3,
     (10, 11, 20, 21, 30, 31, 40), (-1, -1, 0, 0, 1, 1, 2)),
    ("dropped-node-keeps-later-parents-right", {"branching": "3,1,1"}, [5], 3,
     (10, 13, 12, 20, 50, 40), (-1, -1, -1, 0, 2, 3)),
    ("unknown-root", {"branching": "2,2"}, [1, 99], 4, (), ()),
    ("depth-cut-at-k", {"branching": "2,2,1"}, [1], 2,
     (10, 11, 20, 21, 30, 31), (-1, -1, 0, 0, 1, 1)),
    ("k-1-is-the-root-fan", {"branching": "2,2,1"}, [1], 1, (10, 11), (-1, -1)),
    ("k-0", {"branching": "2,2,1"}, [1], 0, (), ()),
    ("max-nodes-cut", {"branching": "2,2", "max_nodes": 3}, [1], 2, (10, 11, 20), (-1, -1, 0)),
    ("max-nodes-1", {"max_nodes": 1}, [1], 5, (10,), (-1,)),
    ("max-nodes-cut-before-depth-cut", {"branching": "2,2,1", "max_nodes": 5}, [1], 3,
     (10, 11, 20, 21, 30), (-1, -1, 0, 0, 1)),
    ("rank-beyond-the-row", {"branching": "5"}, [1], 1, (10, 11, 12), (-1, -1, -1)),
    ("tokens-repeat-along-a-cycle", {"branching": "1,1,1,1,1"}, [1], 5,
     (10, 20, 40, 1, 10), (-1, 0, 1, 2, 3)),
    ("paper-tree-k-1", {}, [1], 1, (10, 11, 12), (-1, -1, -1)),
    ("paper-tree-k-2", {}, [1], 2,
     (10, 11, 12, 20, 21, 22, 30, 31, 32, 50, 51, 52),
     (-1, -1, -1, 0, 0, 0, 1, 1, 1, 2, 2, 2)),
    # of the depth-2 nodes only 20 has a row; ranks past the 3-wide rows are dropped
    ("paper-tree-k-3", {}, [1], 3,
     (10, 11, 12, 20, 21, 22, 30, 31, 32, 50, 51, 52, 40, 41, 42),
     (-1, -1, -1, 0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3)),
]


@pytest.mark.parametrize("options, context, k, tokens, parents",
                         [c[1:] for c in TREE_CASES], ids=[c[0] for c in TREE_CASES])
def test_recycling_trees(options, context, k, tokens, parents):
    draft = filled(MATRIX, **options).propose(tuple(context), k)
    assert isinstance(draft, Draft)
    assert draft == (Draft(tokens, parents) if tokens else Draft())
    assert draft.depth <= k


def test_empty_matrix_and_empty_context_give_empty_drafts():
    assert TokenRecycling().propose((1, 2, 3), 5) == Draft()
    assert filled(MATRIX).propose((), 5) == Draft()


def test_propose_reads_only_the_last_context_token():
    class LastOnly(Sequence[int]):
        def __len__(self) -> int:
            return 10**6

        def __getitem__(self, index):
            assert index == -1, f"read context[{index!r}]"
            return 1

        def __iter__(self):
            raise AssertionError("iterated the context")

    assert filled(MATRIX, branching="3").propose(LastOnly(), 2) == Draft((10, 11, 12), (-1, -1, -1))


# --- the paper's template --------------------------------------------------------------------

def test_paper_template_shape():
    template = build_template(paper_children, MAX_DRAFT_NODES)
    assert len(template) == 80 == sum(map(sum, PAPER_TREE))
    widths = [sum(1 for node in template if node.depth == d) for d in range(1, 8)]
    assert widths == [8, 21, 25, 15, 8, 3, 0]
    # breadth-first, parents first, and each node's children are ranks 0..n-1
    assert [node.depth for node in template] == sorted(node.depth for node in template)
    for i, node in enumerate(template):
        assert node.parent < i
        siblings = [n.rank for n in template if n.parent == node.parent]
        assert siblings == list(range(len(siblings)))
    # the all-top-1 path reaches the bottom
    assert sum(1 for node in template if node.rank == 0) >= 6


def test_paper_tree_on_a_full_matrix():
    # every token t has successors t+1..t+8, so a node's token is its parent's + rank + 1
    full = [(t, range(t + 1, t + 1 + SIGNAL_TOP_K)) for t in range(64)]
    drafter = filled(full)
    draft = drafter.propose((0,), 10)
    assert len(draft) == 80 and draft.depth == 6
    for token, parent, node in zip(draft.tokens, draft.parents, drafter.template):
        above = 0 if parent < 0 else draft.tokens[parent]
        assert token == above + node.rank + 1
    assert draft.tokens[:8] == tuple(range(1, 9))
    assert len(drafter.propose((0,), 3)) == 8 + 21 + 25
    assert len(TokenRecycling(max_nodes=30).propose((0,), 10)) == 0  # no rows yet
    assert len(filled(full, max_nodes=30).propose((0,), 10)) == 30


def test_branching_template_is_cut_at_max_nodes():
    # 8 + 64 + 512 + ... nodes: only the first max_nodes are ever built
    assert len(TokenRecycling(branching="8,8,8,8,8,8", max_nodes=MAX_DRAFT_NODES).template) \
        == MAX_DRAFT_NODES
    assert len(TokenRecycling(branching="8,8,8,8,8,8", max_nodes=100).template) == 100


# --- matrix updates -------------------------------------------------------------------------

def test_later_observations_overwrite_rows():
    drafter = filled(MATRIX, branching="3")
    drafter.observe(signals([(1, (60, 61, 62))]))
    assert drafter.propose((1,), 1) == Draft((60, 61, 62), (-1, -1, -1))
    # other rows are kept
    assert drafter.propose((10,), 1) == Draft((20, 21, 22), (-1, -1, -1))


def test_later_row_wins_within_one_forward():
    drafter = filled([(1, (10, 11, 12)), (7, (70, 71, 72)), (1, (60, 61, 62))], branching="3")
    assert drafter.successors == {1: (60, 61, 62), 7: (70, 71, 72)}


def test_observe_without_top_k_after_changes_nothing():
    drafter = filled(MATRIX)
    before = dict(drafter.successors)
    drafter.observe(TargetSignals(top_k=torch.zeros(2, 3, dtype=torch.int64)))
    drafter.observe(TargetSignals())
    assert drafter.successors == before


def test_observe_rejects_rows_that_do_not_match_their_tokens():
    with pytest.raises(ValueError):
        TokenRecycling().observe(TargetSignals(top_k=torch.zeros(2, 3, dtype=torch.int64),
                                               top_k_after=(1,)))


@pytest.mark.parametrize("share, expected", [(True, Draft((10, 11), (-1, -1))), (False, Draft())])
def test_matrix_across_sequences(share, expected):
    drafter = filled(MATRIX, branching="2", share_across_sequences=share)
    assert drafter.propose((1,), 1) == Draft((10, 11), (-1, -1))
    drafter.end()
    # a later sequence, even of another problem: the paper keeps the matrix across queries
    drafter.begin(DraftRequest((3, 1), "other", sample=1))
    assert drafter.propose((3, 1), 1) == expected
    drafter.observe(signals([(1, (15, 16))]))
    assert drafter.propose((3, 1), 1) == Draft((15, 16), (-1, -1))


@pytest.mark.parametrize("options, message", [
    ({"max_nodes": 0}, "max_nodes must be an integer in [1, 256], got 0"),
    ({"max_nodes": MAX_DRAFT_NODES + 1}, "got 257"),
    ({"max_nodes": True}, "got True"),
    ({"branching": ""}, "got ''"),
    ({"branching": "0,1"}, "got '0,1'"),
    ({"branching": f"{SIGNAL_TOP_K + 1}"}, f"got '{SIGNAL_TOP_K + 1}'"),
    ({"branching": "2,,1"}, "got '2,,1'"),
    ({"branching": "a,b"}, "got 'a,b'"),
    ({"branching": "Paper"}, "got 'Paper'"),
    ({"share_across_sequences": "no"}, "got 'no'"),
])
def test_invalid_options_raise_naming_the_value(options, message):
    with pytest.raises(ValueError) as info:
        TokenRecycling(**options)
    assert message in str(info.value)


def test_valid_options():
    drafter = TokenRecycling(max_nodes=MAX_DRAFT_NODES, branching="8,4,2,2,1,1",
                             share_across_sequences=False)
    assert len(drafter.template) == MAX_DRAFT_NODES  # of 8 + 32 + 64 + 128 + ...
    assert [n.depth for n in TokenRecycling(branching="2,1").template] == [1, 1, 2, 2]
    assert TokenRecycling.needs == frozenset({"top_k"})


# --- through the engine ---------------------------------------------------------------------

class Recording(TokenRecycling):
    """Token Recycling that records each step's draft, root token and signals."""

    def __init__(self, **options):
        super().__init__(**options)
        self.steps: list[dict] = []

    def propose(self, context, k):
        draft = super().propose(context, k)
        self.steps.append({"root": context[-1], "draft": draft})
        return draft

    def observe(self, signals):
        self.steps[-1]["signals"] = signals
        super().observe(signals)

    def accept(self, tokens):
        self.steps[-1]["emitted"] = tuple(tokens)


@pytest.fixture(scope="module")
def llama():
    """A tiny random Llama with its output logits scaled up: sampling at T=0.6 then
    still repeats itself often enough that recycled successors get accepted."""
    model = tiny_model("llama")
    with torch.no_grad():
        model.lm_head.weight.mul_(10)
    return wrap_model(model, name="tiny-llama-sharp")


PROMPT = (1, 17, 42, 99, 250, 3, 77, 17, 42)


def test_engine_observes_the_root_then_every_draft_node(llama):
    drafter = Recording()
    request = GenerationRequest(PROMPT, 40, Sampler(0.0, 0), group="p")
    out = generate(llama, request, drafter, k=4, drafter_name="recycling")
    assert sum(len(step["emitted"]) for step in drafter.steps) == len(out.tokens)
    trees = 0
    for step in drafter.steps:
        draft, got = step["draft"], step["signals"]
        assert got.top_k_after == (step["root"], *draft.tokens)
        assert tuple(got.top_k.shape) == (1 + len(draft), SIGNAL_TOP_K)
        # at T=0 the target's top-1 after the root and after each accepted node is the
        # next emitted token: the rows line up with the nodes they are named after
        node, emitted = -1, step["emitted"]
        assert got.top_k[0, 0].item() == emitted[0]
        for j, token in enumerate(emitted[:-1]):
            node = next(i for i, (t, p) in enumerate(zip(draft.tokens, draft.parents))
                        if t == token and p == node)
            assert got.top_k[1 + node, 0].item() == emitted[j + 1]
        trees += not draft.is_chain
    assert trees > 0


@pytest.mark.parametrize("temperature, seed", [(0.0, 0), (0.6, 1)])
def test_recycling_is_lossless(llama, temperature, seed):
    drafter = TokenRecycling()
    accepted = trees = 0
    for sample in range(2):
        request = GenerationRequest(PROMPT, 48, Sampler(temperature, seed + 10 * sample),
                                    group="p", sample=sample)
        baseline = generate(llama, request)
        recycled = generate(llama, request, drafter, k=5, drafter_name="recycling")
        assert recycled.tokens == baseline.tokens
        assert recycled.stop == baseline.stop
        assert recycled.stats.new_tokens == len(recycled.tokens)
        assert recycled.stats.steps < baseline.stats.steps
        accepted += recycled.stats.accepted
        trees += sum(step.drafted > step.depth for step in recycled.steps)
    # wide trees were verified and some of their paths accepted: the tree path is exercised
    assert trees > 0 and accepted > 0


def test_matrix_shared_across_samples_saves_steps(llama):
    def steps_of_second_sample(share: bool) -> int:
        drafter = TokenRecycling(share_across_sequences=share)
        runs = [generate(llama, GenerationRequest(PROMPT, 48, Sampler(0.0, 0), group="p",
                                                  sample=sample), drafter, k=5)
                for sample in range(2)]
        assert runs[0].tokens == runs[1].tokens
        return runs[1].stats.steps

    # the second sample starts with the matrix the first one filled
    assert steps_of_second_sample(True) < steps_of_second_sample(False)
