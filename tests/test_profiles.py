"""--specdec-profile: a named run size whose values explicit options override."""

from __future__ import annotations

import pytest

from pytest_specdec.bench.paradigms import PARADIGM_NAMES
from pytest_specdec.bench.profiles import PROFILES, describe
from pytest_specdec.plugin.options import OPTIONS, PROFILED_DEFAULTS, _resolver
from pytest_specdec.protocol.spec import DrafterSpec


class FakeConfig:
    """getoption over what the command line gave (None: not given, as pytest has it for
    the options a profile may set)."""

    def __init__(self, profile: str, **given):
        defaults = {o.dest: (None if o.dest in PROFILED_DEFAULTS else o.default) for o in OPTIONS}
        self.values = {**defaults, "specdec_profile": profile, **given}

    def getoption(self, dest):
        return self.values[dest]


@pytest.mark.parametrize("profile, given, dest, expected", [
    # profile value, when the option is not given
    ("smoke", {}, "specdec_problems", 1),
    ("smoke", {}, "specdec_max_new_tokens", 64),
    ("smoke", {}, "specdec_drafters", (DrafterSpec("pld"), DrafterSpec("sam"),
                                       DrafterSpec("eagle3"))),
    ("smoke", {}, "specdec_peers", ()),
    ("paper", {}, "specdec_problems", 120),
    ("paper", {}, "specdec_temperatures", (0.0, 0.6)),
    ("paper", {}, "specdec_timed_rounds", 1),
    ("gate", {}, "specdec_timed_rounds", 3),
    ("gate", {}, "specdec_peers", ()),
    ("smoke", {}, "specdec_baseline_rounds", 1),  # a first look: no round scatter
    ("default", {}, "specdec_baseline_rounds", 3),
    ("smoke", {"specdec_baseline_rounds": 2}, "specdec_baseline_rounds", 2),
    # the option's own default, when the profile leaves it unset
    ("smoke", {}, "specdec_timed_rounds", 1),
    ("smoke", {}, "specdec_temperatures", None),
    ("default", {}, "specdec_problems", 2),
    ("default", {}, "specdec_max_new_tokens", 96),
    ("default", {}, "specdec_drafters", None),
    ("default", {}, "specdec_peers", ("hf_generate",)),
    # an explicit option wins over its profile
    ("smoke", {"specdec_problems": 3}, "specdec_problems", 3),
    ("smoke", {"specdec_drafters": [DrafterSpec("suffix")]}, "specdec_drafters",
     [DrafterSpec("suffix")]),
    ("smoke", {"specdec_peers": ("hf_generate",)}, "specdec_peers", ("hf_generate",)),
    ("paper", {"specdec_max_new_tokens": 512}, "specdec_max_new_tokens", 512),
    # an option no profile sets is read as given
    ("smoke", {"specdec_seed": 7}, "specdec_seed", 7),
])
def test_a_profile_sets_what_is_not_given(profile, given, dest, expected):
    assert _resolver(FakeConfig(profile, **given))(dest) == expected


def test_the_smoke_profile_covers_what_a_first_look_needs():
    smoke = PROFILES["smoke"]
    names = {spec.name for spec in smoke.drafters}
    assert {"pld", "sam"} <= names and names & {"eagle3", "sps"}  # a model drafter too
    assert smoke.paradigms is None  # every paradigm
    assert set(PARADIGM_NAMES) == {"multi_round", "best_of_n"}


def test_describe_names_each_setting_as_an_option():
    assert describe(PROFILES["smoke"]) == ("problems 1; max-new-tokens 64; drafters pld,sam,eagle3; "
                                           "baseline-rounds 1; peers none")
    assert describe(PROFILES["paper"]) == "problems 120; max-new-tokens 15000; temperatures 0,0.6"
    assert describe(PROFILES["gate"]) == ("problems 4; max-new-tokens 256; drafters pld,sam,suffix; "
                                          "timed-rounds 3; peers none")
    assert describe(PROFILES["default"]) == "every option at its default"


def test_an_unknown_profile_is_refused_naming_the_choices(pytester):
    pytester.makepyfile("def test_nothing():\n    pass\n")
    result = pytester.runpytest_subprocess("--specdec-profile", "huge")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--specdec-profile: expected one of smoke, default, gate, paper, "
                                 "got 'huge'*"])


def test_the_smoke_profile_collects_its_cases_and_an_option_overrides_it(suite):
    result = suite.runpytest_subprocess("--collect-only", "-q", "--specdec-profile", "smoke")
    result.stdout.fnmatch_lines([
        "test_cases.py::test_baseline[[]multi_round[]]",
        "test_cases.py::test_baseline[[]best_of_n[]]",
        "test_cases.py::test_speculative[[]pld-multi_round[]]",
        "test_cases.py::test_speculative[[]pld-best_of_n[]]",
        "test_cases.py::test_speculative[[]sam-multi_round[]]",
        "test_cases.py::test_speculative[[]sam-best_of_n[]]",
        "test_cases.py::test_speculative[[]eagle3-multi_round[]]",
        "test_cases.py::test_speculative[[]eagle3-best_of_n[]]",
        "8/12 tests collected (4 deselected)*",
    ])
    result = suite.runpytest_subprocess("--collect-only", "-q", "--specdec-profile", "smoke",
                                        "--specdec-drafter", "suffix", "--specdec-peer",
                                        "hf_generate")
    result.stdout.fnmatch_lines(["*test_speculative[[]suffix-best_of_n[]]",
                                 "*test_hf_peer[[]hf_generate-best_of_n[]]",
                                 "6/8 tests collected (2 deselected)*"])
    result.stdout.no_fnmatch_line("*pld-*")


def test_a_profiles_model_drafter_without_weights_is_skipped_like_the_default_sets(
        suite, monkeypatch, tmp_path, tiny_model_dir):
    monkeypatch.setenv("SPECDEC_CACHE_DIR", str(tmp_path / "fresh-cache"))
    monkeypatch.delenv("PYTEST_ADDOPTS")  # the profile's own baseline rounds, not given
    reports = tmp_path / "reports"
    result = suite.runpytest_subprocess(
        "-p", "no:cacheprovider", "--specdec-profile", "smoke", "--specdec-target",
        str(tiny_model_dir), "--specdec-max-new-tokens", "8", "--specdec-paradigm",
        "multi_round", "-rs", "--specdec-report-dir", str(reports), timeout=300)
    result.assert_outcomes(passed=3, skipped=1, deselected=2)
    result.stdout.fnmatch_lines(["SKIPPED * drafter 'eagle3' cannot run: a prerequisite is "
                                 "missing:*pytest-specdec train eagle3*"])
    (markdown,) = [p for p in reports.iterdir() if p.suffix == ".md"]
    assert ("- **profile**: smoke (overridden: --specdec-paradigm, --specdec-max-new-tokens)"
            in markdown.read_text(encoding="utf-8"))
