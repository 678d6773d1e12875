"""Recorder service through a real Mosquitto: every message type lands, duplicates are stored
once, bad input goes to the dead-letter table, a locked database holds acknowledgements back,
and a recorder killed with SIGKILL mid-stream loses and doubles nothing."""

from __future__ import annotations

import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from gpuheal.broker import PrivateBroker
from gpuheal.config import GpuhealConfig, RecorderConfig
from gpuheal.models import DeadLetter, Event
from gpuheal.mqtt import BrokerURL
from gpuheal.options import CommonOptions, RecorderOptions
from gpuheal.runtime import Component
from gpuheal.topics import Topics
from recorder.export import run_export
from recorder.history import run_history
from recorder.rows import record_for
from recorder.service import Recorder, run
from recorder.store import Store
from tests.factories import (
    NOW,
    make_action,
    make_event,
    make_healer_state,
    make_sample,
    make_state,
)
from tests.support import Collector, wait_for

REPO = Path(__file__).resolve().parent.parent
FAST = {"busy_timeout_s": 0.1, "retry_max_s": 0.3, "warn_interval_s": 0.5,
        "flush_interval_s": 0.05}


def options(url: str, prefix: str, db: Path, only_host: str | None = None,
            **cfg: object) -> RecorderOptions:
    config = GpuhealConfig(recorder=RecorderConfig.model_validate(FAST | cfg))
    common = CommonOptions(broker=url, prefix=prefix, host_name="rec", config=config,
                           only_host=only_host)
    return RecorderOptions(common=common, db=db, client_id=f"rec-{prefix}")


