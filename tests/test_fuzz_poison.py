"""Poison messages the wire fuzz (tests/test_fuzz_wire.py) found, pinned as regression tests.

Each one once crashed or silenced a component: lone UTF-16 surrogates, nesting beyond the
serializer's limit, an oversized status, a sample time beyond year 9999, and a nesting limit
that depended on the caller's stack. The contract (:func:`gpuheal.wire.decode`) now refuses
each with a reason; the components run here for real (``run(opts, stop)`` in a thread, on the
session's Mosquitto) and must dead-letter the poison with the contract's own reason and go on.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from gpuheal.broker import PrivateBroker
from gpuheal.models import MAX_TS, DeadLetter, Event, Sample, iso_utc
from gpuheal.options import AnalyzerOptions, CommonOptions, HealerOptions, RecorderOptions
from gpuheal.topics import Topics
from gpuheal.wire import MAX_JSON_DEPTH, MAX_PAYLOAD_BYTES, PayloadError, decode
from tests.factories import NOW, make_event, make_sample
from tests.support import Collector, Speaker, wait_for

pytestmark = pytest.mark.timeout(60)

HOST = "xhost"
SURROGATE_EVENT = (b'{"v":1,"event_id":"\\ud800","host":"%s","index":7,"kind":"gpu_hang",'
                   b'"severity":"critical","phase":"raised","started_ts":1,"ts":2,'
                   b'"message":"\\udfff"}')
"""Valid but for its lone UTF-16 surrogate escapes, which no UTF-8 text can hold."""


def deep(n: int) -> Any:
    """An object nested ``n`` levels deep."""
    value: Any = 1
    for _ in range(n - 1):
        value = {"a": value}
    return value


def reason_of(model: type[Any], payload: bytes) -> str:
    """Why the contract refuses ``payload`` (the reason a dead letter must carry)."""
    with pytest.raises(PayloadError) as refused:
        decode(model, payload)
    return refused.value.reason


@contextmanager
def running(run: Callable[..., int], opts: Any, component: str) -> Iterator[threading.Thread]:
    """A component's ``run(opts, stop)`` in a thread, online; stopped (exit 0) afterwards."""
    common: CommonOptions = opts.common
    stop = threading.Event()
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(run(opts, stop)), daemon=True)
    status = common.topics.status(common.host_name, component)
    with Collector(common.broker, status) as seen:
        thread.start()
        seen.wait(lambda ms: any(m.payload == b"online" for m in ms) or not thread.is_alive(),
                  15, f"{component} online")
    try:
        assert thread.is_alive(), f"{component} exited with {codes}"
        yield thread
    finally:
        stop.set()
        thread.join(15)
    assert codes == [0], f"{component} exited with {codes}"


def common(broker: PrivateBroker, prefix: str, host: str = HOST) -> CommonOptions:
    return CommonOptions(broker=broker.url, prefix=prefix, host_name=host)


def send(broker: PrivateBroker, *messages: tuple[str, bytes]) -> None:
    with Speaker(broker.url) as speaker:
        for topic, payload in messages:
            speaker.send(topic, payload)


# --- the contract ------------------------------------------------------------------------------
def test_contract_rejects_lone_surrogates() -> None:
    """Once let through, such a string made make_action_id, model_dump_json and SQLite raise
    later, in the healer's policy thread, the analyzer's handler and the recorder's writer."""
    assert "surrogate" in reason_of(Event, SURROGATE_EVENT % b"h")
    fixed = (SURROGATE_EVENT % b"h").replace(b"\\ud800", b"\\u00e9").replace(
        b"\\udfff", b"\\ud83d\\ude00")  # a surrogate *pair* is fine
    assert decode(Event, fixed).message == "\U0001f600"


def _valid_at_stack_depth(payload: bytes, frames: int) -> bool:
    """Whether ``decode`` accepts ``payload`` when called ``frames`` calls deeper."""
    if frames:
        return _valid_at_stack_depth(payload, frames - 1)
    try:
        decode(Event, payload)
    except PayloadError:
        return False
    return True


def test_contract_nesting_limit_does_not_depend_on_the_stack() -> None:
    raw = "@@raw@@"
    head = json.dumps({**json.loads(make_event().to_json()), "evidence": raw}).encode()
    at = head.index(f'"{raw}"'.encode())

    def nested(depth: int) -> bytes:  # built as text: json.dumps has a limit of its own
        return head[:at] + b'{"a":' * depth + b"1" + b"}" * depth + head[at + len(raw) + 2:]

    low, high = 1, 2000  # the deepest evidence valid from here: binary search
    while low < high:
        mid = (low + high + 1) // 2
        if _valid_at_stack_depth(nested(mid), 0):
            low = mid
        else:
            high = mid - 1
    assert low == MAX_JSON_DEPTH - 1  # the message itself is the first level
    assert _valid_at_stack_depth(nested(low), 100), \
        f"{low} levels are valid here, and not JSON 100 calls deeper"
    assert not _valid_at_stack_depth(nested(low + 1), 0)


def test_recorder_dead_letters_an_oversized_status() -> None:
    """Status payloads are plain text, not JSON: the size limit holds for them too."""
    from recorder.rows import record_for

    t = Topics("p")
    payload = b"online" + b" " * MAX_PAYLOAD_BYTES
    record = record_for(t, t.status(HOST, "healer"), payload, NOW)
    assert record is not None and record.table == "deadletter"
    assert "too large" in record.row["reason"]


