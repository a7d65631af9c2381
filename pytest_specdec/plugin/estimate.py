"""The start-of-session estimate on the terminal: the collected cases, priced by the
cost model of :mod:`pytest_specdec.bench.estimate` with a decode step measured on the
loaded target (or ``--specdec-step-ms``), and, at the end, what they took."""

from __future__ import annotations

import statistics
import time
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import pytest

from pytest_specdec.bench.estimate import (ROLE_BASELINE, ROLE_PEER, ROLE_SPECULATIVE, History,
                                           PlannedCase, RunEstimate, duration, estimate_run,
                                           read_history)
from pytest_specdec.plugin.keys import CONFIG_KEY, ESTIMATE_KEY, SESSION_KEY

#: probe readings (each the trimmed mean of PROBE_FORWARDS decode forwards, read with
#: the host and wide probes) whose median is the measured step cost: about 2 s on the
#: 2-core CPU
STEP_READINGS = 3


@dataclass
class Estimated:
    estimate: RunEstimate
    started: float  # time.monotonic() when the cases were about to start


def planned_cases(items: Sequence[pytest.Item]) -> list[PlannedCase]:
    """The benchmark cases among `items`, in run order."""
    planned = []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        case = params.get("specdec_paradigm_case")
        if case is None:
            continue
        if "specdec_peer" in params:
            role, drafter = ROLE_PEER, params["specdec_peer"]
        elif "specdec_drafter" in params:
            role, drafter = ROLE_SPECULATIVE, params["specdec_drafter"].label
        else:
            role, drafter = ROLE_BASELINE, "baseline"
        planned.append(PlannedCase(item.name, role, drafter, case))
    return planned


def announce(session: pytest.Session) -> None:
    """Print the estimate before the first case (collection_finish)."""
    config = session.config
    specdec = config.stash.get(SESSION_KEY, None)
    planned = planned_cases(session.items)
    verbosity = config.get_verbosity()
    reporter = config.pluginmanager.getplugin("terminalreporter")
    if specdec is None or not planned or reporter is None or verbosity < -1:
        return
    cfg = config.stash[CONFIG_KEY]
    collect_only = config.getoption("collectonly")
    history = History()
    if cfg.step_ms is not None:
        step_s, basis = cfg.step_ms / 1000, "given with --specdec-step-ms"
    elif collect_only:
        return  # pricing would load the target; --specdec-step-ms prices without it
    else:
        try:
            target = _load(config, specdec)
            step_s = statistics.median(specdec.probe.measure() for _ in range(STEP_READINGS))
        except Exception as exc:  # the cases report a target that does not load
            reporter.write_line(f"pytest-specdec: no estimate ({type(exc).__name__}: {exc})")
            return
        basis = "measured on the loaded target"
        history = read_history(cfg.report_dir, target.name,
                               str(target.dtype).removeprefix("torch."), str(target.device))
    estimate = estimate_run(cfg, planned, step_s=step_s, step_basis=basis,
                            problems=len(specdec.problems), history=history,
                            step_is_probe=cfg.step_ms is None)
    for line in estimate.lines(per_case=verbosity >= 0):
        reporter.write_line(line)
    config.stash[ESTIMATE_KEY] = Estimated(estimate, time.monotonic())


def _load(config: pytest.Config, specdec: Any) -> Any:
    """The session's target, loaded here rather than in the first case. What loading it
    warns (e.g. that it changed torch's global state, set back) goes to pytest's
    warnings summary as it would from inside a case: collection_finish runs outside
    pytest's per-item warning capture."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        target = specdec.target
    for warning in caught:
        config.issue_config_time_warning(warning.message, stacklevel=2)
    return target


def took_line(config: pytest.Config) -> str | None:
    """For the terminal summary: what the cases took against their estimate."""
    estimated: Any = config.stash.get(ESTIMATE_KEY, None)
    if estimated is None:
        return None
    took, expected = time.monotonic() - estimated.started, estimated.estimate.seconds
    share = f" ({took / expected:.2f} of the estimate)" if expected > 0 else ""
    return (f"pytest-specdec: the cases took {duration(took)}; estimated at the start: "
            f"{duration(expected)}{share}")
