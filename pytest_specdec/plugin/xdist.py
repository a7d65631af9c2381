"""pytest-xdist: each worker runs its cases with its own SpecdecSession (own target, own
baselines) and sends its records, each with the collection index of its case, to the
controller through ``config.workeroutput``; the controller merges them in collection
order, which is the order a single process runs and records them in, and alone reports
and gates."""

from __future__ import annotations

import json
from typing import Any

import pytest

from pytest_specdec.plugin.keys import MERGED_KEY, ORIGINS_KEY, SESSION_KEY, WORKEROUTPUT_RECORDS

def is_worker(config: pytest.Config) -> bool:
    """A pytest-xdist worker (which has ``workerinput``), not the controller."""
    return hasattr(config, "workerinput")


def worker_id(config: pytest.Config) -> str:
    return config.workerinput["workerid"] if is_worker(config) else "main"


def send_records(session: pytest.Session) -> None:
    """On a worker: ``[collection index, record]`` pairs, as JSON, in workeroutput."""
    import json

    config = session.config
    specdec = config.stash.get(SESSION_KEY, None)
    if specdec is None:
        return
    order = {item.nodeid: index for index, item in enumerate(session.items)}
    origins = config.stash.get(ORIGINS_KEY, {})
    late = len(order)  # a record made outside a case's call: after every case, in run order
    pairs = [[order.get(origins.get(position, ""), late), record]
             for position, record in enumerate(specdec.records)]
    config.workeroutput[WORKEROUTPUT_RECORDS] = json.dumps(pairs)


def session_records(config: pytest.Config) -> list[dict] | None:
    """The session's records: every worker's, merged in collection order, on the xdist
    controller; this process's own otherwise; None when no case of ours ran here."""
    merged = config.stash.get(MERGED_KEY, None)
    if merged is not None:
        pairs = [(index, worker, position, record) for worker, sent in merged.items()
                 for position, (index, record) in enumerate(sent)]
        return [record for *_, record in sorted(pairs, key=lambda p: p[:3])]
    specdec = config.stash.get(SESSION_KEY, None)
    return None if specdec is None else specdec.records


def keep_worker_records(node: Any) -> None:
    """On the controller: keep the records a worker sent when it finished (on Ctrl-C
    too); a worker that died without finishing sent none, and its cases are missing
    from the report."""
    sent = getattr(node, "workeroutput", {}).get(WORKEROUTPUT_RECORDS)
    if sent is not None:
        # keyed by worker: a node reported down twice (finished, then lost) counts once
        merged = node.config.stash.setdefault(MERGED_KEY, {})
        merged[node.workerinput["workerid"]] = json.loads(sent)
