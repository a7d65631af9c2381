"""The session's report: written after each finished case and at the end (one file name,
replaced atomically), its meta block, and the sections the
``pytest_specdec_report_sections`` hook gives."""

from __future__ import annotations

import importlib.util

import datetime as _dt
import platform
from pathlib import Path
from typing import Any

import pytest

from pytest_specdec.bench.config import SpecdecConfig
from pytest_specdec.plugin.keys import (COMPARISON_KEY, CONFIG_KEY, MEMORY_KEY, REPORT_STEM_KEY,
                                        SESSION_KEY)
from pytest_specdec.plugin.xdist import session_records

def write_progress(config: pytest.Config) -> None:
    """Rewrite the session report after each finished case, so that a session that
    crashes (not only one interrupted) leaves a valid report of its finished cases."""
    import warnings

    from pytest_specdec.reporting.load import ReportError

    records = session_records(config)
    try:
        if records:
            write_session_report(config, records)
    except (OSError, ReportError) as exc:
        warnings.warn(pytest.PytestWarning(f"pytest-specdec: the report could not be "
                                           f"written: {exc}"))


def show_comparison(terminalreporter: Any, config: pytest.Config) -> None:
    comparison = config.stash.get(COMPARISON_KEY, None)
    if comparison is not None:
        from pytest_specdec.reporting.compare import render_summary

        terminalreporter.section("pytest-specdec compare", red=not comparison.passed)
        terminalreporter.write_line(render_summary(comparison))


def machine_line(config: pytest.Config) -> str:
    """The report's machine: host and CPU, then GPUs, driver, CUDA, torch, transformers,
    and the memory limit of a decode step (:func:`session_memory`)."""
    from pytest_specdec.bench.machine import specdec_machine_info
    from pytest_specdec.reporting.machine_text import describe_specdec_machine

    info = specdec_machine_info(config.stash[CONFIG_KEY], session_memory(config))
    host = f"{platform.node()} {platform.machine()} {platform.processor() or ''}".strip()
    return "; ".join(filter(None, (host, describe_specdec_machine(info))))


def session_memory(config: pytest.Config) -> dict[str, Any] | None:
    """machine_info's ``memory`` entry of this session (``bench.machine.memory_entry``):
    the target's memory limit, measured the first time it is asked for once a case has
    loaded the target (a second's probe, between cases), and the baselines' decode step
    so far. None before that, on the pytest-xdist controller (which loads no target),
    or when the probe did not fit in memory."""
    from pytest_specdec.bench.machine import baseline_step_ms, measure_memory_limit, memory_entry

    if MEMORY_KEY not in config.stash:
        specdec = config.stash.get(SESSION_KEY, None)
        target = None if specdec is None else specdec.loaded_target
        if target is None:
            return None
        config.stash[MEMORY_KEY] = measure_memory_limit(target.model, target.device, target.dtype)
    limit = config.stash[MEMORY_KEY]
    if limit is None:
        return None
    return memory_entry(limit, baseline_step_ms(session_records(config) or []))


def depth_profile_text(records: list[dict], cfg: SpecdecConfig) -> str:
    """Which draft depths the cases ran with (the details show each case's k)."""
    from pytest_specdec.protocol.drafter import CPU_PROFILE_DEPTH

    profiles = dict.fromkeys(r["depth_profile"] for r in records if r.get("depth_profile"))
    if cfg.k is not None:
        return "none: --specdec-k sets every drafter's depth"
    texts = {"reference": "reference (each drafter at its reference's depth)",
             "cpu": f"cpu (each drafter's reference depth capped at {CPU_PROFILE_DEPTH}; "
                    "--specdec-depth-profile reference for the references' own)"}
    return ", ".join(texts.get(p, p) for p in profiles) or "—"


def _profile_overrides(config: pytest.Config) -> str:
    """`` (with --specdec-problems, ... given)``: the options that overrode the profile."""
    from pytest_specdec.plugin.options import OPTIONS, PROFILED_DEFAULTS

    given = [o.flag for o in OPTIONS if o.dest in PROFILED_DEFAULTS
             and config.getoption(o.dest) is not None]
    if config.getoption("specdec_no_peer"):
        given.append("--specdec-no-peer")
    return f" (overridden: {', '.join(given)})" if given else ""


def write_session_report(config: pytest.Config, records: list[dict], *,
                         final: bool = False) -> list[Path]:
    """The session's report files: a free name at the first write (never an earlier
    report's), the same name replaced atomically at every later one. The last write (at
    the end of the session) adds the PNG charts when matplotlib is installed (the
    ``charts`` extra; ``make bench`` installs it): drawing them after every case would
    cost a second each."""
    from pytest_specdec.reporting.files import write_reports
    from pytest_specdec.reporting.layout import depth_text

    cfg = config.stash[CONFIG_KEY]
    stem = config.stash.get(REPORT_STEM_KEY, None)
    if stem is None:
        saved = config.getoption("benchmark_save", None)
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        stem = f"specdec-{saved}-{stamp}" if saved else f"specdec-{stamp}"
    meta = {
        "profile": cfg.profile + _profile_overrides(config),
        "target": records[0]["target"],
        "dtype": records[0]["dtype"],
        "device": ", ".join(dict.fromkeys(r["device"] for r in records)),  # one per GPU worker
        "dataset": cfg.dataset,
        "problems": str(records[0]["problems"]),
        "max_new_tokens": str(cfg.max_new_tokens),
        # one k, or each drafter's own (the details show each case's)
        "k": depth_text(records) + (" (--specdec-k)" if cfg.k is not None else ""),
        "depth profile": depth_profile_text(records, cfg),
        "lossless": "exact mode (row-invariant forwards)" if cfg.exact else "auto",
        "decode path": ", ".join(dict.fromkeys(str(r.get("engine") or "eager")
                                               for r in records)),
        "timed_rounds": str(cfg.timed_rounds),
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "machine": machine_line(config),
    }
    session = config.stash.get(SESSION_KEY, None)
    if session is not None and session.compile_text():
        meta["compilation"] = session.compile_text()
    sections: list = []
    config.hook.pytest_specdec_report_sections(config=config, records=records, sections=sections)
    charts = final and importlib.util.find_spec("matplotlib") is not None
    paths = write_reports(records, cfg.report_dir, stem, meta=meta, sections=sections,
                          replace=REPORT_STEM_KEY in config.stash, charts=charts)
    config.stash[REPORT_STEM_KEY] = paths[0].stem
    return paths
