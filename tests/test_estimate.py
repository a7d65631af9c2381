"""The start-of-session estimate: each case priced by its target steps, from a step
cost measured on the loaded target or given, and earlier reports' ratios."""

from __future__ import annotations

import json

import pytest

from conftest import small_config
from pytest_specdec.bench.config import SpecdecConfig
from pytest_specdec.bench.estimate import (PROBE_STEPS, History, PlannedCase, duration,
                                           estimate_run, read_history)
from pytest_specdec.bench.session import ParadigmCase

MR, BON = ParadigmCase("multi_round", 0.0), ParadigmCase("best_of_n", 0.6)
BON4 = ParadigmCase("best_of_n", 0.6, batch=4, explicit_batch=True)


def _config(tmp_path, **changes) -> SpecdecConfig:
    return small_config(tmp_path, **{"paradigms": ("multi_round", "best_of_n"),
                                     "max_new_tokens": 10, "n": 4, "temperatures": None,
                                     **changes})


def _case(role, drafter, case):
    return PlannedCase(f"{role}-{drafter}-{case.id}", role, drafter, case)


# a step scale of 1 (a decode step costs one probe) keeps the step counts readable;
# test_the_step_scale_prices_a_real_step_above_the_probe covers other scales
HISTORY = History(speedups={("pld", "multi_round", 0.0, 1): 2.0},
                  peer_ratios={("hf_generate", "multi_round", 0.0, 1): 1.5},
                  step_scale={("multi_round", 0.0, 1): 1.0, ("best_of_n", 0.6, 1): 1.0,
                              ("best_of_n", 0.6, 4): 1.0})

# 2 problems, max_new_tokens 10, 1 timed round; multi_round: 2 rounds (4 sequences),
# best_of_n: n=4 (8 sequences); probes: (sequences or batches + 1) x 10.7 steps (5
# one-token forwards, 3 wide ones at 1.9 each); warm-up: 1 problem's sequences x
# min(16, 10) tokens
#   (planned case, expected target steps)
MR_PROBES, BON_PROBES, BON4_PROBES = 5 * 10.7, 9 * 10.7, 3 * 10.7
STEPS = [
    (_case("baseline", "baseline", MR), 40 + MR_PROBES + 20),
    (_case("speculative", "pld", MR), 40 / 2.0 + MR_PROBES),  # measured 2.0x
    (_case("speculative", "sam", MR), 40 / 1.25 + MR_PROBES),  # none measured: the T=0 prior
    # its own warm-up (generate)
    (_case("peer", "hf_generate", MR), 40 * 1.5 + MR_PROBES + 20),
    # no baseline collected for best_of_n: the first case measures it, with the warm-up
    (_case("speculative", "sam", BON),
     (80 / 0.75 + BON_PROBES) + (80 + BON_PROBES) + 40),  # T>0 prior
    (_case("speculative", "pld", BON), 80 / 0.75 + BON_PROBES),
    # none measured: the prior
    (_case("peer", "hf_generate", BON), 80 * 1.6 + BON_PROBES + 40),
    # batch 4: 4 sequences per step, probes per batch
    (_case("baseline", "baseline", BON4), 80 / 4 + BON4_PROBES + 40 / 4),
]


def test_a_probe_costs_its_narrow_and_wide_forwards():
    assert PROBE_STEPS == pytest.approx(5 + 3 * 1.9)


def test_each_case_is_priced_by_its_target_steps(tmp_path):
    cfg = _config(tmp_path)
    estimate = estimate_run(cfg, [p for p, _ in STEPS], step_s=0.01, step_basis="given",
                            problems=2, history=HISTORY)
    assert [c.steps for c in estimate.cases] == pytest.approx([steps for _, steps in STEPS])
    assert estimate.seconds == pytest.approx(0.01 * sum(steps for _, steps in STEPS))
    assert [c.basis for c in estimate.cases] == [
        "", "2.00x measured", "1.25x assumed", "1.50x our baseline's time, measured",
        "0.75x assumed, with its baseline", "0.75x assumed",
        "1.6x our baseline's time, assumed", ""]


def test_paired_timing_and_more_timed_rounds_cost_what_they_run(tmp_path):
    planned = [_case("baseline", "baseline", MR), _case("speculative", "pld", MR)]
    paired = estimate_run(_config(tmp_path, timing="paired", timed_rounds=3), planned,
                          step_s=1.0, step_basis="given", problems=2, history=HISTORY)
    # every timed round of the drafter also has a baseline round (40 steps and probes)
    base_round = 40 + MR_PROBES
    assert [c.steps for c in paired.cases] == pytest.approx(
        [3 * base_round + 20, 3 * (20 + MR_PROBES + base_round)])


