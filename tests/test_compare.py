"""Compare and gate: ``pytest-specdec compare`` and ``--specdec-compare`` inside pytest.

The unit tests compare the stored run tests/data/run_pld.json with modified copies of
itself, so every expected figure can be checked by hand. Its timed rounds give these
spreads ((max - min) / median): pld multi_round 0.22/20.48 = 1.074%, its baseline
0.32/40.96 = 0.781%; so the speedup noise floor of pld multi_round, both runs counted,
is 2 * (1.074% + 0.781%) = 3.7%.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from pytest_specdec import cli
from pytest_specdec.reporting.compare import (compare_records, load_compare_options, load_run,
                                              render, render_summary, spread)

RUN = Path(__file__).parent / "data" / "run_pld.json"
PLD_MR = 1  # index of pld multi_round in run_pld.json's benchmarks (and records)

IDENTICAL = """\
drafter      paradigm     T    speedup    MAT    acceptance    tok/s    accuracy    speedup noise    gate
-----------  -----------  ---  ---------  -----  ------------  -------  ----------  ---------------  ------
baseline     multi_round  0    1.00x      1.00   —             50.0     75.0%       —                ok
pld          multi_round  0    2.00x      2.29   32.1%         100.0    75.0%       3.7%             ok
hf_generate  multi_round  0    1.00x      1.00   —             40.0     75.0%       —                ok
hf_pld       multi_round  0    1.25x      2.00   —             50.0     75.0%       4.9%             ok
baseline     best_of_n    0.6  1.00x      1.00   —             51.2     75.0%       —                ok
pld          best_of_n    0.6  1.60x      1.60   24.0%         81.9     75.0%       4.0%             ok
hf_generate  best_of_n    0.6  1.00x      1.00   —             40.0     50.0%       —                ok
hf_pld       best_of_n    0.6  1.28x      1.28   —             51.2     50.0%       3.8%             ok
"""

MAT_DROP = """\
drafter      paradigm     T    speedup    MAT                   acceptance    tok/s    accuracy    speedup noise    gate
-----------  -----------  ---  ---------  --------------------  ------------  -------  ----------  ---------------  --------
baseline     multi_round  0    1.00x      1.00                  —             50.0     75.0%       —                ok
pld          multi_round  0    2.00x      2.29 → 2.06 (-10.0%)  32.1%         100.0    75.0%       3.7%             FAIL mat
hf_generate  multi_round  0    1.00x      1.00                  —             40.0     75.0%       —                ok
hf_pld       multi_round  0    1.25x      2.00                  —             50.0     75.0%       4.9%             ok
baseline     best_of_n    0.6  1.00x      1.00                  —             51.2     75.0%       —                ok
pld          best_of_n    0.6  1.60x      1.60                  24.0%         81.9     75.0%       4.0%             ok
hf_generate  best_of_n    0.6  1.00x      1.00                  —             40.0     50.0%       —                ok
hf_pld       best_of_n    0.6  1.28x      1.28                  —             51.2     50.0%       3.8%             ok
"""


@pytest.fixture
def base() -> list[dict]:
    return load_run(RUN)


@pytest.fixture
def run_data() -> dict:
    return json.loads(RUN.read_text(encoding="utf-8"))


def changed(records: list[dict], index: int, **changes) -> list[dict]:
    """A deep copy of ``records`` with ``changes`` applied to record ``index``."""
    out = copy.deepcopy(records)
    out[index].update(changes)
    return out


def save(tmp_path: Path, name: str, data: dict) -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def mat_dropped(run_data: dict, factor: float = 0.9) -> dict:
    """run_pld.json with pld multi_round's MAT multiplied by ``factor``."""
    data = copy.deepcopy(run_data)
    extra = data["benchmarks"][PLD_MR]["extra_info"]
    extra["mat"] = extra["mat"] * factor
    return data


# --------------------------------------------------------------------------- deltas


def test_identical_runs_give_the_expected_table_and_pass(base):
    comparison = compare_records(base, copy.deepcopy(base), rules=(("speedup", 0.1), ("mat", 0.05)))
    assert render(comparison) == IDENTICAL
    assert comparison.passed and comparison.failure_lines() == []
    assert len(comparison.compared) == 8 and comparison.warnings == []


