"""REST: the suffix-array datastore (against brute force), exact drafts for hand-made
datastores, the group datastore, saving and loading, the `datastore build` command,
and losslessness through the engine with tree drafts."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import pytest

from conftest import tiny_model
from pytest_specdec import cli
from pytest_specdec.drafters import rest as rest_module
from pytest_specdec.drafters.rest import Rest, frequency_tree
from pytest_specdec.engine import GenerationRequest, generate
from pytest_specdec.engine.target import wrap_model
from pytest_specdec.protocol.datastore import (SEPARATOR, Datastore, DatastoreError,
                                               build_datastore, read_documents, suffix_array)
from pytest_specdec.protocol.drafter import Draft, DraftRequest, validate_draft
from pytest_specdec.protocol.sampling import Sampler


def corpus_file(folder: Path, docs: Sequence[Sequence[int]], name: str = "corpus.rest") -> str:
    path = folder / name
    build_datastore(docs, tokenizer="test").save(path, overwrite=True)
    return str(path)


def propose(drafter: Rest, context: Sequence[int], k: int = 4, group: str = "g") -> Draft:
    """Begin a sequence whose prompt is `context`, then propose up to k tokens."""
    drafter.begin(DraftRequest(tuple(context), group))
    return drafter.propose(tuple(context), k)


def finished(drafter: Rest, group: str, *sequences: Sequence[int]) -> Rest:
    """Run whole sequences through the drafter (prompt only, then end)."""
    for tokens in sequences:
        drafter.begin(DraftRequest(tuple(tokens), group))
        drafter.end()
    return drafter


# --- the suffix array and lookups against brute force -------------------------------------

@pytest.mark.parametrize("alphabet", [1, 2, 3, 50])
def test_suffix_array_matches_sorting_the_suffixes(alphabet):
    rng = np.random.default_rng(alphabet)
    for n in [0, 1, 2, 3, 7, 64, 257]:
        tokens = rng.integers(-1, alphabet, n)
        expected = sorted(range(n), key=lambda i: tokens[i:].tolist())
        assert suffix_array(tokens).tolist() == expected


def brute_force_occurrences(docs: list[list[int]], pattern: list[int]) -> list[tuple[int, int]]:
    """(document, offset) of every occurrence of pattern inside one document."""
    m = len(pattern)
    return [(d, i) for d, doc in enumerate(docs) for i in range(len(doc) - m + 1)
            if doc[i:i + m] == pattern]


def test_lookup_matches_brute_force_on_random_documents():
    rng = np.random.default_rng(7)
    docs = [rng.integers(0, 4, rng.integers(0, 30)).tolist() for _ in range(25)]
    store = build_datastore(docs)
    kept = [doc for doc in docs if doc]  # empty documents are dropped
    for _ in range(300):
        pattern = rng.integers(0, 4, rng.integers(1, 6)).tolist()
        found = store.lookup(pattern)
        starts = store.suffix_array[found.start:found.stop].tolist()
        docs_of = np.searchsorted(store.doc_starts, starts, "right") - 1
        as_pairs = sorted((int(d), p - int(store.doc_starts[d])) for d, p in zip(docs_of, starts))
        assert as_pairs == brute_force_occurrences(kept, pattern), pattern
        # the matches are ordered by the token that follows them (separator first)
        following = [int(store.tokens[p + len(pattern)]) for p in starts]
        assert following == sorted(following)
        assert store.continues(found, len(pattern)) == any(f >= 0 for f in following)


def test_build_layout_and_metadata():
    store = build_datastore([[5, 6], [], [7]], tokenizer="tok", vocab_size=9)
    assert store.tokens.tolist() == [5, 6, SEPARATOR, 7, SEPARATOR]
    assert store.doc_starts.tolist() == [0, 3]
    assert store.suffix_array.tolist() == [0, 1, 3]
    assert (store.documents, len(store)) == (2, 3)
    assert store.metadata == {"tokenizer": "tok", "vocab_size": "9"}
    assert store.tokens.dtype == np.int32 and store.suffix_array.dtype == np.int32


LOOKUP_CASES = [
    # id, docs, pattern, matched positions in `tokens` (suffix order)
    ("two-occurrences", [[1, 2, 3, 1, 2, 4]], [1, 2], [0, 3]),
    ("not-across-documents", [[1, 2], [3, 4]], [2, 3], []),
    ("at-a-document-end", [[1, 2], [3, 4]], [3, 4], [3]),
    ("longer-than-any-document", [[1, 2]], [1, 2, 3], []),
    ("empty-store", [], [1], []),
    ("empty-pattern-matches-everything", [[4, 3]], [], [1, 0]),
]


@pytest.mark.parametrize("docs, pattern, positions", [c[1:] for c in LOOKUP_CASES],
                         ids=[c[0] for c in LOOKUP_CASES])
def test_lookup(docs, pattern, positions):
    store = build_datastore(docs)
    found = store.lookup(pattern)
    assert store.suffix_array[found.start:found.stop].tolist() == positions


def test_continuations_stop_at_the_document_end_and_spread_over_many_matches():
    store = build_datastore([[1, 2, 3], [1, 2, 4, 5], [1, 2, 4, 6], [1, 2, 7]])
    found = store.lookup([1, 2])
    rows = store.continuations(found, 2, depth=3, limit=10)
    assert rows.tolist() == [[3, -1, -1], [4, 5, -1], [4, 6, -1], [7, -1, -1]]
    # two of four matches: evenly spaced (the 1st and 3rd), not the first two
    assert store.continuations(found, 2, depth=1, limit=2).tolist() == [[3], [4]]
    assert store.continuations(range(0), 2, depth=2, limit=5).shape == (0, 2)


@pytest.mark.parametrize("docs, message", [
    ([[1, -2]], "token ids must lie in"),
    ([[1, 2**31]], "token ids must lie in"),
])
def test_build_rejects_bad_ids(docs, message):
    with pytest.raises(DatastoreError, match=message):
        build_datastore(docs)


# --- saving and loading ------------------------------------------------------------------

def test_save_load_round_trip(tmp_path):
    store = build_datastore([[1, 2, 3, 1, 2, 4], [9, 1, 2]], tokenizer="tok", vocab_size=10)
    path = store.save(tmp_path / "a.rest")
    loaded = Datastore.load(path)
    for name in ("tokens", "doc_starts", "suffix_array"):
        assert np.array_equal(getattr(loaded, name), getattr(store, name))
        assert getattr(loaded, name).dtype == getattr(store, name).dtype
    assert loaded.metadata["tokenizer"] == "tok" and loaded.metadata["vocab_size"] == "10"
    assert loaded.metadata["documents"] == "2" and loaded.metadata["tokens"] == "9"
    assert loaded.lookup([1, 2]) == store.lookup([1, 2]) and len(loaded.lookup([1, 2])) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.rest"]  # no temporary left


def test_save_never_overwrites_without_permission(tmp_path):
    path = tmp_path / "a.rest"
    build_datastore([[1, 2]]).save(path)
    before = path.read_bytes()
    with pytest.raises(DatastoreError, match="already exists.*--force"):
        build_datastore([[3, 4]]).save(path)
    assert path.read_bytes() == before
    build_datastore([[3, 4]]).save(path, overwrite=True)
    assert Datastore.load(path).tokens.tolist() == [3, 4, SEPARATOR]


def test_a_failed_save_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    import safetensors.numpy

    path = tmp_path / "a.rest"
    build_datastore([[1, 2]]).save(path)
    before = path.read_bytes()

    def broken(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.numpy, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        build_datastore([[3, 4]]).save(path, overwrite=True)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.rest"]


def test_load_errors_name_the_file(tmp_path):
    from safetensors.numpy import save_file

    with pytest.raises(DatastoreError, match="no datastore file at .*missing.rest"):
        Datastore.load(tmp_path / "missing.rest")
    junk = tmp_path / "junk.rest"
    junk.write_text("not safetensors")
    with pytest.raises(DatastoreError, match="junk.rest is not a datastore: not a safetensors"):
        Datastore.load(junk)
    foreign = tmp_path / "weights.safetensors"
    save_file({"w": np.zeros(3, dtype=np.float32)}, str(foreign))
    with pytest.raises(DatastoreError, match="weights.safetensors is not a datastore.*format"):
        Datastore.load(foreign)
    damaged = tmp_path / "damaged.rest"
    store = build_datastore([[1, 2], [3]])
    store.suffix_array = store.suffix_array[:-1]
    store.save(damaged)
    with pytest.raises(DatastoreError, match="damaged.rest is damaged"):
        Datastore.load(damaged)


# --- exact drafts from a small datastore ------------------------------------------------

BRANCHY = [[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 5, 6], [1, 2, 3, 7]]

REST_CASES = [
    # id, datastore documents, context, k, options, expected tokens, expected parents
    # (None: a chain)
    ("chain", [[1, 2, 3, 4, 5]], [9, 1, 2], 3, {}, (3, 4, 5), None),
    ("k-cuts-the-depth", [[1, 2, 3, 4, 5]], [9, 1, 2], 2, {}, (3, 4), None),
    ("document-end-cuts-the-chain", [[1, 2, 3]], [1, 2], 4, {}, (3,), None),
    # counts: 3:3, 3-4:2, 5:1, 3-7:1, 5-6:1; ranked by count, then depth, then path
    ("branching-by-frequency", BRANCHY, [0, 1, 2], 2, {}, (3, 4, 5, 7, 6), (-1, 0, -1, 0, 2)),
    ("max-nodes-cuts-the-rarest", BRANCHY, [0, 1, 2], 2, {"max_nodes": 3}, (3, 4, 5), (-1, 0, -1)),
    ("max-nodes-1", BRANCHY, [0, 1, 2], 2, {"max_nodes": 1}, (3,), None),
    ("depth-1-tree", BRANCHY, [0, 1, 2], 1, {}, (3, 5), (-1, -1)),
    ("equal-counts-by-token", [[1, 2, 8], [1, 2, 6]], [1, 2], 1, {}, (6, 8), (-1, -1)),
    ("repeats-inside-a-document", [[1, 2, 3, 1, 2, 4, 1, 2, 3]], [1, 2], 2, {},
     (3, 4, 1, 1), (-1, -1, 0, 1)),
    # the longest suffix wins even where a shorter one has a more frequent continuation
    ("longest-suffix-wins", [[7, 1, 2, 3], [5, 1, 2, 4], [8, 1, 2, 4]], [7, 1, 2], 1, {},
     (3,), None),
    ("shorter-suffix-when-the-longer-is-absent", [[7, 1, 2, 3], [5, 1, 2, 4], [8, 1, 2, 4]],
     [9, 1, 2], 1, {}, (4, 3), (-1, -1)),
    ("max-suffix-caps-the-suffix", [[7, 1, 2, 3], [5, 1, 2, 4], [8, 1, 2, 4]], [7, 1, 2], 1,
     {"max_suffix": 2}, (4, 3), (-1, -1)),
    ("long-suffix", [[9, 8, 7, 6, 5, 1, 2, 3], [1, 2, 4], [1, 2, 4]], [0, 9, 8, 7, 6, 5, 1, 2],
     1, {}, (3,), None),
    # a suffix found only at a document's end has nothing to draft: a shorter one is used
    ("match-at-a-document-end-is-skipped", [[5, 1, 2], [7, 1, 2, 9]], [5, 1, 2], 2, {},
     (9,), None),
    ("min-suffix-3-misses-the-bigram", [[1, 2, 3]], [9, 1, 2], 2, {"min_suffix": 3}, (), None),
    ("min-suffix-1-takes-a-unigram", [[2, 3]], [9, 5, 2], 2, {"min_suffix": 1}, (3,), None),
    ("min-suffix-2-skips-the-unigram", [[2, 3]], [9, 5, 2], 2, {}, (), None),
    ("no-match", [[1, 2, 3]], [50, 51], 3, {}, (), None),
    ("context-shorter-than-min-suffix", [[1, 2, 3]], [1], 3, {}, (), None),
    ("never-across-documents", [[1, 2], [3, 4]], [0, 2, 3], 2, {}, (), None),
    # 3,3,3,4,4,4 after (1, 2): two evenly spread matches see both continuations
    ("max-matches-spread-over-the-matches", [[1, 2, 3]] * 3 + [[1, 2, 4]] * 3, [1, 2], 1,
     {"max_matches": 2}, (3, 4), (-1, -1)),
    ("max-matches-1", [[1, 2, 3]] * 3 + [[1, 2, 4]] * 3, [1, 2], 1, {"max_matches": 1},
     (3,), None),
]


@pytest.mark.parametrize("docs, context, k, options, tokens, parents",
                         [c[1:] for c in REST_CASES], ids=[c[0] for c in REST_CASES])
def test_rest_drafts(tmp_path, docs, context, k, options, tokens, parents):
    drafter = Rest(datastore=corpus_file(tmp_path, docs), share_group=False, **options)
    draft = propose(drafter, context, k)
    assert draft == Draft(tokens, parents)
    validate_draft(draft, drafter="rest", k=k, vocab_size=100)


def reference_tree(rows: list[list[int]], max_nodes: int) -> Draft:
    """The frequency tree the slow, obvious way: count every path prefix in a dict."""
    counts: dict[tuple[int, ...], int] = {}
    for row in rows:
        path: tuple[int, ...] = ()
        for token in row:
            if token == SEPARATOR:
                break
            path += (token,)
            counts[path] = counts.get(path, 0) + 1
    chosen = sorted(counts, key=lambda p: (-counts[p], len(p), p))[:max_nodes]
    index = {path: i for i, path in enumerate(chosen)}
    tree = Draft(tuple(p[-1] for p in chosen),
                 tuple(index[p[:-1]] if len(p) > 1 else -1 for p in chosen))
    return Draft(tree.tokens) if tree.is_chain else tree


def test_frequency_tree_matches_a_reference_trie_count():
    rng = np.random.default_rng(3)
    for _ in range(300):
        rows = rng.integers(-1, 4, (int(rng.integers(0, 30)), int(rng.integers(1, 6))))
        rows[np.maximum.accumulate(rows < 0, axis=1)] = SEPARATOR
        max_nodes = int(rng.integers(1, 20))
        assert frequency_tree(rows, max_nodes) == reference_tree(rows.tolist(), max_nodes)


def test_the_current_sequence_is_not_searched():
    # REST retrieves from datastores only (prompt lookup covers the current text)
    drafter = Rest()
    assert propose(drafter, [1, 2, 3, 1, 2]) == Draft()
    drafter.accept((3, 1, 2))
    assert drafter.propose((1, 2, 3, 1, 2, 3, 1, 2), 4) == Draft()


class SpyContext(Sequence[int]):
    """A context that records which positions a drafter reads."""

    def __init__(self, tokens: list[int]):
        self.tokens, self.lowest = tokens, len(tokens)

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index):
        if isinstance(index, slice):
            self.lowest = min(self.lowest, index.indices(len(self.tokens))[0])
            return tuple(self.tokens[index])
        self.lowest = min(self.lowest, index % len(self.tokens))
        return self.tokens[index]

    def __iter__(self):
        raise AssertionError("the drafter walked the whole context")


def test_a_proposal_reads_only_the_last_max_suffix_tokens(tmp_path):
    prefix = list(range(3, 40)) * 100
    tail = [90, 91, 92, 93, 94, 95, 1, 2]
    drafter = Rest(datastore=corpus_file(tmp_path, [tail + [5], [1, 2, 6]]), max_suffix=6)
    context = SpyContext(prefix + tail)
    assert drafter.propose(context, 2) == Draft((5,))
    assert context.lowest >= len(context) - 6


# --- the group datastore: earlier sequences of the same problem -------------------------

def test_the_group_datastore_serves_the_second_sample_not_other_groups():
    drafter = Rest()  # no corpus: the group datastore is the only source
    first = [10, 11, 12]
    drafter.begin(DraftRequest(tuple(first), "A", sample=0))
    assert drafter.propose(tuple(first), 4) == Draft()
    drafter.accept((20, 21, 22))
    drafter.accept((23, 24))
    drafter.end()
    # sample 1 of the same problem: sample 0's prompt and output are searched
    drafter.begin(DraftRequest(tuple(first), "A", sample=1))
    assert drafter.propose(tuple(first), 4) == Draft((20, 21, 22, 23))
    drafter.accept((20,))
    assert drafter.propose((*first, 20, 21), 4) == Draft((22, 23, 24))
    drafter.end()
    # another problem sees nothing of problem A
    assert propose(drafter, [9, 21, 22], group="B") == Draft()
    drafter.end()
    assert propose(drafter, [9, 21, 22], group="A") == Draft((23, 24))


def test_two_earlier_samples_branch_by_frequency():
    drafter = finished(Rest(), "A", [1, 2, 3, 4], [1, 2, 5], [1, 2, 3, 6])
    # 3 follows twice, 5 once; at depth 2: 3-4 once, 3-6 once
    assert propose(drafter, [0, 1, 2], k=2, group="A") == Draft((3, 5, 4, 6), (-1, -1, 0, 0))


def test_sharing_off_uses_only_the_corpus(tmp_path):
    drafter = finished(Rest(datastore=corpus_file(tmp_path, [[1, 2, 3]]), share_group=False),
                       "A", [1, 2, 4])
    assert propose(drafter, [1, 2], group="A") == Draft((3,))


SOURCE_CASES = [
    # id, corpus documents, earlier sequences of group A, context, options, tokens, parents
    ("group-and-corpus-pooled", [[1, 2, 3]], [[1, 2, 4]], [1, 2], {}, (3, 4), (-1, -1)),
    ("group-fills-max-matches-first", [[1, 2, 3]], [[1, 2, 4]], [1, 2], {"max_matches": 1},
     (4,), None),
    ("longer-suffix-in-the-corpus-wins", [[7, 1, 2, 3]], [[1, 2, 4]], [7, 1, 2], {}, (3,), None),
    ("longer-suffix-in-the-group-wins", [[1, 2, 3]], [[7, 1, 2, 4]], [7, 1, 2], {}, (4,), None),
    ("corpus-alone-when-the-group-misses", [[1, 2, 3]], [[5, 6]], [1, 2], {}, (3,), None),
]


@pytest.mark.parametrize("corpus, earlier, context, options, tokens, parents",
                         [c[1:] for c in SOURCE_CASES], ids=[c[0] for c in SOURCE_CASES])
def test_group_and_corpus_sources(tmp_path, corpus, earlier, context, options, tokens, parents):
    drafter = finished(Rest(datastore=corpus_file(tmp_path, corpus), **options), "A", *earlier)
    assert propose(drafter, context, k=1, group="A") == Draft(tokens, parents)


def test_the_group_datastore_is_rebuilt_at_end_not_per_token(monkeypatch):
    builds = []
    real = rest_module.build_datastore
    monkeypatch.setattr(rest_module, "build_datastore",
                        lambda docs: builds.append(len(docs)) or real(docs))
    drafter = Rest()
    for sample in range(3):
        drafter.begin(DraftRequest((1, 2), "A", sample=sample))
        for token in range(3, 40):
            drafter.propose((1, 2), 4)
            drafter.accept((token,))
        assert builds == list(range(1, sample + 1))
        drafter.end()
    assert builds == [1, 2, 3]


# --- options ----------------------------------------------------------------------------

@pytest.mark.parametrize("options, message", [
    ({"min_suffix": 0}, "1 <= min_suffix <= max_suffix, got min_suffix=0, max_suffix=16"),
    ({"min_suffix": 5, "max_suffix": 4}, "got min_suffix=5, max_suffix=4"),
    ({"max_matches": 0}, "max_matches must be >= 1, got 0"),
    ({"max_depth": 0}, "max_depth must be >= 1, got 0"),
    ({"max_nodes": 0}, r"max_nodes must be in \[1, 256\], got 0"),
    ({"max_nodes": 257}, r"max_nodes must be in \[1, 256\], got 257"),
    ({"share_group": False}, "REST needs a source"),
])
def test_invalid_options_raise_naming_the_values(options, message):
    with pytest.raises(ValueError, match=message):
        Rest(**options)


@pytest.mark.parametrize("corpus, share_group, source", [
    (False, True, "group"),  # the default: the problem's earlier sequences only
    (True, True, "corpus+group"),
    (True, False, "corpus"),
])
def test_source_says_where_drafts_come_from(tmp_path, corpus, share_group, source):
    options = {"datastore": corpus_file(tmp_path, [[1, 2, 3]])} if corpus else {}
    drafter = Rest(share_group=share_group, **options)
    assert drafter.source == source
    with pytest.raises(AttributeError):
        drafter.source = "corpus"  # read-only


def test_the_default_is_the_reference_configuration():
    drafter = Rest()
    assert (drafter.source, drafter.max_suffix, drafter.min_suffix, drafter.max_depth,
            drafter.max_nodes) == ("group", 16, 2, 10, 64)


@pytest.mark.parametrize("k, max_depth, expected", [
    (20, 10, tuple(range(3, 13))),  # the reference's depth 10 under a large k
    (4, 10, (3, 4, 5, 6)),  # k is smaller
    (20, 2, (3, 4)),
])
def test_max_depth_caps_the_draft(tmp_path, k, max_depth, expected):
    drafter = Rest(datastore=corpus_file(tmp_path, [list(range(1, 30))]), share_group=False,
                   max_depth=max_depth)
    assert propose(drafter, [1, 2], k=k) == Draft(expected)


def test_datastore_option_errors_name_the_path(tmp_path):
    with pytest.raises(ValueError, match="no datastore file at .*nowhere.rest"):
        Rest(datastore=str(tmp_path / "nowhere.rest"))
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ValueError, match="notes.txt is not a datastore"):
        Rest(datastore=str(text))


def test_the_datastore_file_is_loaded_once_per_version(tmp_path):
    path = corpus_file(tmp_path, [[1, 2, 3]])
    first, second = Rest(datastore=path), Rest(datastore=path)
    assert first.corpus is second.corpus
    build_datastore([[1, 2, 4, 5]]).save(path, overwrite=True)  # a new version is read again
    assert propose(Rest(datastore=path), [1, 2]) == Draft((4, 5))


# --- the `pytest-specdec datastore build` command --------------------------------------

class ByteTokenizer:
    """A stand-in tokenizer: one token per UTF-8 byte."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        assert add_special_tokens is False
        return list(text.encode("utf-8"))