def query(db: Path, sql: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    """A fresh read connection each time (WAL: readers never block the recorder)."""
    if not db.exists():
        return []
    with closing(sqlite3.connect(db, timeout=5)) as conn:
        try:
            return conn.execute(sql, params).fetchall()
        except sqlite3.OperationalError:  # tables not created yet
            return []


def count(db: Path, table: str, where: str = "1") -> int:
    rows = query(db, f"SELECT COUNT(*) FROM {table} WHERE {where}")
    return int(rows[0][0]) if rows else 0


def wait_online(db: Path, after_id: int = 0) -> None:
    """The recorder stored its own ``online``: its subscriptions are in place."""
    wait_for(lambda: count(db, "component_status",
                           f"component = 'recorder' AND status = 'online' AND id > {after_id}"),
             15, "the recorder's own online status in its database")


class Publisher:
    """One persistent paho connection publishing QoS 1 messages, each confirmed by the broker."""

    def __init__(self, url: str) -> None:
        b = BrokerURL.parse(url)
        self.client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                                  protocol=paho.MQTTv5)
        self.client.max_inflight_messages_set(1000)
        self.client.connect(b.host, b.port)
        self.client.loop_start()

    def send(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        info.wait_for_publish(5)
        assert info.is_published(), f"broker did not take {topic}"

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def pub(broker: PrivateBroker) -> Iterator[Publisher]:
    p = Publisher(broker.url)
    yield p
    p.close()


@contextmanager
def running(opts: RecorderOptions) -> Iterator[Recorder]:
    rec = Recorder(opts)
    component = Component(rec, opts.common)
    status = opts.common.topics.status("rec", "recorder")
    with Collector(opts.common.broker, status) as seen:
        component.start()
        try:
            # once the broker passed on the recorder's "online", it had its subscriptions
            seen.wait(lambda ms: any(m.text == "online" for m in ms), 15, "recorder online")
        except AssertionError:
            component.stop()
            raise
    try:
        yield rec
    finally:
        component.stop()


# --- in-process recorder -----------------------------------------------------------------
def test_every_message_type_lands_in_its_table(broker: PrivateBroker, pub: Publisher,
                                               prefix: str, tmp_path: Path) -> None:
    db = tmp_path / "rec.db"
    t = Topics(prefix)
    # a recording with samples past retention: folded into aggregates at start
    old = Store(db)
    old.write([r for r in (record_for(t, t.sample("old", 0),
                                      make_sample(seq=i, ts=NOW + i, host="old").to_json(), NOW)
                           for i in range(3)) if r])
    old.close()
    with running(options(broker.url, prefix, db, retention_days=1)) as rec:
        e = make_event()
        pub.send(t.sample("h1", 0), make_sample(seq=1).to_json(), qos=0)
        pub.send(t.sample("h1", 0), make_sample(seq=2).to_json(), qos=1)
        pub.send(t.state("h1", 0), make_state().to_json(), retain=True)
        pub.send(t.event("h1", 0), e.to_json())
        pub.send(t.action("h1", 0), make_action(e).to_json())
        pub.send(t.healer_state("h1"), make_healer_state().to_json(), retain=True)
        pub.send(t.status("h1", "analyzer"), b"online", retain=True)
        letter = DeadLetter(component="healer", topic="x", reason="bad", payload="{",
                            ts=NOW)
        pub.send(t.deadletter("healer"), letter.to_json(), qos=0)
        pub.send(t.event("h1", 0), b"{not json")
        pub.send(t.action("h1", 0), b'{"v": 1, "action_id": "a"}')
        wait_for(lambda: count(db, "deadletter") == 3, 10, "three dead letters")
        wait_for(lambda: count(db, "samples") == 2 and count(db, "healer_states") == 1
                 and count(db, "component_status", "host = 'h1'") == 1, 10, "every row")
        assert count(db, "events") == 1 and count(db, "actions") == 1
        assert count(db, "states") == 1
        reasons = [r[0] for r in query(db, "SELECT reason FROM deadletter ORDER BY id")]
        assert reasons[0] == "bad"
        assert reasons[1].startswith("not JSON") and "invalid Action" in reasons[2]
        assert rec.stats.deadlettered == 2
        assert rec.stats.retention_passes >= 1
    assert count(db, "samples", "host = 'old'") == 0
    assert count(db, "sample_aggregates", "host = 'old'") == 4  # one minute, four metrics
    # a clean stop records offline... of the recorder itself, on its next run
    assert query(db, "SELECT status FROM component_status WHERE component = 'recorder'") \
        == [("online",)]


def test_duplicates_published_twice_are_stored_once(broker: PrivateBroker, pub: Publisher,
                                                    prefix: str, tmp_path: Path) -> None:
    db = tmp_path / "rec.db"
    t = Topics(prefix)
    with running(options(broker.url, prefix, db)) as rec:
        before = rec.stats.committed
        e = make_event()
        messages = [
            (t.event("h1", 0), e.to_json()),
            (t.action("h1", 0), make_action(e, "started").to_json()),
            (t.action("h1", 0), make_action(e, "succeeded").to_json()),
            (t.sample("h1", 0), make_sample(seq=5).to_json()),
        ]
        for topic, payload in messages + messages:
            pub.send(topic, payload)
        wait_for(lambda: rec.stats.committed - before >= 8, 10, "both copies committed")
        assert count(db, "events") == 1
        assert count(db, "actions") == 2
        assert count(db, "samples") == 1


def test_a_message_sqlite_cannot_store_is_a_dead_letter_and_the_writer_goes_on(
        broker: PrivateBroker, pub: Publisher, prefix: str, tmp_path: Path) -> None:
    db = tmp_path / "rec.db"
    t = Topics(prefix)
    # json.loads keeps the escape as a lone surrogate, which no UTF-8 can store: the contract
    # rejects it, and the recorder keeps it as a dead letter and goes on
    poison = make_event(0).to_json().replace(b'"message":"out_of_memory #0 raised"',
                                             b'"message":"\\ud800"')
    assert b"\\ud800" in poison
    with running(options(broker.url, prefix, db)) as rec:
        pub.send(t.event("h1", 0), poison)
        pub.send(t.event("h1", 0), make_event(1).to_json())
        wait_for(lambda: count(db, "events") == 1, 10, "the event after the poison")
        wait_for(lambda: count(db, "deadletter", "reason LIKE '%surrogate%'"), 10,
                 "the poison as a dead letter")
        assert rec.stats.batch_errors == 0 and rec.stats.unstorable == 0
        pub.send(t.event("h1", 0), make_event(2).to_json())
        wait_for(lambda: count(db, "events") == 2, 10, "the writer still storing")


def test_only_host_records_that_host(broker: PrivateBroker, pub: Publisher, prefix: str,
                                     tmp_path: Path) -> None:
    db = tmp_path / "rec.db"
    t = Topics(prefix)
    with running(options(broker.url, prefix, db, only_host="h2")):
        pub.send(t.event("h1", 0), make_event(host="h1").to_json())
        pub.send(t.event("h2", 0), make_event(host="h2").to_json())
        wait_for(lambda: count(db, "events") == 1, 10, "the h2 event")
        pub.send(t.event("h2", 0), make_event(1, host="h2").to_json())
        wait_for(lambda: count(db, "events") == 2, 10, "the second h2 event")
        assert count(db, "events", "host = 'h1'") == 0


def test_locked_database_acknowledges_nothing_until_stored(broker: PrivateBroker,
                                                           pub: Publisher, prefix: str,
                                                           tmp_path: Path) -> None:
    db = tmp_path / "rec.db"
    t = Topics(prefix)
    with Collector(broker.url, t.deadletter("recorder")) as warnings, \
            running(options(broker.url, prefix, db)) as rec:
        acked_before = rec.stats.acked
        locker = sqlite3.connect(db, isolation_level=None)
        locker.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        try:
            for n in range(20):
                pub.send(t.event("h1", 0), make_event(n).to_json())
            wait_for(lambda: rec.stats.received >= acked_before + 20, 10, "all 20 received")
            letter = warnings.wait(lambda ms: ms, 10, "a storage warning")[0].json()
            assert letter["reason"].startswith("storage unavailable")
            assert "locked" in letter["reason"]
            assert letter["topic"] == t.status("rec", "recorder")
            assert rec.stats.degraded_since is not None
            assert rec.stats.acked == acked_before  # nothing acknowledged while not stored
            assert count(db, "events") == 0
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        wait_for(lambda: count(db, "events") == 20, 10, "the 20 events once the lock is gone")
        wait_for(lambda: rec.stats.acked >= acked_before + 20, 5, "acknowledgements")
        assert rec.stats.degraded_since is None
        # the warning itself is recorded too, once storage works again
        wait_for(lambda: count(db, "deadletter", "reason LIKE 'storage unavailable%'"), 10,
                 "the recorded warning")


def test_run_refuses_an_unusable_database_and_stops_cleanly(broker: PrivateBroker,
                                                            prefix: str,
                                                            tmp_path: Path) -> None:
    bad = tmp_path / "newer.db"
    store = Store(bad)
    store.db["schema_version"].insert({"version": 999, "name": "future", "applied_ts": NOW})
    store.close()
    assert run(options(broker.url, prefix, bad), threading.Event()) == 1

    db = tmp_path / "ok.db"
    stop = threading.Event()
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(run(options(broker.url, prefix, db),
                                                               stop)))
    with Collector(broker.url, Topics(prefix).status("rec", "recorder")) as status:
        thread.start()
        wait_online(db)
        stop.set()
        thread.join(15)
        assert result == [0]
        status.wait(lambda ms: ms and ms[-1].text == "offline", 5, "offline on a clean stop")


