"""Drafters that serve several open sequences at once (``concurrent_sequences``): the
declaration and how it is read, one instance serving every row of a batch through a
handle per sequence, siblings drafting from each other's text as it is generated
(exact drafts per built-in), outputs equal to plain decoding at T=0 and T>0, drafters
written to the one-sequence protocol unchanged, and the guard on every handle call."""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Sequence

import pytest

from conftest import small_config, tiny_model
from pytest_specdec.bench.runner import engine_batch_method
from pytest_specdec.engine.batch import generate_batch
from pytest_specdec.engine.loop import GenerationRequest, generate
from pytest_specdec.engine.target import wrap_model
from pytest_specdec.protocol.drafter import (ConcurrentDrafterBase, Draft, DraftError,
                                             DraftRequest, DrafterBase, SequenceDrafter,
                                             draft_depth, serves_concurrent_sequences)
from pytest_specdec.protocol.drafting import ProblemMemory
from pytest_specdec.protocol.registry import load_registry
from pytest_specdec.protocol.sampling import Sampler

DOCS = Path(__file__).resolve().parent.parent / "docs" / "drafters.md"

#: the built-ins that declare concurrent_sequences, with the options they run with here
#: (pld shares nothing across sequences unless share_group)
CONCURRENT = [("sam", {}), ("suffix", {}), ("pld", {"share_group": "true"}), ("rest", {}),
              ("pia", {})]


@pytest.fixture(scope="module")
def small_vocab():
    # 64 tokens: a random model repeats itself, so n-gram drafters find drafts
    return wrap_model(tiny_model("llama", vocab_size=64), name="tiny-64")


def make(name: str, options: dict[str, str]):
    registered = load_registry().get(name)
    return registered.create(**registered.convert_options(options))


def samples(temperature: float, *, n: int = 4, groups: Sequence[str] = ("g",), seed: int = 0,
            budget: int = 40) -> list[GenerationRequest]:
    """Best-of-N rows: per group one prompt, its N samples with their own seeds."""
    rng = random.Random(seed)
    out = []
    for group in groups:
        prompt = tuple(rng.randrange(1, 60) for _ in range(rng.randrange(6, 14)))
        out += [GenerationRequest(prompt, budget - 3 * i, Sampler(temperature, 100 + i),
                                  group=group, sample=i) for i in range(n)]
    return out


def plain(target, requests):
    return [generate(target, r).tokens for r in requests]


# --------------------------------------------------------------------------- the declaration

class OldStyle:
    """A drafter written to the one-sequence protocol alone (no base class, no
    declaration): it drafts the token that followed the last one in its own text."""

    max_depth = 2

    def begin(self, request: DraftRequest) -> None:
        self.text = list(request.prompt_ids)

    def propose(self, context: Sequence[int], k: int) -> Draft:
        after = [self.text[i + 1] for i in range(len(self.text) - 1) if self.text[i] == context[-1]]
        return Draft(tuple(after[-1:]))

    def accept(self, tokens: Sequence[int]) -> None:
        self.text.extend(tokens)

    def end(self) -> None:
        pass


class Declared(ConcurrentDrafterBase):
    def open(self, request: DraftRequest) -> SequenceDrafter:
        return SequenceDrafter()


class Says:
    def __init__(self, declared: object, opens: bool):
        self.concurrent_sequences = declared
        if opens:
            self.open = lambda request: SequenceDrafter()


@pytest.mark.parametrize("drafter, serves", [
    (OldStyle(), False), (DrafterBase(), False), (Declared(), True), (Declared, True),
    (Says(False, opens=False), False), (Says(True, opens=True), True),
], ids=["third-party-without-it", "DrafterBase", "ConcurrentDrafterBase", "a-class",
        "declared-false", "declared-true-with-open"])
def test_the_declaration_is_read(drafter, serves):
    assert serves_concurrent_sequences(drafter) is serves


