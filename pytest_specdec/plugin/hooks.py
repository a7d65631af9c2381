"""The pytest plugin's hooks and fixtures: options, parametrization and order of the
suites' cases, the session and its target, the compare gate, the terminal summary; the
session report is :mod:`.report`'s, pytest-xdist's merge :mod:`.xdist`'s."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pytest_specdec.bench.config import SpecdecConfig
from pytest_specdec.bench.problems import ProblemSetError, load_problems
from pytest_specdec.bench.record import PEER_NAMES
from pytest_specdec.bench.session import SpecdecSession, paradigm_cases, worker_device
from pytest_specdec.plugin.keys import (COMPARE_BASE_KEY, COMPARISON_KEY, CONFIG_KEY, ORIGINS_KEY,
                                        REGISTRY_KEY, SESSION_KEY, TORCH_STATE_KEY)
from pytest_specdec.plugin.options import add_options, read_config
from pytest_specdec.plugin.progress import install_progress
from pytest_specdec.plugin.report import (session_memory, show_comparison, write_progress,
                                          write_session_report)
from pytest_specdec.plugin.xdist import (is_worker, keep_worker_records, send_records,
                                         session_records, worker_id)
from pytest_specdec.protocol.drafter import DrafterUnavailable
from pytest_specdec.protocol.registry import Registry, add_hook_drafters, load_registry


#: fixtures the suites parametrize over
CASE_FIXTURES = ("specdec_drafter", "specdec_paradigm_case", "specdec_peer")


def pytest_addoption(parser: pytest.Parser) -> None:
    add_options(parser)


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    from pytest_specdec.plugin import hookspec

    pluginmanager.add_hookspecs(hookspec)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "specdec: a pytest-specdec benchmark case")
    from pytest_specdec.engine import torch_state

    config.stash[TORCH_STATE_KEY] = torch_state.capture()  # before any drafter is made
    cfg = read_config(config)
    config.stash[CONFIG_KEY] = cfg
    config.stash[REGISTRY_KEY] = registry = load_registry()
    add_hook_drafters(config, registry)
    for problem in registry.problems:
        config.issue_config_time_warning(pytest.PytestConfigWarning(problem), stacklevel=2)
    _check_cheap(cfg, registry)
    if not is_worker(config):  # the controller (or the only process) reads it and gates
        _load_compare_base(config, cfg)


def _load_compare_base(config: pytest.Config, cfg: SpecdecConfig) -> None:
    """--specdec-compare / --specdec-compare-fail: read the saved run before any case runs."""
    from pytest_specdec.reporting.compare import load_compare_options

    try:
        base = load_compare_options(cfg.compare, cfg.compare_fail)
    except ValueError as exc:
        raise pytest.UsageError(str(exc)) from None
    if base is not None:
        config.stash[COMPARE_BASE_KEY] = base


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> Any:
    """--specdec-compare: compare this session's records with the saved run and, when a
    --specdec-compare-fail rule breaks, make the session exit 1 (TESTS_FAILED). A
    tryfirst wrapper, so it runs before pytest-benchmark's own --benchmark-compare-fail
    check (which raises); the table is shown by pytest_terminal_summary."""
    config = session.config
    if is_worker(config):  # before the yield: xdist sends workeroutput in its own wrapper
        send_records(session)
    base = config.stash.get(COMPARE_BASE_KEY, None)
    if base is not None and not is_worker(config):  # xdist workers: not here
        from pytest_specdec.reporting.compare import compare_records

        cfg = config.stash[CONFIG_KEY]
        comparison = compare_records(base, session_records(config) or [],
                                     rules=cfg.compare_fail, base_name=str(cfg.compare),
                                     new_name="this session")
        config.stash[COMPARISON_KEY] = comparison
        if not comparison.passed and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
    return (yield)


# --------------------------------------------------------------------------- pytest-xdist
# (see xdist.py)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Any:
    """Note which case added each record (the merged report's order)."""
    specdec = item.config.stash.get(SESSION_KEY, None)
    before = len(specdec.records) if specdec is not None else 0
    try:
        return (yield)
    except DrafterUnavailable as exc:
        if specdec is None or specdec.config.drafters_named:
            raise  # named with --specdec-drafter: the case fails with the message
        # in the default set, a drafter whose weights are not trained yet is skipped
        # with the command that provides them (pytest's skip summary and the report)
        specdec.unavailable.setdefault(exc.drafter, exc.detail)
        pytest.skip(str(exc))
    finally:
        if specdec is not None:
            origins = item.config.stash.setdefault(ORIGINS_KEY, {})
            origins.update(dict.fromkeys(range(before, len(specdec.records)), item.nodeid))
            if len(specdec.records) > before and not is_worker(item.config):
                write_progress(item.config)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    keep_worker_records(node)


def _check_cheap(cfg: SpecdecConfig, registry: Registry) -> None:
    """What can be checked without loading a model: fail before any case runs."""
    for spec in cfg.drafters or ():
        try:
            registered = registry.get(spec.name)
            registered.create(**registered.convert_options(dict(spec.options)))
        except (KeyError, ValueError, TypeError) as exc:
            raise pytest.UsageError(f"--specdec-drafter {spec.label}: {exc.args[0]}") from None
        except Exception:  # a drafter that cannot be made fails its own cases, not the session
            pass
    if cfg.device.startswith("cuda"):
        from pytest_specdec.engine.target import TargetError, resolve_device

        try:
            resolve_device(cfg.device)
        except TargetError as exc:
            raise pytest.UsageError(f"--specdec-device: {exc}") from None
    target = Path(cfg.target).expanduser()
    if cfg.target.startswith((".", "/", "~")) and not target.exists():
        raise pytest.UsageError(f"--specdec-target {cfg.target!r}: no such file or folder")
    if cfg.dataset.endswith((".json", ".jsonl")) and not Path(cfg.dataset).expanduser().exists():
        raise pytest.UsageError(f"--specdec-dataset {cfg.dataset!r}: no such file")


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    """Add ``machine_info["specdec"]``: GPUs, driver, CUDA, torch and transformers
    versions, target name, dtype and device (see bench/machine.py). Not the memory limit
    of a decode step: pytest-benchmark compares machine_info, taken at the session's start
    (before any target is loaded), with a saved run's, and a measured figure would always
    differ; a saved run carries it beside (:func:`pytest_benchmark_update_json`)."""
    cfg = config.stash.get(CONFIG_KEY, None)
    if cfg is not None:
        from pytest_specdec.bench.machine import SPECDEC_KEY, specdec_machine_info

        machine_info[SPECDEC_KEY] = specdec_machine_info(cfg)


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_json(config: pytest.Config, benchmarks: Any,
                                 output_json: dict) -> None:
    """A saved run's ``specdec`` entry: the memory limit of the decode step (once a case
    has loaded the target; bench.machine.memory_entry), which its reports show."""
    from pytest_specdec.bench.machine import SPECDEC_KEY

    memory = session_memory(config)
    if memory:
        output_json[SPECDEC_KEY] = {"memory": memory}


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_compare_machine_info(config: pytest.Config, benchmarksession: Any,
                                          machine_info: dict, compared_benchmark: dict) -> None:
    """Warn, through pytest-benchmark's logger, when the compared run was measured on
    another GPU, target or dtype (--benchmark-compare)."""
    from pytest_specdec.bench.machine import compare_warning, machine_differences

    differences = machine_differences(machine_info, compared_benchmark.get("machine_info"))
    if differences:
        benchmarksession.logger.warning(compare_warning(differences))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    config = metafunc.config
    cfg, registry = config.stash[CONFIG_KEY], config.stash[REGISTRY_KEY]
    # drafter first, then paradigm: ids read [pld-multi_round]
    if "specdec_drafter" in metafunc.fixturenames:
        specs = cfg.drafters or registry.default_specs(ablations=cfg.ablations)
        metafunc.parametrize("specdec_drafter", specs, ids=[s.label for s in specs])
    if "specdec_peer" in metafunc.fixturenames:
        # every peer, those not asked for deselected below (an empty parameter set
        # would depend on the user's empty_parameter_set_mark)
        metafunc.parametrize("specdec_peer", PEER_NAMES, ids=list(PEER_NAMES))
    if "specdec_paradigm_case" in metafunc.fixturenames:
        cases = paradigm_cases(cfg)
        if "specdec_peer" in metafunc.fixturenames:
            # generate checks our plain decoding, which is defined one sequence at a
            # time: peers run at batch 1 only
            cases = list(dict.fromkeys(c.at_batch_1 for c in cases))
        metafunc.parametrize("specdec_paradigm_case", cases, ids=[c.id for c in cases])


def _peer_of(item: pytest.Item) -> str | None:
    """The peer a case runs (its specdec_peer parameter), None for other items."""
    callspec = getattr(item, "callspec", None)
    return callspec.params.get("specdec_peer") if callspec is not None else None


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config,
                                  items: list[pytest.Item]) -> None:
    cfg = config.stash[CONFIG_KEY]
    # the peers not in --specdec-peer (all of them with --specdec-no-peer)
    is_peer = [_peer_of(i) not in (None, *cfg.peers) for i in items]
    if any(is_peer):
        config.hook.pytest_deselected(items=[i for i, p in zip(items, is_peer) if p])
        items[:] = [i for i, p in zip(items, is_peer) if not p]
    cases = [i for i in items if _is_case(i)]
    if not cases:
        return
    for item in cases:
        item.add_marker("specdec")
    # baselines first, then speculative cases, then peers: every speculative case is
    # compared with a baseline measured earlier in this session (sort is stable)
    rank = {"specdec_drafter": 1, "specdec_peer": 2}
    items.sort(key=lambda i: max((rank.get(f, 0) for f in getattr(i, "fixturenames", ())),
                                 default=0))
    try:
        problems = load_problems(cfg.dataset, limit=cfg.problems, split=cfg.dataset_split)
    except ProblemSetError as exc:
        raise pytest.UsageError(f"--specdec-dataset {cfg.dataset!r}: {exc}") from None
    worker = worker_id(config)
    config.stash[SESSION_KEY] = SpecdecSession(cfg, config.stash[REGISTRY_KEY], problems,
                                               lambda: _load_target(cfg, worker), worker=worker,
                                               progress=install_progress(config))


