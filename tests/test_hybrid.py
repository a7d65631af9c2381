"""Hybrid drafters (A+B): the rule on table inputs, SAM's depth standing for its match
length, options parsed and routed to each part, every call forwarded (hidden states
split by part, probes routed), a part's failure named, losslessness through the
engine, and a plugin run of ``--specdec-drafter sam+pld``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from pytest_specdec import cli
from pytest_specdec.drafters.pld import PromptLookup
from pytest_specdec.drafters.sam import SamDecoding
from pytest_specdec.engine import GenerationRequest, generate
from pytest_specdec.protocol.drafter import (Draft, DraftError, DrafterBase, DraftRequest,
                                             TargetSignals, draft_depth, drafter_record_fields)
from pytest_specdec.protocol.hybrid import (DEFAULT_THRESHOLD, LIST_NOTE, Hybrid, HybridPartError,
                                            cut, sam_depth)
from pytest_specdec.protocol.registry import Registry, load_registry
from pytest_specdec.protocol.sampling import Sampler
from pytest_specdec.protocol.spec import DrafterSpec, parse_drafter_spec as _drafter

A_TOKEN, B_TOKEN = 1, 2


class Chain(DrafterBase):
    """Proposes `size` copies of `token` (at most k), or a tree of that depth; logs every call."""

    def __init__(self, token: int, size: int, max_depth: int = 40, tree: bool = False,
                 probes: tuple[int, ...] = (), needs: frozenset[str] = frozenset()):
        self.token, self.size, self.max_depth, self.tree = token, size, max_depth, tree
        self.probes, self.needs = probes, frozenset(needs)
        self.calls: list[tuple] = []
        self.asked: list[int] = []
        self.signals: list[TargetSignals] = []

    def begin(self, request):
        self.calls.append(("begin", request.group))

    def propose(self, context, k):
        self.asked.append(k)
        depth = min(self.size, k)
        probes = dict(probe_tokens=self.probes, probe_parents=(-1,) * len(self.probes))
        if self.tree and depth:  # a chain plus a sibling at every depth
            tokens = tuple(self.token for _ in range(2 * depth))
            parents = tuple(-1 if i < 2 else 2 * (i // 2) - 2 for i in range(2 * depth))
            return Draft(tokens, parents, **probes)
        return Draft((self.token,) * depth, **probes)

    def observe(self, signals):
        self.signals.append(signals)

    def accept(self, tokens):
        self.calls.append(("accept", tuple(tokens)))

    def end(self):
        self.calls.append(("end",))


def hybrid(a_size, b_size, *, threshold=0, a_depth=40, b_depth=40, tree=False, **kw) -> Hybrid:
    return Hybrid(Chain(A_TOKEN, a_size, a_depth, tree=tree), Chain(B_TOKEN, b_size, b_depth),
                  threshold=threshold, names=("a", "b"), **kw)


# --------------------------------------------------------------------------- the rule

RULE_CASES = [
    # id, A's size, B's size, threshold, k, A's depth, B's depth,
    #     expected: (part, draft depth, k asked of A, k asked of B or None)
    ("a-at-the-threshold", 5, 3, 5, 8, 40, 40, ("a", 5, 8, None)),
    ("a-above-the-threshold", 8, 3, 5, 8, 40, 40, ("a", 8, 8, None)),
    ("a-one-short", 4, 3, 5, 8, 40, 40, ("b", 3, 8, 8)),
    ("a-empty", 0, 3, 5, 8, 40, 40, ("b", 3, 8, 8)),
    ("b-empty-a-shallow-falls-back-to-a", 3, 0, 5, 8, 40, 40, ("a", 3, 8, 8)),
    ("both-empty", 0, 0, 5, 8, 40, 40, ("b", 0, 8, 8)),
    ("threshold-1-any-a-draft", 1, 3, 1, 8, 40, 40, ("a", 1, 8, None)),
    # the threshold is judged above a small k (the cpu profile), then the draft is cut
    ("a-asked-past-k-then-cut", 30, 3, 21, 5, 40, 40, ("a", 5, 21, None)),
    ("a-past-k-but-short", 20, 3, 21, 5, 40, 40, ("b", 3, 21, 5)),
    # each part is asked for at most its own max_depth within k
    ("b-capped-at-its-depth", 0, 9, 5, 8, 40, 3, ("b", 3, 8, 3)),
    ("a-capped-at-its-depth", 9, 2, 5, 8, 6, 40, ("a", 6, 6, None)),
    # the default threshold: 21 (SAM's depth for a 5-token match), capped at A's depth
    ("default-threshold-21", 20, 3, 0, 40, 40, 40, ("b", 3, 40, 40)),
    ("default-threshold-21-met", 21, 3, 0, 40, 40, 40, ("a", 21, 40, None)),
    ("default-threshold-capped-at-a-depth", 10, 3, 0, 10, 10, 40, ("a", 10, 10, None)),
]


@pytest.mark.parametrize("a_size, b_size, threshold, k, a_depth, b_depth, expected",
                         [c[1:] for c in RULE_CASES], ids=[c[0] for c in RULE_CASES])
def test_the_rule_picks_a_when_its_draft_is_deep_enough_else_b(a_size, b_size, threshold, k,
                                                               a_depth, b_depth, expected):
    h = hybrid(a_size, b_size, threshold=threshold, a_depth=a_depth, b_depth=b_depth)
    h.begin(DraftRequest((5, 6), "g"))
    draft = h.propose((5, 6), k)
    part, depth, asked_a, asked_b = expected
    token = {"a": A_TOKEN, "b": B_TOKEN}[part]
    assert draft == Draft((token,) * depth)
    assert h.part_list[0].asked == [asked_a]
    assert h.part_list[1].asked == ([] if asked_b is None else [asked_b])
    other = "b" if part == "a" else "a"
    assert h.parts == {part: {"steps": 1, "tokens": depth}, other: {"steps": 0, "tokens": 0}}


def test_a_tree_draft_is_cut_to_k_depth():
    tree = Draft((10, 11, 12, 13, 14, 15), (-1, -1, 0, 0, 2, 4))  # depths 1 1 2 2 3 4
    assert cut(tree, 2) == Draft((10, 11, 12, 13), (-1, -1, 0, 0))
    assert cut(tree, 4) == tree
    assert cut(Draft((1, 2, 3), probe_tokens=(9,), probe_parents=(-1,)), 1) == \
        Draft((1,), probe_tokens=(9,), probe_parents=(-1,))
    h = hybrid(6, 2, threshold=5, tree=True)
    h.begin(DraftRequest((5,), "g"))
    draft = h.propose((5,), 3)
    assert draft.depth == 3 and len(draft) == 6 and draft.tokens == (A_TOKEN,) * 6


# SAM's depth for a match of L tokens is 1 + 4 L, so threshold sam_depth(L) is "match >= L"
@pytest.mark.parametrize("match, min_match, k, part", [
    (4, 5, 40, "pld"), (5, 5, 40, "sam"), (6, 5, 40, "sam"),
    (4, 5, 5, "pld"), (5, 5, 5, "sam"),  # the cpu profile's k: the same choice
    (1, 1, 40, "sam"), (2, 3, 40, "pld"), (3, 3, 40, "sam"),
])
def test_a_sam_depth_threshold_is_a_match_length_threshold(match, min_match, k, part):
    assert sam_depth(5) == DEFAULT_THRESHOLD == 21
    prefix = list(range(10, 10 + match))
    context = (*prefix, *range(200, 230), *prefix)  # the longest repeat: `prefix` (match)
    h = Hybrid(SamDecoding(share_group=False), Chain(B_TOKEN, 2), names=("sam", "pld"),
               threshold=sam_depth(min_match))
    h.begin(DraftRequest(context, "g"))
    draft = h.propose(context, k)
    assert h.parts[part]["steps"] == 1
    expected_a = min(k, sam_depth(match))
    assert draft.tokens == ((*range(200, 230), *prefix)[:expected_a] if part == "sam"
                            else (B_TOKEN, B_TOKEN))


@pytest.mark.parametrize("threshold, part", [(DEFAULT_THRESHOLD, "pld"), (8, "sam"), (9, "pld")])
def test_a_loop_shorter_than_the_threshold_goes_to_b(threshold, part):
    """The documented difference: in text with period 8, SAM's copy is 8 tokens deep
    however long the match (the reference would pick SAM: its match is >= 5)."""
    context = tuple(range(20, 28)) * 4
    h = Hybrid(SamDecoding(share_group=False), Chain(B_TOKEN, 2), names=("sam", "pld"),
               threshold=threshold)
    h.begin(DraftRequest(context, "g"))
    draft = h.propose(context, 40)
    assert h.parts[part]["steps"] == 1
    assert draft.tokens == (tuple(range(20, 28)) if part == "sam" else (B_TOKEN, B_TOKEN))


def test_every_call_reaches_both_parts_whichever_drafted():
    h = hybrid(5, 3, threshold=5)
    h.begin(DraftRequest((5, 6), "g"))
    h.propose((5, 6), 8)
    h.accept((A_TOKEN, 7))
    h.part_list[0].size = 0
    h.propose((5, 6, A_TOKEN, 7), 8)
    h.accept((B_TOKEN,))
    h.accept((9,))  # a step without a propose (no room left in the budget)
    h.end()
    expected = [("begin", "g"), ("accept", (A_TOKEN, 7)), ("accept", (B_TOKEN,)), ("accept", (9,)),
                ("end",)]
    assert h.part_list[0].calls == expected and h.part_list[1].calls == expected
    assert h.parts == {"a": {"steps": 1, "tokens": 5}, "b": {"steps": 1, "tokens": 3}}


def test_needs_and_max_depth_come_from_both_parts():
    a = Chain(A_TOKEN, 1, 40, needs=frozenset({"top_k"}))
    b = Chain(B_TOKEN, 1, 6, needs=frozenset({"hidden_states", "output_head"}))
    h = Hybrid(a, b, names=("a", "b"))
    assert h.needs == {"top_k", "hidden_states", "output_head"}
    assert (h.max_depth, h.depths, h.threshold) == (40, (40, 6), 21)
    assert Hybrid(a, b, names=("a", "b"), max_depth=12).max_depth == 12


class Weighted(Chain):
    """A part that states the digest of weights it loaded, as a model drafter does."""

    def record_fields(self):
        return {"drafter_note": "", "drafter_weights": "a41e460907035687"}


@pytest.mark.parametrize("parts, weights", [
    ((Chain(A_TOKEN, 2), Chain(B_TOKEN, 2)), None),
    ((Chain(A_TOKEN, 2), Weighted(B_TOKEN, 2)), "b:a41e460907035687"),
    ((Weighted(A_TOKEN, 2), Weighted(B_TOKEN, 2)), "a:a41e460907035687,b:a41e460907035687"),
])
def test_a_hybrid_records_its_model_parts_weights_each_named(parts, weights):
    fields = drafter_record_fields(Hybrid(*parts, names=("a", "b")))
    assert fields.get("drafter_weights") == weights
    assert fields["hybrid_parts"] == {"a": {"steps": 0, "tokens": 0},
                                      "b": {"steps": 0, "tokens": 0}}


def test_probes_of_both_parts_travel_and_each_gets_its_own_choices():
    a = Chain(A_TOKEN, 2, probes=(30, 31), needs=frozenset({"probe_choices"}))
    b = Chain(B_TOKEN, 3, probes=(40,), needs=frozenset({"probe_choices", "top_k"}))
    h = Hybrid(a, b, names=("a", "b"), threshold=5)
    h.begin(DraftRequest((5,), "g"))
    draft = h.propose((5,), 8)  # A too shallow: B drafts, A's probes come along
    assert draft == Draft((B_TOKEN,) * 3, None, (30, 31, 40), (-1, -1, -1))
    top = torch.zeros(4, 2, dtype=torch.long)
    h.observe(TargetSignals(top_k=top, top_k_after=(5, 2, 2, 2), probe_choices=(7, 8, 9)))
    assert a.signals[-1] == TargetSignals(probe_choices=(7, 8))  # no top_k: A did not ask
    assert b.signals[-1].probe_choices == (9,) and b.signals[-1].top_k is top
    h.accept((B_TOKEN, 4))
    a.size = 6
    assert h.propose((5, B_TOKEN, 4), 8) == Draft((A_TOKEN,) * 6, None, (30, 31), (-1, -1))
    h.observe(TargetSignals(probe_choices=(1, 2)))
    assert a.signals[-1].probe_choices == (1, 2) and b.signals[-1].probe_choices == ()


# --------------------------------------------------------------------------- through the engine

PROMPT = (1, 17, 42, 99, 250, 3, 77)


class Collector(Chain):
    """Keeps every hidden-state row it is given, by position, and what attach lent it."""

    def __init__(self, token, size, layers, needs):
        super().__init__(token, size, needs=frozenset(needs))
        self.hidden_layers = layers
        self.rows: dict[int, torch.Tensor] = {}
        self.infos = []

    def attach(self, target):
        self.infos.append(target)

    def observe(self, signals):
        for i, row in enumerate(signals.hidden_states):
            self.rows[signals.hidden_start + i] = row.clone()


class Plain:
    """A part written without DrafterBase: no attach, observe or hidden_layers."""

    def begin(self, request):
        pass

    def propose(self, context, k):
        return Draft()

    def accept(self, tokens):
        pass

    def end(self):
        pass


@pytest.mark.parametrize("a_layers, b_layers, a_resolved, b_resolved", [
    ((1,), (2, 0), (1,), (2, 0)),
    ((), (-1, 1), (2,), (2, 1)),  # () is the last layer; shared layers are asked once
    ((0, 1), None, (0, 1), None),  # B needs no hidden states
])
def test_each_part_gets_the_hidden_states_of_its_own_layers(llama, a_layers, b_layers,
                                                            a_resolved, b_resolved):
    a = Collector(A_TOKEN, 6, a_layers, {"hidden_states", "embeddings"})
    b = Collector(B_TOKEN, 2, b_layers or (), {"hidden_states"} if b_layers else set())
    h = Hybrid(a, b, names=("a", "b"), threshold=3)
    out = generate(llama, GenerationRequest(PROMPT, 10), h, k=4)
    sequence = [*PROMPT, *out.tokens]
    with torch.no_grad():
        states = llama.model(input_ids=torch.tensor([sequence[:-1]]),
                             output_hidden_states=True).hidden_states
    assert h.hidden_layers == tuple(dict.fromkeys(a_resolved + (b_resolved or ())))
    for part, resolved in ((a, a_resolved), (b, b_resolved)):
        assert len(part.infos) == 1
        if resolved is None:
            assert part.rows == {}
            continue
        got = torch.stack([part.rows[i] for i in range(len(sequence) - 1)])
        expected = torch.cat([states[j][0] for j in resolved], dim=-1)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    # each part is lent only the target tensors it named
    assert a.infos[0].embeddings is not None and b.infos[0].embeddings is None
    # a part without attach or observe works beside one with them
    generate(llama, GenerationRequest(PROMPT, 6), Hybrid(Plain(), a, names=("p", "a")), k=4)


class Boom(Chain):
    def __init__(self, where):
        super().__init__(B_TOKEN, 2)
        self.where = where

    def begin(self, request):
        if self.where == "begin":
            raise RuntimeError("no begin")

    def propose(self, context, k):
        if self.where == "propose":
            raise ValueError("no draft")
        if self.where == "bad-draft":
            return [1, 2]
        return super().propose(context, k)

    def accept(self, tokens):
        if self.where == "accept":
            raise KeyError("no accept")


@pytest.mark.parametrize("where, text", [
    ("begin", "part 'boom' of sam+boom raised in begin: RuntimeError: no begin"),
    ("propose", "part 'boom' of sam+boom raised in propose: ValueError: no draft"),
    ("accept", "part 'boom' of sam+boom raised in accept: KeyError: 'no accept'"),
    ("bad-draft", "part 'boom' of sam+boom proposed a bad draft: drafter 'boom' broke the "
                  "rule 'propose returns a Draft': got list"),
])
def test_a_part_that_raises_fails_the_hybrids_case_naming_the_part(llama, where, text):
    h = Hybrid(SamDecoding(), Boom(where), names=("sam", "boom"))
    with pytest.raises(DraftError) as caught:
        generate(llama, GenerationRequest(PROMPT, 8), h, k=4, drafter_name="sam+boom")
    assert caught.value.drafter == "sam+boom"
    assert f"{HybridPartError.__name__}: {text}" in caught.value.detail


REPETITIVE = (5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 7, 8, 9, 10) * 3


@pytest.mark.parametrize("temperature", [0.0, 0.6])
@pytest.mark.parametrize("threshold", [1, 5, 0])
def test_sam_plus_pld_is_lossless_through_the_engine(llama, temperature, threshold):
    registered = load_registry().get("sam+pld")
    options = registered.convert_options({"threshold": str(threshold)})
    for seed, group in ((1, "g"), (2, "h")):
        request = GenerationRequest(REPETITIVE, 40, Sampler(temperature, seed), group=group)
        plain = generate(llama, request)
        h = registered.create(**options)
        out = generate(llama, request, h, k=options["max_depth"], drafter_name="sam+pld")
        assert out.tokens == plain.tokens and out.stop == plain.stop
        # propose runs in each step with room for a draft token in the budget
        before = [sum(s.emitted for s in out.steps[:i]) for i in range(len(out.steps))]
        proposes = sum(1 for b in before if 40 - b - 1 > 0)
        assert sum(p["steps"] for p in h.parts.values()) == proposes
        assert sum(p["tokens"] for p in h.parts.values()) == sum(s.drafted for s in out.steps)
        if (temperature, threshold) == (0.0, 5):  # both parts drafted here
            assert all(p["tokens"] > 0 for p in h.parts.values()), h.parts


# --------------------------------------------------------------------------- names and options

def registry() -> Registry:
    class Head(DrafterBase):
        max_depth = 6

        def __init__(self, model: str = "", depth: int = 3, greedy: bool = True):
            self.model, self.depth, self.greedy = model, depth, greedy

    reg = Registry()
    reg.add("sam", SamDecoding, "test")
    reg.add("pld", PromptLookup, "test")
    reg.add("eagle3", Head, "test")
    reg.add("a.b", Head, "test")
    reg.add("a", SamDecoding, "test")
    return reg


@pytest.mark.parametrize("text, spec", [
    ("sam+eagle3", DrafterSpec("sam+eagle3")),
    ("sam+eagle3:threshold=5,eagle3.model=/path", DrafterSpec(
        "sam+eagle3", (("threshold", "5"), ("eagle3.model", "/path")))),
    ("suffix+eagle3", DrafterSpec("suffix+eagle3")),
    ("pld+sps:sps.model=org/name", DrafterSpec("pld+sps", (("sps.model", "org/name"),))),
    ("pld", DrafterSpec("pld")),
])
def test_command_line_names_a_hybrid(text, spec):
    assert _drafter(text) == spec
    assert spec.label == text


@pytest.mark.parametrize("text", ["a+b+c", "+pld", "pld+", "sam+eagle 3"])
def test_command_line_rejects_other_shapes(text):
    with pytest.raises(argparse.ArgumentTypeError, match="A\\+B"):
        _drafter(text)


@pytest.mark.parametrize("name, raw, converted, routed", [
    ("sam+eagle3", {}, {"max_depth": 40}, ({"min_match": 1, "share_group": True},
                                           {"model": "", "depth": 3})),
    ("sam+eagle3", {"threshold": "5", "eagle3.model": "/path", "sam.min_match": "2",
                    "eagle3.greedy": "false"},
     {"threshold": 5, "eagle3.model": "/path", "sam.min_match": 2, "eagle3.greedy": False,
      "max_depth": 40},
     ({"min_match": 2, "share_group": True}, {"model": "/path", "depth": 3, "greedy": False})),
    ("pld+eagle3", {"max_depth": "8"}, {"max_depth": 8}, ({"max_ngram": 3}, {"depth": 3})),
    ("pld+eagle3", {}, {"max_depth": 10}, ({"max_ngram": 3}, {"depth": 3})),
    # "a.b.depth" is part a.b's even beside a part "a"
    ("a+a.b", {"a.b.depth": "7", "a.min_match": "3"},
     {"a.b.depth": 7, "a.min_match": 3, "max_depth": 40}, ({"min_match": 3}, {"depth": 7})),
])
def test_options_parse_and_route_to_the_right_part(name, raw, converted, routed):
    registered = registry().get(name)
    options = registered.convert_options(raw)
    assert options == converted
    assert draft_depth(registered.factory, options=options) == converted["max_depth"]
    h = registered.create(**options)
    assert isinstance(h, Hybrid) and h.names == tuple(name.split("+"))
    for part, expected in zip(h.part_list, routed):
        assert {key: getattr(part, key) for key in expected} == expected
    assert h.threshold == int(raw.get("threshold", min(21, h.depths[0])))


@pytest.mark.parametrize("name, raw, error, message", [
    ("sam+nope", {}, KeyError, "hybrid 'sam+nope': unknown drafter 'nope'; registered: a, a.b, "
                               "eagle3, pld, sam; any two combine as A+B"),
    ("sam+sam", {}, ValueError, "a hybrid names two different drafters, got 'sam+sam'"),
    ("sam+eagle3", {"model": "x"}, ValueError,
     "drafter 'sam+eagle3' has no option 'model' (accepted: threshold, max_depth, sam.min_match, "
     "sam.share_group, eagle3.model, eagle3.depth, eagle3.greedy); prefix it with the "
     "part's name: eagle3.model"),
    ("sam+eagle3", {"eagle3.depth": "deep"}, ValueError,
     "drafter 'eagle3' option depth='deep': expected int"),
    ("sam+eagle3", {"threshold": "x"}, ValueError, "drafter 'sam+eagle3' option threshold='x'"),
    ("sam+eagle3", {"threshold": "41"}, ValueError,
     "hybrid sam+eagle3: threshold 41 is deeper than 'sam' ever drafts (its max_depth is 40)"),
    ("sam+eagle3", {"sam.min_match": "0"}, ValueError,
     "hybrid sam+eagle3: part 'sam': min_match must be an integer >= 1, got 0"),
])
def test_bad_names_and_options_are_clear_errors(name, raw, error, message):
    with pytest.raises(error) as caught:
        registered = registry().get(name)
        registered.create(**registered.convert_options(raw))
    assert message in caught.value.args[0]


def test_registry_keeps_plus_for_hybrids_and_hybrids_inherit_no_ablations():
    reg = registry()
    reg.add("x+y", SamDecoding, "conftest (x)")
    assert "x+y" not in reg.drafters
    assert reg.problems == ["drafter 'x+y' from conftest (x): '+' is kept for hybrids (A+B); skipped"]
    assert not any("+" in s.name and s.options for s in reg.default_specs(ablations=True))
    assert getattr(reg.get("sam+pld").factory, "ablations", ()) == ()
    assert reg.get("sam+pld").factory.max_depth == 40


def test_list_mentions_hybrids(monkeypatch, capsys):
    monkeypatch.setattr(cli, "load_registry", registry)
    assert cli.main(["list"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"hybrids: {LIST_NOTE}"


# --------------------------------------------------------------------------- the plugin

def test_plugin_runs_a_hybrid_and_rejects_an_unknown_part(suite, tiny_model_dir, tmp_path):
    reports = tmp_path / "reports"
    common = ["-p", "no:cacheprovider", "--specdec-target", str(tiny_model_dir),
              "--specdec-problems", "1", "--specdec-max-new-tokens", "8",
              "--specdec-paradigm", "multi_round", "--benchmark-disable", "--specdec-no-peer",
              "--specdec-report-dir", str(reports), "-rf", "--tb=short"]
    result = suite.runpytest_subprocess(*common, "--specdec-drafter", "sam+pld:threshold=3",
                                        timeout=300)
    result.assert_outcomes(passed=2)
    (json_file,) = reports.glob("*.json")
    records = json.loads(json_file.read_text(encoding="utf-8"))["records"]
    assert {(r["drafter"], r["k"]) for r in records} == {("baseline", 0),
                                                          ("sam+pld:threshold=3", 40)}
    bad = suite.runpytest_subprocess(*common, "--specdec-drafter", "sam+nope", timeout=300)
    assert bad.ret == pytest.ExitCode.USAGE_ERROR
    bad.stderr.fnmatch_lines(["*--specdec-drafter sam+nope: hybrid 'sam+nope': unknown drafter "
                              "'nope'; registered: *pld*sam*; any two combine as A+B*"])


def test_report_note_names_each_parts_note():
    from pytest_specdec.drafters.pld import PromptLookup
    from pytest_specdec.drafters.rest import Rest
    from pytest_specdec.protocol.hybrid import Hybrid

    hybrid = Hybrid(Rest(), PromptLookup(), threshold=3, names=("rest", "pld"))
    assert hybrid.report_note == ("rest: no datastore: retrieves only from the problem's "
                                  "earlier sequences (each problem's first sequence drafts "
                                  "nothing)")
