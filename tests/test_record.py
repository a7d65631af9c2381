"""The typed case record: its fields are the one list the columns, the required keys,
the compared and gated metrics and a drafter's own fields are read from."""

from __future__ import annotations

import dataclasses

import pytest

from pytest_specdec.bench.record import (ABSENT, COLUMNS, COMPARED, DRAFTER_FIELDS, GATED_METRICS,
                                         REQUIRED_KEYS, SCHEMA_VERSION, CaseRecord, RecordError,
                                         check_record)
from pytest_specdec.protocol.drafter import DrafterBase, drafter_record_fields
from pytest_specdec.reporting.compare import METRICS
from pytest_specdec.reporting.export import CSV_FIELDS

#: The keys a schema-1 record has always had to carry: saved runs rely on them.
SCHEMA_1_REQUIRED = {
    "specdec_schema", "role", "drafter", "paradigm", "temperature", "target", "dtype",
    "device", "k", "problems", "max_new_tokens", "new_tokens", "steps", "drafted",
    "accepted", "mat", "acceptance_rate", "per_position_acceptance", "draft_share",
    "tokens_per_s", "wall_s_rounds", "wall_s", "baseline_wall_s", "speedup", "accuracy",
    "output_sha256", "lossless",
}


def minimal(**changes) -> dict:
    values = dict(
        specdec_schema=SCHEMA_VERSION, role="speculative", drafter="pld", paradigm="multi_round",
        temperature=0.0, target="t", dtype="float32", device="cpu", k=10, problems=1,
        max_new_tokens=8, new_tokens=16, steps=8, drafted=10, accepted=8, mat=2.0,
        acceptance_rate=0.8, per_position_acceptance=[0.9, 0.7], draft_share=0.1,
        tokens_per_s=100.0, wall_s_rounds=[0.16], wall_s=0.16, baseline_wall_s=0.32,
        speedup=2.0, accuracy=1.0, output_sha256="ab", lossless="exact")
    values.update(changes)
    return values


def test_the_schema_keeps_its_required_keys():
    assert set(REQUIRED_KEYS) == SCHEMA_1_REQUIRED
    assert set(REQUIRED_KEYS) <= set(COLUMNS) and CSV_FIELDS == COLUMNS


def test_compared_and_gated_metrics_come_from_the_record():
    assert tuple(m.key for m in METRICS) == tuple(COMPARED) == GATED_METRICS
    assert GATED_METRICS == ("speedup", "mat", "acceptance_rate", "tokens_per_s", "accuracy")
    assert DRAFTER_FIELDS == ("drafter_weights", "drafter_note", "hybrid_parts")


def test_a_record_holds_what_it_was_given_in_column_order():
    record = CaseRecord(**minimal(t_verify_ms=None)).as_dict()
    assert list(record) == [c for c in COLUMNS if c in record]
    assert record["t_verify_ms"] is None  # a field measured as nothing is kept
    assert "drafter_note" not in record  # a field not given is absent
    assert CaseRecord(**minimal()).drafter_note is ABSENT


def test_a_record_checks_its_fields():
    with pytest.raises(TypeError):
        CaseRecord(**{k: v for k, v in minimal().items() if k != "mat"})
    with pytest.raises(TypeError):
        CaseRecord(**minimal(not_a_field=1))
    with pytest.raises(RecordError, match=r"mat \(str\)"):
        CaseRecord(**minimal(mat="2"))
    with pytest.raises(RecordError, match="holds a non-number"):
        CaseRecord(**minimal(wall_s_rounds=["x"]))
    with pytest.raises(RecordError, match="has role 'judge'"):
        CaseRecord(**minimal(role="judge"))
    with pytest.raises(RecordError, match="has drafter_instances 'some'"):
        CaseRecord(**minimal(batch=4, drafter_instances="some"))
    for instances in ("shared", "per sequence"):
        assert CaseRecord(**minimal(batch=4, drafter_instances=instances)).as_dict()[
            "drafter_instances"] == instances
    assert "drafter_instances" not in CaseRecord(**minimal()).as_dict()
    assert dataclasses.is_dataclass(CaseRecord)


def test_a_saved_record_is_checked_as_a_plain_dict():
    saved = minimal(an_old_field="kept")  # a key this version does not write still loads
    check_record(saved, "run.json")
    with pytest.raises(RecordError, match="lacks required keys: speedup"):
        check_record({k: v for k, v in saved.items() if k != "speedup"}, "run.json")


class Noted(DrafterBase):
    report_note = "n" * 400


class Weighted(Noted):
    def record_fields(self):
        return {**super().record_fields(), "drafter_weights": "w" * 80, "other": 1}


class Plain:  # no DrafterBase: a note through the documented attribute
    report_note = "from the problem's earlier samples"


class Broken(DrafterBase):
    def record_fields(self):
        raise RuntimeError("no")


def test_a_drafter_adds_fields_through_record_fields():
    assert drafter_record_fields(Noted()) == {"drafter_note": "n" * 300}
    assert drafter_record_fields(Weighted()) == {"drafter_note": "n" * 300,
                                                 "drafter_weights": "w" * 64}
    assert drafter_record_fields(Plain()) == {"drafter_note": Plain.report_note}
    assert drafter_record_fields(Broken()) == {}
    assert drafter_record_fields(DrafterBase()) == {}
    fields = drafter_record_fields(Weighted())
    assert CaseRecord(**minimal(**fields)).as_dict()["drafter_weights"] == "w" * 64
