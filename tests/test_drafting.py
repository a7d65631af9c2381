"""The shared drafter parts (pytest_specdec.protocol.drafting): the per-problem memory, best-first
selection of a counted trie's top nodes, the counted trie, and chain-or-tree drafts."""

from __future__ import annotations

import random

import pytest

from pytest_specdec.protocol.drafter import Draft, DraftRequest, validate_draft
from pytest_specdec.protocol.drafting import CountedTrie, ProblemMemory, best_first, tree_draft


# --- ProblemMemory ---------------------------------------------------------------------

def request(prompt, group="A", sample=0):
    return DraftRequest(tuple(prompt), group, sample)


MEMORY_CASES = [
    # id, script of (call, argument), expected sequences per group after it
    ("one-sequence", [("begin", ((1, 2), "A")), ("extend", (3,)), ("end", None)],
     {"A": ((1, 2, 3),), "B": ()}),
    ("samples-in-order", [("begin", ((1,), "A")), ("extend", (2,)), ("end", None),
                          ("begin", ((1,), "A")), ("extend", (3, 4)), ("end", None)],
     {"A": ((1, 2), (1, 3, 4))}),
    ("problems-apart", [("begin", ((1,), "A")), ("end", None), ("begin", ((5,), "B")),
                        ("extend", (6,)), ("end", None)],
     {"A": ((1,),), "B": ((5, 6),)}),
    ("begin-without-end-files-the-open-one", [("begin", ((1,), "A")), ("extend", (2,)),
                                              ("begin", ((7,), "B"))],
     {"A": ((1, 2),), "B": ()}),
    ("second-end-is-harmless", [("begin", ((1,), "A")), ("end", None), ("end", None)],
     {"A": ((1,),)}),
    ("empty-sequence-is-not-filed", [("begin", ((), "A")), ("end", None)], {"A": ()}),
    ("open-sequence-is-not-filed", [("begin", ((1,), "A")), ("extend", (2,))], {"A": ()}),
]


@pytest.mark.parametrize("script, expected", [c[1:] for c in MEMORY_CASES],
                         ids=[c[0] for c in MEMORY_CASES])
def test_problem_memory_files_finished_sequences_per_problem(script, expected):
    memory = ProblemMemory()
    for call, argument in script:
        if call == "begin":
            memory.begin(request(*argument))
        elif call == "extend":
            memory.extend(argument)
        else:
            memory.end()
    assert {group: memory.sequences(group) for group in expected} == expected


def test_problem_memory_follows_the_open_sequence():
    memory = ProblemMemory()
    assert (memory.group, memory.current, memory.is_open) == ("", [], False)
    memory.begin(request((1, 2), "A"))
    memory.extend((3,))
    memory.extend([4, 5])
    assert (memory.group, memory.current, memory.is_open) == ("A", [1, 2, 3, 4, 5], True)
    assert memory.sequences() == ()  # the open sequence is not an earlier one
    assert memory.end() == (1, 2, 3, 4, 5)
    assert (memory.current, memory.is_open) == ([], False)
    assert memory.end() is None
    memory.begin(request((9,), "A"))
    assert memory.sequences() == ((1, 2, 3, 4, 5),)  # default: the open sequence's problem


def test_problem_memory_index_gets_the_previous_index_and_every_sequence():
    calls = []

    def index(previous, sequences):
        calls.append((previous, sequences))
        return len(sequences)

    memory = ProblemMemory(index)
    for group, prompt in [("A", (1,)), ("B", (5,)), ("A", (2,))]:
        memory.begin(request(prompt, group))
        memory.end()
    assert calls == [(None, ((1,),)), (None, ((5,),)), (1, ((1,), (2,)))]
    assert (memory.index("A"), memory.index("B"), memory.index("C")) == (2, 1, None)


def test_problem_memory_without_keep_files_nothing():
    memory = ProblemMemory(lambda previous, sequences: pytest.fail("no index without keep"),
                           keep=False)
    memory.begin(request((1, 2), "A"))
    memory.extend((3,))
    assert memory.end() == (1, 2, 3)
    assert memory.sequences("A") == () and memory.index("A") is None


# --- best_first ----------------------------------------------------------------------------

# a tree as nested (name, score, children); smaller score = better
TREE = [
    ("a", 1, [("a1", 2, [("a11", 5, [])]), ("a2", 4, [])]),
    ("b", 3, [("b1", 3, [])]),
    ("c", 6, []),
]


def select(tree, max_nodes, max_depth):
    names, parents = best_first(tree, lambda node: node[2], lambda node: node[1],
                                max_nodes, max_depth)
    return [node[0] for node in names], parents


BEST_FIRST_CASES = [
    # id, max_nodes, max_depth, expected names, expected parents
    ("all", 10, 10, ["a", "a1", "b", "b1", "a2", "a11", "c"], [-1, 0, -1, 2, 0, 1, -1]),
    ("cut-by-count", 3, 10, ["a", "a1", "b"], [-1, 0, -1]),
    # b and b1 share score 3: b was offered first (a sibling of a), b1 only once b is taken
    ("equal-scores-in-offer-order", 4, 10, ["a", "a1", "b", "b1"], [-1, 0, -1, 2]),
    ("depth-1", 10, 1, ["a", "b", "c"], [-1, -1, -1]),
    ("depth-2", 10, 2, ["a", "a1", "b", "b1", "a2", "c"], [-1, 0, -1, 2, 0, -1]),
    ("one-node", 1, 10, ["a"], [-1]),
    ("no-nodes", 0, 10, [], []),
    ("no-depth", 5, 0, [], []),
]


