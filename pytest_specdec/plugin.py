"""The pytest plugin: options, parametrization of the suites, fixtures, the report."""

from __future__ import annotations

import datetime as _dt
import platform
from pathlib import Path
from typing import Any

import pytest

from pytest_specdec.options import SpecdecConfig, add_options, read_config
from pytest_specdec.problems import ProblemSetError, load_problems
from pytest_specdec.registry import Registry, load_registry
from pytest_specdec.session import PEERS, SpecdecSession, paradigm_cases

CONFIG_KEY = pytest.StashKey[SpecdecConfig]()
REGISTRY_KEY = pytest.StashKey[Registry]()
SESSION_KEY = pytest.StashKey[SpecdecSession]()

#: fixtures the suites parametrize over
CASE_FIXTURES = ("specdec_drafter", "specdec_paradigm_case", "specdec_peer")


def pytest_addoption(parser: pytest.Parser) -> None:
    add_options(parser)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "specdec: a pytest-specdec benchmark case")
    cfg = read_config(config)
    config.stash[CONFIG_KEY] = cfg
    config.stash[REGISTRY_KEY] = registry = load_registry()
    for problem in registry.problems:
        config.issue_config_time_warning(pytest.PytestConfigWarning(problem), stacklevel=2)
    _check_cheap(cfg, registry)


def _check_cheap(cfg: SpecdecConfig, registry: Registry) -> None:
    """What can be checked without loading a model: fail before any case runs."""
    for spec in cfg.drafters or ():
        try:
            registered = registry.get(spec.name)
            registered.create(**registered.convert_options(dict(spec.options)))
        except (KeyError, ValueError, TypeError) as exc:
            raise pytest.UsageError(f"--specdec-drafter {spec.label}: {exc.args[0]}") from None
    if cfg.device.startswith("cuda"):
        from pytest_specdec.target import TargetError, resolve_device

        try:
            resolve_device(cfg.device)
        except TargetError as exc:
            raise pytest.UsageError(f"--specdec-device: {exc}") from None
    target = Path(cfg.target).expanduser()
    if cfg.target.startswith((".", "/", "~")) and not target.exists():
        raise pytest.UsageError(f"--specdec-target {cfg.target!r}: no such file or folder")
    if cfg.dataset.endswith((".json", ".jsonl")) and not Path(cfg.dataset).expanduser().exists():
        raise pytest.UsageError(f"--specdec-dataset {cfg.dataset!r}: no such file")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    config = metafunc.config
    cfg, registry = config.stash[CONFIG_KEY], config.stash[REGISTRY_KEY]
    # drafter first, then paradigm: ids read [pld-multi_round]
    if "specdec_drafter" in metafunc.fixturenames:
        specs = cfg.drafters or registry.default_specs()
        metafunc.parametrize("specdec_drafter", specs, ids=[s.label for s in specs])
    if "specdec_peer" in metafunc.fixturenames:
        metafunc.parametrize("specdec_peer", PEERS, ids=list(PEERS))
    if "specdec_paradigm_case" in metafunc.fixturenames:
        cases = paradigm_cases(cfg)
        metafunc.parametrize("specdec_paradigm_case", cases, ids=[c.id for c in cases])


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config,
                                  items: list[pytest.Item]) -> None:
    cfg = config.stash[CONFIG_KEY]
    if not cfg.peer:
        is_peer = ["specdec_peer" in getattr(i, "fixturenames", ()) for i in items]
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
    config.stash[SESSION_KEY] = SpecdecSession(cfg, config.stash[REGISTRY_KEY], problems,
                                               lambda: _load_target(cfg))


def _is_case(item: pytest.Item) -> bool:
    return any(f in getattr(item, "fixturenames", ()) for f in CASE_FIXTURES)


def _load_target(cfg: SpecdecConfig) -> Any:
    from pytest_specdec.target import load_target

    return load_target(cfg.target, device=cfg.device, dtype=cfg.dtype,
                       trust_remote_code=cfg.trust_remote_code, seed=cfg.seed)


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


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    session = config.stash.get(SESSION_KEY, None)
    if session is None or not session.records:
        return
    from pytest_specdec.report import render_terminal, write_reports

    cfg = session.config
    saved = config.getoption("benchmark_save", None)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    stem = f"specdec-{saved}-{stamp}" if saved else f"specdec-{stamp}"
    meta = {
        "target": session.records[0]["target"],
        "dtype": session.records[0]["dtype"],
        "device": session.records[0]["device"],
        "dataset": cfg.dataset,
        "problems": str(len(session.problems)),
        "max_new_tokens": str(cfg.max_new_tokens),
        "k": str(cfg.k),
        "timed_rounds": str(cfg.timed_rounds),
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.machine()} {platform.processor() or ''}".strip(),
    }
    terminalreporter.section("pytest-specdec")
    terminalreporter.write_line(render_terminal(session.records))
    paths = write_reports(session.records, cfg.report_dir, stem, meta=meta)
    for path in paths:
        terminalreporter.write_line(f"report written: {path}")
