"""The HTML page, the PNG charts, the report filters, and the machine info a run carries
(pytest-benchmark's machine_info hooks), from the stored run tests/data/run_pld.json and
one small plugin run on the tiny model folder."""

from __future__ import annotations

import base64
import json
import os
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from conftest import STORED_RUN, STORED_SUMMARY
from pytest_specdec import cli
from pytest_specdec.bench.machine import (machine_differences, nvidia_driver_version,
                                          specdec_machine_info, target_name, weight_bytes)
from pytest_specdec.reporting import (ReportError, describe_machine, load_records, report_meta,
                                      select_records, write_reports)
from pytest_specdec.reporting.html import render_html
from pytest_specdec.reporting.machine_text import describe_memory_limit

RUN = STORED_RUN
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EXPECTED_SUMMARY = STORED_SUMMARY


class Page(HTMLParser):
    """The parts of a report page the tests look at: per section id, its tables (rows of
    cell texts, and the classes of cells), list items, images; every start tag seen."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.tables: dict[str, list[list[list[str]]]] = {}
        self.best: dict[str, list[str]] = {}
        self.items: dict[str, list[str]] = {}
        self.images: list[dict[str, str]] = []
        self.text: dict[str, str] = {}
        self.title = ""
        self._section = ""
        self._cell: list[str] | None = None
        self._cell_class = ""
        self._item: list[str] | None = None
        self._in_title = False
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        self.tags.append(tag)
        if tag == "section":
            self._section = attributes.get("id", "")
        elif tag == "table":
            self.tables.setdefault(self._section, []).append([])
        elif tag == "tr":
            self.tables[self._section][-1].append([])
        elif tag in ("td", "th"):
            self._cell, self._cell_class = [], attributes.get("class", "")
        elif tag == "li":
            self._item = []
        elif tag == "img":
            self.images.append(attributes)
        elif tag == "title":
            self._in_title = True

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            text = "".join(self._cell)
            self.tables[self._section][-1][-1].append(text)
            if self._cell_class == "best":
                self.best.setdefault(self._section, []).append(text)
            self._cell = None
        elif tag == "li" and self._item is not None:
            self.items.setdefault(self._section, []).append("".join(self._item))
            self._item = None
        elif tag == "title":
            self._in_title = False

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)
        if self._item is not None:
            self._item.append(data)
        if self._in_title:
            self.title += data
        self.text[self._section] = self.text.get(self._section, "") + data


def page_of(records, **kwargs) -> Page:
    return Page(render_html(records, title=kwargs.pop("title", "PLD"),
                            meta=kwargs.pop("meta", report_meta(records)), **kwargs))


# --------------------------------------------------------------------------- html


def test_html_holds_every_section_of_the_report(records):
    page = page_of(records, title="PLD on SmolLM2")
    assert page.title == "PLD on SmolLM2"
    assert page.tags[:1] == ["html"] and "script" not in page.tags and "link" not in page.tags
    (meta,) = page.tables["meta"]
    assert ["target", "HuggingFaceTB/SmolLM2-135M-Instruct"] in meta
    assert ["machine", "bench-01, AMD EPYC 7763 64-Core Processor, Linux 6.8.0-60-generic, "
                       "Python 3.12.3"] in meta
    (summary,) = page.tables["summary"]
    assert summary == EXPECTED_SUMMARY
    assert page.best["summary"] == ["2.00x · MAT 2.29", "1.60x · MAT 1.60"]
    (details,) = page.tables["details"]
    assert details[0][3] == "k" and details[0][8] == "tokens/s median (min–max)"
    assert ["pld", "multi_round", "0", "10", "2.00x", "2.29", "32.1%", "4.2%", "100.0 (99.4–100.4)",
            "20.48 (20.39–20.61)", "75.0%", "exact", "3f9a1c0e5b7d2a48"] in details
    assert len(details) == 1 + 8
    (positions,) = page.tables["per-position"]
    assert ["pld", "best_of_n", "0.6", "45%", "33%", "27%", "23%", "20%", "18%", "17%", "16%"] in positions
    assert page.items["peers"] == [
        "multi_round T=0: our baseline tok/s ÷ hf_generate tok/s = 1.25 (50.0 ÷ 40.0); "
        "our pld speedup ÷ hf_pld speedup = 1.60 (2.00x ÷ 1.25x)",
        "best_of_n T=0.6: our baseline tok/s ÷ hf_generate tok/s = 1.28 (51.2 ÷ 40.0); "
        "our pld speedup ÷ hf_pld speedup = 1.25 (1.60x ÷ 1.28x)"]
    assert "median of its timed rounds" in page.text["how-to-read"]
    assert "mat-by-sequence" not in page.tables and "charts" not in page.text


def test_html_mat_by_round_and_sample(records):
    for record in records:
        if record["role"] == "speculative":
            record["mat_by_round"], record["mat_by_sample"] = [1.5, 3.25], [2.29]
    (table,) = page_of(records).tables["mat-by-sequence"]
    assert table[0] == ["drafter", "paradigm", "T", "seq 1", "seq 2"]
    assert ["pld", "multi_round", "0", "1.50", "3.25"] in table


def test_html_escapes_every_text(records):
    hostile = "<script>alert('x')</script> & \"q\""
    for record in records:
        if record["drafter"] == "pld":
            record["drafter"] = hostile
        record["target"] = "A&B <model>"
    text = render_html(records, title="<b>title</b>", meta={"machine": "<img src=x onerror=1>"})
    assert "<script" not in text and "<b>" not in text and "<img src=x" not in text
    page = Page(text)
    assert page.tags.count("script") == page.tags.count("b") == page.tags.count("img") == 0
    assert page.title == "<b>title</b>"
    assert [row[0] for row in page.tables["summary"][0]].count(hostile) == 1
    assert ["machine", "<img src=x onerror=1>"] in page.tables["meta"][0]
    assert page.best["summary"] == ["2.00x · MAT 2.29", "1.60x · MAT 1.60"]


def test_html_separates_targets(records):
    other = [{**r, "target": "tiny-llama"} for r in records]
    page = page_of(records + other)
    assert len(page.tables["summary"]) == 2
    assert all(table == EXPECTED_SUMMARY for table in page.tables["summary"])
    assert "tiny-llama (float32)" in page.text["summary"]


def test_write_reports_html_never_overwrites(records, tmp_path):
    (tmp_path / "run.html").write_text("someone else's page", encoding="utf-8")
    paths = write_reports(records, tmp_path, "run", meta={})
    assert [p.name for p in paths] == ["run-2.md", "run-2.csv", "run-2.json", "run-2.html"]
    assert (tmp_path / "run.html").read_text(encoding="utf-8") == "someone else's page"
    assert Page(paths[3].read_text(encoding="utf-8")).tables["summary"][0] == EXPECTED_SUMMARY


def test_failed_html_write_leaves_no_partial_file(records, tmp_path, monkeypatch):
    real_replace = os.replace

    def failing_on_html(src, dst):
        if str(dst).endswith(".html"):
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr("pytest_specdec.atomic.os.replace", failing_on_html)
    with pytest.raises(OSError):
        write_reports(records, tmp_path, "run", meta={})
    # the files written before are whole; no html, no temp file
    assert sorted(os.listdir(tmp_path)) == ["run.csv", "run.json", "run.md"]


# --------------------------------------------------------------------------- charts


def test_charts_are_written_linked_and_embedded(records, tmp_path):
    paths = write_reports(records, tmp_path, "run", meta=report_meta(records), charts=True)
    assert [p.name for p in paths] == ["run.md", "run.csv", "run.json", "run.html",
                                       "run-speedup.png", "run-acceptance.png"]
    pngs = [p.read_bytes() for p in paths[4:]]
    assert all(png.startswith(PNG_MAGIC) and len(png) > 2000 for png in pngs)
    markdown = paths[0].read_text(encoding="utf-8")
    assert "![Speedup per paradigm](run-speedup.png)" in markdown
    assert "![Per-position acceptance](run-acceptance.png)" in markdown
    images = Page(paths[3].read_text(encoding="utf-8")).images
    prefix = "data:image/png;base64,"
    assert [base64.b64decode(i["src"].removeprefix(prefix)) for i in images] == pngs
    assert sorted(os.listdir(tmp_path)) == sorted(p.name for p in paths)  # no temp files


def test_charts_never_overwrite(records, tmp_path):
    (tmp_path / "run-acceptance.png").write_bytes(b"mine")
    paths = write_reports(records, tmp_path, "run", meta={}, charts=True)
    assert paths[0].name == "run-2.md" and paths[-1].name == "run-2-acceptance.png"
    assert (tmp_path / "run-acceptance.png").read_bytes() == b"mine"


def test_charts_of_several_targets_and_no_acceptance(records, tmp_path):
    other = [{**r, "target": "tiny-llama", "per_position_acceptance": []} for r in records]
    paths = write_reports(records + other, tmp_path, "two", meta={}, charts=True)
    assert all(p.read_bytes().startswith(PNG_MAGIC) for p in paths[4:])
    baselines = [r for r in records if r["role"] == "baseline"]  # nothing to draw but the line
    paths = write_reports(baselines, tmp_path, "base", meta={}, charts=True)
    assert all(p.read_bytes().startswith(PNG_MAGIC) for p in paths[4:])


def test_charts_without_matplotlib_name_the_extra(records, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    out = tmp_path / "out"
    with pytest.raises(ReportError, match=r"matplotlib.*pip install pytest-specdec\[charts\]"):
        write_reports(records, out, "run", meta={}, charts=True)
    assert not out.exists()

    assert cli.main(["report", str(RUN), "--out", str(out), "--charts"]) == 2
    captured = capsys.readouterr()
    assert "pip install pytest-specdec[charts]" in captured.err
    assert captured.out == "" and not out.exists()

    # without --charts nothing changes
    assert cli.main(["report", str(RUN), "--out", str(out)]) == 0
    assert sorted(os.listdir(out)) == ["run_pld.csv", "run_pld.html", "run_pld.json", "run_pld.md"]


def test_cli_report_charts(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["report", str(RUN), "--out", str(out), "--stem", "pld", "--charts"]) == 0
    stdout = capsys.readouterr().out
    for name in ("pld.md", "pld.csv", "pld.json", "pld.html", "pld-speedup.png",
                 "pld-acceptance.png"):
        assert f"wrote {out / name}" in stdout
    assert (out / "pld-speedup.png").read_bytes().startswith(PNG_MAGIC)


# --------------------------------------------------------------------------- filters


def test_select_records_by_temperature_and_target(records):
    other = [{**r, "target": "tiny-llama"} for r in records]
    both = records + other
    picked = select_records(both, temperatures=[0.6], targets=["tiny-llama"])
    assert [(r["drafter"], r["paradigm"], r["target"]) for r in picked] == [
        (d, "best_of_n", "tiny-llama") for d in ("baseline", "pld", "hf_generate", "hf_pld")]
    assert select_records(both, temperatures=[0, 0.6]) == both
    assert select_records(both, drafters=["pld"], temperatures=[0.0], targets=["tiny-llama"]) == [
        next(r for r in other if r["drafter"] == "pld" and r["paradigm"] == "multi_round")]
    assert select_records(both, temperatures=[1.0]) == []


def two_targets(run_data: dict, tmp_path: Path) -> Path:
    for bench in run_data["benchmarks"]:
        if "extra_info" in bench and "target" in bench["extra_info"]:
            bench["extra_info"]["target"] = "tiny-llama"
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(run_data), encoding="utf-8")
    return path


def test_cli_report_filters_by_temperature_and_target(run_data, tmp_path, capsys):
    tiny = two_targets(run_data, tmp_path)
    out = tmp_path / "out"
    argv = ["report", str(RUN), str(tiny), "--out", str(out), "--temperature", "0.6",
            "--target", "tiny-llama", "--drafter", "baseline", "pld"]
    assert cli.main(argv) == 0
    assert "multi_round" not in capsys.readouterr().out
    saved = json.loads((out / "report.json").read_text(encoding="utf-8"))["records"]
    assert [(r["drafter"], r["paradigm"], r["target"]) for r in saved] == [
        ("baseline", "best_of_n", "tiny-llama"), ("pld", "best_of_n", "tiny-llama")]


def test_cli_report_filter_names_what_the_runs_hold(tmp_path, capsys):
    assert cli.main(["report", str(RUN), "--out", str(tmp_path / "o"), "--target", "Qwen3-8B"]) == 2
    err = capsys.readouterr().err
    assert "no records match the filters" in err
    assert "temperatures 0, 0.6" in err and "targets HuggingFaceTB/SmolLM2-135M-Instruct" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("value", ["warm", "-0.5", "nan"])
def test_cli_report_bad_temperature(value, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["report", str(RUN), "--temperature", value])
    assert info.value.code == 2
    assert f"expected a temperature >= 0 such as 0 or 0.6, got {value!r}" in capsys.readouterr().err


# --------------------------------------------------------------------------- machine info


GPU_INFO = {"target": "Qwen/Qwen3-8B", "target_spec": "Qwen/Qwen3-8B", "dtype": "bfloat16",
            "device": "cuda", "torch": "2.13.0", "transformers": "5.24.0",
            "gpus": ["NVIDIA H200", "NVIDIA H200"], "cuda": "12.8", "driver": "570.133.20"}


def test_describe_machine_shows_the_specdec_entry(run_data):
    machine_info = {**run_data["machine_info"], "specdec": GPU_INFO}
    assert describe_machine(machine_info) == (
        "bench-01, AMD EPYC 7763 64-Core Processor, Linux 6.8.0-60-generic, Python 3.12.3; "
        "GPU 2x NVIDIA H200 (driver 570.133.20, CUDA 12.8); torch 2.13.0, transformers 5.24.0")
    cpu_only = {k: v for k, v in GPU_INFO.items() if k not in ("gpus", "cuda", "driver")}
    assert describe_machine({"node": "box", "specdec": cpu_only}) == (
        "box; torch 2.13.0, transformers 5.24.0")


def test_report_meta_shows_the_machine_info_of_the_run(run_data):
    run_data["machine_info"]["specdec"] = GPU_INFO
    from pytest_specdec.reporting import records_from_benchmark_json

    meta = report_meta(records_from_benchmark_json(run_data, source="gpu.json"))
    assert meta["machine"].endswith("GPU 2x NVIDIA H200 (driver 570.133.20, CUDA 12.8); "
                                    "torch 2.13.0, transformers 5.24.0")


def test_target_name_without_loading(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "my-model").mkdir()
    assert target_name("embedded") == "SmolLM2-135M-Instruct"
    assert target_name(str(tmp_path / "config.json")) == "random:config.json"
    assert target_name(str(tmp_path / "my-model")) == "my-model"
    assert target_name("Qwen/Qwen3-8B") == "Qwen/Qwen3-8B"


def fake_nvidia_smi(tmp_path: Path, monkeypatch, body: str) -> None:
    script = tmp_path / "bin" / "nvidia-smi"
    script.parent.mkdir()
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", str(script.parent), prepend=os.pathsep)


def test_driver_version_from_nvidia_smi(tmp_path, monkeypatch):
    fake_nvidia_smi(tmp_path, monkeypatch, 'echo "$@" > "$(dirname "$0")/args"\n'
                                           "printf '570.133.20\\n570.133.20\\n'")
    assert nvidia_driver_version() == "570.133.20"
    assert (tmp_path / "bin" / "args").read_text().split() == [
        "--query-gpu=driver_version", "--format=csv,noheader"]


def test_driver_version_absent_without_a_working_nvidia_smi(tmp_path, monkeypatch):
    monkeypatch.setattr("pytest_specdec.bench.machine.shutil.which", lambda name: None)
    assert nvidia_driver_version() is None
    monkeypatch.undo()
    fake_nvidia_smi(tmp_path, monkeypatch, "echo 'NVIDIA-SMI has failed' >&2; exit 9")
    assert nvidia_driver_version() is None


def config_for(**changes):
    from pytest_specdec.bench.config import SpecdecConfig

    values = dict(target="Qwen/Qwen3-8B", device="auto", dtype="auto", trust_remote_code=False,
                  drafters=None, paradigms=("multi_round",), dataset="embedded",
                  dataset_split="test", problems=1, max_new_tokens=8, n=2, rounds=2,
                  temperatures=None, seed=0, k=5, timed_rounds=1, report_dir=Path("reports"),
                  peers=(), strict=False, tie_margin=None, step_timeout=10.0, compare=None,
                  compare_fail=())
    values.update(changes)
    known = SpecdecConfig.__dataclass_fields__
    return SpecdecConfig(**{k: v for k, v in values.items() if k in known})


def test_machine_info_with_cuda(monkeypatch):
    import transformers

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "NVIDIA H200")
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr("pytest_specdec.bench.machine.nvidia_driver_version", lambda: "570.133.20")
    info = specdec_machine_info(config_for())
    assert info == {**GPU_INFO, "torch": torch.__version__,
                    "transformers": transformers.__version__}


def test_machine_info_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    info = specdec_machine_info(config_for(target="embedded", dtype="bfloat16"))
    assert info["target"] == "SmolLM2-135M-Instruct" and info["target_spec"] == "embedded"
    assert (info["dtype"], info["device"]) == ("bfloat16", "cpu")
    assert not {"gpus", "cuda", "driver"} & set(info)


def test_machine_differences():
    same = {"specdec": dict(GPU_INFO)}
    assert machine_differences(same, {"specdec": {**GPU_INFO, "torch": "2.12.0"}}) == []
    assert machine_differences(same, {"node": "x"}) == []  # a run made without pytest-specdec
    other = {"specdec": {**GPU_INFO, "target": "Llama-3-8B", "gpus": [], "dtype": "float16"}}
    assert machine_differences(same, other) == [
        "GPU: saved 'none' vs now 'NVIDIA H200, NVIDIA H200'",
        "target: saved 'Llama-3-8B' vs now 'Qwen/Qwen3-8B'",
        "dtype: saved 'float16' vs now 'bfloat16'"]


# --------------------------------------------------------------------------- through pytest


def assert_memory_entry(memory: dict, model_dir: Path, records: list[dict]) -> None:
    """machine_info's memory entry of a saved run: the target's weights, a bandwidth, the
    limit they give, the baselines' median probe as the step, and the figure."""
    from pytest_specdec.engine.target import load_target

    assert memory["weight_bytes"] == weight_bytes(load_target(str(model_dir)).model)
    assert 0 < memory["probe_bytes"] <= memory["weight_bytes"]
    assert memory["bandwidth_bytes_per_s"] > 0
    assert memory["limit_ms"] == pytest.approx(
        memory["weight_bytes"] / memory["bandwidth_bytes_per_s"] * 1e3, rel=1e-3)
    (baseline,) = [r for r in records if r["role"] == "baseline"]
    assert memory["step_ms"] == baseline["probe_ms"]
    assert memory["limit_over_step"] == pytest.approx(memory["limit_ms"] / memory["step_ms"],
                                                      rel=1e-3)


