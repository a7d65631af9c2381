"""The pytest plugin end to end: pytest runs the real suite (suites/test_cases.py) in a
subprocess, on the tiny random Llama of ``tiny_model_dir``.

Every run is a fresh ``python -m pytest`` (5-8 s of torch/transformers import each), so
checks share runs where that stays readable, and ``--collect-only`` is used wherever no
case has to run.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from conftest import SUITE
from pytest_specdec.plugin.options import OPTIONS
from pytest_specdec.protocol.registry import load_registry

USAGE_ERROR = pytest.ExitCode.USAGE_ERROR  # 4


# --------------------------------------------------------------------------- helpers


@pytest.fixture
def small(tiny_model_dir: Path) -> list[str]:
    """Options of a small, fast session on the tiny model."""
    return ["-p", "no:cacheprovider", "--specdec-target", str(tiny_model_dir),
            "--specdec-problems", "1", "--specdec-max-new-tokens", "8", "--specdec-n", "2"]


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess(*args, timeout=300)


def collected_ids(result: pytest.RunResult) -> list[str]:
    """Test ids from ``--collect-only -q`` output, in collection order, without the path."""
    return [line.split("::", 1)[1] for line in result.outlines if "test_cases.py::" in line]


def case_ids(drafters: list[str], paradigm_ids: list[str], peers=("hf_generate",)) -> set[str]:
    return ({f"test_baseline[{p}]" for p in paradigm_ids}
            | {f"test_speculative[{d}-{p}]" for d in drafters for p in paradigm_ids}
            | {f"test_hf_peer[{h}-{p}]" for h in peers for p in paradigm_ids})


def kind_rank(test_id: str) -> int:
    return ("test_baseline[", "test_speculative[", "test_hf_peer[").index(test_id.split("[")[0] + "[")


def report_files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir()} if directory.exists() else {}


def only_json(directory: Path, names) -> dict:
    (name,) = [n for n in names if n.endswith(".json")]
    return json.loads((directory / name).read_text(encoding="utf-8"))


# --------------------------------------------------------------------------- --help


def test_help_lists_every_option_in_the_specdec_group(suite):
    result = run(suite, "-p", "no:cacheprovider", "--help")
    assert result.ret == pytest.ExitCode.OK
    # the group header, then each option in OPTIONS order (argparse keeps the order)
    patterns = [r"^speculative decoding benchmarks \(pytest-specdec\):$"]
    patterns += [rf"^\s+{re.escape(opt.flag)}(=\S+)?(\s|$)" for opt in OPTIONS]
    result.stdout.re_match_lines(patterns)
    assert len(OPTIONS) >= 20


# --------------------------------------------------------------------------- collection


def test_default_collection_ids_and_order(suite, small):
    result = run(suite, *small, "--collect-only", "-q")
    assert result.ret == pytest.ExitCode.OK
    ids = collected_ids(result)
    # default: every registered drafter, the reference's hybrid, no ablations; the
    # hf_generate peer only
    drafters = [spec.label for spec in load_registry().default_specs()]
    assert {"pld", "sps", "eagle3", "sam+eagle3"} <= set(drafters)
    assert not any(":" in d for d in drafters)
    assert len(ids) == len(set(ids)) == 2 + 2 * len(drafters) + 2
    assert set(ids) == case_ids(drafters, ["multi_round", "best_of_n"])
    for test_id in ("test_baseline[multi_round]", "test_baseline[best_of_n]",
                    "test_speculative[pld-multi_round]", "test_speculative[pld-best_of_n]",
                    "test_speculative[sam+eagle3-best_of_n]",
                    "test_hf_peer[hf_generate-multi_round]"):
        assert test_id in ids
    # baselines first, then speculative cases, then the peers
    assert [kind_rank(i) for i in ids] == sorted(kind_rank(i) for i in ids)
    assert ids[:2] == ["test_baseline[multi_round]", "test_baseline[best_of_n]"]
    result.stdout.fnmatch_lines([f"{len(ids)}/{len(ids) + 2} tests collected (2 deselected)*"])


def test_default_specs_add_declared_ablations_after_each_drafter():
    from pytest_specdec.protocol.drafter import DrafterBase
    from pytest_specdec.protocol.registry import Registry

    class Shares(DrafterBase):
        ablations = ({"share_group": "false"}, {"b": "2", "a": "1"})

        def __init__(self, share_group: bool = True, a: int = 0, b: int = 0):
            pass

    registry = Registry()
    registry.add("zeta", DrafterBase, "test")
    registry.add("alpha", Shares, "test")
    assert [s.label for s in registry.default_specs(ablations=True)] == [
        "alpha", "alpha:share_group=false", "alpha:a=1,b=2", "zeta"]
    assert [s.label for s in registry.default_specs()] == ["alpha", "zeta"]
    registry.add("sam", DrafterBase, "test")
    assert [s.label for s in registry.default_specs()] == ["alpha", "sam", "zeta"]
    registry.add("eagle3", DrafterBase, "test")  # both parts of SAM[EAGLE-3]: the hybrid too
    assert [s.label for s in registry.default_specs()] == [
        "alpha", "eagle3", "sam", "zeta", "sam+eagle3"]


@pytest.mark.parametrize("args, peers", [
    ((), ["hf_generate"]),
    (("--specdec-peer", "hf_pld,hf_generate"), ["hf_generate", "hf_pld"]),
    (("--specdec-peer", "none"), []),
    (("--specdec-no-peer",), []),
])
def test_peer_option_selects_the_peer_cases(suite, small, args, peers):
    result = run(suite, *small, *args, "--specdec-drafter", "pld", "--specdec-paradigm",
                 "multi_round", "--collect-only", "-q")
    assert result.ret == pytest.ExitCode.OK
    assert [i for i in collected_ids(result) if i.startswith("test_hf_peer")] == [
        f"test_hf_peer[{p}-multi_round]" for p in peers]


def test_ablations_option_adds_the_declared_variants(suite, small):
    result = run(suite, *small, "--specdec-ablations", "--specdec-paradigm", "multi_round",
                 "--specdec-peer", "none", "--collect-only", "-q")
    assert result.ret == pytest.ExitCode.OK
    ids = collected_ids(result)
    for variant in ("sam:share_group=false", "suffix:use_global=false",
                    "lookahead:share_pool=true"):
        assert f"test_speculative[{variant}-multi_round]" in ids


def test_bad_peer_name_is_a_usage_error(suite, small):
    result = run(suite, *small, "--specdec-peer", "hf_eagle", "--collect-only")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*unknown peer 'hf_eagle'; available: hf_generate, hf_pld, or none*"])


def test_baselines_come_first_whatever_the_definition_order(suite, small):
    """The sort is the plugin's doing: the same cases defined peers-first collect
    baselines-first (pytest collects a module's functions in definition order)."""
    suite.makepyfile(suite_cases=SUITE.read_text(encoding="utf-8"))
    suite.makepyfile(test_cases="from suite_cases import test_hf_peer, test_speculative, test_baseline\n")
    result = run(suite, *small, "--specdec-drafter", "pld", "--collect-only", "-q")
    assert result.ret == pytest.ExitCode.OK
    ids = collected_ids(result)
    assert set(ids) == case_ids(["pld"], ["multi_round", "best_of_n"])
    assert [kind_rank(i) for i in ids] == [0, 0, 1, 1, 2, 2]


def test_temperatures_and_drafter_options_in_ids(suite, small):
    drafter = "pld:share_group=true,max_ngram=2"
    result = run(suite, *small, "--specdec-temperature", "0,0.6", "--specdec-drafter", drafter,
                 "--collect-only", "-q")
    assert result.ret == pytest.ExitCode.OK
    ids = collected_ids(result)
    paradigm_ids = ["multi_round-T0", "multi_round-T0.6", "best_of_n-T0", "best_of_n-T0.6"]
    assert len(ids) == 12
    assert set(ids) == case_ids([drafter], paradigm_ids)
    assert "test_speculative[pld:share_group=true,max_ngram=2-best_of_n-T0.6]" in ids
    assert [kind_rank(i) for i in ids] == sorted(kind_rank(i) for i in ids)


def test_paradigm_option_restricts_the_cases(suite, small):
    result = run(suite, *small, "--specdec-paradigm", "multi_round", "--specdec-drafter", "pld",
                 "--collect-only", "-q")
    assert result.ret == pytest.ExitCode.OK
    assert collected_ids(result) == ["test_baseline[multi_round]", "test_speculative[pld-multi_round]",
                                     "test_hf_peer[hf_generate-multi_round]"]


def test_no_peer_deselects_the_hf_cases(suite, small):
    """--specdec-no-peer deselects the hf cases: they are neither run nor shown as passed."""
    result = run(suite, *small, "--specdec-no-peer", "--specdec-drafter", "pld", "--collect-only", "-q")
    assert result.ret == pytest.ExitCode.OK
    assert set(collected_ids(result)) == case_ids(["pld"], ["multi_round", "best_of_n"], peers=())
    result.stdout.fnmatch_lines(["*4 deselected*"])


def test_no_peer_does_not_depend_on_empty_parameter_set_mark(suite, small):
    result = run(suite, *small, "--specdec-no-peer", "--specdec-drafter", "pld",
                 "-o", "empty_parameter_set_mark=fail_at_collect", "--collect-only", "-q")
    assert result.ret == pytest.ExitCode.OK
    assert set(collected_ids(result)) == case_ids(["pld"], ["multi_round", "best_of_n"], peers=())


# --------------------------------------------------------------------------- full runs


def test_full_run_passes_and_writes_reports(suite, small, tmp_path):
    reports, storage = tmp_path / "reports", tmp_path / "benchmarks"
    result = run(suite, *small, "--specdec-drafter", "pld", "--specdec-report-dir", str(reports),
                 "--specdec-peer", "hf_generate,hf_pld", "--specdec-baseline-rounds", "3",
                 "--benchmark-save=myrun", f"--benchmark-storage={storage}")
    result.assert_outcomes(passed=8)
    result.stdout.fnmatch_lines([
        "*= pytest-specdec =*",
        "drafter *multi_round T=0*best_of_n T=0.6*",
        "baseline *1.00x · MAT 1.00*",
        "pld *x · MAT *",
        "hf_generate *MAT*",
        "hf_pld *MAT*",
        f"report written: {reports}/specdec-myrun-*.md",
        f"report written: {reports}/specdec-myrun-*.csv",
        f"report written: {reports}/specdec-myrun-*.json",
    ])

    first = report_files(reports)
    # matplotlib is installed with the test extra: the session's last write adds the charts
    assert sorted(Path(n).suffix for n in first) == [".csv", ".html", ".json", ".md", ".png", ".png"]
    assert {n.rsplit("-", 1)[-1] for n in first if n.endswith(".png")} == {"speedup.png",
                                                                          "acceptance.png"}
    markdown_text = next(reports.glob("*.md")).read_text()
    assert "-speedup.png)" in markdown_text and "data:image/png;base64," in next(
        reports.glob("*.html")).read_text()
    data = only_json(reports, first)
    records = data["records"]
    assert len(records) == 8
    assert {r["drafter"] for r in records} == {"baseline", "pld", "hf_generate", "hf_pld"}
    assert {(r["drafter"], r["paradigm"]) for r in records} == {
        (d, p) for d in ("baseline", "pld", "hf_generate", "hf_pld") for p in ("multi_round", "best_of_n")}
    for r in records:
        assert r["problems"] == 1 and r["max_new_tokens"] == 8
        # a baseline is timed in the three rounds asked for, every other case in one
        assert len(r["wall_s_rounds"]) == (3 if r["drafter"] == "baseline" else 1)
        if r["drafter"] == "pld":  # its noise carries the baselines' round scatter
            assert isinstance(r["round_scatter"], float)
        if r["drafter"] in ("baseline", "pld"):
            assert r["lossless"] in ("exact", "near_tie")
        else:  # the peers give our baseline's tokens, at T=0.6 too (tests/test_peer.py)
            assert r["lossless"] == "exact" and r["peer_settings"]["sampling"]
    assert data["meta"]["problems"] == "1"
    assert (reports / next(n for n in first if n.endswith(".md"))).read_text().startswith("# ")

    # pytest-benchmark's own saved run carries every record in extra_info
    (saved,) = storage.rglob("*myrun.json")
    benchmarks = json.loads(saved.read_text())["benchmarks"]
    assert len(benchmarks) == 8
    for bench in benchmarks:
        assert {"mat", "speedup", "lossless"} <= set(bench["extra_info"]), bench["name"]

    # a second run to the same folder adds new files and leaves the first ones alone;
    # under --benchmark-disable, benchmark.pedantic still runs each case once
    again = run(suite, *small, "--specdec-drafter", "pld", "--specdec-report-dir", str(reports),
                "--specdec-paradigm", "multi_round", "--specdec-no-peer", "--benchmark-disable",
                "--benchmark-save=myrun", f"--benchmark-storage={storage}")
    again.assert_outcomes(passed=2, deselected=2)
    after = report_files(reports)
    assert {n: after[n] for n in first} == first  # untouched, byte for byte
    new = sorted(set(after) - set(first))
    assert sorted(Path(n).suffix for n in new) == [".csv", ".html", ".json", ".md", ".png", ".png"]
    records = only_json(reports, new)["records"]
    assert [(r["drafter"], r["paradigm"]) for r in records] == [("baseline", "multi_round"),
                                                                ("pld", "multi_round")]
    assert [len(r["wall_s_rounds"]) for r in records] == [1, 1]  # the suite fixture's one baseline round


def test_timed_rounds_are_kept_under_benchmark_disable(suite, small, tmp_path):
    reports = tmp_path / "reports"
    result = run(suite, *small, "--specdec-drafter", "pld", "--specdec-report-dir", str(reports),
                 "--specdec-paradigm", "multi_round", "--specdec-no-peer", "--benchmark-disable",
                 "--specdec-timed-rounds", "2")
    result.assert_outcomes(passed=2, deselected=2)
    data = only_json(reports, report_files(reports))
    assert data["meta"]["timed_rounds"] == "2"
    # the baseline too: its rounds are at least the timed rounds
    assert [len(r["wall_s_rounds"]) for r in data["records"]] == [2, 2]


# --------------------------------------------------------------------------- usage errors

CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


@pytest.mark.parametrize("args, message", [
    pytest.param(["--specdec-drafter", "nope"],
                 "*--specdec-drafter nope: unknown drafter 'nope'; registered: *pld*",
                 id="unknown-drafter"),
    pytest.param(["--specdec-drafter", "pld:bogus=1"],
                 "*--specdec-drafter pld:bogus=1: drafter 'pld' has no option 'bogus' "
                 "(accepted: match, max_ngram, min_ngram, share_group)*",
                 id="unknown-drafter-option"),
    pytest.param(["--specdec-drafter", "pld:max_ngram=abc"],
                 "*--specdec-drafter pld:max_ngram=abc: drafter 'pld' option max_ngram='abc': "
                 "expected int*",
                 id="bad-drafter-option-type"),
    pytest.param(["--specdec-paradigm", "foo"],
                 "*error: argument --specdec-paradigm: unknown paradigm 'foo'; "
                 "available: multi_round, best_of_n*",
                 id="unknown-paradigm"),
    pytest.param(["--specdec-n", "0"], "*error: argument --specdec-n: must be >= 1, got 0*", id="n-0"),
    pytest.param(["--specdec-rounds", "0"], "*error: argument --specdec-rounds: must be >= 1, got 0*",
                 id="rounds-0"),
    pytest.param(["--specdec-max-new-tokens", "0"],
                 "*error: argument --specdec-max-new-tokens: must be >= 1, got 0*", id="budget-0"),
    pytest.param(["--specdec-temperature", "-0.6"],
                 "*error: argument --specdec-temperature: must be >= 0, got -0.6*",
                 id="negative-temperature"),
    pytest.param(["--specdec-device", "cuda"],
                 "*--specdec-device: device 'cuda' was asked for but CUDA is not available*",
                 id="cuda-without-cuda", marks=CUDA),
    pytest.param(["--specdec-target", "/no/such/dir"],
                 "*--specdec-target '/no/such/dir': no such file or folder*", id="missing-target"),
    pytest.param(["--specdec-dataset", "missing.jsonl"],
                 "*--specdec-dataset 'missing.jsonl': no such file*", id="missing-dataset"),
])
def test_usage_errors(suite, small, args, message):
    # the bad option comes last: argparse keeps the last value given
    result = run(suite, *small, *args)
    assert result.ret == USAGE_ERROR, result.stderr.str()
    result.stderr.fnmatch_lines([message])
    assert "passed" not in result.stdout.str() and "failed" not in result.stdout.str()


@pytest.mark.parametrize("row, message", [
    pytest.param({"text": "What is 1 + 1?", "label": "2"},
                 "*has no question column: looked for 'problem', 'question'*"
                 "columns present: 'text', 'label'*", id="no-question"),
    pytest.param({"question": "What is 1 + 1?", "label": "2"},
                 "*has no answer column: looked for 'answer'*columns present: 'question', 'label'*",
                 id="no-answer"),
])
def test_dataset_without_needed_columns_fails_before_any_case(suite, small, tmp_path, row, message):
    suite.makefile(".jsonl", problems=json.dumps(row))
    reports = tmp_path / "reports"
    result = run(suite, *small, "--specdec-dataset", "problems.jsonl", "--specdec-report-dir", str(reports))
    assert result.ret == USAGE_ERROR
    result.stderr.fnmatch_lines([f"*--specdec-dataset 'problems.jsonl': {message}"])
    result.assert_outcomes(deselected=2)  # only the peer not asked for; nothing ran
    result.stdout.no_fnmatch_line("*passed*")
    assert report_files(reports) == {}


# --------------------------------------------------------------------------- drafter plugins

BROKEN_DRAFTER = """
from pytest_specdec.protocol.drafter import Draft, DrafterBase


class Broken(DrafterBase):
    \"\"\"Proposes a token id far outside any vocabulary.\"\"\"

    def propose(self, context, k):
        return Draft((10**9,))
"""


def fake_distribution(pytester: pytest.Pytester, name: str, entry_points: str) -> None:
    """An installed distribution without installing: <name>-0.1.dist-info on sys.path."""
    info = pytester.mkdir(f"{name}-0.1.dist-info")
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[pytest_specdec.drafters]\n{entry_points}\n")


def test_failing_drafter_fails_only_its_own_cases(suite, small, tmp_path, monkeypatch):
    fake_distribution(suite, "brokendrafter", "broken = brokendrafter:Broken")
    suite.makepyfile(brokendrafter=BROKEN_DRAFTER)
    # a second plugin whose module cannot be imported: a warning, the session goes on
    fake_distribution(suite, "kaputdrafter", "kaput = kaputdrafter:Kaput")
    suite.makepyfile(kaputdrafter="raise RuntimeError('kaput on purpose')\n")
    monkeypatch.setenv("PYTHONPATH", str(suite.path))
    reports = tmp_path / "reports"

    result = run(suite, *small, "--specdec-drafter", "pld", "--specdec-drafter", "broken",
                 "--specdec-no-peer", "--benchmark-disable", "--specdec-report-dir", str(reports),
                 "-rfs")
    result.assert_outcomes(passed=4, failed=2, deselected=4)
    result.stdout.fnmatch_lines(["*drafter 'broken' broke the rule 'token ids in [[]0, *)': "
                                 "token 0 is 1000000000*"])
    failed = sorted(line.split()[1].split("::")[1] for line in result.outlines
                    if line.startswith("FAILED "))
    assert failed == ["test_speculative[broken-best_of_n]", "test_speculative[broken-multi_round]"]
    output = pytest.LineMatcher(result.outlines + result.errlines)
    output.fnmatch_lines(["*drafter 'kaput' from kaputdrafter (kaputdrafter:Kaput) failed to load: "
                          "RuntimeError: kaput on purpose*"])
    records = only_json(reports, report_files(reports))["records"]
    assert sorted({r["drafter"] for r in records}) == ["baseline", "pld"]


def test_registered_plugin_drafter_is_a_default_case(suite, small, monkeypatch):
    """Entry points of another distribution are drafters like the built-in ones."""
    fake_distribution(suite, "brokendrafter", "broken = brokendrafter:Broken")
    suite.makepyfile(brokendrafter=BROKEN_DRAFTER)
    monkeypatch.setenv("PYTHONPATH", str(suite.path))
    result = run(suite, *small, "--specdec-paradigm", "multi_round", "--specdec-no-peer",
                 "--collect-only", "-q")
    assert result.ret == pytest.ExitCode.OK
    spec = sorted(i for i in collected_ids(result) if i.startswith("test_speculative["))
    assert "test_speculative[broken-multi_round]" in spec
    assert "test_speculative[pld-multi_round]" in spec
