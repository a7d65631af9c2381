"""A drafter whose prerequisite is missing (its trained weights, on a fresh cache) is a
missing step, not a broken rule: in the default set it is skipped with the command that
provides it, and the session can pass; named with --specdec-drafter, its cases fail
with the same message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pytest_specdec.engine.loop import GenerationRequest, generate
from pytest_specdec.protocol.drafter import DrafterUnavailable, MissingPrerequisite


def test_the_engine_reports_a_missing_prerequisite_as_such(tmp_path, monkeypatch, tiny_target):
    from pytest_specdec.drafters.eagle3 import Eagle3
    from pytest_specdec.drafters.sps import SpeculativeSampling
    from pytest_specdec.protocol.hybrid import Hybrid
    from pytest_specdec.drafters.sam import SamDecoding

    monkeypatch.setenv("SPECDEC_CACHE_DIR", str(tmp_path))
    request = GenerationRequest(prompt_ids=(1, 2, 3), max_new_tokens=4)
    for name, drafter, command in (
            ("eagle3", Eagle3(), "pytest-specdec train eagle3"),
            ("sps", SpeculativeSampling(), "pytest-specdec train sps"),
            ("sam+eagle3", Hybrid(SamDecoding(), Eagle3(), names=("sam", "eagle3")),
             "pytest-specdec train eagle3")):
        with pytest.raises(DrafterUnavailable) as caught:
            generate(tiny_target, request, drafter, k=4, drafter_name=name)
        message = str(caught.value)
        assert message.startswith(f"drafter {name!r} cannot run: a prerequisite is missing: ")
        assert command in message and "broke the rule" not in message
        cause = caught.value.__cause__
        while cause is not None and not isinstance(cause, MissingPrerequisite):
            cause = cause.__cause__  # a hybrid's part error wraps its part's
        assert isinstance(cause, MissingPrerequisite)


@pytest.fixture
def small(tiny_model_dir: Path) -> list[str]:
    return ["-p", "no:cacheprovider", "--specdec-target", str(tiny_model_dir),
            "--specdec-problems", "1", "--specdec-max-new-tokens", "8"]


@pytest.fixture
def fresh(suite, monkeypatch, tmp_path):
    """The suite on a cache where no drafter has weights yet."""
    monkeypatch.setenv("SPECDEC_CACHE_DIR", str(tmp_path / "fresh-cache"))
    return suite


def test_the_default_set_skips_untrained_drafters_and_passes(fresh, small, tmp_path):
    reports = tmp_path / "reports"
    result = fresh.runpytest_subprocess(*small, "--specdec-paradigm", "multi_round",
                                        "--specdec-no-peer", "-rs", "--specdec-report-dir",
                                        str(reports), timeout=300)
    result.assert_outcomes(passed=8, skipped=3, deselected=2)
    assert result.ret == 0
    result.stdout.fnmatch_lines([
        "SKIPPED * drafter 'eagle3' cannot run: a prerequisite is missing: eagle3 has no "
        "trained weights*pytest-specdec train eagle3*",
        "SKIPPED * drafter 'sps' cannot run: a prerequisite is missing:*pytest-specdec train sps*",
        "SKIPPED * drafter 'sam+eagle3' cannot run:*pytest-specdec train eagle3*",
    ])
    (markdown,) = [p for p in reports.iterdir() if p.suffix == ".md"]
    text = markdown.read_text(encoding="utf-8")
    assert "## Drafters not run" in text and "`sps`:" in text
    (data,) = [p for p in reports.iterdir() if p.suffix == ".json"]
    assert "eagle3" not in {r["drafter"] for r in json.loads(data.read_text())["records"]}


def test_a_drafter_named_explicitly_fails_naming_the_missing_weights(fresh, small):
    result = fresh.runpytest_subprocess(*small, "--specdec-paradigm", "multi_round",
                                        "--specdec-no-peer", "--specdec-drafter", "eagle3",
                                        timeout=300)
    result.assert_outcomes(passed=1, failed=1, deselected=2)
    result.stdout.fnmatch_lines(["*DrafterUnavailable: drafter 'eagle3' cannot run: a "
                                 "prerequisite is missing: eagle3 has no trained weights*"])
    result.stdout.no_fnmatch_line("*broke the rule*")