def pytest_collection_finish(session: pytest.Session) -> None:
    """Before the first case: the cases and an estimate of the run's length
    (plugin/estimate.py); the controller of pytest-xdist collects no cases."""
    from pytest_specdec.plugin.estimate import announce

    if not is_worker(session.config):
        original = session.config.stash.get(TORCH_STATE_KEY, None)
        if original is not None:  # the target loads here: from the session's state, as in a case
            _restore_torch_state(original)
        announce(session)


def _is_case(item: pytest.Item) -> bool:
    return any(f in getattr(item, "fixturenames", ()) for f in CASE_FIXTURES)


def _load_target(cfg: SpecdecConfig, worker: str = "main") -> Any:
    """The session's target. Loading it (model code, from_pretrained) must not change
    torch's global state for the case that loads it: what it changed is set back, with
    a warning naming it."""
    from pytest_specdec.engine import torch_state
    from pytest_specdec.engine.target import load_target

    before = torch_state.capture()
    try:
        return load_target(cfg.target, device=_worker_device(cfg.device, worker),
                           dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code,
                           seed=cfg.seed, engine="auto" if cfg.engine == "both" else cfg.engine)
    finally:
        _restore_torch_state(before, f"loading the target {cfg.target!r}")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Any:
    """Every case starts from the session's torch state (as pytest_configure found it,
    before any drafter was made) and leaves it so: whatever a case changed in torch's
    global settings (a drafter, its factory, a fixture) is set back after it, and
    whatever changed them before or between cases is set back before the next."""
    original = item.config.stash.get(TORCH_STATE_KEY, None)
    if original is None or not _is_case(item):
        return (yield)
    _restore_torch_state(original)
    try:
        return (yield)
    finally:
        _restore_torch_state(original)