def test_a_baseline_is_priced_for_its_rounds(tmp_path):
    planned = [_case("baseline", "baseline", MR), _case("speculative", "pld", MR),
               _case("speculative", "pld", BON)]
    estimate = estimate_run(_config(tmp_path, baseline_rounds=3), planned, step_s=1.0,
                            step_basis="given", problems=2, history=HISTORY)
    # three baseline rounds (40 steps and probes) and one warm-up; the drafter one round;
    # best_of_n's baseline, measured inside its first case, three rounds too
    assert [c.steps for c in estimate.cases] == pytest.approx(
        [3 * (40 + MR_PROBES) + 20, 20 + MR_PROBES,
         (80 / 0.75 + BON_PROBES) + 3 * (80 + BON_PROBES) + 40])


def test_an_expected_speedup_prices_the_unmeasured_cases(tmp_path):
    planned = [_case("baseline", "baseline", MR), _case("speculative", "sam", MR)]
    estimate = estimate_run(_config(tmp_path, expected_speedup=2.0), planned, step_s=1.0,
                            step_basis="given", problems=2, history=HISTORY)
    assert estimate.cases[1].steps == pytest.approx(40 / 2 + MR_PROBES)
    assert estimate.cases[1].basis == "2x assumed"


def _report(path, records):
    path.write_text(json.dumps({"meta": {}, "records": records}))


def _record(role, drafter, paradigm="multi_round", temperature=0.0, **fields):
    return {"role": role, "drafter": drafter, "paradigm": paradigm, "temperature": temperature,
            "target": "tiny", "dtype": "float32", "device": "cpu", "sequences": 4,
            "max_new_tokens": 10, **fields}