@pytest.fixture
def byte_tokenizer(monkeypatch):
    monkeypatch.setattr(cli, "load_tokenizer", lambda spec: (ByteTokenizer(), f"bytes:{spec}", 256))


def documents_of(path: Path) -> list[str]:
    store = Datastore.load(path)
    text = bytes(t if t >= 0 else 0 for t in store.tokens.tolist()).decode("utf-8")
    return text.split("\0")[:-1]


def test_cli_builds_from_txt_and_jsonl(tmp_path, byte_tokenizer, capsys):
    txt = tmp_path / "notes.txt"
    txt.write_text("first line\nsame paragraph\n\n\nsecond\n  \nthird\n", encoding="utf-8")
    jsonl = tmp_path / "chats.jsonl"
    jsonl.write_text('{"body": "from json", "id": 1}\n\n{"body": "again"}\n', encoding="utf-8")
    out = tmp_path / "store.rest"
    argv = ["datastore", "build", str(txt), str(jsonl), "--text-field", "body",
            "--target", "tiny", "--output", str(out)]
    assert cli.main(argv) == 0
    assert documents_of(out) == ["first line\nsame paragraph", "second", "third",
                                 "from json", "again"]
    meta = Datastore.load(out).metadata
    assert (meta["tokenizer"], meta["vocab_size"], meta["documents"]) == ("bytes:tiny", "256", "5")
    assert f"wrote {out} (5 documents, 50 tokens, tokenizer bytes:tiny)" in capsys.readouterr().out
    # the file drives the drafter: "second" is followed by the rest of its document
    drafter = Rest(datastore=str(out), share_group=False)
    assert propose(drafter, list(b"same par"), k=4) == Draft(tuple(b"agra"))