def test_without_rules_the_gate_column_is_empty(base):
    table = render(compare_records(base, copy.deepcopy(base)))
    assert table.splitlines()[2].split() == ["baseline", "multi_round", "0", "1.00x", "1.00",
                                             "—", "50.0", "75.0%", "—"]


def test_mat_drop_beyond_the_rule_fails_and_names_the_case(base):
    new = changed(base, PLD_MR, mat=base[PLD_MR]["mat"] * 0.9)
    comparison = compare_records(base, new, rules=(("mat", 0.05),))
    assert render(comparison) == MAT_DROP
    assert not comparison.passed
    assert comparison.failure_lines() == [
        "pld multi_round T=0: MAT 2.29 → 2.06 (-10.0%) breaks mat:5%"]
    assert render_summary(comparison).endswith(
        "gate mat:5% FAILED: pld multi_round T=0: MAT 2.29 → 2.06 (-10.0%) breaks mat:5%")


def test_mat_is_deterministic_so_any_drop_beyond_the_rule_counts(base):
    # no noise floor for MAT: a 1% drop breaks mat:0.5%, and passes mat:2%
    new = changed(base, PLD_MR, mat=base[PLD_MR]["mat"] * 0.99)
    assert not compare_records(base, new, rules=(("mat", 0.005),)).passed
    assert compare_records(base, new, rules=(("mat", 0.02),)).passed
    assert compare_records(base, new, rules=(("speedup", 0.0),)).passed  # another metric


def test_a_drop_of_exactly_drop_passes_and_rises_never_fail(base):
    assert compare_records(base, changed(base, PLD_MR, mat=base[PLD_MR]["mat"] * 0.95),
                           rules=(("mat", 0.05),)).passed
    higher = changed(base, PLD_MR, mat=3.0, speedup=3.0, tokens_per_s=150.0)
    assert compare_records(base, higher, rules=(("mat", 0.0), ("speedup", 0.0))).passed


def test_markdown_and_json_formats(base):
    new = changed(base, PLD_MR, mat=base[PLD_MR]["mat"] * 0.9)
    comparison = compare_records(base, new, rules=(("mat", 0.05),))
    md = render(comparison, "md").splitlines()
    assert md[0].startswith("| drafter ") and set(md[1]) <= set("|-: ")
    assert "| pld " in md[3] and "2.29 → 2.06 (-10.0%)" in md[3] and "FAIL mat" in md[3]
    data = json.loads(render(comparison, "json"))
    assert data["passed"] is False and data["rules"] == {"mat": 0.05}
    (pld,) = [c for c in data["cases"] if c["drafter"] == "pld" and c["paradigm"] == "multi_round"]
    assert pld["failed"] == ["mat"] and pld["status"] == "compared"
    assert pld["metrics"]["mat"]["change"] == pytest.approx(-0.1)
    floor = 2 * (0.22 / 20.48 + 0.32 / 40.96)
    assert pld["metrics"]["speedup"]["noise_floor"] == pytest.approx(floor)


# --------------------------------------------------------------------------- noise floor


def test_spread_of_timed_rounds():
    assert spread([20.61, 20.48, 20.39]) == pytest.approx(0.22 / 20.48)
    assert spread([3.0]) == 0.0 and spread([]) == 0.0


def test_speedup_drop_within_the_rounds_spread_passes_a_larger_one_fails(base):
    floor = 2 * (0.22 / 20.48 + 0.32 / 40.96)  # 3.71%
    rule = (("speedup", 0.02),)  # tighter than the noise: the floor decides
    within = changed(base, PLD_MR, speedup=2.0 * 0.97)  # -3%
    comparison = compare_records(base, within, rules=rule)
    assert comparison.passed
    delta = next(c for c in comparison.cases if c.drafter == "pld" and c.temperature == 0)
    assert delta.metrics["speedup"].floor == pytest.approx(floor)
    assert delta.metrics["speedup"].threshold == pytest.approx(floor)

    beyond = changed(base, PLD_MR, speedup=2.0 * 0.95)  # -5%
    comparison = compare_records(base, beyond, rules=rule)
    assert comparison.failure_lines() == [
        "pld multi_round T=0: speedup 2.00x → 1.90x (-5.0%) breaks speedup:2%, noise floor 3.7%"]
    # a rule looser than the noise: the rule decides
    assert compare_records(base, beyond, rules=(("speedup", 0.06),)).passed