# --- a real recorder process, killed with SIGKILL ------------------------------------------
def start_recorder(url: str, prefix: str, db: Path, log: Path,
                   config: Path | None = None) -> subprocess.Popen[bytes]:
    """``python -m gpuheal recorder`` as a real process, with a fixed client id."""
    argv = [sys.executable, "-m", "gpuheal", "recorder", "--broker", url, "--prefix", prefix,
            "--host-name", "rec", "--db", str(db), "--client-id", f"rec-{prefix}"]
    if config is not None:
        argv += ["--config", str(config)]
    with log.open("ab") as out:
        return subprocess.Popen(argv, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL,
                                env=os.environ | {"PYTHONPATH": str(REPO)})


def kill9(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(10) == -signal.SIGKILL


def online_id(db: Path) -> int:
    rows = query(db, "SELECT MAX(id) FROM component_status WHERE component = 'recorder'")
    return int(rows[0][0] or 0) if rows else 0


class Stream(threading.Thread):
    """Publishes an incident's events and actions (QoS 1) until told to stop."""

    def __init__(self, url: str, topics: Topics) -> None:
        super().__init__(daemon=True)
        self.pub = Publisher(url)
        self.topics = topics
        self.sent_events: set[tuple[str, str, str]] = set()
        self.sent_actions: set[tuple[str, str]] = set()
        self.count = 0
        self.halt = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            n = 0
            while not self.halt.is_set():
                e: Event = make_event(n, host=f"h{n % 3}", index=n % 2)
                a = make_action(e, "started")
                self.pub.send(self.topics.event(e.host, e.index), e.to_json())
                self.pub.send(self.topics.action(a.host, a.index), a.to_json())
                if n % 5 == 0:  # the same event delivered again: must not double
                    self.pub.send(self.topics.event(e.host, e.index), e.to_json())
                self.sent_events.add((e.event_id, e.phase, e.severity))
                self.sent_actions.add((a.action_id, a.status))
                n += 1
                self.count = n
                self.halt.wait(0.002)  # a steady stream, not a flood
        except BaseException as exc:  # reported by the test
            self.error = exc

    def stop(self) -> None:
        self.halt.set()
        self.join(10)
        self.pub.close()
        assert self.error is None, self.error


def test_sigkill_mid_stream_loses_and_doubles_nothing(broker: PrivateBroker, prefix: str,
                                                      tmp_path: Path) -> None:
    db, log = tmp_path / "rec.db", tmp_path / "recorder.log"
    t = Topics(prefix)
    proc = start_recorder(broker.url, prefix, db, log)
    stream = Stream(broker.url, t)
    try:
        wait_online(db)
        stream.start()
        wait_for(lambda: count(db, "events") >= 100, 20, "100 events recorded")
        kill9(proc)  # in the middle of the stream
        at_kill = stream.count
        wait_for(lambda: stream.count >= at_kill + 100, 20, "100 more published while down")
        mark = online_id(db)
        proc = start_recorder(broker.url, prefix, db, log)
        wait_online(db, after_id=mark)
        wait_for(lambda: stream.count >= at_kill + 200, 20, "more published after restart")
    finally:
        stream.stop()
        proc_alive = proc.poll() is None
    assert proc_alive, log.read_text()[-3000:]
    try:
        wait_for(lambda: count(db, "events") >= len(stream.sent_events)
                 and count(db, "actions") >= len(stream.sent_actions), 20,
                 f"all {len(stream.sent_events)} events and actions")
        events = query(db, "SELECT event_id, phase, severity FROM events")
        actions = query(db, "SELECT action_id, status FROM actions")
        assert len(events) == len(set(events)) and set(events) == stream.sent_events
        assert len(actions) == len(set(actions)) and set(actions) == stream.sent_actions
        # the killed run left a Last Will, which the restarted one recorded
        statuses = [r[0] for r in query(db, "SELECT status FROM component_status WHERE "
                                            "component = 'recorder' ORDER BY id")]
        assert statuses == ["online", "offline", "online"]
        # the recording reads back from the file alone, while the recorder still writes it
        out = io.StringIO()
        assert run_export(db, "actions", "jsonl", out=out, err=io.StringIO()) == 0
        exported = {(o["action_id"], o["status"]) for o in map(json.loads,
                                                              out.getvalue().splitlines())}
        assert exported == stream.sent_actions
        out = io.StringIO()
        assert run_history(db, out=out, err=io.StringIO(), incidents=False) == 0
        assert out.getvalue().count(" raised ") == len(stream.sent_events)
        assert out.getvalue().count("clear_llm_cache  started") == len(stream.sent_actions)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0, log.read_text()[-3000:]


def test_sigkill_while_the_disk_is_locked_loses_nothing(broker: PrivateBroker, prefix: str,
                                                        tmp_path: Path) -> None:
    """What was received but never stored was never acknowledged: the broker resends it."""
    db, log = tmp_path / "rec.db", tmp_path / "recorder.log"
    t = Topics(prefix)
    fast = tmp_path / "fast.toml"
    fast.write_text("[recorder]\nbusy_timeout_s = 0.1\nretry_max_s = 0.3\n")
    proc = start_recorder(broker.url, prefix, db, log, fast)
    pub = Publisher(broker.url)
    try:
        with Collector(broker.url, t.deadletter("recorder")) as warnings:
            wait_online(db)
            locker = sqlite3.connect(db, isolation_level=None)
            locker.execute("BEGIN IMMEDIATE")
            for n in range(30):
                pub.send(t.event("h1", 0), make_event(n).to_json())
            warnings.wait(lambda ms: ms, 15, "the recorder's storage warning")
            kill9(proc)
            locker.execute("ROLLBACK")
            locker.close()
        assert count(db, "events") == 0
        mark = online_id(db)
        proc = start_recorder(broker.url, prefix, db, log, fast)
        wait_online(db, after_id=mark)
        wait_for(lambda: count(db, "events") == 30, 15, "the 30 events, resent by the broker")
    finally:
        pub.close()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(15)


def test_sample_every_downsamples_samples_only(broker: PrivateBroker, pub: Publisher,
                                               prefix: str, tmp_path: Path) -> None:
    """At fleet rates: one sample per GPU per 10 s of event time is stored (and every one that
    says the GPU is lost or carries an XID); every State, Event and Action is kept, and every
    message is acknowledged (the persistent session keeps nothing back)."""
    db = tmp_path / "fleet.db"
    t = Topics(prefix)
    opts = options(broker.url, prefix, db)
    opts.sample_every_s = 10.0
    with running(opts) as rec:
        for seq in range(30):  # 30 s of samples, one a second
            extra: dict[str, object] = {"xids": [13]} if seq == 14 else {}
            pub.send(t.sample("h1", 0), make_sample(seq=seq, ts=NOW + seq, **extra).to_json())
        e = make_event()
        pub.send(t.event("h1", 0), e.to_json())
        pub.send(t.state("h1", 0), make_state().to_json(), retain=True)
        wait_for(lambda: count(db, "events") == 1 and count(db, "states") == 1, 10, "rows")
        wait_for(lambda: rec.stats.acked >= 32, 10, "every message acknowledged")
    seqs = [r[0] for r in query(db, "SELECT seq FROM samples ORDER BY seq")]
    assert seqs == [0, 10, 14, 24]  # every 10 s from the last one stored; the XID one too
    assert rec.stats.downsampled == 26
