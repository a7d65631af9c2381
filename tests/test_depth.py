"""Per-drafter draft depth: each drafter declares its reference's depth (``max_depth``),
``--specdec-k`` overrides it for all, the record's ``k`` is the depth a case ran with,
and the reports show it per case."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pytest_specdec.protocol.drafter import (DEFAULT_MAX_DEPTH, MAX_DRAFT_NODES, Draft, DrafterBase,
                                             DraftError, DraftRequest, draft_depth)
from pytest_specdec.protocol.registry import load_registry
from pytest_specdec.reporting import depth_text, report_meta
from pytest_specdec.reporting.compare import compare_records

#: built-in drafter -> the draft depth of its reference implementation
REFERENCE_DEPTHS = {
    "pld": 10,        # Spec-Bench inference_pld.py
    "sam": 40,        # SAM-Decoding: min(40, 1 + 4 * match length) per step
    "suffix": 64,     # SuffixDecoding: the tree depth caps its adaptive drafts
    "pia": 12,        # PIA: branch length
    "rest": 10,       # REST
    "recycling": 6,   # Token Recycling: the paper's static tree
    "lookahead": 4,   # Lookahead: N - 1 with N = 5
    "sps": 32,        # SpS: the cap of transformers' adaptive draft length (starts at 5)
    "eagle3": 8,      # EAGLE-3: depth 7 below the first level (total_token 60, top_k 10)
}


# --------------------------------------------------------------------------- declared depths


@pytest.mark.parametrize("name, depth", REFERENCE_DEPTHS.items())
def test_each_builtin_drafter_runs_at_its_reference_depth(name, depth):
    factory = load_registry().get(name).factory
    assert factory.max_depth == depth
    assert draft_depth(factory, drafter=name) == depth
    assert draft_depth(factory, override=3, drafter=name) == 3


def test_every_registered_builtin_is_in_the_table():
    builtins = {name for name, r in load_registry().drafters.items()
                if r.factory.__module__.startswith("pytest_specdec.drafters.")}
    assert builtins == set(REFERENCE_DEPTHS)


def test_a_max_depth_option_sets_the_cases_depth():
    """REST's depth is one of its options: rest:max_depth=N is that case's k."""
    rest = load_registry().get("rest").factory
    assert draft_depth(rest, options={"max_depth": 16}) == 16
    assert draft_depth(rest, options={"max_nodes": 16}) == 10
    assert draft_depth(rest, options={"max_depth": 16}, override=3) == 3
    with pytest.raises(DraftError, match="declared 300"):
        draft_depth(rest, options={"max_depth": 300}, drafter="rest:max_depth=300")


class Legacy:
    """A drafter written from an older README: no DrafterBase, no max_depth."""

    def begin(self, request): pass
    def propose(self, context, k): return Draft()
    def accept(self, tokens): pass
    def end(self): pass


def legacy_factory() -> Legacy:
    return Legacy()


@pytest.mark.parametrize("factory, expected", [
    pytest.param(Legacy, DEFAULT_MAX_DEPTH, id="class-without-max_depth"),
    pytest.param(legacy_factory, DEFAULT_MAX_DEPTH, id="function-factory"),
    pytest.param(DrafterBase, DEFAULT_MAX_DEPTH, id="DrafterBase"),
    pytest.param(type("Deep", (DrafterBase,), {"max_depth": 17}), 17, id="subclass-declares"),
    pytest.param(type("Widest", (DrafterBase,), {"max_depth": MAX_DRAFT_NODES}),
                 MAX_DRAFT_NODES, id="at-the-node-limit"),
    pytest.param(None, DEFAULT_MAX_DEPTH, id="no-factory"),
])
def test_declared_depth_and_fallback(factory, expected):
    assert DEFAULT_MAX_DEPTH == 5
    assert draft_depth(factory) == expected
    assert draft_depth(factory, override=2) == 2


@pytest.mark.parametrize("declared, shown", [
    (0, "0 (int)"), (-3, "-3 (int)"), (MAX_DRAFT_NODES + 1, f"{MAX_DRAFT_NODES + 1} (int)"),
    (True, "True (bool)"), (5.0, "5.0 (float)"), ("5", "'5' (str)"), (None, "None (NoneType)"),
])
def test_a_bad_declared_depth_is_the_drafters_error(declared, shown):
    bad = type("Bad", (DrafterBase,), {"max_depth": declared})
    with pytest.raises(DraftError) as error:
        draft_depth(bad, drafter="bad")
    assert str(error.value) == (f"drafter 'bad' broke the rule 'max_depth is an int in "
                                f"[1, {MAX_DRAFT_NODES}]': declared {shown}")
    assert draft_depth(bad, override=4) == 4  # --specdec-k makes the declaration moot


# --------------------------------------------------------------------------- SAM's own rule


@pytest.mark.parametrize("match_len, k, expected", [
    (1, 40, 5),     # 1 + 4 * 1
    (3, 40, 13),    # 1 + 4 * 3
    (9, 40, 37),
    (10, 40, 40),   # 41, capped by k
    (20, 40, 40),
    (3, 8, 8),      # k below the rule
])
def test_sam_drafts_one_plus_four_per_matched_token(match_len, k, expected):
    from pytest_specdec.drafters.sam import SamDecoding

    text = list(range(100, 200))  # 100 distinct tokens, then its first match_len again
    sam = SamDecoding(share_group=False)
    sam.begin(DraftRequest(tuple(text + text[:match_len]), "p"))
    draft = sam.propose(text + text[:match_len], k)
    assert draft.tokens == tuple(text[match_len:match_len + expected])


# --------------------------------------------------------------------------- the report


def record(role: str, drafter: str, k: int, paradigm: str = "multi_round") -> dict:
    return {"role": role, "drafter": drafter, "k": k, "paradigm": paradigm, "temperature": 0.0}


RUN = [record("baseline", "baseline", 0), record("speculative", "sam", 40),
       record("speculative", "pld", 10), record("speculative", "legacy", 5),
       record("peer", "hf_generate", 0), record("peer", "hf_pld", 10)]


@pytest.mark.parametrize("records, expected", [
    pytest.param(RUN, "legacy 5, pld 10, sam 40, hf_pld 10", id="each-drafter-its-own"),
    pytest.param([{**r, "k": 3 if r["k"] else 0} for r in RUN], "3", id="one-k-for-all"),
    pytest.param([RUN[0], RUN[4]], "—", id="no-drafting-case"),
    pytest.param(RUN + [record("speculative", "pld", 5, "best_of_n")],
                 "legacy 5, pld 10/5, sam 40, hf_pld 10", id="a-drafter-at-two-depths"),
])
def test_meta_k_is_one_depth_or_each_drafters(records, expected):
    assert depth_text(records) == expected


def test_report_meta_k_follows_the_drafting_cases(records):
    # the stored run: baseline and hf_generate carry k 10 too, but do not draft
    assert report_meta(records)["k"] == "10"
    changed = [{**r, "k": 7} if r["drafter"] == "hf_pld" else r for r in records]
    assert report_meta(changed)["k"] == "pld 10, hf_pld 7"


def test_compare_warns_per_case_when_k_differs(records):
    same_k_other_run = [{**r, "k": 0} if r["drafter"] == "baseline" else r for r in records]
    assert compare_records(records, same_k_other_run).warnings == []  # plain decoding: no k
    deeper = [{**r, "k": 40} if r["drafter"] == "pld" else r for r in records]
    assert compare_records(records, deeper).warnings == [
        "the runs differ in k (draft depth) of 2 compared case(s), BASE → NEW: "
        "pld multi_round T=0: 10 → 40; pld best_of_n T=0.6: 10 → 40"]
    # a run of fewer drafters is no difference in k
    assert compare_records(records, [r for r in records if r["drafter"] != "pld"]).warnings == []


# --------------------------------------------------------------------------- end to end

DEPTH_CONFTEST = '''
from pytest_specdec.protocol.drafter import Draft, DrafterBase


def seen(name, k):
    """Each k a propose was given, in ks.txt of the run's directory."""
    with open("ks.txt", "a") as log:
        log.write(f"{name} {k}\\n")


