"""Recorder: received message → row (pure, no broker, no database)."""

from __future__ import annotations

import json

import pytest

from gpuheal.models import DeadLetter
from recorder.rows import deadletter_record, record_for
from tests.factories import (
    NOW,
    T,
    make_action,
    make_event,
    make_healer_state,
    make_sample,
    make_state,
)

VALID = [
    ("samples", T.sample("h1", 0), make_sample().to_json()),
    ("states", T.state("h1", 0), make_state().to_json()),
    ("events", T.event("h1", 0), make_event().to_json()),
    ("actions", T.action("h1", 0), make_action(make_event()).to_json()),
    ("component_status", T.status("h1", "analyzer"), b"online"),
    ("healer_states", T.healer_state("h1"), make_healer_state().to_json()),
    ("deadletter", T.deadletter("analyzer"),
     DeadLetter(component="analyzer", topic="p/h1/gpu/0/sample", reason="not JSON",
                payload="{", ts=NOW).to_json()),
]


@pytest.mark.parametrize(("table", "topic", "payload"), VALID, ids=[v[0] for v in VALID])
def test_valid_message_becomes_a_row_of_its_table(table: str, topic: str,
                                                  payload: bytes) -> None:
    rec = record_for(T, topic, payload, NOW + 5)
    assert rec is not None
    assert rec.table == table


def test_sample_row_keeps_every_field_and_json_lists() -> None:
    s = make_sample(seq=7, xids=[79], throttle_reasons=["hw_slowdown"], ecc_uncorrected=2,
                    remapped_rows_pending=True, fan_pct=None,
                    processes=[{"pid": 42, "name": "ollama", "used_mb": 900.0}])
    rec = record_for(T, T.sample("h1", 0), s.to_json(), NOW + 1)
    assert rec is not None
    row = rec.row
    assert (row["host"], row["gpu"], row["seq"], row["ts"]) == ("h1", 0, 7, NOW)
    assert json.loads(row["xids"]) == [79]
    assert json.loads(row["processes"]) == [{"pid": 42, "name": "ollama", "used_mb": 900.0}]
    assert row["fan_pct"] is None  # missing stays NULL, never 0
    assert row["remapped_rows_pending"] is True
    assert row["received_ts"] == NOW + 1


BAD = [
    ("not JSON", T.event("h1", 0), b"{not json", "not JSON"),
    ("not an object", T.event("h1", 0), b"[1, 2]", "not a JSON object"),
    ("not UTF-8", T.sample("h1", 0), b"\xff\xfe", "not UTF-8"),
    ("schema", T.event("h1", 0), b'{"v": 1, "event_id": "x"}', "invalid Event"),
    ("NaN", T.sample("h1", 0), make_sample().to_json().replace(b'"ts":1700000000.0',
                                                                 b'"ts":NaN'), "NaN"),
    ("wrong version", T.action("h1", 0),
     make_action(make_event()).to_json().replace(b'"v":1', b'"v":2'), "invalid Action"),
    ("topic host mismatch", T.sample("h2", 0), make_sample().to_json(), "topic names host"),
    ("topic gpu mismatch", T.event("h1", 3), make_event().to_json(), "topic names GPU 3"),
    ("int64 overflow", T.sample("h1", 0),
     make_sample().to_json().replace(b'"seq":1', b'"seq":99999999999999999999999'),
     "integer out of range"),
    ("bad status", T.status("h1", "healer"), b"sleeping", "online or offline"),
    ("healer host mismatch", T.healer_state("h2"), make_healer_state().to_json(),
     "topic names host"),
    ("unknown topic", "p/h1/gpu/0/sim", b"{}", "not a topic the recorder records"),
    ("too large", T.event("h1", 0), b"{" + b" " * (300 * 1024) + b"}", "too large"),
    ("status too large", T.status("h1", "healer"), b"online" + b" " * (256 * 1024),
     "too large"),
]


@pytest.mark.parametrize(("name", "topic", "payload", "reason"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_becomes_a_deadletter_row_with_the_reason(name: str, topic: str,
                                                            payload: bytes,
                                                            reason: str) -> None:
    rec = record_for(T, topic, payload, NOW)
    assert rec is not None
    assert rec.table == "deadletter", name
    assert reason in rec.row["reason"]
    assert rec.row["component"] == "recorder"
    assert rec.row["topic"] == topic
    assert rec.row["ts"] == NOW


def test_empty_payload_is_a_cleared_retained_topic_and_records_nothing() -> None:
    assert record_for(T, T.state("h1", 0), b"", NOW) is None
    assert record_for(T, T.status("h1", "publisher"), b"", NOW) is None


def test_deadletter_payload_is_truncated_and_made_text() -> None:
    rec = deadletter_record("p/x", b"\xff" + b"a" * 200_000, "why", NOW)
    assert len(rec.row["payload"]) == 64 * 1024
    assert rec.row["payload"].startswith("\ufffd")


def test_evidence_nested_beyond_the_contract_is_a_dead_letter() -> None:
    deep: dict[str, object] = {"x": 1}
    for _ in range(300):
        deep = {"x": deep}
    payload = make_event().to_json().replace(b'"evidence":{"memory_used_mb":37000.0}',
                                             b'"evidence":' + json.dumps(deep).encode())
    rec = record_for(T, T.event("h1", 0), payload, NOW)
    assert rec is not None and rec.table == "deadletter"
    assert "nested deeper" in rec.row["reason"]


def test_evidence_nested_to_the_contract_limit_is_stored() -> None:
    deep: dict[str, object] = {"x": 1}
    for _ in range(60):
        deep = {"x": deep}
    payload = make_event().to_json().replace(b'"evidence":{"memory_used_mb":37000.0}',
                                             b'"evidence":' + json.dumps(deep).encode())
    rec = record_for(T, T.event("h1", 0), payload, NOW)
    assert rec is not None and rec.table == "events"
    assert json.loads(rec.row["evidence"]) == deep