def test_saved_run_carries_machine_info_and_compare_warns(suite, tiny_model_dir, tmp_path):
    import transformers

    # pytest-benchmark's own machine_info warning needs the storage under the cwd
    storage, reports = suite.path / "storage", tmp_path / "reports"
    small = ["-p", "no:cacheprovider", "--specdec-target", str(tiny_model_dir),
             "--specdec-problems", "1", "--specdec-max-new-tokens", "8",
             "--specdec-paradigm", "multi_round", "--specdec-no-peer",
             "--specdec-drafter", "pld", f"--benchmark-storage={storage}"]
    result = suite.runpytest_subprocess(*small, "--benchmark-save=first",
                                        "--specdec-report-dir", str(reports), timeout=300)
    result.assert_outcomes(passed=2, deselected=2)

    (saved,) = storage.rglob("0001_first.json")
    data = json.loads(saved.read_text(encoding="utf-8"))
    info = data["machine_info"]["specdec"]
    assert info["target"] == tiny_model_dir.name and info["target_spec"] == str(tiny_model_dir)
    assert (info["dtype"], info["device"]) == ("float32", "cpu")
    assert (info["torch"], info["transformers"]) == (torch.__version__, transformers.__version__)
    assert ("gpus" in info) == torch.cuda.is_available()
    records = load_records([saved])
    # beside machine_info, which pytest-benchmark compares with the next run's
    assert "memory" not in info
    info = {**info, "memory": data["specdec"]["memory"]}
    assert_memory_entry(info["memory"], tiny_model_dir, records)
    # the session's report and a report of the saved run both show it
    (html_name,) = [p for p in reports.iterdir() if p.suffix == ".html"]
    page = Page(html_name.read_text(encoding="utf-8"))
    meta = dict(page.tables["meta"][0])
    assert f"torch {torch.__version__}, transformers {transformers.__version__}; " \
        f"{describe_memory_limit(info['memory'])}" in meta["machine"]
    assert records[0]["machine"].endswith(f"torch {torch.__version__}, "
                                          f"transformers {transformers.__version__}; "
                                          f"{describe_memory_limit(info['memory'])}")
    assert "limit ÷ step" in meta["machine"]
    # each case's verify forward in decode steps, in Timing and costs
    (timing,) = page.tables["timing"]
    pld = next(r for r in records if r["drafter"] == "pld")
    assert pld["verify_steps"] == pytest.approx(pld["t_verify_ms"] / pld["t_step_ms"], rel=0.01)
    assert pld["verify_width"] >= 1
    column = timing[0].index("t_verify steps (width)")
    assert timing[1][column] == f"{pld['verify_steps']:.2f} ({pld['verify_width']:.1f})"

    # a second saved run of another target and dtype
    data["machine_info"]["specdec"].update(target="other-model", dtype="bfloat16")
    saved.with_name("0002_other.json").write_text(json.dumps(data), encoding="utf-8")

    differs = suite.runpytest_subprocess(*small, "--collect-only", "-q",
                                         "--benchmark-compare=0002", timeout=300)
    assert differs.ret == pytest.ExitCode.OK
    output = pytest.LineMatcher(differs.outlines + differs.errlines)
    output.fnmatch_lines([
        "*pytest-specdec: the compared run was measured on another GPU, target or dtype "
        f"(target: saved 'other-model' vs now '{tiny_model_dir.name}'; "
        "dtype: saved 'bfloat16' vs now 'float32')*"])

    same = suite.runpytest_subprocess(*small, "--collect-only", "-q",
                                      "--benchmark-compare=0001", timeout=300)
    assert same.ret == pytest.ExitCode.OK
    output = pytest.LineMatcher(same.outlines + same.errlines)
    output.fnmatch_lines(["*Comparing against benchmarks from*0001_first.json*"])
    output.no_fnmatch_line("*pytest-specdec: the compared run*")