def _restore_torch_state(state: Any, changed_by: str = "") -> None:
    """Set torch's global settings back to `state`; warn when `changed_by` (a source
    worth telling the user about) changed them, or when torch refuses a setting."""
    import warnings

    from pytest_specdec.engine import torch_state

    if torch_state.unchanged(state):
        return
    changes = torch_state.diff(state, torch_state.capture())
    kept = torch_state.restore(state)
    if changed_by:
        warnings.warn(pytest.PytestWarning(
            f"pytest-specdec: {changed_by} changed {torch_state.describe(changes)}; "
            "set back for the cases"))
    for name, why in kept:
        warnings.warn(pytest.PytestWarning(
            f"pytest-specdec: torch refused to set {name} back between cases ({why})"))


def _worker_device(spec: str, worker: str) -> str:
    """--specdec-device for this process: one GPU per xdist worker (session.worker_device)."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return worker_device(spec, worker, gpus)


@pytest.fixture(scope="session")
def specdec_session(request: pytest.FixtureRequest) -> SpecdecSession:
    """The benchmark session: target, problems, baselines and finished records."""
    try:
        return request.config.stash[SESSION_KEY]
    except KeyError:
        pytest.fail("specdec_session is only available to tests that use the "
                    "specdec_drafter / specdec_paradigm_case / specdec_peer fixtures")


@pytest.fixture
def specdec_drafter(request: pytest.FixtureRequest) -> Any:
    """The drafter spec of this case (NAME with its options)."""
    return request.param


@pytest.fixture
def specdec_paradigm_case(request: pytest.FixtureRequest) -> Any:
    """The paradigm and temperature of this case."""
    return request.param


@pytest.fixture
def specdec_peer(request: pytest.FixtureRequest) -> str:
    """hf_generate or hf_pld."""
    return request.param


@pytest.hookimpl(tryfirst=True)
def pytest_specdec_report_sections(config: pytest.Config, records: list[dict],
                                   sections: list) -> None:
    """The plugin's own sections, first: a conftest's implementation sees them; after
    the summary, the default drafters skipped for a missing prerequisite, if any."""
    from pytest_specdec.reporting.sections import default_sections, not_run_section

    sections.extend(default_sections(records))
    specdec = config.stash.get(SESSION_KEY, None)
    if specdec is not None and specdec.unavailable:
        sections.insert(1, not_run_section(specdec.unavailable))


# tryfirst: the reports are written before pytest-benchmark's summary, which raises on a
# --benchmark-compare-fail regression and would stop the hooks after it. pytest runs the
# terminal summary on Ctrl-C too, so an interrupted session reports its finished cases.
@pytest.hookimpl(tryfirst=True)
def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    if is_worker(config):  # the xdist controller merges every worker's records and reports
        return
    records = session_records(config)
    if not records:
        show_comparison(terminalreporter, config)
        return
    from pytest_specdec.reporting.layout import flag_advice, flagged_lines
    from pytest_specdec.reporting.markdown import render_terminal

    terminalreporter.section("pytest-specdec")
    terminalreporter.write_line(render_terminal(records))
    flagged = flagged_lines(records)
    if flagged:
        terminalreporter.write_line(
            "WARNING: speedups flagged as timing artefacts or unstable (never marked best): "
            + "; ".join(flagged), yellow=True, bold=True)
        for advice in flag_advice(records):
            terminalreporter.write_line(f"  {advice} (docs/timing.md#flags)", yellow=True)
    for path in write_session_report(config, records, final=True):
        terminalreporter.write_line(f"report written: {path}")
    from pytest_specdec.plugin.estimate import took_line

    took = took_line(config)
    if took is not None:
        terminalreporter.write_line(took)
    show_comparison(terminalreporter, config)