def test_noisier_rounds_raise_the_floor(base):
    noisy = changed(base, PLD_MR, speedup=1.9, wall_s_rounds=[19.0, 20.48, 22.0])  # spread 14.6%
    assert compare_records(base, noisy, rules=(("speedup", 0.02),)).passed


def test_one_timed_round_has_no_noise_floor_and_says_so(base):
    one = [dict(r, wall_s_rounds=r["wall_s_rounds"][1:2]) for r in base]
    new = changed(one, PLD_MR, speedup=2.0 * 0.97)
    comparison = compare_records(one, new, rules=(("speedup", 0.02),))
    assert not comparison.passed
    assert any("single timed round" in w and "--specdec-timed-rounds" in w
               for w in comparison.warnings)


def test_tokens_per_s_floor_is_the_cases_own_spread(base):
    floor = 2 * 0.22 / 20.48  # 2.15%
    assert compare_records(base, changed(base, PLD_MR, tokens_per_s=98.0),
                           rules=(("tokens_per_s", 0.01),)).passed  # -2%
    comparison = compare_records(base, changed(base, PLD_MR, tokens_per_s=97.0),
                                 rules=(("tokens_per_s", 0.01),))  # -3%
    assert not comparison.passed
    assert f"noise floor {floor * 100:.1f}%" in comparison.failure_lines()[0]


# --------------------------------------------------------------------------- matching


def test_cases_in_one_run_only_are_listed_not_gated(base):
    new = [r for r in base if r["drafter"] != "hf_pld"]
    new.append(dict(copy.deepcopy(base[PLD_MR]), drafter="sam"))
    comparison = compare_records(base, new, rules=(("mat", 0.05),))
    assert comparison.passed
    rows = {tuple(line.split()[:3]): line for line in render(comparison).splitlines()[2:]}
    assert rows[("hf_pld", "multi_round", "0")].endswith("only in base")
    assert "2.00 → —" in rows[("hf_pld", "multi_round", "0")]
    assert rows[("sam", "multi_round", "0")].endswith("only in new")


def test_a_gate_with_no_case_in_common_checked_nothing_and_fails(base):
    other = [dict(r, paradigm="self_consistency") for r in base]
    comparison = compare_records(base, other, rules=(("mat", 0.05),))
    assert not comparison.passed
    assert comparison.failure_lines() == [
        "no case of NEW matches a case of BASE: the gate checked nothing"]
    assert compare_records(base, other).passed  # without rules: only the table


def test_different_dtype_device_warn_but_do_not_fail(base):
    new = [dict(r, dtype="bfloat16", device="cuda:0") for r in base]
    comparison = compare_records(base, new, rules=(("mat", 0.05),))
    assert comparison.passed and len(comparison.compared) == 8
    assert "the runs differ in dtype: BASE has float32; NEW has bfloat16" in comparison.warnings
    assert "the runs differ in device: BASE has cpu; NEW has cuda:0" in comparison.warnings


def test_a_different_single_target_is_matched_with_a_warning(base):
    new = [dict(r, target="Qwen/Qwen3-8B") for r in base]
    comparison = compare_records(base, new, rules=(("mat", 0.05),))
    assert comparison.passed and len(comparison.compared) == 8
    assert any(w.startswith("the runs differ in target") for w in comparison.warnings)
    assert any(w.startswith("cases are matched across targets") for w in comparison.warnings)


def test_several_targets_are_matched_per_target(base):
    other = [dict(r, target="tiny") for r in base]
    new = copy.deepcopy(base) + changed(other, PLD_MR, mat=1.0)
    comparison = compare_records(base + other, new, rules=(("mat", 0.05),))
    assert len(comparison.compared) == 16
    assert comparison.failure_lines() == [
        "pld multi_round T=0 [tiny]: MAT 2.29 → 1.00 (-56.2%) breaks mat:5%"]
    assert render(comparison).splitlines()[0].split()[:2] == ["target", "drafter"]


