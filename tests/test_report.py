"""Reports and the command line, from a stored pytest-benchmark run (tests/data/run_pld.json).

The fixture is a hand-written run in pytest-benchmark's saved format: multi_round at T=0
and best_of_n at T=0.6, each with baseline, pld, hf_generate and hf_pld, plus one plain
pytest-benchmark case that reports must ignore. Its numbers are chosen so that every
expected figure below can be checked by hand.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import os
from pathlib import Path

import pytest

from conftest import STORED_RUN, STORED_SUMMARY
from pytest_specdec import cli
from pytest_specdec.reporting import (ReportError, load_records, records_from_benchmark_json,
                                      render_csv, render_json, render_markdown, render_terminal,
                                      report_meta, summary_table, write_reports)

RUN = STORED_RUN

EXPECTED_HEADERS, *EXPECTED_ROWS = STORED_SUMMARY


def markdown_rows(text: str) -> list[list[str]]:
    """Cells of every Markdown table row in ``text``, stripped (separator rows dropped)."""
    rows = []
    for line in text.splitlines():
        if line.startswith("|") and not set(line) <= set("|-: "):
            rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def with_record(records: list[dict], like: dict, **changes) -> list[dict]:
    """``records`` plus a copy of ``like`` with ``changes``."""
    return records + [{**copy.deepcopy(like), **changes}]


def find(records: list[dict], drafter: str, paradigm: str) -> dict:
    return next(r for r in records if r["drafter"] == drafter and r["paradigm"] == paradigm)


# --------------------------------------------------------------------------- loading


def test_loads_specdec_records_and_ignores_other_benchmarks(records):
    assert len(records) == 8
    assert {(r["drafter"], r["paradigm"]) for r in records} == {
        (d, p) for d in ("baseline", "pld", "hf_generate", "hf_pld")
        for p in ("multi_round", "best_of_n")}
    pld = find(records, "pld", "multi_round")
    assert pld["case"] == "suites/test_cases.py::test_speculative[pld-multi_round]"
    assert pld["source"] == str(RUN)
    assert pld["run_date"] == "2025-06-01T12:34:56.789012+00:00"
    assert pld["machine"] == ("bench-01, AMD EPYC 7763 64-Core Processor, "
                              "Linux 6.8.0-60-generic, Python 3.12.3")


def test_report_meta(records):
    assert report_meta(records) == {
        "profile": "—",  # the stored run predates profiles
        "target": "HuggingFaceTB/SmolLM2-135M-Instruct", "dtype": "float32", "device": "cpu",
        "problems": "4", "max_new_tokens": "256", "k": "10",
        "depth profile": "—",  # the stored run predates depth profiles
        "date": "2025-06-01T12:34:56.789012+00:00",
        "machine": "bench-01, AMD EPYC 7763 64-Core Processor, Linux 6.8.0-60-generic, Python 3.12.3",
    }


# --------------------------------------------------------------------------- summary


def test_summary_table(records):
    assert summary_table(records) == (EXPECTED_HEADERS, EXPECTED_ROWS)


def test_summary_table_orders_rows_whatever_the_input_order(records):
    assert summary_table(list(reversed(records))) == (EXPECTED_HEADERS, EXPECTED_ROWS)


def test_summary_marks_best_speculative_speedup_per_column(records):
    pld_mr, pld_bon = find(records, "pld", "multi_round"), find(records, "pld", "best_of_n")
    records = with_record(records, pld_mr, drafter="pld:share_group=true", speedup=2.5, mat=2.8)
    records = with_record(records, pld_bon, drafter="pld:share_group=true", speedup=1.1, mat=1.2)
    headers, rows = summary_table(records, mark_best=lambda text: f"<{text}>")
    assert headers == EXPECTED_HEADERS
    assert rows == [
        ["baseline", "1.00x · MAT 1.00", "1.00x · MAT 1.00"],
        ["pld", "2.00x · MAT 2.29", "<1.60x · MAT 1.60>"],
        ["pld:share_group=true", "<2.50x · MAT 2.80>", "1.10x · MAT 1.20"],
        ["hf_generate", "1.00x · MAT 1.00", "1.00x · MAT 1.00"],
        ["hf_pld", "1.25x · MAT 2.00", "1.28x · MAT 1.28"],
    ]


def test_peers_are_never_marked_even_when_faster(records):
    find(records, "pld", "best_of_n")["speedup"] = 1.05  # now below hf_pld's 1.28
    _, rows = summary_table(records, mark_best=lambda text: f"<{text}>")
    assert rows[1] == ["pld", "<2.00x · MAT 2.29>", "<1.05x · MAT 1.60>"]
    assert rows[3] == ["hf_pld", "1.25x · MAT 2.00", "1.28x · MAT 1.28"]


def test_missing_cells_and_a_single_temperature(records):
    multi_round = [r for r in records if r["paradigm"] == "multi_round" and r["drafter"] != "hf_pld"]
    records = with_record(multi_round, find(records, "pld", "best_of_n"), temperature=0.0)
    assert summary_table(records) == (
        ["drafter", "multi_round", "best_of_n"],
        [["baseline", "1.00x · MAT 1.00", "—"],
         ["pld", "2.00x · MAT 2.29", "1.60x · MAT 1.60"],
         ["hf_generate", "1.00x · MAT 1.00", "—"]])


def test_several_temperatures_of_one_paradigm_become_columns(records):
    records = with_record(records, find(records, "pld", "best_of_n"), temperature=1.0, speedup=1.4)
    headers, rows = summary_table(records)
    assert headers == ["drafter", "multi_round T=0", "best_of_n T=0.6", "best_of_n T=1"]
    assert rows[1] == ["pld", "2.00x · MAT 2.29", "1.60x · MAT 1.60", "1.40x · MAT 1.60"]
    assert rows[0][3] == "—"


def test_several_targets_get_a_target_column(records):
    other = [{**r, "target": "tiny-llama", "speedup": 1.0 if r["role"] != "speculative" else 1.5}
             for r in records if r["paradigm"] == "multi_round"]
    headers, rows = summary_table(records + other)
    assert headers == ["target"] + EXPECTED_HEADERS
    label = "HuggingFaceTB/SmolLM2-135M-Instruct (float32)"
    assert rows[:4] == [[label] + row for row in EXPECTED_ROWS]
    assert rows[5] == ["tiny-llama (float32)", "pld", "1.50x · MAT 2.29", "—"]


def test_terminal_marks_best_with_a_star(records):
    text = render_terminal(records)
    assert "2.00x · MAT 2.29*" in text and "1.60x · MAT 1.60*" in text
    assert "1.25x · MAT 2.00*" not in text and "1.00x · MAT 1.00*" not in text
    lines = text.splitlines()
    assert lines[0].split() == ["drafter", "multi_round", "T=0", "best_of_n", "T=0.6"]
    assert [line.split()[0] for line in lines[2:6]] == ["baseline", "pld", "hf_generate", "hf_pld"]


# --------------------------------------------------------------------------- markdown


@pytest.fixture
def markdown(records) -> str:
    return render_markdown(records, title="PLD on SmolLM2", meta=report_meta(records))


def test_markdown_title_meta_and_summary(markdown):
    assert markdown.startswith("# PLD on SmolLM2\n")
    assert "- **target**: HuggingFaceTB/SmolLM2-135M-Instruct\n" in markdown
    assert "- **k**: 10\n" in markdown
    rows = markdown_rows(markdown)
    assert rows[0] == EXPECTED_HEADERS
    assert rows[1:5] == [
        ["baseline", "1.00x · MAT 1.00", "1.00x · MAT 1.00"],
        ["pld", "**2.00x · MAT 2.29**", "**1.60x · MAT 1.60**"],
        ["hf_generate", "1.00x · MAT 1.00", "1.00x · MAT 1.00"],
        ["hf_pld", "1.25x · MAT 2.00", "1.28x · MAT 1.28"],
    ]


def test_markdown_details_per_record(markdown):
    rows = markdown_rows(markdown)
    assert ["drafter", "paradigm", "T", "k", "speedup", "MAT", "acceptance", "draft share",
            "tokens/s median (min–max)", "wall s median (min–max)", "accuracy", "lossless",
            "output"] in rows
    # tokens/s per round: new tokens / that round's wall time (2048 / 20.61 .. 2048 / 20.39)
    # k: the depth each drafting case ran with; plain decoding (hf_generate) drafts nothing
    assert ["pld", "multi_round", "0", "10", "2.00x", "2.29", "32.1%", "4.2%",
            "100.0 (99.4–100.4)", "20.48 (20.39–20.61)", "75.0%", "exact",
            "`3f9a1c0e5b7d2a48`"] in rows
    assert ["hf_generate", "best_of_n", "0.6", "—", "1.00x", "1.00", "—", "0.0%",
            "40.0 (39.8–40.2)", "102.40 (102.00–102.90)", "50.0%", "not_checked",
            "`9e2d4b6a0c1f3857`"] in rows
    assert ["pld", "best_of_n", "0.6", "10", "1.60x", "1.60", "24.0%", "3.1%", "81.9 (81.4–82.2)",
            "50.00 (49.80–50.30)", "75.0%", "near_tie", "`c05d29e8a1f4b736`"] in rows


def test_markdown_per_position_acceptance_first_eight(markdown):
    rows = markdown_rows(markdown)
    assert ["drafter", "paradigm", "T"] + [f"pos {i}" for i in range(1, 9)] in rows
    assert ["pld", "multi_round", "0", "62%", "48%", "41%", "37%", "34%", "31%", "29%", "27%"] in rows
    assert ["pld", "best_of_n", "0.6", "45%", "33%", "27%", "23%", "20%", "18%", "17%", "16%"] in rows


def test_markdown_peer_ratios(markdown):
    # multi_round: 50.0 / 40.0 tok/s and 2.00x / 1.25x; best_of_n: 51.2 / 40.0 and 1.60x / 1.28x
    assert ("- multi_round T=0: our baseline tok/s ÷ hf_generate tok/s = 1.25 (50.0 ÷ 40.0); "
            "our pld speedup ÷ hf_pld speedup = 1.60 (2.00x ÷ 1.25x)\n") in markdown
    assert ("- best_of_n T=0.6: our baseline tok/s ÷ hf_generate tok/s = 1.28 (51.2 ÷ 40.0); "
            "our pld speedup ÷ hf_pld speedup = 1.25 (1.60x ÷ 1.28x)\n") in markdown


def test_peer_ratio_compares_only_the_drafter_named_pld(records):
    records = [r for r in records if r["drafter"] != "pld"]
    records = [{**r, "drafter": "pld:share_group=true"} if r["role"] == "speculative" else r
               for r in records]
    text = render_markdown(records, title="t", meta={})
    assert "hf_pld speedup" not in text
    assert "our baseline tok/s ÷ hf_generate tok/s = 1.25" in text


def test_markdown_how_to_read(markdown):
    how_to_read = markdown.split("## How to read", 1)[1]
    assert "median of its timed rounds" in how_to_read and "side by side" in how_to_read
    assert "**MAT**" in how_to_read


def test_markdown_separates_targets(records):
    other = [{**r, "target": "tiny-llama"} for r in records]
    text = render_markdown(records + other, title="t", meta={})
    assert "### HuggingFaceTB/SmolLM2-135M-Instruct (float32)" in text
    assert "### tiny-llama (float32)" in text
    assert "- tiny-llama (float32), multi_round T=0: our baseline tok/s" in text


# --------------------------------------------------------------------------- csv, json


def test_csv_has_one_row_per_record(records):
    rows = list(csv.reader(io.StringIO(render_csv(records))))
    header, body = rows[0], rows[1:]
    assert header[:8] == ["case", "role", "drafter", "paradigm", "temperature", "target", "dtype",
                          "device"]
    assert "per_position_acceptance" in header and "output_sha256" in header
    assert len(body) == 8
    pld = dict(zip(header, body[1]))
    assert pld["drafter"] == "pld" and pld["paradigm"] == "multi_round"
    assert pld["per_position_acceptance"] == "0.62;0.48;0.41;0.37;0.34;0.31;0.29;0.27;0.26;0.25"
    assert pld["speedup"] == "2.0"
    assert dict(zip(header, body[0]))["acceptance_rate"] == ""  # None


def test_json_round_trip(records):
    meta = report_meta(records)
    assert json.loads(render_json(records, meta=meta)) == {"meta": meta, "records": records}


# --------------------------------------------------------------------------- writing


def test_write_reports_never_overwrites(records, tmp_path):
    out = tmp_path / "reports" / "nested"
    meta = report_meta(records)
    first = write_reports(records, out, "run", meta=meta)
    assert [p.name for p in first] == ["run.md", "run.csv", "run.json", "run.html"]
    before = {p: p.read_bytes() for p in first}

    second = write_reports(records[:2], out, "run", meta=meta)
    assert [p.name for p in second] == ["run-2.md", "run-2.csv", "run-2.json", "run-2.html"]
    assert {p: p.read_bytes() for p in first} == before
    assert len(list(csv.reader(io.StringIO(second[1].read_text())))) == 3

    third = write_reports(records, out, "run", meta=meta)
    assert [p.name for p in third] == ["run-3.md", "run-3.csv", "run-3.json", "run-3.html"]
    assert sorted(os.listdir(out)) == sorted(p.name for p in first + second + third)  # no temp files


def test_write_reports_moves_all_names_when_one_is_taken(records, tmp_path):
    (tmp_path / "run.csv").write_text("someone else's file")
    paths = write_reports(records, tmp_path, "run", meta={})
    assert [p.name for p in paths] == ["run-2.md", "run-2.csv", "run-2.json", "run-2.html"]
    assert (tmp_path / "run.csv").read_text() == "someone else's file"


def test_write_reports_renames_a_synced_temp_file_in_place(records, tmp_path, monkeypatch):
    renames, synced = [], []
    real_replace, real_fsync = os.replace, os.fsync

    def recording_replace(src, dst):
        assert Path(src).read_text(encoding="utf-8")  # complete before it gets its name
        renames.append((Path(src), Path(dst)))
        real_replace(src, dst)

    def recording_fsync(fd):
        synced.append(fd)
        real_fsync(fd)

    monkeypatch.setattr("pytest_specdec.atomic.os.replace", recording_replace)
    monkeypatch.setattr("pytest_specdec.atomic.os.fsync", recording_fsync)
    paths = write_reports(records, tmp_path, "run", meta={})
    assert [dst for _, dst in renames] == paths
    assert all(src.parent == dst.parent and src != dst for src, dst in renames)
    assert len(synced) >= 4


def test_failed_write_leaves_no_file_behind(records, tmp_path, monkeypatch):
    def failing_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("pytest_specdec.atomic.os.replace", failing_replace)
    with pytest.raises(OSError):
        write_reports(records, tmp_path, "run", meta={})
    assert os.listdir(tmp_path) == []


def test_write_reports_rejects_a_stem_with_directories(records, tmp_path):
    with pytest.raises(ReportError, match="plain file name"):
        write_reports(records, tmp_path, "../escape", meta={})


# --------------------------------------------------------------------------- errors


def test_missing_file_is_named(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(ReportError, match="no such file") as info:
        load_records([missing])
    assert str(missing) in str(info.value)


def test_invalid_json_is_named(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('{"benchmarks": [', encoding="utf-8")
    with pytest.raises(ReportError, match="not valid JSON") as info:
        load_records([broken])
    assert str(broken) in str(info.value)


def test_foreign_json_is_named(tmp_path):
    foreign = tmp_path / "foreign.json"
    foreign.write_text('{"foo": 1}', encoding="utf-8")
    with pytest.raises(ReportError, match="not a pytest-benchmark JSON") as info:
        load_records([foreign])
    assert str(foreign) in str(info.value)


def test_record_missing_keys_names_file_case_and_keys(run_data, tmp_path):
    extra = run_data["benchmarks"][1]["extra_info"]
    del extra["mat"], extra["speedup"]
    damaged = tmp_path / "damaged.json"
    damaged.write_text(json.dumps(run_data), encoding="utf-8")
    with pytest.raises(ReportError) as info:
        load_records([damaged])
    message = str(info.value)
    assert str(damaged) in message
    assert "suites/test_cases.py::test_speculative[pld-multi_round]" in message
    assert "mat, speedup" in message


def test_wrong_value_type_is_named(run_data):
    run_data["benchmarks"][1]["extra_info"]["speedup"] = "fast"
    with pytest.raises(ReportError, match=r"run.json: .*pld-multi_round.*speedup \(str\)"):
        records_from_benchmark_json(run_data, source="run.json")


def test_unknown_schema_version_is_refused(run_data):
    run_data["benchmarks"][0]["extra_info"]["specdec_schema"] = 2
    with pytest.raises(ReportError, match="specdec_schema 2"):
        records_from_benchmark_json(run_data, source="run.json")


# --------------------------------------------------------------------------- cli


def test_cli_report_end_to_end(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["report", str(RUN), "--out", str(out), "--stem", "pld"]) == 0
    stdout = capsys.readouterr().out
    assert "2.00x · MAT 2.29*" in stdout
    written = [out / "pld.md", out / "pld.csv", out / "pld.json"]
    assert all(f"wrote {path}" in stdout for path in written)
    assert all(path.is_file() for path in written)
    saved = json.loads(written[2].read_text(encoding="utf-8"))
    assert len(saved["records"]) == 8
    assert saved["meta"]["target"] == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_cli_report_default_stem_and_filters(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["report", str(RUN), "--out", str(out), "--drafter", "baseline", "pld",
            "--paradigm", "best_of_n"]
    assert cli.main(argv) == 0
    stdout = capsys.readouterr().out
    assert "hf_pld" not in stdout and "multi_round" not in stdout
    saved = json.loads((out / "run_pld.json").read_text(encoding="utf-8"))
    assert [(r["drafter"], r["paradigm"]) for r in saved["records"]] == [
        ("baseline", "best_of_n"), ("pld", "best_of_n")]


def test_cli_report_bad_file_exits_2(tmp_path, capsys):
    foreign = tmp_path / "foreign.json"
    foreign.write_text('{"foo": 1}', encoding="utf-8")
    assert cli.main(["report", str(foreign), "--out", str(tmp_path / "out")]) == 2
    assert str(foreign) in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_report_without_records_exits_2(run_data, tmp_path, capsys):
    run_data["benchmarks"] = run_data["benchmarks"][-1:]  # only the plain benchmark
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps(run_data), encoding="utf-8")
    assert cli.main(["report", str(plain), "--out", str(tmp_path / "out")]) == 2
    assert "no pytest-specdec records" in capsys.readouterr().err


def test_cli_report_filter_matching_nothing_exits_2(tmp_path, capsys):
    assert cli.main(["report", str(RUN), "--out", str(tmp_path), "--drafter", "eagle"]) == 2
    err = capsys.readouterr().err
    assert "no records match" in err and "baseline, pld, hf_generate, hf_pld" in err


class EchoDrafter:
    """A stand-in drafter: only its signature matters to ``list``."""

    needs = frozenset()

    def __init__(self, window: int = 4, greedy: bool = True, mode: str = "fast") -> None:
        pass


def test_cli_list(monkeypatch, capsys):
    from pytest_specdec.protocol.registry import Registry

    registry = Registry()
    registry.add("echo", EchoDrafter, "dummy-package (tests:EchoDrafter)")
    registry.problems.append("drafter 'broken' from x failed to load")
    monkeypatch.setattr(cli, "load_registry", lambda: registry)
    assert cli.main(["list"]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [
        "echo  (dummy-package (tests:EchoDrafter))",
        "    draft depth 5 (no max_depth declared: the default)",
        "    window: int = 4",
        "    greedy: bool = True",
        "    mode: str = 'fast'",
    ]
    assert "drafter 'broken' from x failed to load" in captured.err


def test_markdown_mat_by_round_and_sample(records):
    """The group-sharing ablation: MAT of each round / sample, per speculative record."""
    for record in records:
        if record["role"] == "speculative":
            if record["paradigm"] == "multi_round":
                record["mat_by_round"], record["mat_by_sample"] = [1.5, 3.25], [2.29]
            else:
                record["mat_by_round"], record["mat_by_sample"] = [1.6], [1.2, 1.5, 1.8, 1.9]
    text = render_markdown(records, title="t", meta=report_meta(records))
    section = text.split("## MAT by round and sample")[1].split("\n## ")[0]
    assert markdown_rows(section) == [
        ["drafter", "paradigm", "T", "seq 1", "seq 2", "seq 3", "seq 4"],
        ["pld", "multi_round", "0", "1.50", "3.25", "—", "—"],
        ["pld", "best_of_n", "0.6", "1.20", "1.50", "1.80", "1.90"],
    ]


def test_markdown_without_per_sequence_mat_has_no_such_section(markdown):
    assert "## MAT by round and sample" not in markdown


def test_deeply_nested_json_is_a_clear_error(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" * 200000, encoding="utf-8")
    with pytest.raises(ReportError, match="nested too deeply"):
        load_records([path])


def test_write_reports_replace_rewrites_its_own_stem(records, tmp_path):
    """A session rewrites its report as cases finish: the same names, the latest records."""
    meta = report_meta(records)
    first = write_reports(records[:2], tmp_path, "run", meta=meta)
    again = write_reports(records, tmp_path, "run", meta=meta, replace=True)
    assert [p.name for p in again] == [p.name for p in first]
    assert len(json.loads(again[2].read_text())["records"]) == len(records)
    assert sorted(os.listdir(tmp_path)) == sorted(p.name for p in first)  # no temp files


def test_lossless_section_shows_what_the_check_found(records):
    from pytest_specdec.reporting import render_markdown
    from pytest_specdec.reporting.tables import lossless_table as _lossless_table

    spec = next(r for r in records if r["role"] == "speculative")
    checked = dict(spec, lossless="near_tie", lossless_method="teacher_forced",
                   tokens_exact=410, tokens_near_tie=2, max_tie_margin=0.625,
                   tie_margin={"logits": 1.125, "source": "measured", "max_gap": 0.375},
                   sequences_departed=3, check_s=1.5, wall_s_rounds=[4.0, 4.5],
                   first_departure={"problem": "embedded-001", "sample": 0, "round": 1,
                                    "token": 17})
    headers, rows = _lossless_table([checked, *[r for r in records if r is not spec]])
    assert headers[3:] == ["method", "exact tokens", "near-ties", "largest margin",
                           "margin allowed", "departed", "first departure", "check s (share)"]
    assert rows == [[spec["drafter"], spec["paradigm"], "0", "teacher_forced", "410", "2",
                     "0.62", "1.12", "3", "embedded-001 / 0 / 1 / 17", "1.5 (15.0%)"]]
    given = dict(checked, tie_margin={"logits": 0.5, "source": "given"})
    assert _lossless_table([given])[1][0][7] == "0.5 (given)"
    assert "## Losslessness" in render_markdown([checked], title="t", meta={})
    # records written before the check reported its counts get no row, and no section
    assert _lossless_table(records)[1] == []
    assert "## Losslessness" not in render_markdown(records, title="t", meta={})


def test_markdown_hybrid_parts(records):
    """A hybrid's record says which part drafted each step; the report lists it."""
    like = find(records, "pld", "multi_round")
    records = with_record(records, like, drafter="sam+pld",
                          hybrid_parts={"sam": {"steps": 3, "tokens": 63},
                                        "pld": {"steps": 1, "tokens": 10}})
    text = render_markdown(records, title="t", meta=report_meta(records))
    section = text.split("## Hybrids", 1)[1].split("\n## ", 1)[0]
    assert "- sam+pld, multi_round T=0: sam 3 steps (75%), 63 tokens; pld 1 steps (25%), 10 tokens" \
        in section
    plain = render_markdown(find_all_but(records, "sam+pld"), title="t", meta=report_meta(records))
    assert "## Hybrids" not in plain


def find_all_but(records: list[dict], drafter: str) -> list[dict]:
    return [r for r in records if r["drafter"] != drafter]


def test_markdown_drafter_notes_once_per_drafter(records):
    """A drafter's note (where its drafts come from) shows once, however many rows."""
    note = "no datastore: retrieves only from the problem's earlier sequences"
    records = [dict(r, drafter_note=note) if r["drafter"] == "pld" else r for r in records]
    text = render_markdown(records, title="t", meta=report_meta(records))
    section = text.split("## Drafter notes", 1)[1].split("\n## ", 1)[0]
    assert section.strip().splitlines() == [f"- pld: {note}"]