@pytest.mark.parametrize("drafter, rule", [
    (Says("yes", opens=True), "concurrent_sequences is True or False"),
    (Says(1, opens=True), "concurrent_sequences is True or False"),
    (Says(True, opens=False), "a drafter declaring concurrent_sequences has open"),
])
def test_a_bad_declaration_fails_the_drafter_named(drafter, rule, small_vocab):
    with pytest.raises(DraftError, match=re.escape(f"drafter 'odd' broke the rule '{rule}")):
        serves_concurrent_sequences(drafter, "odd")
    with pytest.raises(DraftError, match=re.escape(rule)):
        generate_batch(small_vocab, samples(0.0, n=2), [drafter, drafter], k=2,
                       drafter_name="odd")


def test_the_built_in_ngram_drafters_declare_it():
    registry = load_registry()
    declared = {name for name in registry.drafters
                if serves_concurrent_sequences(registry.get(name).factory)}
    assert declared >= {name for name, _ in CONCURRENT}
    assert not declared & {"lookahead", "recycling", "eagle3", "sps"}


# --------------------------------------------------------------------------- live sharing

def two_open(drafter, sibling_group: str, k: int = 3) -> Draft:
    """Sequences 0 and 1 open at once, prompt (1, 2, 3) each; sequence 1 has accepted
    10..14, sequence 0 only 10: sequence 0's next proposal."""
    first = drafter.open(DraftRequest((1, 2, 3), "g", sample=0))
    second = drafter.open(DraftRequest((1, 2, 3), sibling_group, sample=1))
    second.accept((10, 11, 12, 13, 14))
    first.accept((10,))
    return first.propose((1, 2, 3, 10), k)


def alone(drafter, k: int = 3) -> Draft:
    """Sequence 0 as above, with no sibling."""
    first = drafter.open(DraftRequest((1, 2, 3), "g", sample=0))
    first.accept((10,))
    return first.propose((1, 2, 3, 10), k)


# drafter, options, draft with a sibling of its problem, with one of another problem
SIBLING_DRAFTS = [
    # the match "1 2 3 10" in the sibling's automaton (SAM) / the sibling's n-gram index
    # (PLD) / the sibling's datastore (REST): its next three tokens
    ("sam", {}, Draft((11, 12, 13)), Draft()),
    ("pld", {"share_group": "true"}, Draft((11, 12, 13)), Draft()),
    ("rest", {}, Draft((11, 12, 13)), Draft()),
    # the global trie holds both responses: "10" was followed by 11 once; a match of
    # one token may draft one node (max_spec_factor 1.0); offset 2 allows three
    ("suffix", {}, Draft((11,)), Draft((11,))),
    ("suffix", {"max_spec_offset": "2"}, Draft((11, 12, 13)), Draft((11, 12, 13))),
    # the one branch trie: the branch after 10 in the sibling's output
    ("pia", {}, Draft((11, 12, 13)), Draft((11, 12, 13))),
    # sharing turned off: nothing from the sibling
    ("sam", {"share_group": "false"}, Draft(), Draft()),
    ("pld", {}, Draft(), Draft()),
    ("suffix", {"use_global": "false"}, Draft(), Draft()),
]


@pytest.mark.parametrize("name, options, same_problem, other_problem", SIBLING_DRAFTS,
                         ids=[f"{n}-{'-'.join(f'{k}={v}' for k, v in o.items()) or 'default'}"
                              for n, o, _, _ in SIBLING_DRAFTS])
def test_an_open_sibling_s_accepted_tokens_are_drafted(name, options, same_problem,
                                                       other_problem):
    """sam, pld and rest share within a problem only; suffix and pia across the case,
    as at batch 1."""
    assert alone(make(name, options)) == Draft()
    assert two_open(make(name, options), "g") == same_problem
    assert two_open(make(name, options), "other") == other_problem


def test_sam_copies_the_longest_match_among_its_sources():
    """Sequence 0 repeats its own text (match 2), the finished sample holds a match of
    3, an open sibling one of 4: the sibling's wins; once the sibling is finished its
    text is in the group automaton and the match stays."""
    sam = make("sam", {})
    sam.begin(DraftRequest((7, 8, 9), "g"))
    sam.accept((5, 6, 20, 21))
    sam.end()  # finished: 7 8 9 5 6 20 21
    first = sam.open(DraftRequest((7, 8, 9), "g", sample=1))
    second = sam.open(DraftRequest((7, 8, 9), "g", sample=2))
    second.accept((4, 5, 6, 30, 31, 32))
    first.accept((5, 6, 40, 5, 6))  # own: "5 6" earlier; finished: "5 6" after "9"
    assert first.propose((7, 8, 9, 5, 6, 40, 5, 6), 3) == Draft((40, 5, 6))
    first.accept((30,))  # now "6 30" only in the sibling
    assert first.propose((7, 8, 9, 5, 6, 40, 5, 6, 30), 3) == Draft((31, 32))
    second.end()
    assert first.propose((7, 8, 9, 5, 6, 40, 5, 6, 30), 3) == Draft((31, 32))