def test_cli_reports_progress_every_n_documents(tmp_path, byte_tokenizer, capsys):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(7)))
    assert cli.main(["datastore", "build", str(corpus), "--output", str(tmp_path / "o.rest"),
                     "--progress-every", "3"]) == 0
    progress = [line for line in capsys.readouterr().err.splitlines() if "tokenized" in line]
    assert progress == ["pytest-specdec: tokenized 3 documents (15 tokens)",
                        "pytest-specdec: tokenized 6 documents (30 tokens)"]


def test_cli_refuses_to_overwrite_without_force(tmp_path, byte_tokenizer, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text("abc\n")
    out = tmp_path / "o.rest"
    out.write_bytes(b"precious")
    assert cli.main(["datastore", "build", str(corpus), "--output", str(out)]) == 2
    assert f"{out} already exists; pass --force" in capsys.readouterr().err
    assert out.read_bytes() == b"precious"
    assert cli.main(["datastore", "build", str(corpus), "--output", str(out), "--force"]) == 0
    assert documents_of(out) == ["abc"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.txt", "o.rest"]


CLI_ERRORS = [
    # id, file name, content, extra arguments, message (a regex)
    ("missing-file", None, None, [], r"corpus '.*absent.txt' does not exist"),
    ("empty-corpus", "c.txt", "\n\n  \n", [], r"no text in .*c.txt: the corpus is empty"),
    ("wrong-jsonl-field", "c.jsonl", '{"text": "a"}\n{"content": "b"}\n', [],
     r"c.jsonl:2: no field 'text' \(has: content\); choose one with --text-field"),
    ("field-not-a-string", "c.jsonl", '{"prompt": 3}\n', ["--text-field", "prompt"],
     r"c.jsonl:1: field 'prompt' is int, expected a string"),
    ("invalid-json", "c.jsonl", '{"text": "a"}\n\n{"text": \n', [], r"c.jsonl:3: not valid JSON"),
    ("unknown-kind", "c.csv", "a,b\n", [], r"c.csv': expected a .txt or .jsonl file"),
    ("bad-progress", "c.txt", "a\n", ["--progress-every", "0"], r"--progress-every must be >= 1"),
    ("missing-output-folder", "c.txt", "a\n", ["--output", "nowhere/o.rest"],
     r"the folder of --output .*nowhere/o.rest does not exist"),
]


@pytest.mark.parametrize("name, content, extra, message", [c[1:] for c in CLI_ERRORS],
                         ids=[c[0] for c in CLI_ERRORS])
def test_cli_errors_exit_2_with_a_clear_message(tmp_path, monkeypatch, capsys, name, content,
                                                extra, message):
    corpus = tmp_path / (name or "absent.txt")
    if content is not None:
        corpus.write_text(content, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "load_tokenizer", lambda spec: (ByteTokenizer(), "bytes", 256))
    argv = ["datastore", "build", str(corpus), "--output", str(tmp_path / "o.rest"), *extra]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("pytest-specdec: error: ")
    assert re.search(message, err), err
    assert not (tmp_path / "o.rest").exists()


def test_cli_checks_the_corpus_before_loading_the_tokenizer(tmp_path, monkeypatch, capsys):
    def never(spec):
        raise AssertionError("the tokenizer was loaded before the corpus was checked")

    monkeypatch.setattr(cli, "load_tokenizer", never)
    argv = ["datastore", "build", str(tmp_path / "absent.txt"), "--output", str(tmp_path / "o")]
    assert cli.main(argv) == 2
    assert "absent.txt' does not exist" in capsys.readouterr().err


def test_cli_datastore_without_an_action_prints_help(capsys):
    assert cli.main(["datastore"]) == 2
    assert "build" in capsys.readouterr().err


def test_read_documents_jsonl_lines_are_counted_with_blank_lines(tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "a"}\n\n{"text": "b"}\n[1]\n')
    documents = read_documents(corpus)
    assert [next(documents), next(documents)] == ["a", "b"]
    with pytest.raises(DatastoreError, match=r"c.jsonl:4: no field 'text' \(has: list\)"):
        next(documents)


def test_cli_with_a_real_tokenizer_from_a_model_folder(tmp_path, tiny_model_dir, capsys):
    from transformers import AutoTokenizer

    corpus = tmp_path / "c.txt"
    corpus.write_text("The answer is 42.\n\nTom has 47 apples.\n", encoding="utf-8")
    out = tmp_path / "o.rest"
    argv = ["datastore", "build", str(corpus), "--target", str(tiny_model_dir),
            "--output", str(out)]
    assert cli.main(argv) == 0
    store = Datastore.load(out)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert store.metadata["tokenizer"] == tiny_model_dir.name
    assert store.metadata["vocab_size"] == str(len(tokenizer))
    first = store.tokens[:store.doc_starts[1] - 1].tolist()
    assert first == tokenizer.encode("The answer is 42.", add_special_tokens=False)


# --- datasets as corpora (local, no network) -----------------------------------------------

@pytest.fixture
def fake_hub(monkeypatch):
    """datasets.load_dataset answering from memory: records its calls, serves `tables`."""
    datasets = pytest.importorskip("datasets")
    calls, tables = [], {}

    def load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        if (name, split) not in tables:
            raise ConnectionError(f"no network to fetch {name}")
        return datasets.Dataset.from_dict(tables[(name, split)])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls, tables


def test_cli_builds_from_a_hugging_face_dataset(tmp_path, byte_tokenizer, fake_hub, capsys):
    calls, tables = fake_hub
    tables[("owner/chats", "validation")] = {"id": [1, 2], "body": ["hello there", "bye"]}
    out = tmp_path / "o.rest"
    argv = ["datastore", "build", "owner/chats:short", "--split", "validation", "--column",
            "body", "--output", str(out)]
    assert cli.main(argv) == 0
    assert calls == [("owner/chats", "short", "validation")]
    assert documents_of(out) == ["hello there", "bye"]
    assert "wrote" in capsys.readouterr().out


def test_cli_dataset_split_defaults_to_train_and_column_to_text(tmp_path, byte_tokenizer,
                                                                fake_hub):
    calls, tables = fake_hub
    tables[("owner/notes", "train")] = {"text": ["abc"]}
    assert cli.main(["datastore", "build", "owner/notes", "--output",
                     str(tmp_path / "o.rest")]) == 0
    assert calls == [("owner/notes", None, "train")]
    assert documents_of(tmp_path / "o.rest") == ["abc"]


def test_cli_builds_from_a_local_dataset_folder(tmp_path, byte_tokenizer, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    folder = tmp_path / "chats"
    folder.mkdir()
    (folder / "train.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n')
    out = tmp_path / "o.rest"
    assert cli.main(["datastore", "build", str(folder), str(tmp_path / "more.txt"),
                     "--output", str(out)]) == 2  # a missing second corpus: nothing built
    assert not out.exists()
    (tmp_path / "more.txt").write_text("three\n")
    assert cli.main(["datastore", "build", str(folder), str(tmp_path / "more.txt"),
                     "--output", str(out)]) == 0
    assert documents_of(out) == ["one", "two", "three"]


DATASET_ERRORS = [
    # id, table served for (owner/data, train), arguments, message (a regex)
    ("offline", None, ["owner/data"],
     r"could not load the dataset 'owner/data' \(split 'train'\): ConnectionError: no "
     r"network to fetch owner/data\. Without network access, pass a local dataset folder"),
    ("unknown-split", {"text": ["a"]}, ["owner/data", "--split", "test"],
     r"could not load the dataset 'owner/data' \(split 'test'\)"),
    ("missing-column", {"content": ["a"], "id": [1]}, ["owner/data"],
     r"dataset 'owner/data' \(split 'train'\) has no column 'text' \(has: content, id\); "
     r"choose one with --column"),
    ("not-a-string", {"text": ["a", None]}, ["owner/data"],
     r"dataset 'owner/data' row 1: column 'text' is NoneType, expected a string"),
    ("not-a-dataset-id", None, ["not an id"],
     r"corpus 'not an id' does not exist \(expected a .txt or .jsonl file, a local dataset "
     r"folder, or a Hugging Face dataset id owner/name\[:config\]\)"),
]


@pytest.mark.parametrize("table, arguments, message", [c[1:] for c in DATASET_ERRORS],
                         ids=[c[0] for c in DATASET_ERRORS])
def test_cli_dataset_errors_exit_2_with_a_clear_message(tmp_path, byte_tokenizer, fake_hub,
                                                        capsys, table, arguments, message):
    if table is not None:
        fake_hub[1][("owner/data", "train")] = table
    assert cli.main(["datastore", "build", *arguments, "--output",
                     str(tmp_path / "o.rest")]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert not (tmp_path / "o.rest").exists()


def test_cli_dataset_without_the_datasets_package(tmp_path, monkeypatch, capsys):
    import sys

    def never(spec):
        raise AssertionError("the tokenizer was loaded before the corpus was checked")

    monkeypatch.setattr(cli, "load_tokenizer", never)
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets raises ImportError
    assert cli.main(["datastore", "build", "owner/data", "--output",
                     str(tmp_path / "o.rest")]) == 2
    assert ("corpus 'owner/data' is a dataset: reading it needs the 'datasets' package "
            "(pip install datasets)") in capsys.readouterr().err


# --- losslessness through the engine (tree drafts) -------------------------------------

PROMPT = (1, 17, 42, 99, 250, 3, 77)


class Recording(Rest):
    """Rest that keeps its drafts."""

    def __init__(self, **options):
        super().__init__(**options)
        self.drafts: list[Draft] = []

    def propose(self, context, k):
        self.drafts.append(super().propose(context, k))
        return self.drafts[-1]


@pytest.fixture(scope="module")
def tiny_llama():
    return wrap_model(tiny_model("llama"), name="tiny-llama")


def branchy_corpus(sequence: list[int], every: int = 7) -> list[list[int]]:
    """Windows of `sequence` where, after 6 tokens, a wrong token is twice as frequent
    as the right one: with max_suffix=6 each window gives a tree whose first branch is
    wrong and whose second is right for a few tokens more."""
    docs = []
    for i in range(8, len(sequence) - 4, every):
        wrong = (sequence[i] + 1) % 500
        docs += [sequence[i - 6:i] + [wrong]] * 2 + [sequence[i - 6:i + 4]]
    return docs


@pytest.mark.parametrize("temperature, seed", [(0.0, 0), (0.6, 1)])
def test_rest_is_lossless_with_tree_drafts(tiny_llama, tmp_path, temperature, seed):
    request = GenerationRequest(PROMPT, 32, Sampler(temperature, seed), group="p")
    baseline = generate(tiny_llama, request)
    corpus = corpus_file(tmp_path, branchy_corpus(list(PROMPT) + baseline.tokens))
    drafter = Recording(datastore=corpus, share_group=False, max_suffix=6)
    result = generate(tiny_llama, request, drafter, k=4, drafter_name="rest")
    assert result.tokens == baseline.tokens
    assert result.stop == baseline.stop
    # at each branch the wrong token (twice as frequent) comes first, so a tree accepted
    # to full depth was accepted along its second branch
    assert any(not draft.is_chain and step.accepted == 4
               for draft, step in zip(drafter.drafts, result.steps))
    assert result.stats.steps < baseline.stats.steps


@pytest.mark.parametrize("temperature", [0.0, 0.6])
def test_group_rest_is_lossless_across_rounds(tiny_llama, temperature):
    drafter = Recording()  # group datastore only
    accepted = []
    # round 1 repeats round 0's seed (so its text repeats); sample 1 has its own seed
    for sample, round_, seed in [(0, 0, 5), (0, 1, 5), (1, 0, 6)]:
        request = GenerationRequest(PROMPT, 20, Sampler(temperature, seed), group="p",
                                    sample=sample, round=round_)
        baseline = generate(tiny_llama, request)
        result = generate(tiny_llama, request, drafter, k=4)
        assert result.tokens == baseline.tokens
        accepted.append(result.stats.accepted)
    assert accepted[0] == 0 and accepted[1] > 10, accepted


def test_report_note_says_what_rest_retrieves_from(tmp_path):
    assert Rest().report_note == ("no datastore: retrieves only from the problem's earlier "
                                  "sequences (each problem's first sequence drafts nothing)")