@pytest.mark.parametrize("step_scale, batch, scale", [
    # measured: a baseline's step over its probe, from the history
    ({("multi_round", 0.0, 1): 1.5}, 1, 1.5),
    # none measured: the prior, which grows with the rows of a batched step
    ({}, 1, 1.25),
    ({}, 4, 1.25 + 3 * 0.13),
])
def test_the_step_scale_prices_a_real_step_above_the_probe(tmp_path, step_scale, batch, scale):
    """step_s is the probe (a one-token forward at a short context); a run's plain
    decode step costs more (sampling, Python, a longer context, B rows): the decode
    steps and the warm-up are priced at the scale, the probes at themselves."""
    case = ParadigmCase("multi_round", 0.0, batch=batch, explicit_batch=batch > 1)
    estimate = estimate_run(_config(tmp_path), [_case("baseline", "baseline", case)],
                            step_s=1.0, step_basis="given", problems=2,
                            history=History(step_scale=step_scale))
    # 4 sequences x 10 tokens, B at a time; probes around every batch; warm-up 2 x 10
    probes = (4 // batch + 1) * PROBE_STEPS
    assert estimate.cases[0].steps == pytest.approx((40 + 20) / batch * scale + probes)


def test_history_comes_from_the_newest_report_of_the_same_target(tmp_path):
    import os

    older, newer, other, broken = (tmp_path / f"specdec-{n}.json"
                                   for n in ("old", "new", "other", "broken"))
    _report(older, [_record("speculative", "pld", speedup=9.0)])
    _report(newer, [_record("baseline", "baseline", wall_s=2.0, new_tokens=30,
                            t_step_ms=39.0, probe_ms=31.2),
                    _record("speculative", "pld", speedup=1.25),
                    _record("speculative", "sam", speedup=None),
                    _record("peer", "hf_generate", wall_s=3.0)])
    _report(other, [{**_record("speculative", "pld", speedup=5.0), "target": "another"}])
    broken.write_text("{not json")
    for age, path in enumerate((older, newer, other, broken)):
        os.utime(path, (1000 + age, 1000 + age))
    history = read_history(tmp_path, "tiny")
    assert history.source == newer
    assert history.speedups == {("pld", "multi_round", 0.0, 1): 1.25}
    assert history.peer_ratios == {("hf_generate", "multi_round", 0.0, 1): 1.5}
    assert history.fill == {("multi_round", 0.0, 1): 0.75}  # 30 of 4 x 10 tokens
    assert history.step_scale == {("multi_round", 0.0, 1): pytest.approx(1.25)}
    assert read_history(tmp_path, "nobody") == History()
    assert read_history(tmp_path / "missing", "tiny") == History()


def test_each_case_comes_from_the_newest_report_that_measured_it(tmp_path):
    """A smoke run after a full one: the smoke's cases from the smoke, the others from
    the full run."""
    import os

    full, smoke = tmp_path / "specdec-full.json", tmp_path / "specdec-smoke.json"
    _report(full, [_record("speculative", "pld", speedup=1.5),
                   _record("speculative", "eagle3", speedup=0.8)])
    _report(smoke, [_record("speculative", "pld", speedup=1.25)])
    os.utime(full, (1000, 1000))
    os.utime(smoke, (2000, 2000))
    history = read_history(tmp_path, "tiny")
    assert history.source == smoke
    assert history.speedups == {("pld", "multi_round", 0.0, 1): 1.25,
                                ("eagle3", "multi_round", 0.0, 1): 0.8}


@pytest.mark.parametrize("seconds, text", [
    (0.04, "0.0 s"), (4.24, "4.2 s"), (42.4, "42 s"), (185, "3 min 05 s"),
    (7800, "2 h 10 min"), (273600, "3 d 4 h")])
def test_duration(seconds, text):
    assert duration(seconds) == text


def test_collect_only_with_a_given_step_cost_prices_the_run_without_a_model(suite):
    result = suite.runpytest_subprocess("--collect-only", "--specdec-step-ms", "25",
                                        "--specdec-target", "Qwen/Qwen3-8B",
                                        "--specdec-profile", "smoke")
    result.stdout.fnmatch_lines([
        "pytest-specdec: 8 cases, estimated * at 25.0 ms per decode step (given with "
        "--specdec-step-ms; no earlier report of this target: speedups assumed; model "
        "loading not included)",
        "  test_baseline[[]multi_round[]] * ",
        "  test_speculative[[]pld-multi_round[]] * 1.25x assumed",
    ])
    assert result.ret == 0


def test_a_session_prints_its_estimate_first_and_what_it_took_last(suite, tiny_model_dir,
                                                                     tmp_path):
    args = ["-p", "no:cacheprovider", "--specdec-target", str(tiny_model_dir),
            "--specdec-problems", "1", "--specdec-max-new-tokens", "8", "--specdec-paradigm",
            "multi_round", "--specdec-drafter", "pld", "--specdec-no-peer",
            "--specdec-report-dir", str(tmp_path)]
    first = suite.runpytest_subprocess(*args, timeout=300)
    first.assert_outcomes(passed=2, deselected=2)
    first.stdout.fnmatch_lines([
        "pytest-specdec: 2 cases, estimated * ms per decode step (measured on the loaded "
        "target; no earlier report of this target: speedups assumed; *",
        "*pytest-specdec: the cases took *; estimated at the start: * of the estimate)"])
    # the second run prices pld by the speedup the first one measured
    second = suite.runpytest_subprocess(*args, timeout=300)
    second.stdout.fnmatch_lines(["pytest-specdec: 2 cases, * (measured on the loaded target; "
                                 "speedups from specdec-*.json where it measured the case, *",
                                 "  test_speculative[[]pld-multi_round[]] * measured"])
    quiet = suite.runpytest_subprocess(*args, "-qq", timeout=300)
    quiet.stdout.no_fnmatch_line("*estimated*")


def test_history_is_of_the_same_dtype_and_device(tmp_path):
    """A bfloat16 run's speedups and step costs would misprice a float32 one."""
    import os

    fp32, bf16 = tmp_path / "specdec-fp32.json", tmp_path / "specdec-bf16.json"
    _report(fp32, [_record("speculative", "pld", speedup=1.5)])
    _report(bf16, [{**_record("speculative", "pld", speedup=2.4), "dtype": "bfloat16"}])
    os.utime(fp32, (1000, 1000))
    os.utime(bf16, (2000, 2000))  # the newer one, of another dtype
    history = read_history(tmp_path, "tiny", "float32", "cpu")
    assert history.source == fp32
    assert history.speedups == {("pld", "multi_round", 0.0, 1): 1.5}
    assert read_history(tmp_path, "tiny", "bfloat16", "cpu").speedups == {
        ("pld", "multi_round", 0.0, 1): 2.4}
    assert read_history(tmp_path, "tiny", "float32", "cuda:0") == History()