def test_a_sibling_s_match_survives_its_automaton_growing():
    """The sibling's automaton splits states as it grows; the match moves to the state
    that holds it now (SuffixAutomaton.normalize): the state that reading the matched
    string from the start reaches."""
    from pytest_specdec.drafters.sam import SuffixAutomaton

    rng = random.Random(3)
    growing, match, moved = SuffixAutomaton(), (0, 0), 0
    consumed: list[int] = []
    for _ in range(400):
        growing.extend((rng.randrange(3),))  # the sibling accepts a token
        consumed.append(rng.randrange(3))  # so does the sequence that follows it
        match = growing.advance(match, consumed[-1:])
        growing.extend((rng.randrange(3),))
        state, length = growing.normalize(*match)
        moved += state != match[0]
        reached = 0
        for token in consumed[len(consumed) - length:]:
            reached = growing.transitions[reached][token]
        assert reached == state
        match = (state, length)
    assert moved > 0  # states did split under the match


def test_suffix_counts_a_growing_response_caught_up_by_another():
    """Sequence 1 repeats sequence 0's response as far as it has come; sequence 0's
    next token is then counted under the string both wrote."""
    suffix = make("suffix", {})
    first = suffix.open(DraftRequest((1,), "g"))
    second = suffix.open(DraftRequest((1,), "g", sample=1))
    first.accept((5, 6, 7))
    second.accept((5, 6, 7))
    first.accept((8,))
    assert suffix.global_trie.count((5, 6, 7)) == 2
    assert suffix.global_trie.count((6, 7, 8)) == 1
    second.accept((8,))
    assert suffix.global_trie.count((6, 7, 8)) == 2


def test_pia_takes_back_only_the_ending_sequence_s_prompt_counts():
    pia = make("pia", {})
    first = pia.open(DraftRequest((1, 2, 3, 4), "g"))
    second = pia.open(DraftRequest((1, 2, 3, 4), "g", sample=1))
    assert pia.trie.trees[2].children[3].prompt == 2
    first.end()
    assert pia.trie.trees[2].children[3].prompt == 1
    assert second.propose((9, 2), 2) == Draft((3, 4))
    second.end()
    assert pia.trie.trees[2].children[3].prompt == 0


def test_problem_memory_follows_several_open_sequences():
    memory = ProblemMemory(lambda previous, sequences: len(sequences))
    a0 = memory.open(DraftRequest((1,), "A"))
    a1 = memory.open(DraftRequest((2,), "A", sample=1))
    b0 = memory.open(DraftRequest((3,), "B"))
    a1.extend((5,))
    assert memory.open_sequences("A") == (a0, a1) and memory.open_sequences("B") == (b0,)
    assert memory.close(a1) == (2, 5) and memory.close(a1) is None
    assert memory.open_sequences("A") == (a0,)
    assert memory.sequences("A") == ((2, 5),) and memory.index("A") == 1
    assert memory.sequences("B") == () and memory.index("B") is None


# --------------------------------------------------------------------------- the engine

@pytest.mark.parametrize("temperature", [0.0, 0.6])
@pytest.mark.parametrize("name, options", CONCURRENT, ids=[n for n, _ in CONCURRENT])
def test_one_shared_instance_equals_plain_decoding(small_vocab, name, options, temperature):
    """Every row of a batch of two problems' samples served by one instance, through
    a handle each; batch 1 (the same kind of instance, one sequence at a time) too."""
    requests = samples(temperature, n=3, groups=("g", "h"))
    shared = make(name, options)
    k = draft_depth(shared)
    out = generate_batch(small_vocab, requests, [shared] * len(requests), k=k, drafter_name=name)
    truth = plain(small_vocab, requests)
    assert [g.tokens for g in out] == truth
    one = make(name, options)
    assert [generate(small_vocab, r, one, k=k, drafter_name=name).tokens
            for r in requests] == truth