# --------------------------------------------------------------------------- the command


def test_cli_compare_passes_with_exit_0(tmp_path, run_data, capsys):
    new = save(tmp_path, "new.json", run_data)
    assert cli.main(["compare", str(RUN), str(new), "--fail", "speedup:10%,mat:5%"]) == 0
    captured = capsys.readouterr()
    assert captured.out == IDENTICAL and captured.err == ""


def test_cli_compare_gate_failure_exits_1_naming_case_and_rule(tmp_path, run_data, capsys):
    new = save(tmp_path, "new.json", mat_dropped(run_data))
    assert cli.main(["compare", str(RUN), str(new), "--fail", "speedup:10%,mat:5%"]) == 1
    captured = capsys.readouterr()
    assert captured.out == MAT_DROP
    assert captured.err == ("pytest-specdec: gate failed: pld multi_round T=0: "
                            "MAT 2.29 → 2.06 (-10.0%) breaks mat:5%\n")
    # the same files without --fail: only the table
    assert cli.main(["compare", str(RUN), str(new)]) == 0


def test_cli_compare_formats(tmp_path, run_data, capsys):
    new = save(tmp_path, "new.json", mat_dropped(run_data))
    assert cli.main(["compare", str(RUN), str(new), "--fail", "mat:5%", "--format", "json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["base"] == str(RUN) and data["new"] == str(new)
    assert data["failures"] == ["pld multi_round T=0: MAT 2.29 → 2.06 (-10.0%) breaks mat:5%"]
    assert cli.main(["compare", str(RUN), str(new), "--format", "md"]) == 0
    assert capsys.readouterr().out.startswith("| drafter ")


def test_cli_compare_warns_on_stderr(tmp_path, run_data, capsys):
    data = copy.deepcopy(run_data)
    for bench in data["benchmarks"][:-1]:
        bench["extra_info"]["dtype"] = "float16"
    new = save(tmp_path, "new.json", data)
    assert cli.main(["compare", str(RUN), str(new), "--fail", "mat:5%"]) == 0
    assert (f"pytest-specdec: warning: the runs differ in dtype: {RUN} has float32; "
            f"{new} has float16") in capsys.readouterr().err


@pytest.mark.parametrize("content, message", [
    pytest.param(None, "no such file", id="missing"),
    pytest.param('{"benchmarks": [', "not valid JSON (line 1", id="corrupt"),
    pytest.param('{"foo": 1}', "not a pytest-benchmark JSON file", id="foreign"),
    pytest.param('{"benchmarks": [{"name": "plain", "extra_info": {}}]}',
                 "no pytest-specdec records", id="no-records"),
    pytest.param('{"benchmarks": [{"name": "x", "extra_info": {"specdec_schema": 1}}]}',
                 "lacks required keys", id="damaged-record"),
])
@pytest.mark.parametrize("side", ["base", "new"])
def test_cli_compare_bad_input_exits_2_naming_the_file(tmp_path, capsys, content, message, side):
    bad = tmp_path / "bad.json"
    if content is not None:
        bad.write_text(content, encoding="utf-8")
    argv = ["compare", str(bad), str(RUN)] if side == "base" else ["compare", str(RUN), str(bad)]
    assert cli.main(argv + ["--fail", "mat:5%"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"pytest-specdec: error: {bad}: ")
    assert message in captured.err


@pytest.mark.parametrize("rule, message", [
    ("latency:5%", "METRIC one of speedup, mat, acceptance_rate, tokens_per_s, accuracy"),
    ("mat:five", "mat: expected a drop like 10% or 0.1"),
    ("mat:150%", "mat: expected a drop like 10% or 0.1"),
])
def test_cli_compare_bad_rule_is_a_usage_error(capsys, rule, message):
    with pytest.raises(SystemExit) as info:
        cli.main(["compare", str(RUN), str(RUN), "--fail", rule])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_compare_options_checked_at_configure_time(tmp_path):
    assert load_compare_options(None, ()) is None
    assert len(load_compare_options(RUN, (("mat", 0.05),))) == 8
    with pytest.raises(ValueError, match="--specdec-compare-fail needs --specdec-compare"):
        load_compare_options(None, (("mat", 0.05),))
    with pytest.raises(ValueError, match=r"--specdec-compare: .*nope\.json: no such file"):
        load_compare_options(tmp_path / "nope.json", ())


# --------------------------------------------------------------------------- inside pytest


@pytest.fixture
def small(tiny_model_dir: Path, tmp_path: Path) -> list[str]:
    """A two-case session (baseline and pld, multi_round) on the tiny model."""
    return ["-p", "no:cacheprovider", "--specdec-target", str(tiny_model_dir),
            "--specdec-problems", "1", "--specdec-max-new-tokens", "8",
            "--specdec-paradigm", "multi_round", "--specdec-drafter", "pld",
            "--specdec-no-peer", "--specdec-report-dir", str(tmp_path / "reports"),
            f"--benchmark-storage={tmp_path / 'storage'}"]


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess(*args, timeout=300)


def test_gate_inside_pytest_beside_benchmark_compare_fail(suite, small, tmp_path, run_data):
    # run 1 saves the run that run 2 is gated against; it is itself gated against a run
    # whose MAT is 1.00 everywhere, the least MAT there is: no drop, so it passes
    floor = copy.deepcopy(run_data)
    floor["benchmarks"] = floor["benchmarks"][:2]  # baseline and pld, multi_round, T=0
    floor["benchmarks"][PLD_MR]["extra_info"]["mat"] = 1.0
    floor_path = save(tmp_path, "floor.json", floor)
    first = run(suite, *small, "--benchmark-save=base", f"--specdec-compare={floor_path}",
                "--specdec-compare-fail=mat:5%")
    assert first.ret == pytest.ExitCode.OK, first.stdout.str()
    first.assert_outcomes(passed=2, deselected=2)
    first.stdout.fnmatch_lines([
        "*= pytest-specdec compare =*",
        f"base: {floor_path}",
        "drafter *paradigm *T *speedup *MAT *gate",
        "baseline *multi_round *0 *ok",
        "pld *multi_round *0 *ok",
        "warning: cases are matched across targets*",
        "gate mat:5%: passed (2 cases compared)",
    ])

    # run 2: the same cases, gated against run 1 where pld's MAT was made 10% higher;
    # pytest-benchmark's own gate runs beside it (and passes: any slowdown is allowed)
    (saved,) = (tmp_path / "storage").rglob("0001_base.json")
    data = json.loads(saved.read_text(encoding="utf-8"))
    (pld,) = [b["extra_info"] for b in data["benchmarks"] if b["extra_info"]["drafter"] == "pld"]
    pld["mat"] = pld["mat"] / 0.9
    higher = save(tmp_path, "higher.json", data)
    dropped = run(suite, *small, f"--specdec-compare={higher}",
                  "--specdec-compare-fail=mat:5%,acceptance_rate:0%,accuracy:0%",
                  "--benchmark-compare=0001", "--benchmark-compare-fail=min:1000000%")
    assert dropped.ret == pytest.ExitCode.TESTS_FAILED, dropped.stdout.str()
    dropped.assert_outcomes(passed=2, deselected=2)  # every case passed; the gate failed
    dropped.stdout.fnmatch_lines([
        "*= pytest-specdec compare =*",
        "baseline *multi_round *0 *ok",
        "pld *multi_round *0 *(-10.0%)*FAIL mat",
        "gate mat:5%,acceptance_rate:0%,accuracy:0% FAILED: pld multi_round T=0: "
        "MAT * → * (-10.0%) breaks mat:5%",
    ])
    # identical acceptance and accuracy broke no 0% rule: the one failure is MAT's
    assert dropped.stdout.str().count("FAILED: ") == 1
    # pytest-benchmark compared too: its table shows the saved run beside this one
    dropped.stdout.fnmatch_lines(["test_speculative[[]pld-multi_round] (0001_base) *"])


@pytest.mark.parametrize("args, message", [
    pytest.param(["--specdec-compare-fail=mat:5%"],
                 "*--specdec-compare-fail needs --specdec-compare RUN.json*", id="fail-alone"),
    pytest.param(["--specdec-compare=corrupt.json", "--specdec-compare-fail=mat:5%"],
                 "*--specdec-compare: corrupt.json: not valid JSON (line 1*", id="corrupt"),
])
def test_compare_usage_errors_before_any_case(suite, small, args, message):
    """(A missing file takes the same path: test_compare_options_checked_at_configure_time.)"""
    suite.makefile(".json", corrupt='{"benchmarks": [')
    result = run(suite, *small, *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])
    assert "passed" not in result.stdout.str()


def test_different_drafter_weights_are_warned_about(records):
    from pytest_specdec.reporting.compare import compare_records

    base = [{**r, "drafter_weights": "aaaa"} if r["role"] == "speculative" else r for r in records]
    new = [{**r, "drafter_weights": "bbbb"} if r["role"] == "speculative" else r for r in records]
    comparison = compare_records(base, new)
    assert any("different drafter weights" in w and "aaaa → bbbb" in w
               for w in comparison.warnings)
    assert not any("drafter weights" in w for w in compare_records(base, base).warnings)


def test_a_flagged_speedup_fails_a_speedup_rule_and_stated_noise_is_the_floor(records):
    from pytest_specdec.reporting.compare import compare_records

    stated = [{**r, "speedup_noise": 0.02, "timing_flags": []} for r in records]
    flagged = [{**r, "timing_flags": ["above cost bound"]} if r["role"] == "speculative" else r
               for r in stated]
    comparison = compare_records(stated, flagged, rules=[("speedup", 0.10)])
    assert not comparison.passed
    assert any("flagged speedup" in w for w in comparison.warnings)
    same = compare_records(stated, stated, rules=[("speedup", 0.10)])
    assert same.passed and any("stated timing noise" in w for w in same.warnings)
    case = next(c for c in same.compared if c.role == "speculative")
    assert case.metrics["speedup"].floor == pytest.approx(0.08)


def test_cases_are_matched_at_their_batch_size(records):
    """A batch-4 record is compared with the batch-4 one, never with batch 1's; a
    record saved before the batch axis counts as batch 1."""
    from pytest_specdec.reporting.compare import compare_records

    batched = [{**r, "batch": 4, "speedup": (r["speedup"] or 1) / 2} for r in records]
    comparison = compare_records(records + batched, [{**r, "batch": 1} for r in records] + batched,
                                 rules=[("speedup", 0.10)])
    assert comparison.passed
    assert len(comparison.compared) == 2 * len(records)
    assert {c.batch for c in comparison.compared} == {1, 4}
    assert any(c.label.endswith("batch 4") for c in comparison.compared)


def test_cases_served_shared_or_per_sequence_are_warned_about(records):
    """A batched case whose drafter served every row with one instance is not the
    measurement of one instance per sequence: compare says so, like other weights."""
    from pytest_specdec.reporting.compare import compare_records

    def batched(instances: str | None) -> list[dict]:
        out = [{**r, "batch": 4} for r in records]
        return [{**r, "drafter_instances": instances}
                if r["role"] == "speculative" and instances else r for r in out]

    comparison = compare_records(batched("shared"), batched("per sequence"))
    assert any("drafter_instances" in w and "shared → per sequence" in w
               for w in comparison.warnings)
    assert not any("drafter_instances" in w
                   for w in compare_records(batched("shared"), batched("shared")).warnings)
    # a record saved before the field has none: nothing to tell apart
    assert not any("drafter_instances" in w
                   for w in compare_records(batched(None), batched("shared")).warnings)


def test_the_batch_table_shows_how_the_rows_were_served(records):
    from pytest_specdec.reporting.tables import BATCH_NOTE, batch_table

    batched = [{**r, "batch": 4, "drafter_instances": "shared"} if r["role"] == "speculative"
               else {**r, "batch": 4} for r in records]
    headers, rows = batch_table(records + batched)
    assert headers[-2:] == ["batch 1", "batch 4"]
    drafted = [row for row in rows if row[0] != "baseline"]
    assert drafted and all(row[-1].endswith(" · shared") for row in drafted)
    assert not any("shared" in row[-2] for row in rows)  # batch 1: one instance
    assert "per sequence" in BATCH_NOTE and "drafter_instances" in BATCH_NOTE