# --- the components ----------------------------------------------------------------------------
def test_healer_survives_an_event_with_a_lone_surrogate(broker: PrivateBroker, prefix: str,
                                                        tmp_path: Path) -> None:
    """It used to stop the healer: make_action_id raised in the policy thread, and then the
    guard-state save in ``run``'s ``finally`` raised too, so the bus was never stopped."""
    from healer.service import run

    t = Topics(prefix)
    poison = SURROGATE_EVENT % HOST.encode()
    opts = HealerOptions(common=common(broker, prefix), source="sim",
                         state_file=tmp_path / "healer.json")
    with Collector(broker.url, f"{prefix}/#") as seen, running(run, opts, "healer") as thread:
        send(broker, (t.event(HOST, 7), poison), (t.healer_set(HOST), b'{"dry_run": true}'))
        seen.wait(lambda ms: any(m.topic == t.healer_state(HOST) and m.json()["dry_run"]
                                 for m in ms) or not thread.is_alive(), 10,
                  "the healer handling the command after the event")
        assert thread.is_alive(), "the healer died"
        letters = [decode(DeadLetter, m.payload) for m in seen.on("/deadletter/healer")]
        assert [(d.topic, d.reason) for d in letters] == [
            (t.event(HOST, 7), reason_of(Event, poison))]
        assert not seen.on("/action")


def test_analyzer_dead_letters_a_sample_with_a_lone_surrogate(broker: PrivateBroker,
                                                              prefix: str) -> None:
    """It used to pass the analyzer's parse and then fail in the handler (no dead letter)."""
    from analyzer.service import run

    t = Topics(prefix)
    poison = make_sample(host=HOST, name="NAME").to_json().replace(b'"NAME"', b'"\\ud800"')
    opts = AnalyzerOptions(common=common(broker, prefix, "analyzerhost"))
    with Collector(broker.url, f"{prefix}/#") as seen, running(run, opts, "analyzer"):
        send(broker, (t.sample(HOST, 0), poison), (t.sample(HOST, 0), b"\xffsentinel"))
        def through_the_sentinel() -> list[DeadLetter] | None:
            found = [decode(DeadLetter, m.payload) for m in seen.on("/deadletter/analyzer")]
            return found if any("sentinel" in d.payload for d in found) else None

        letters = wait_for(through_the_sentinel, 10, "the sentinel's dead letter")
        assert [d.reason for d in letters][:1] == [reason_of(Sample, poison)]
        assert len(letters) == 2, "the surrogate sample was neither used nor dead-lettered"
        assert not seen.on("/state")


def test_analyzer_takes_the_last_second_of_year_9999_and_refuses_the_next(
        broker: PrivateBroker, prefix: str) -> None:
    """A sample time beyond year 9999 once failed the State's ISO timestamp in the handler;
    it is now outside the contract, and the last second inside it makes a State."""
    from analyzer.service import run

    t = Topics(prefix)
    beyond = make_sample(host=HOST, index=1).to_json().replace(b'"ts":1700000000.0',
                                                               f'"ts":{MAX_TS + 1}'.encode())
    assert beyond != make_sample(host=HOST, index=1).to_json()
    opts = AnalyzerOptions(common=common(broker, prefix, "analyzerhost"))
    with Collector(broker.url, f"{prefix}/#") as seen, running(run, opts, "analyzer"):
        send(broker, (t.sample(HOST, 1), beyond),
             (t.sample(HOST, 0), make_sample(host=HOST, ts=MAX_TS).to_json()))
        states = seen.wait(lambda ms: [m for m in ms if m.topic == t.state(HOST, 0)], 10,
                           "the State of the last second")
        assert states[-1].json()["timestamp"] == iso_utc(MAX_TS) == "9999-12-31T23:59:59.000Z"
        letters = [decode(DeadLetter, m.payload) for m in seen.on("/deadletter/analyzer")]
        assert [(d.topic, d.reason) for d in letters] == [
            (t.sample(HOST, 1), reason_of(Sample, beyond))]
        assert not seen.on("/1/state")


@pytest.mark.parametrize("poison", ["deep", "surrogate"])
def test_recorder_keeps_storing_after_a_poison_message(broker: PrivateBroker, prefix: str,
                                                       tmp_path: Path, poison: str) -> None:
    """It used to kill the recorder's writer thread (status still online, nothing stored or
    acknowledged any more): pydantic's serializer stops at 255 levels while JSON input could
    nest ~1000, and a lone surrogate failed both the row and its dead-letter fallback. Both
    are now outside the contract: stored as dead letters, and the recorder goes on."""
    from recorder.service import run

    t = Topics(prefix)
    db = tmp_path / "rec.db"
    opts = RecorderOptions(common=common(broker, prefix), db=db, client_id=f"{prefix}-rec")
    if poison == "deep":
        event = {**json.loads(make_event(host=HOST).to_json()), "event_id": "deep",
                 "evidence": {"x": deep(300)}}
        payload = json.dumps(event).encode()
    else:
        payload = SURROGATE_EVENT.replace(b'"index":7', b'"index":0') % HOST.encode()
    reason = reason_of(Event, payload)
    after = make_event(n=1, host=HOST)

    def rows(sql: str) -> list[Any]:
        try:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
                return con.execute(sql).fetchall()
        except sqlite3.OperationalError:
            return []

    with running(run, opts, "recorder") as thread:
        send(broker, (t.event(HOST, 0), payload), (t.event(HOST, 0), after.to_json()))
        wait_for(lambda: rows(f"select 1 from events where event_id = '{after.event_id}'"),
                 10, "the valid event after the poison in SQLite")
        assert thread.is_alive()
    assert rows("select topic, reason from deadletter") == [(t.event(HOST, 0), reason)]
    assert rows("select count(*) from events") == [(1,)]