def mat(generations) -> float:
    return sum(len(g.tokens) for g in generations) / sum(len(g.steps) for g in generations)


@pytest.mark.parametrize("temperature", [0.0, 0.6])
@pytest.mark.parametrize("name", ["sam", "suffix", "pia", "rest"])
def test_sharing_with_open_siblings_loses_no_mat(small_vocab, name, temperature):
    """Best-of-N at batch 4: one instance for the batch drafts at least as well as one
    per row (each of which sees one sample); REST, which has nothing but the problem's
    other sequences to search, drafts only with the siblings open beside it."""
    requests = samples(temperature, n=4, budget=64)
    together = generate_batch(small_vocab, requests, [make(name, {})] * 4, k=8,
                              drafter_name=name)
    per_row = generate_batch(small_vocab, requests, [make(name, {}) for _ in requests], k=8,
                             drafter_name=name)
    assert [g.tokens for g in together] == [g.tokens for g in per_row]
    assert mat(together) >= mat(per_row)
    if name == "rest" and temperature == 0.0:
        assert mat(per_row) == 1.0 < mat(together)


def test_engine_batch_method_makes_one_instance_only_for_a_declared_drafter(small_vocab):
    requests = samples(0.6, n=4)
    truth = plain(small_vocab, requests)
    sam = engine_batch_method(small_vocab, lambda: make("sam", {}), batch=4, k=5,
                              drafter_name="sam")
    old = engine_batch_method(small_vocab, OldStyle, batch=4, k=2, drafter_name="old")
    assert len(sam.drafters) == 1 and len(old.drafters) == 4
    assert [g.tokens for g in sam(requests)] == truth
    assert [g.tokens for g in old(requests)] == truth
    assert [g.tokens for g in sam(requests[:3])] == truth[:3]  # a last, smaller batch


@pytest.mark.parametrize("temperature", [0.0, 0.6])
def test_a_third_party_drafter_without_the_declaration_runs_at_batch_4(small_vocab, temperature):
    requests = samples(temperature, n=4, seed=1)
    out = generate_batch(small_vocab, requests, [OldStyle() for _ in requests], k=2,
                         drafter_name="old")
    assert [g.tokens for g in out] == plain(small_vocab, requests)
    assert sum(g.stats.drafted for g in out) > 0
    with pytest.raises(ValueError, match="the same drafter instance serves two requests"):
        shared = OldStyle()
        generate_batch(small_vocab, requests, [shared] * 4, k=2)


class Failing(ConcurrentDrafterBase):
    """A concurrent drafter whose handles break one rule, in sample 2's handle only."""

    def __init__(self, failure: str):
        self.failure = failure

    def open(self, request: DraftRequest) -> SequenceDrafter:
        if self.failure == "open" and request.sample == 2:
            raise RuntimeError("no handle today")
        if self.failure == "no-methods" and request.sample == 2:
            return object()  # type: ignore[return-value]
        return FailingSequence(self.failure if request.sample == 2 else "")


class FailingSequence(SequenceDrafter):
    def __init__(self, failure: str):
        self.failure, self.steps = failure, 0

    def propose(self, context: Sequence[int], k: int) -> Draft:
        self.steps += 1
        if self.steps == 3 and self.failure == "raises":
            raise KeyError("lost")
        if self.steps == 3 and self.failure == "too-deep":
            return Draft((1,) * (k + 1))
        if self.steps == 3 and self.failure == "writes-context":
            context._tokens.append(1)  # type: ignore[attr-defined]
        return Draft((context[-1],))


