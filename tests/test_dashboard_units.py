"""The dashboard's pure parts: history queries on a recording written by the recorder's own
store, the live model, the stream's fan-out, input parsing and the original shapes."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from dashboard.api import is_loopback, parse_since
from dashboard.history import History, HistoryUnavailable
from dashboard.live import LiveModel
from dashboard.stream import QUEUE_SIZE, Broadcaster
from dashboard.views import NOT_AVAILABLE, api_gpu, services_ai
from gpuheal.models import Action, Event, Sample, State
from gpuheal.mqtt import Received
from gpuheal.topics import TopicParts
from recorder.rows import record_of
from recorder.store import Store

T0 = 1_750_000_000.0


def record_samples(db: Path, n: int, host: str = "h", gpu: int = 0) -> Store:
    """``n`` samples one second apart, temperature = seconds since T0, via the recorder."""
    store = Store(db)
    parts = TopicParts(host=host, kind="sample", index=gpu)
    records = [record_of(parts, Sample(host=host, index=gpu, source="sim", ts=T0 + i, seq=i,
                                       temperature_c=float(i), utilization_pct=50.0,
                                       power_draw_w=None if i % 2 else 30.0), T0 + i)
               for i in range(n)]
    store.write(records)
    return store


def test_history_is_bucket_averages_of_the_last_window(tmp_path: Path) -> None:
    db = tmp_path / "r.db"
    record_samples(db, 7200).close()  # two hours
    h = History(db).series("h", 0, 3600.0)
    s = h["series"]
    assert h["end_ts"] == T0 + 7199 and h["start_ts"] == T0 + 3599
    assert h["points"] == len(s["ts"]) == 1000 and h["bucket_s"] == pytest.approx(3.6)
    # each bucket averages the samples in it: temperature = seconds since T0
    for ts, temp in zip(s["ts"], s["temperature_c"], strict=True):
        assert abs(temp - (ts - T0)) <= 1.8
    assert set(s["utilization_pct"]) == {50.0}
    assert set(s["power_draw_w"]) == {30.0}, "missing readings do not count as 0"
    few = History(db).series("h", 0, 3600.0, points=10, metrics=("temperature_c",))
    assert few["points"] == 10 and set(few["series"]) == {"ts", "temperature_c"}
    assert few["series"]["temperature_c"][0] == pytest.approx(3599 + 180, abs=1)
    assert History(db).series("h", 1, 3600.0)["points"] == 0
    with pytest.raises(ValueError, match="unknown metric"):
        History(db).series("h", 0, 60.0, metrics=("fan_pct",))


def test_history_counts_folded_minutes_with_their_weight(tmp_path: Path) -> None:
    db = tmp_path / "r.db"
    store = record_samples(db, 7200)
    store.fold_samples(T0 + 5400)  # the first 90 minutes become 1-minute aggregates
    store.close()
    h = History(db).series("h", 0, 7200.0)
    s = h["series"]
    assert 0 < h["points"] <= 1000
    assert s["ts"][0] < T0 + 600, "the folded part charts too"
    for ts, temp in zip(s["ts"], s["temperature_c"], strict=True):
        assert abs(temp - (ts - T0)) <= 40  # a folded minute sits in its bucket
    raw_only = History(db).series("h", 0, 1200.0)
    assert raw_only["start_ts"] == T0 + 7199 - 1200


def test_events_and_actions_pages(tmp_path: Path) -> None:
    db = tmp_path / "r.db"
    store = Store(db)
    events = [Event(event_id=f"e{i}", host="h", index=i % 2, kind="thermal_throttling",
                    severity="critical", phase="raised", started_ts=T0 + i, ts=T0 + i,
                    message=f"hot {i}", evidence={"temperature_c": 86.0 + i})
              for i in range(5)]
    action = Action(action_id="a1", event_id="e0", host="h", index=0, action="throttle_gpu",
                    status="started", ts=T0, detail={"kind": "thermal_throttling"})
    store.write([record_of(TopicParts("h", "event", e.index), e, T0) for e in events]
                + [record_of(TopicParts("h", "action", 0), action, T0)])
    store.close()
    history = History(db, clock=lambda: T0 + 10)
    page = history.events({"gpu": 0}, None, limit=2, offset=0)
    assert page.total == 3 and [e["event_id"] for e in page.items] == ["e4", "e2"]
    assert page.items[0]["evidence"] == {"temperature_c": 90.0}
    assert Event.model_validate(page.items[0]) == events[4]
    assert history.events({}, since_s=7.0).total == 2  # ts >= T0 + 3
    assert history.actions({"event_id": "e0"}).items == [action.model_dump(mode="json")]
    assert history.actions({"status": "verified"}).total == 0


def test_history_unavailable_says_why(tmp_path: Path) -> None:
    with pytest.raises(HistoryUnavailable, match="--db"):
        History(None).events({})
    with pytest.raises(HistoryUnavailable, match="no database at"):
        History(tmp_path / "none.db").events({})
    other = tmp_path / "other.db"
    import sqlite3

    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.commit()
    with pytest.raises(HistoryUnavailable, match="not a gpuheal recording"):
        History(other).actions({})
    assert not (tmp_path / "none.db").exists(), "a reader never creates the file"


@pytest.mark.parametrize(("text", "seconds"), [
    ("30s", 30.0), ("15m", 900.0), ("1h", 3600.0), ("2d", 172800.0), ("1w", 604800.0),
    ("1.5h", 5400.0), (None, None)])
def test_since_durations(text: str | None, seconds: float | None) -> None:
    assert parse_since(text) == seconds


@pytest.mark.parametrize("text", ["", "h", "1", "1x", "-1h", "0s", "1e3s", "9999d", "1 h"])
def test_bad_since(text: str) -> None:
    with pytest.raises(ValueError, match="since must be"):
        parse_since(text)


def test_loopback_addresses() -> None:
    assert all(map(is_loopback, ["127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "192.168.1.5", "example.org"]))


# --- the live model ------------------------------------------------------------------------
def received(message: object, kind: str, host: str = "h", index: int | None = 0) -> Received:
    return Received(topic=f"p/{host}/{kind}", parts=TopicParts(host, kind, index),
                    message=message, retain=False, qos=1, received_ts=time.time(),
                    payload=b"")


def state(index: int, ts: float, **kw: object) -> State:
    return State(host="h", index=index, health="healthy", timestamp="x", ts=ts, **kw)


def test_live_model_counts_and_conditions_that_need_a_person() -> None:
    sent: list[tuple[str, object]] = []
    live = LiveModel(recent=3)
    live.sink = lambda kind, make: sent.append((kind, make()))
    live.set_connected(True)
    raised = Event(event_id="x79", host="h", index=0, kind="xid_error", severity="critical",
                   phase="raised", started_ts=T0, ts=T0, message="XID 79")
    live.on_event(received(raised, "event"))
    notify = Action(action_id="n1", event_id="x79", host="h", index=0, action="notify",
                    status="skipped", reason="needs_human", ts=T0)
    live.on_action(received(notify, "action"))
    assert live.needs_person() == ["x79"]
    acked = notify.model_copy(update={"status": "acknowledged", "reason": None})
    live.on_action(received(acked, "action"))
    assert live.needs_person() == []
    events, actions = live.counts()
    assert events == {("h", "xid_error", "critical", "raised"): 1}
    assert actions == {("h", "notify", "skipped"): 1, ("h", "notify", "acknowledged"): 1}
    assert [k for k, _ in sent] == ["event", "action", "action"]
    for i in range(5):
        live.on_action(received(notify.model_copy(update={"action_id": f"n{i + 2}"}),
                                "action"))
    assert len(live.recent_actions()) == 3, "the window is bounded"


def test_live_model_staleness_follows_broker_and_age() -> None:
    now = time.time()
    live = LiveModel(clock=lambda: now)
    live.set_connected(True)
    live.on_state(received(state(0, now - 5), "state"))
    live.on_state(received(state(1, now - 500), "state"))
    assert [g["stale"] for g in live.states()] == [False, True]
    change = live.health_change()
    assert change == {"broker_connected": True, "stale": [{"host": "h", "index": 1}]}
    assert live.health_change() is None, "only changes are news"
    live.set_connected(False)
    assert live.health_change() == {"broker_connected": False,
                                    "stale": [{"host": "h", "index": 0},
                                              {"host": "h", "index": 1}]}
    live.on_cleared(TopicParts("h", "state", 1))
    assert [g["index"] for g in live.states()] == [0]


def test_original_shapes() -> None:
    assert api_gpu([], "h", True) == {**NOT_AVAILABLE, "gpus": [], "broker_connected": True}
    gpus = [{"host": "a", "index": 0}, {"host": "h", "index": 1}, {"host": "h", "index": 0}]
    assert api_gpu(gpus, "h", True)["gpu"] == {"host": "h", "index": 0}
    assert api_gpu(gpus, "elsewhere", True)["gpu"] == {"host": "a", "index": 0}
    gpu = {"host": "h", "index": 0, "name": "G", "utilization": None, "memory": {},
           "power": {"draw_w": 10.0}, "health": "healthy", "error": "none"}
    body = services_ai(gpu, "unknown")
    assert body["gpu_available"] is True
    assert body["llm"]["gpu_load"] is None, "a missing reading stays null"
    assert body["llm"]["gpu"]["memory_used_mb"] is None
    assert body["llm"]["gpu"]["power_draw_w"] == 10.0


# --- the stream's fan-out ---------------------------------------------------------------------
def test_a_slow_stream_client_is_dropped_and_the_others_go_on() -> None:
    async def scenario() -> tuple[bool, list[str | None], int]:
        b = Broadcaster()
        slow, fast = b.add(), b.add()
        assert slow is not None and fast is not None
        got: list[str | None] = []
        for i in range(QUEUE_SIZE + 5):
            b.publish("state", lambda i=i: {"n": i})
            await asyncio.sleep(0)  # the fan-out runs; the fast client reads, the slow not
            while not fast.queue.empty():
                got.append(fast.queue.get_nowait())
        rest = [slow.queue.get_nowait() for _ in range(slow.queue.qsize())]
        assert b.clients == 1, "only the fast client is left"
        return slow.dropped, rest, len(got)

    dropped, rest, fast_count = asyncio.run(scenario())
    assert dropped and rest == [None], "emptied, then told to end"
    assert fast_count == QUEUE_SIZE + 5


def test_publishing_without_clients_builds_nothing() -> None:
    b = Broadcaster()
    b.publish("state", lambda: pytest.fail("serialized for nobody"))
    b.close_all()