class Legacy:
    """No DrafterBase, no max_depth: the fallback depth."""

    def begin(self, request):
        pass

    def propose(self, context, k):
        seen("legacy", k)
        return Draft((context[-1],) * k)

    def accept(self, tokens):
        pass

    def end(self):
        pass


class Deep3(DrafterBase):
    max_depth = 3

    def propose(self, context, k):
        seen("deep3", k)
        return Draft((context[-1],) * k)


class BadDepth(DrafterBase):
    max_depth = 0


def pytest_specdec_register_drafters(config):
    return {"legacy": Legacy, "deep3": Deep3, "bad_depth": BadDepth}
'''


@pytest.fixture
def depth_suite(suite: pytest.Pytester) -> pytest.Pytester:
    suite.makeconftest(DEPTH_CONFTEST)
    return suite


def small_run(tiny_model_dir: Path, reports: Path, *drafters: str) -> list[str]:
    args = ["-p", "no:cacheprovider", "--specdec-target", str(tiny_model_dir),
            "--specdec-problems", "1", "--specdec-max-new-tokens", "8",
            "--specdec-paradigm", "multi_round", "--benchmark-disable",
            "--specdec-peer", "hf_generate,hf_pld",
            "--specdec-report-dir", str(reports), "-rf", "--tb=short"]
    for name in drafters:
        args += ["--specdec-drafter", name]
    return args


def session_report(reports: Path) -> tuple[dict, str]:
    (json_file,) = reports.glob("*.json")
    (md_file,) = reports.glob("*.md")
    return json.loads(json_file.read_text(encoding="utf-8")), md_file.read_text(encoding="utf-8")


def largest_k(pytester: pytest.Pytester) -> dict[str, int]:
    """The largest k each conftest drafter's propose was given."""
    out: dict[str, int] = {}
    for line in (pytester.path / "ks.txt").read_text().splitlines():
        name, k = line.split()
        out[name] = max(out.get(name, 0), int(k))
    return out


@pytest.mark.parametrize("profile, pld_depth, profile_text", [
    (["--specdec-depth-profile", "reference"], 10, "reference (each drafter at its "),
    ([], 10, "reference (each drafter at its "),  # the default
    (["--specdec-depth-profile", "auto"], 5, "cpu (each drafter's reference depth capped at 5;"),
    (["--specdec-depth-profile", "cpu"], 5, "cpu (each drafter's reference depth capped at 5;"),
], ids=["reference", "default", "auto-on-cpu", "cpu"])
def test_cases_run_at_each_drafters_depth(depth_suite, tiny_model_dir, tmp_path, profile,
                                          pld_depth, profile_text):
    reports = tmp_path / "reports"
    result = depth_suite.runpytest_subprocess(
        *small_run(tiny_model_dir, reports, "pld", "legacy", "deep3", "bad_depth"), *profile,
        timeout=300)
    result.assert_outcomes(passed=6, failed=1)
    result.stdout.fnmatch_lines(["*DraftError: drafter 'bad_depth' broke the rule "
                                 "'max_depth is an int in [[]1, 256[]]': declared 0 (int)*",
                                 "FAILED *test_speculative[[]bad_depth-multi_round[]]*"])
    data, markdown = session_report(reports)
    assert {r["drafter"]: r["k"] for r in data["records"]} == {
        "baseline": 0, "legacy": DEFAULT_MAX_DEPTH, "deep3": 3, "pld": pld_depth,
        "hf_generate": 0, "hf_pld": pld_depth}
    # the first step of a sequence has room for 7 draft tokens (the budget is 8): the
    # largest k a propose got is the case's depth
    assert largest_k(depth_suite) == {"legacy": DEFAULT_MAX_DEPTH, "deep3": 3}
    k_text = f"deep3 3, legacy 5, pld {pld_depth}, hf_pld {pld_depth}" if pld_depth != 5 else \
        "deep3 3, legacy 5, pld 5, hf_pld 5"
    assert data["meta"]["k"] == k_text
    assert f"- **k**: {k_text}\n" in markdown
    assert data["meta"]["depth profile"].startswith(profile_text)
    assert f"- **depth profile**: {profile_text}" in markdown
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[1:-1]]
            for line in markdown.split("## Details", 1)[1].split("\n## ", 1)[0].splitlines()
            if line.startswith("| ")}
    assert rows["drafter"][:4] == ["drafter", "paradigm", "T", "k"]
    assert {name: rows[name][3] for name in ("baseline", "legacy", "deep3", "pld", "hf_pld",
                                             "hf_generate")} == {
        "baseline": "—", "legacy": "5", "deep3": "3", "pld": str(pld_depth),
        "hf_pld": str(pld_depth), "hf_generate": "—"}


def test_specdec_k_overrides_every_drafters_depth(depth_suite, tiny_model_dir, tmp_path):
    reports = tmp_path / "reports"
    result = depth_suite.runpytest_subprocess(
        *small_run(tiny_model_dir, reports, "legacy", "deep3", "bad_depth"),
        "--specdec-k", "2", timeout=300)
    result.assert_outcomes(passed=6)  # a bad declaration is moot under an override
    data, markdown = session_report(reports)
    assert {r["drafter"]: r["k"] for r in data["records"]} == {
        "baseline": 0, "legacy": 2, "deep3": 2, "bad_depth": 2, "hf_generate": 0, "hf_pld": 2}
    assert largest_k(depth_suite) == {"legacy": 2, "deep3": 2}
    assert data["meta"]["k"] == "2 (--specdec-k)"
    assert "- **k**: 2 (--specdec-k)\n" in markdown


@pytest.mark.parametrize("value", ["0", "-1", "abc", "2.5", str(MAX_DRAFT_NODES + 1)])
def test_specdec_k_must_be_a_depth_the_drafts_can_have(suite, tiny_model_dir, value):
    result = suite.runpytest_subprocess("-p", "no:cacheprovider", "--specdec-target",
                                        str(tiny_model_dir), f"--specdec-k={value}", timeout=300)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*error: argument --specdec-k: expected a draft depth in "
                                 f"1..{MAX_DRAFT_NODES}, got '{value}'*"])


@pytest.mark.parametrize("profile, device, resolved", [
    ("auto", "cpu", "cpu"), ("auto", "cuda", "reference"), ("reference", "cpu", "reference"),
    ("cpu", "cuda", "cpu"),
])
def test_depth_profile_resolution(profile, device, resolved):
    from pytest_specdec.protocol.drafter import depth_profile

    assert depth_profile(profile, device) == resolved


@pytest.mark.parametrize("declared, profile, override, options, expected", [
    (40, "reference", None, {}, 40),
    (40, "cpu", None, {}, 5),       # capped
    (3, "cpu", None, {}, 3),        # below the cap: unchanged
    (40, "cpu", 12, {}, 12),        # --specdec-k is never capped
    (10, "cpu", None, {"max_depth": 16}, 5),  # nor raised by the profile
])
def test_cpu_profile_caps_declared_depths(declared, profile, override, options, expected):
    from pytest_specdec.protocol.drafter import draft_depth

    class Declares:
        max_depth = declared

    assert draft_depth(Declares, override=override, options=options, profile=profile) == expected


def test_unknown_depth_profile_is_refused():
    from pytest_specdec.protocol.drafter import depth_profile

    with pytest.raises(ValueError, match="depth profile 'fast' is not one of auto, reference, cpu"):
        depth_profile("fast", "cpu")