@pytest.mark.parametrize("failure, rule", [
    ("raises", "propose does not raise"),
    ("too-deep", "at most k tokens deep"),
    ("writes-context", "the context is read-only"),
    ("open", "open does not raise"),
    ("no-methods", "open returns a sequence with propose, accept and end"),
])
def test_a_failing_handle_fails_its_drafter_s_case_only(small_vocab, failure, rule):
    """The guard checks a handle's calls as a drafter's; the error names the drafter,
    and the next case (another drafter on the same target) is unaffected."""
    requests = samples(0.0, n=4)
    shared = Failing(failure)
    with pytest.raises(DraftError, match=re.escape(f"drafter 'failing' broke the rule '{rule}'")):
        generate_batch(small_vocab, requests, [shared] * 4, k=3, drafter_name="failing")
    fine = Failing("")
    out = generate_batch(small_vocab, requests, [fine] * 4, k=3, drafter_name="fine")
    assert [g.tokens for g in out] == plain(small_vocab, requests)


# --------------------------------------------------------------------------- the docs' example

def docs_example() -> dict:
    """The Python block of docs/drafters.md that defines SharedBigrams, executed."""
    text = DOCS.read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
    (source,) = [b for b in blocks if "class SharedBigrams" in b]
    namespace: dict = {}
    exec(compile(source, str(DOCS), "exec"), namespace)
    return namespace


def test_the_documented_example_shares_between_open_siblings():
    example = docs_example()["SharedBigrams"]
    drafter = example(length=2)
    assert serves_concurrent_sequences(drafter)
    first = drafter.open(DraftRequest((1, 2), "g"))
    second = drafter.open(DraftRequest((1, 2), "g", sample=1))
    other = drafter.open(DraftRequest((1, 2), "h"))
    second.accept((5, 6, 7))
    assert first.propose((1, 2, 5), 4) == Draft((6, 7))
    assert other.propose((1, 2, 5), 4) == Draft()  # another problem's table


@pytest.mark.parametrize("temperature", [0.0, 0.6])
def test_the_documented_example_runs_batched_and_alone(small_vocab, temperature):
    example = docs_example()["SharedBigrams"]
    requests = samples(temperature, n=3, groups=("g", "h"))
    shared = example()
    out = generate_batch(small_vocab, requests, [shared] * len(requests), k=3,
                         drafter_name="shared_bigrams")
    truth = plain(small_vocab, requests)
    assert [g.tokens for g in out] == truth
    if temperature == 0.0:  # a random model at T=0.6 rarely repeats a bigram
        assert sum(g.stats.accepted for g in out) > 0
    one = example()
    assert [generate(small_vocab, r, one, k=3).tokens for r in requests] == truth


# --------------------------------------------------------------------------- the record

class PerRow(DrafterBase):
    """A third-party drafter without the declaration: one instance per open sequence."""

    max_depth = 2

    def propose(self, context: Sequence[int], k: int) -> Draft:
        return Draft(tuple(context[-1:]))


@pytest.fixture(scope="module")
def tokenized(tiny_model_dir):
    """The tiny random model with the embedded tokenizer (a session encodes prompts)."""
    from pytest_specdec.engine.target import load_target

    return load_target(str(tiny_model_dir), device="cpu", dtype="float32")


def session_records(target, tmp_path, batch: int) -> dict[str, dict]:
    """The baseline's, sam's and a third party's records of one small Best-of-N case."""
    from pytest_specdec.bench.problems import load_problems
    from pytest_specdec.bench.session import ParadigmCase, SpecdecSession
    from pytest_specdec.protocol.spec import DrafterSpec

    cfg = small_config(tmp_path)
    registry = load_registry()
    registry.add("per_row", PerRow, "test")
    session = SpecdecSession(cfg, registry, load_problems("embedded", limit=2), lambda: target)
    case = ParadigmCase("best_of_n", 0.0, batch=batch)
    return {"baseline": session.run_baseline_case(case, None),
            "sam": session.run_speculative_case(DrafterSpec("sam"), case, None),
            "per_row": session.run_speculative_case(DrafterSpec("per_row"), case, None)}


def test_a_record_says_whether_one_instance_served_every_row(tokenized, tmp_path):
    batched = session_records(tokenized, tmp_path, 4)
    assert batched["sam"]["drafter_instances"] == "shared"
    assert batched["per_row"]["drafter_instances"] == "per sequence"
    assert "drafter_instances" not in batched["baseline"]
    alone = session_records(tokenized, tmp_path, 1)
    assert not any("drafter_instances" in r for r in alone.values())
