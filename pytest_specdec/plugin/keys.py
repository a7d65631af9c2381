"""Where the plugin keeps its state: keys of ``config.stash``, shared by the hooks and
their helpers."""

from __future__ import annotations

from typing import Any

import pytest

from pytest_specdec.bench.config import SpecdecConfig
from pytest_specdec.bench.session import SpecdecSession
from pytest_specdec.protocol.registry import Registry

CONFIG_KEY = pytest.StashKey[SpecdecConfig]()
REGISTRY_KEY = pytest.StashKey[Registry]()
SESSION_KEY = pytest.StashKey[SpecdecSession]()
#: --specdec-compare: the saved run's records, then the comparison made at session end
COMPARE_BASE_KEY = pytest.StashKey[list]()
COMPARISON_KEY = pytest.StashKey[Any]()
#: on each process: the nodeid of the case that added each record (by its position)
ORIGINS_KEY = pytest.StashKey[dict]()
#: on the pytest-xdist controller: each worker's [collection index, record] pairs
MERGED_KEY = pytest.StashKey[dict]()
# the session report's file name, chosen at its first write and rewritten after
REPORT_STEM_KEY = pytest.StashKey[str]()
#: torch's global state as the session starts: every case starts from it (engine/torch_state.py)
TORCH_STATE_KEY = pytest.StashKey[Any]()
#: the key of the records a worker sends to the controller in config.workeroutput
WORKEROUTPUT_RECORDS = "specdec_records"
#: the start-of-session estimate (bench.estimate.RunEstimate) and when the cases began
ESTIMATE_KEY = pytest.StashKey[Any]()
#: the memory limit of the session's target (bench.machine.MemoryLimit), measured once
#: when a report or machine_info first asks after a case loaded the target; None: the
#: probe did not fit in memory
MEMORY_KEY = pytest.StashKey[Any]()
