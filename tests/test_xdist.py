"""Several workers: the suites under pytest-xdist (``-n 2``) give one merged report, equal
in content and order to the single-process one; the gate runs on the controller over
the merged records; each worker takes its own GPU (checked with a faked GPU count)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from pytest_specdec.bench.session import worker_device
from pytest_specdec.plugin.hooks import _worker_device

#: what a record holds that does not depend on timing, nor on the worker it ran on
DETERMINISTIC = ("role", "drafter", "drafter_options", "paradigm", "temperature", "target",
                 "dtype", "k", "problems", "max_new_tokens", "sequences", "new_tokens", "steps",
                 "drafted", "accepted", "mat", "mat_by_round", "mat_by_sample",
                 "acceptance_rate", "per_position_acceptance", "accuracy", "output_sha256",
                 "lossless")


# --------------------------------------------------------------------------- one GPU each


@pytest.mark.parametrize("spec, worker, count, expected", [
    ("auto", "gw0", 2, "cuda:0"),
    ("auto", "gw1", 2, "cuda:1"),
    ("cuda", "gw2", 2, "cuda:0"),      # more workers than GPUs: round robin
    ("cuda", "gw7", 4, "cuda:3"),
    ("cuda", "gw12", 8, "cuda:4"),
    ("auto", "main", 4, "auto"),       # not an xdist worker
    ("cuda", "gw1", 1, "cuda"),        # one GPU: shared, as asked
    ("auto", "gw1", 0, "auto"),        # no GPU: auto resolves to the CPU
    ("cpu", "gw1", 4, "cpu"),          # an explicit device is kept
    ("cuda:2", "gw1", 4, "cuda:2"),
    ("auto", "gwx", 4, "auto"),        # not a worker name xdist gives
])
def test_worker_device_gives_each_worker_its_gpu(spec, worker, count, expected):
    assert worker_device(spec, worker, count) == expected


def test_worker_device_counts_the_visible_gpus(monkeypatch):
    """The plugin asks torch how many GPUs are visible (CUDA_VISIBLE_DEVICES applies)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    assert [_worker_device("auto", f"gw{n}") for n in range(4)] == [
        "cuda:0", "cuda:1", "cuda:2", "cuda:0"]
    assert _worker_device("cuda", "main") == "cuda"
    assert _worker_device("cuda:1", "gw0") == "cuda:1"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _worker_device("auto", "gw1") == "auto"


# --------------------------------------------------------------------------- end to end


# ``suite`` (tests/conftest.py): a pytester dir holding the real suite


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess(*args, timeout=300)


def the_report(directory: Path) -> dict:
    """The one report a run wrote: four files of one name (and its two charts), its
    JSON read."""
    names = sorted(p.name for p in directory.iterdir())
    charts = [n for n in names if n.endswith(".png")]
    names = [n for n in names if n not in charts]
    stems = {name.rsplit(".", 1)[0] for name in names}
    assert len(stems) == 1, names
    assert [n.rsplit(".", 1)[1] for n in names] == ["csv", "html", "json", "md"], names
    assert sorted(charts) in ([], [f"{s}-acceptance.png" for s in stems]
                              + [f"{s}-speedup.png" for s in stems]), charts
    (stem,) = stems
    return json.loads((directory / f"{stem}.json").read_text(encoding="utf-8"))


def test_two_workers_give_the_single_process_report(suite, tiny_model_dir, tmp_path):
    small = ["-p", "no:cacheprovider", "--specdec-target", str(tiny_model_dir),
             "--specdec-problems", "1", "--specdec-max-new-tokens", "8", "--specdec-n", "2",
             "--specdec-drafter", "pld", "--specdec-drafter", "sam",
             "--specdec-peer", "hf_generate,hf_pld"]
    cases = 2 + 2 * 2 + 2 * 2  # baselines, drafters and hf peers, over two paradigms

    single = run(suite, *small, "--specdec-report-dir", str(tmp_path / "single"),
                 "--benchmark-save=base", f"--benchmark-storage={tmp_path / 'storage'}")
    single.assert_outcomes(passed=cases)
    one = the_report(tmp_path / "single")

    # the saved run, with pld's best_of_n MAT made 10% higher: the gate must fail on it
    (saved,) = (tmp_path / "storage").rglob("0001_base.json")
    data = json.loads(saved.read_text(encoding="utf-8"))
    higher = copy.deepcopy(data)
    for bench in higher["benchmarks"]:
        extra = bench["extra_info"]
        if (extra["drafter"], extra["paradigm"]) == ("pld", "best_of_n"):
            extra["mat"] = extra["mat"] / 0.9
    gated = tmp_path / "higher.json"
    gated.write_text(json.dumps(higher), encoding="utf-8")

    multi = run(suite, *small, "-n", "2", "--specdec-report-dir", str(tmp_path / "multi"),
                f"--specdec-compare={gated}", "--specdec-compare-fail=mat:5%,accuracy:0%")
    multi.assert_outcomes(passed=cases)
    two = the_report(tmp_path / "multi")

    # one report, from the controller: the workers neither report nor gate
    out = multi.stdout.str()
    written = [line for line in out.splitlines() if line.startswith("report written: ")]
    assert len([w for w in written if not w.endswith(".png")]) == 4, out
    assert len(written) == 6, out  # and the two charts (matplotlib: the test extra)
    assert out.count("= pytest-specdec =") == out.count("= pytest-specdec compare =") == 1, out

    # the same records, in the same order, on every deterministic field
    def content(report: dict) -> list[tuple]:
        return [tuple(r[key] for key in DETERMINISTIC) for r in report["records"]]

    assert len(one["records"]) == cases
    assert content(two) == content(one)
    roles = ["baseline"] * 2 + ["speculative"] * 4 + ["peer"] * 4  # no extra baseline rows
    assert [r["role"] for r in one["records"]] == roles
    assert {key: two["meta"][key] for key in ("target", "dtype", "device", "problems")} == {
        key: one["meta"][key] for key in ("target", "dtype", "device", "problems")}

    # which worker ran each case: "main" alone; both workers under -n 2, and some case
    # ran on a worker that had not run its paradigm's baseline case (it measured its own)
    assert {r["worker"] for r in one["records"]} == {"main"}
    assert {r["worker"] for r in two["records"]} == {"gw0", "gw1"}
    baseline_on = {r["paradigm"]: r["worker"] for r in two["records"] if r["role"] == "baseline"}
    elsewhere = [r for r in two["records"]
                 if r["role"] != "baseline" and r["worker"] != baseline_on[r["paradigm"]]]
    assert elsewhere, [(r["drafter"], r["paradigm"], r["worker"]) for r in two["records"]]
    assert all(r["baseline_wall_s"] > 0 and r["lossless"] in ("exact", "near_tie")
               for r in elsewhere if r["role"] == "speculative")

    # the gate ran once, on the controller, over the merged records: every case matched,
    # and the one drop named
    assert multi.ret == pytest.ExitCode.TESTS_FAILED, out
    multi.stdout.fnmatch_lines([
        "*= pytest-specdec compare =*",
        "baseline *multi_round *0 *ok",
        "pld *multi_round *0 *ok",
        "baseline *best_of_n *0.6 *ok",
        "pld *best_of_n *0.6 *(-10.0%)*FAIL mat",
        "sam *best_of_n *0.6 *ok",
        "hf_pld *best_of_n *0.6 *ok",
        "gate mat:5%,accuracy:0% FAILED: pld best_of_n T=0.6: MAT * → * (-10.0%) breaks mat:5%",
    ])
    assert out.count("FAILED: ") == 1, out
    assert "only in " not in out, out  # no case of one run missing from the other
