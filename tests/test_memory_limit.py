"""The memory limit of a decode step: the target's weight bytes, the bandwidth probe (on a
fake clock), the figure limit ÷ step, machine_info's ``memory`` entry and the line reports
show for it; and each case's verify cost in decode steps in the Timing and costs table.
The plugin run that saves them is in test_report_html.py (its machine-info test)."""

from __future__ import annotations

import itertools

import pytest
import torch

from conftest import tiny_model
from pytest_specdec.bench import machine
from pytest_specdec.bench.machine import (BANDWIDTH_PROBE_REPEATS, MemoryLimit, baseline_step_ms,
                                          measure_bandwidth, measure_memory_limit, memory_entry,
                                          specdec_machine_info, weight_bytes)
from pytest_specdec.engine import timing
from pytest_specdec.engine.metrics import limit_over_step, memory_limit_s, verify_steps
from pytest_specdec.reporting import describe_machine, load_records, report_meta
from pytest_specdec.reporting.machine_text import describe_memory_limit
from pytest_specdec.reporting.tables import TIMING_HEADERS, timing_table, verify_cost_text


def fake_clock(monkeypatch, durations: list[float]) -> list[float]:
    """A clock whose successive (start, end) readings are `durations` apart; returns the
    list of readings taken, so a test can count them."""
    readings: list[float] = []
    ticks = itertools.chain.from_iterable((10.0 * i, 10.0 * i + d) for i, d in enumerate(durations))

    def clock() -> float:
        readings.append(next(ticks))
        return readings[-1]

    monkeypatch.setattr(timing, "clock", clock)
    return readings


def test_the_probe_reads_the_median_of_its_timed_products(monkeypatch):
    durations = [0.02, 0.05, 0.01, 0.03, 0.04]
    assert len(durations) == BANDWIDTH_PROBE_REPEATS
    readings = fake_clock(monkeypatch, durations)
    probe_bytes, seconds = measure_bandwidth(torch.device("cpu"), torch.float32, 8 * 4096 * 4)
    assert probe_bytes == 8 * 4096 * 4  # 8 rows of 4096 float32 columns
    assert seconds == pytest.approx(0.03)
    assert len(readings) == 2 * BANDWIDTH_PROBE_REPEATS  # the warm-up is not timed


def test_the_probe_is_capped_and_sized_in_the_dtype(monkeypatch):
    fake_clock(monkeypatch, [0.01] * BANDWIDTH_PROBE_REPEATS)
    monkeypatch.setattr(machine, "BANDWIDTH_PROBE_MAX_BYTES", 4096 * 2 * 3)
    probe_bytes, _ = measure_bandwidth(torch.device("cpu"), torch.bfloat16, 10 ** 9)
    assert probe_bytes == 4096 * 2 * 3  # 3 rows of 4096 bfloat16 columns, not 1 GB
    fake_clock(monkeypatch, [0.01] * BANDWIDTH_PROBE_REPEATS)
    probe_bytes, _ = measure_bandwidth(torch.device("cpu"), torch.float32, 100)
    assert probe_bytes == 100  # a model smaller than a row: one row of its size


def test_a_probe_that_does_not_fit_in_memory_gives_no_limit(monkeypatch):
    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("out of memory")

    monkeypatch.setattr(torch, "full", no_memory)
    assert measure_bandwidth(torch.device("cpu"), torch.float32, 10 ** 6) is None
    assert measure_memory_limit(tiny_model(), torch.device("cpu"), torch.float32) is None


def test_weight_bytes_count_parameters_and_buffers_and_tied_weights_once():
    model = tiny_model()
    parameters = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert buffers > 0  # the rotary frequencies
    assert weight_bytes(model) == parameters + buffers
    tied = tiny_model()
    tied.lm_head.weight = tied.model.embed_tokens.weight  # one tensor, read once a step
    assert weight_bytes(tied) == parameters + buffers - 512 * 64 * 4
    assert weight_bytes(tied.to(torch.bfloat16)) == (parameters + buffers - 512 * 64 * 4) // 2


def test_the_limit_is_weight_bytes_over_the_probed_bandwidth(monkeypatch):
    model = tiny_model()
    fake_clock(monkeypatch, [0.004, 0.002, 0.003, 0.005, 0.001])
    limit = measure_memory_limit(model, torch.device("cpu"), torch.float32)
    assert limit.weight_bytes == weight_bytes(model)
    assert limit.probe_bytes <= limit.weight_bytes < limit.probe_bytes + 4096 * 4
    assert limit.bandwidth == pytest.approx(limit.probe_bytes / 0.003)
    assert limit.limit_s == pytest.approx(limit.weight_bytes / limit.bandwidth)


def test_a_probe_that_reads_no_time_gives_no_limit(monkeypatch):
    fake_clock(monkeypatch, [0.0] * BANDWIDTH_PROBE_REPEATS)
    assert measure_memory_limit(tiny_model(), torch.device("cpu"), torch.float32) is None