@pytest.mark.parametrize("max_nodes, max_depth, names, parents",
                         [c[1:] for c in BEST_FIRST_CASES], ids=[c[0] for c in BEST_FIRST_CASES])
def test_best_first(max_nodes, max_depth, names, parents):
    assert select(TREE, max_nodes, max_depth) == (names, parents)


def test_best_first_on_an_empty_tree():
    assert select([], 5, 5) == ([], [])


def test_best_first_reads_only_the_children_of_the_nodes_it_takes():
    read = []

    def children(node):
        read.append(node[0])
        return node[2]

    best_first(TREE, children, lambda node: node[1], 2, 10)
    assert read == ["a", "a1"]


# --- CountedTrie -------------------------------------------------------------------------------

COUNTED_CASES = [
    # id, paths, max_nodes, max_depth, expected draft
    ("chain", [(3, 4, 5)], 10, 10, Draft((3, 4, 5))),
    ("depth-cut", [(3, 4, 5)], 10, 2, Draft((3, 4))),
    # counts: 3:3, 3-4:2, 5:1, 3-7:1, 5-6:1
    ("by-count-then-depth", [(3, 4), (3, 4), (5, 6), (3, 7)], 10, 10,
     Draft((3, 4, 5, 7, 6), (-1, 0, -1, 0, 2))),
    ("node-cut", [(3, 4), (3, 4), (5, 6), (3, 7)], 3, 10, Draft((3, 4, 5), (-1, 0, -1))),
    ("equal-counts-by-token", [(8,), (6,)], 10, 10, Draft((6, 8), (-1, -1))),
    # equal counts at two depths: the shallower first, then by path
    ("equal-counts-by-depth-then-path", [(9, 1), (2, 5)], 10, 10,
     Draft((2, 9, 5, 1), (-1, -1, 0, 1))),
    ("a-branch-of-its-own", [(1,), (2, 3)], 10, 10, Draft((1, 2, 3), (-1, -1, 1))),
    ("empty", [], 10, 10, Draft()),
    ("empty-paths", [(), ()], 10, 10, Draft()),
]


@pytest.mark.parametrize("paths, max_nodes, max_depth, expected",
                         [c[1:] for c in COUNTED_CASES], ids=[c[0] for c in COUNTED_CASES])
def test_counted_trie_top(paths, max_nodes, max_depth, expected):
    trie = CountedTrie()
    for path in paths:
        trie.add(path)
    assert trie.top(max_nodes, max_depth) == expected


def test_counted_trie_weights_add_up():
    trie = CountedTrie()
    trie.add((1, 2), weight=3)
    trie.add((1, 4), weight=5)
    trie.add((2,))
    assert trie.root.count == 9
    assert trie.root.children[1].count == 8 and trie.root.children[1].children[2].count == 3
    assert trie.root.children[1].children[4].path() == (1, 4)
    assert trie.top(2, 5) == Draft((1, 4))


def brute_force_top(paths, max_nodes, max_depth) -> Draft:
    """Every path prefix counted in a dict, sorted by (count desc, depth, path)."""
    counts: dict[tuple[int, ...], int] = {}
    for path in paths:
        for d in range(1, min(len(path), max_depth) + 1):
            counts[path[:d]] = counts.get(path[:d], 0) + 1
    chosen = sorted(counts, key=lambda p: (-counts[p], len(p), p))[:max_nodes]
    slot = {p: i for i, p in enumerate(chosen)}
    return tree_draft([p[-1] for p in chosen], [slot[p[:-1]] if len(p) > 1 else -1
                                                for p in chosen]) if chosen else Draft()


def test_counted_trie_top_matches_brute_force():
    rng = random.Random(5)
    for _ in range(300):
        paths = [tuple(rng.randrange(4) for _ in range(rng.randrange(0, 6)))
                 for _ in range(rng.randrange(0, 25))]
        max_nodes, max_depth = rng.randrange(1, 20), rng.randrange(1, 6)
        trie = CountedTrie()
        for path in paths:
            trie.add(path)
        draft = trie.top(max_nodes, max_depth)
        assert draft == brute_force_top(paths, max_nodes, max_depth), (paths, max_nodes)
        validate_draft(draft, drafter="t", k=max_depth, vocab_size=4)


# --- tree_draft -------------------------------------------------------------------------------

@pytest.mark.parametrize("tokens, parents, expected", [
    ((5, 6, 7), (-1, 0, 1), Draft((5, 6, 7))),
    ((5,), (-1,), Draft((5,))),
    ((), (), Draft()),
    ((5, 6), (-1, -1), Draft((5, 6), (-1, -1))),
    ((5, 6, 7), (-1, 0, 0), Draft((5, 6, 7), (-1, 0, 0))),
])
def test_tree_draft_is_a_chain_when_it_is_one(tokens, parents, expected):
    assert tree_draft(tokens, parents) == expected


def test_every_shared_name_is_public():
    import pytest_specdec.protocol.drafting as drafting

    for name in ("ProblemMemory", "best_first", "tree_draft", "CountedTrie"):
        assert getattr(drafting, name).__doc__, name
    assert "public API" in drafting.__doc__.splitlines()[0]