def test_the_figures_are_defined_once():
    assert memory_limit_s(536_000_000, 20e9) == pytest.approx(0.0268)
    assert limit_over_step(0.027, 0.053) == pytest.approx(0.5094, abs=1e-4)
    assert verify_steps(0.142, 0.056) == pytest.approx(2.5357, abs=1e-4)
    assert memory_limit_s(536_000_000, 0.0) is None
    assert limit_over_step(0.027, 0.0) is None and verify_steps(0.1, 0.0) is None


def test_the_memory_entry_takes_the_median_baseline_probe_as_the_step():
    limit = MemoryLimit(weight_bytes=540_000_000, probe_bytes=536_000_000, bandwidth=20e9)
    records = [{"role": "baseline", "probe_ms": 50.0}, {"role": "speculative", "probe_ms": 90.0},
               {"role": "baseline", "probe_ms": 54.0}, {"role": "baseline", "probe_ms": 60.0},
               {"role": "baseline"}]  # a record saved without a probe
    assert baseline_step_ms(records) == [50.0, 54.0, 60.0]
    entry = memory_entry(limit, baseline_step_ms(records))
    assert entry == {"weight_bytes": 540_000_000, "probe_bytes": 536_000_000,
                     "bandwidth_bytes_per_s": 20e9, "limit_ms": 27.0, "step_ms": 54.0,
                     "limit_over_step": 0.5}
    # before any baseline: the limit alone
    assert set(memory_entry(limit, [])) == {"weight_bytes", "probe_bytes",
                                            "bandwidth_bytes_per_s", "limit_ms"}


def test_machine_info_carries_the_entry_given(monkeypatch):
    from test_report_html import config_for

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    entry = memory_entry(MemoryLimit(540_000_000, 536_000_000, 20e9), [54.0])
    assert specdec_machine_info(config_for(), entry)["memory"] == entry
    assert "memory" not in specdec_machine_info(config_for())


def test_the_machine_line_shows_step_limit_and_figure():
    entry = {"weight_bytes": 538_060_288, "probe_bytes": 538_050_560,
             "bandwidth_bytes_per_s": 19.9e9, "limit_ms": 27.04, "step_ms": 53.0,
             "limit_over_step": 0.5102}
    text = ("decode step 53.0 ms, memory limit 27.0 ms (538 MB of weights at 19.9 GB/s): "
            "limit ÷ step 0.51")
    assert describe_memory_limit(entry) == text
    assert describe_machine({"node": "box", "specdec": {"torch": "2.13.0", "memory": entry}}) == (
        f"box; torch 2.13.0; {text}")
    without_step = {k: v for k, v in entry.items() if k not in ("step_ms", "limit_over_step")}
    assert describe_memory_limit(without_step) == (
        "memory limit 27.0 ms (538 MB of weights at 19.9 GB/s)")
    assert describe_memory_limit({"limit_ms": "27"}) == describe_memory_limit(None) == ""


def test_a_saved_run_of_todays_schema_still_loads_and_reports(run_data, tmp_path):
    import json

    from pytest_specdec.reporting import write_reports

    # a run saved before these fields: timing costs, but no verify cost, no memory entry
    for benchmark in run_data["benchmarks"]:
        benchmark["extra_info"].update(speedup_noise=0.05, t_step_ms=53.0, t_verify_ms=120.0)
    assert "memory" not in run_data["machine_info"].get("specdec", {})
    saved = tmp_path / "0001_today.json"
    saved.write_text(json.dumps(run_data), encoding="utf-8")
    records = load_records([saved])
    assert records and not any("verify_steps" in r for r in records)
    assert "memory limit" not in records[0]["machine"]
    headers, rows = timing_table(records)
    column = headers.index("t_verify steps (width)")
    assert rows and all(row[column] == "—" for row in rows)
    assert "120.0" in rows[0]  # t_verify ms, as before
    written = write_reports(records, tmp_path / "out", "today", meta=report_meta(records))
    assert {p.suffix for p in written} >= {".md", ".html"}


def test_the_timing_table_shows_a_verify_forward_in_decode_steps(records):
    record = next(r for r in records if r["role"] == "speculative")
    record.update(speedup_noise=0.05, verify_steps=2.3056, verify_width=59.84)
    assert verify_cost_text(record) == "2.31 (59.8)"
    headers, rows = timing_table([record])
    assert headers == TIMING_HEADERS
    assert rows[0][headers.index("t_verify steps (width)")] == "2.31 (59.8)"
    assert verify_cost_text({"verify_steps": 1.5}) == "1.50"


def test_load_records_reads_a_run_with_the_entry(run_data, tmp_path):
    import json

    run_data["machine_info"]["specdec"] = {"torch": "2.13.0", "memory": {
        "weight_bytes": 538_060_288, "bandwidth_bytes_per_s": 19.9e9, "limit_ms": 27.04,
        "step_ms": 53.0, "limit_over_step": 0.5102}}
    saved = tmp_path / "run.json"
    saved.write_text(json.dumps(run_data), encoding="utf-8")
    assert load_records([saved])[0]["machine"].endswith("limit ÷ step 0.51")
