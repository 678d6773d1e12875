"""The pipeline on a second MQTT 5 broker: ejabberd (Debian's 23.01), not only Mosquitto.

gpuheal uses standard MQTT 5 only, so a broker written apart from Mosquitto must carry it.
Against a real ejabberd these tests start (tests/ejabberd_broker.py; skipped with the reason
when it is not installed):

* the closed loop: publisher (simulated hang, 50x), analyzer, healer (simulated actuators) and
  recorder as real processes, ending with a verified GPU reset stored in SQLite;
* the recorder's persistent session: killed with SIGKILL mid-stream and restarted, it loses and
  doubles nothing;
* a restarted analyzer continues the conditions of the retained States (same ``event_id``,
  not raised again);
* the status Last Will: ``offline`` with the ``gpuheal-reason`` user property ``lost`` for a
  killed component, ``stopped`` for a clean goodbye.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from analyzer.service import run as run_analyzer
from gpuheal.config import AnalyzerConfig, GpuhealConfig
from gpuheal.config.detection import UnavailableConfig
from gpuheal.models import Event, Sample, State, Status
from gpuheal.mqtt import BrokerURL, Bus
from gpuheal.options import AnalyzerOptions, CommonOptions
from gpuheal.topics import Topics
from gpuheal.wire import decode
from tests.ejabberd_broker import EjabberdBroker, ejabberd_missing, start_ejabberd
from tests.factories import make_action, make_event, mk, thermal_flap_stream
from tests.support import REPO, Collector, wait_for

pytestmark = pytest.mark.skipif(ejabberd_missing() is not None,
                                reason=ejabberd_missing() or "")

ENV = {k: v for k, v in os.environ.items() if not k.startswith("GPUHEAL_")} | {
    "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def ejabberd() -> Iterator[EjabberdBroker]:
    """One ejabberd for this module; each test has its own topic prefix."""
    broker = start_ejabberd()
    yield broker
    broker.stop()


def gpuheal(tmp: Path, name: str, *args: str) -> subprocess.Popen[bytes]:
    """``python -m gpuheal ARGS`` as a real process, its output in ``tmp/name.log``."""
    with (tmp / f"{name}.log").open("ab") as log:
        return subprocess.Popen([sys.executable, "-m", "gpuheal", *args], cwd=REPO, env=ENV,
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def stop(procs: list[subprocess.Popen[bytes]]) -> list[int]:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    return [p.wait(30) for p in procs]


def rows(db: Path, sql: str) -> list[tuple[Any, ...]]:
    if not db.exists():
        return []
    with closing(sqlite3.connect(db, timeout=5)) as conn:
        try:
            return conn.execute(sql).fetchall()
        except sqlite3.OperationalError:  # not created yet
            return []


class Sender:
    """One paho connection (with the URL's login) that publishes QoS 1, each confirmed."""

    def __init__(self, url: str) -> None:
        b = BrokerURL.parse(url)
        self.client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                                  protocol=paho.MQTTv5)
        self.client.username_pw_set(b.username, b.password)
        self.client.max_inflight_messages_set(100)
        self.client.connect(b.host, b.port)
        self.client.loop_start()

    def send(self, topic: str, payload: bytes, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(10)
        assert info.is_published(), f"the broker did not take {topic}"

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_closed_loop_heals_a_hang_and_records_the_verified_reset(
        ejabberd: EjabberdBroker, prefix: str, tmp_path: Path) -> None:
    db = tmp_path / "loop.db"
    common = ["--broker", ejabberd.url, "--prefix", prefix, "--host-name", "simhost",
              "--log-level", "WARNING"]
    procs = [gpuheal(tmp_path, "recorder", "recorder", *common, "--db", str(db)),
             gpuheal(tmp_path, "analyzer", "analyzer", *common),
             gpuheal(tmp_path, "healer", "healer", *common, "--source", "sim",
                     "--state-file", str(tmp_path / "healer.json"))]
    try:
        with Collector(ejabberd.url, [f"{prefix}/#"]) as watch:
            watch.wait(lambda ms: {m.topic.split("/")[2] for m in ms if m.payload == b"online"}
                       >= {"recorder", "analyzer", "healer"}, 30, "three components online")
            procs.append(gpuheal(tmp_path, "publisher", "publisher", *common, "--source", "sim",
                                 "--scenario", "hang", "--speed", "50"))

            def actions() -> list[tuple[str, str]]:
                return [(a["action"], a["status"]) for a in watch.payloads("/action")]

            watch.wait(lambda _: ("reset_gpu", "verified") in actions(), 90,
                       "the GPU reset verified")
        # the recorder stored the whole story, up to the healthy State after the reset
        # (ejabberd keeps one QoS 1 message in flight per subscriber, whatever its Receive
        # Maximum, and the recorder acknowledges each only once committed: it trails)
        wait_for(lambda: ("reset_gpu", "verified") in rows(db, "SELECT action, status FROM "
                                                               "actions")
                 and rows(db, "SELECT health FROM states") == [("healthy",)],
                 60, "the verified reset and the healthy State in SQLite")
    finally:
        codes = stop(procs)
    assert codes == [0, 0, 0, 0], [(tmp_path / f"{n}.log").read_text()[-2000:] for n in
                                   ("recorder", "analyzer", "healer", "publisher")]
    actions = rows(db, "SELECT action, status FROM actions ORDER BY id")
    assert [a for a in actions if a[0] == "reset_gpu"] == [
        ("reset_gpu", "started"), ("reset_gpu", "succeeded"), ("reset_gpu", "verified")]
    events = rows(db, "SELECT kind, severity, phase FROM events WHERE kind = 'gpu_hang'")
    assert ("gpu_hang", "critical", "escalated") in events or \
        ("gpu_hang", "critical", "raised") in events, events
    assert ("gpu_hang", "critical", "cleared") in events
    assert rows(db, "SELECT COUNT(*) FROM samples")[0][0] > 50
    assert rows(db, "SELECT COUNT(*) FROM deadletter")[0][0] == 0


def test_recorder_killed_mid_stream_loses_and_doubles_nothing(
        ejabberd: EjabberdBroker, prefix: str, tmp_path: Path) -> None:
    db = tmp_path / "rec.db"
    t = Topics(prefix)
    argv = ["recorder", "--broker", ejabberd.url, "--prefix", prefix, "--host-name", "rec",
            "--db", str(db), "--client-id", f"rec-{prefix}", "--log-level", "WARNING"]

    def online_after(mark: int) -> bool:
        return bool(rows(db, "SELECT id FROM component_status WHERE component = 'recorder' "
                             f"AND status = 'online' AND id > {mark}"))

    sent_events: set[tuple[str, str, str]] = set()
    sent_actions: set[tuple[str, str]] = set()
    halt = threading.Event()
    errors: list[BaseException] = []
    count = [0]

    def stream() -> None:
        sender = Sender(ejabberd.url)
        try:
            n = 0
            while not halt.is_set():
                e: Event = make_event(n, host=f"h{n % 3}", index=n % 2)
                a = make_action(e, "started")
                sender.send(t.event(e.host, e.index), e.to_json())
                sender.send(t.action(a.host, a.index), a.to_json())
                if n % 5 == 0:  # the same event again: stored once
                    sender.send(t.event(e.host, e.index), e.to_json())
                sent_events.add((e.event_id, e.phase, e.severity))
                sent_actions.add((a.action_id, a.status))
                n += 1
                count[0] = n
                # a steady stream the recorder keeps up with on ejabberd, which keeps one
                # QoS 1 message in flight per subscriber: one per commit
                halt.wait(0.1)
        except BaseException as exc:  # reported by the test
            errors.append(exc)
        finally:
            sender.close()

    proc = gpuheal(tmp_path, "recorder", *argv)
    writer = threading.Thread(target=stream, daemon=True)
    try:
        wait_for(lambda: online_after(0), 20, "the recorder online")
        writer.start()
        wait_for(lambda: len(rows(db, "SELECT 1 FROM events")) >= 20, 30, "20 events stored")
        proc.send_signal(signal.SIGKILL)  # mid-stream
        assert proc.wait(10) == -signal.SIGKILL
        at_kill = count[0]
        wait_for(lambda: count[0] >= at_kill + 20, 30, "20 more published while it is down")
        mark = rows(db, "SELECT MAX(id) FROM component_status")[0][0]
        proc = gpuheal(tmp_path, "recorder", *argv)
        wait_for(lambda: online_after(mark), 20, "the restarted recorder online")
        wait_for(lambda: count[0] >= at_kill + 40, 30, "more published after the restart")
    finally:
        halt.set()
        writer.join(20)
    assert not errors, errors
    try:
        wait_for(lambda: len(rows(db, "SELECT 1 FROM events")) >= len(sent_events)
                 and len(rows(db, "SELECT 1 FROM actions")) >= len(sent_actions), 60,
                 f"all {len(sent_events)} events and {len(sent_actions)} actions stored")
        events = rows(db, "SELECT event_id, phase, severity FROM events")
        actions = rows(db, "SELECT action_id, status FROM actions")
        assert len(events) == len(set(events)) and set(events) == sent_events
        assert len(actions) == len(set(actions)) and set(actions) == sent_actions
        # the killed run's Last Will reached the restarted recorder through its session
        statuses = [r[0] for r in rows(db, "SELECT status FROM component_status WHERE "
                                           "component = 'recorder' ORDER BY id")]
        assert statuses == ["online", "offline", "online"]
    finally:
        assert stop([proc]) == [0], (tmp_path / "recorder.log").read_text()[-3000:]


QUIET = AnalyzerConfig(unavailable=UnavailableConfig(min_timeout_s=3600.0))


def run_analyzer_while(url: str, prefix: str, samples: list[Sample], seen: Collector) -> None:
    """The analyzer in a thread: online, fed ``samples`` (QoS 1), until it published the
    State of the last one; it must stop with 0."""
    common = CommonOptions(broker=url, prefix=prefix, host_name="site",
                           config=GpuhealConfig(analyzer=QUIET))
    t = Topics(prefix)
    halt = threading.Event()
    result: list[int] = []
    before = sum(1 for m in seen.on("/analyzer/status") if m.payload == b"online")
    thread = threading.Thread(target=lambda: result.append(
        run_analyzer(AnalyzerOptions(common), halt)))
    thread.start()
    try:
        seen.wait(lambda _: sum(1 for m in seen.on("/analyzer/status")
                                if m.payload == b"online") > before, 20, "analyzer online")
        sender = Sender(url)
        try:
            for s in samples:
                sender.send(t.sample(s.host, s.index), s.to_json())
        finally:
            sender.close()
        last = samples[-1].ts
        seen.wait(lambda _: any(p["ts"] >= last for p in seen.payloads("/state")), 20,
                  "the State of the last sample")
    finally:
        halt.set()
        thread.join(15)
    assert result == [0]


def test_restarted_analyzer_continues_the_retained_conditions(
        ejabberd: EjabberdBroker, prefix: str) -> None:
    t = Topics(prefix)
    flap = thermal_flap_stream(index=0)
    cool = mk(flap[-1].ts + 5, 500, index=0, temperature_c=70.0)
    with Collector(ejabberd.url, [t.gpu_pattern("event"), t.gpu_pattern("state"),
                                  t.status_pattern()]) as seen:
        run_analyzer_while(ejabberd.url, prefix, flap[:10], seen)
        first_run = [decode(Event, m.payload) for m in seen.on("/event")]
        started_a = seen.payloads("/state")[-1]["analyzer_started_ts"]
        run_analyzer_while(ejabberd.url, prefix, [*flap[10:], cool], seen)
        events = [decode(Event, m.payload) for m in seen.on("/event")]
        states = [decode(State, m.payload) for m in seen.on("/state") if m.payload]
    raised = [e for e in first_run if e.kind == "thermal_throttling"]
    assert [e.phase for e in raised] == ["raised"]
    second_run = events[len(first_run):]
    # the retained State carried the condition over: cleared by the new run, never re-raised
    assert [(e.phase, e.event_id) for e in second_run] == [("cleared", raised[0].event_id)]
    later = [s for s in states if s.analyzer_started_ts != started_a]
    assert later and later[0].analyzer_started_ts > started_a
    assert later[0].active[0].event_id == raised[0].event_id


BUS_CHILD = """
import sys, threading
from gpuheal.mqtt import Bus
from gpuheal.topics import Topics
bus = Bus(sys.argv[1], "publisher", "h1", Topics(sys.argv[2]))
assert bus.start(wait_s=10)
print("up", flush=True)
threading.Event().wait()
"""


def test_status_last_will_carries_the_reason(ejabberd: EjabberdBroker, prefix: str) -> None:
    """A clean stop says ``stopped``; a killed process's Last Will says ``lost``, both in the
    MQTT v5 user property ``gpuheal-reason`` and retained."""
    t = Topics(prefix)
    seen: list[tuple[Status, bool]] = []
    watcher = Bus(ejabberd.url, "analyzer", "w", t, announce_status=False)
    watcher.subscribe(t.status_pattern("h1", "publisher"), Status,
                      lambda r: seen.append((r.message, r.retain)))
    assert watcher.start(wait_s=10)
    child = None
    try:
        clean = Bus(ejabberd.url, "publisher", "h1", t)
        assert clean.start(wait_s=10)
        wait_for(lambda: seen and seen[-1][0].value == "online", what="online")
        clean.stop()
        wait_for(lambda: seen[-1][0].value == "offline", what="the clean offline")
        assert seen[-1][0].reason == "stopped"
        child = subprocess.Popen([sys.executable, "-c", BUS_CHILD, ejabberd.url, prefix],
                                 stdout=subprocess.PIPE, env=ENV, cwd=REPO)
        assert child.stdout is not None and child.stdout.readline() == b"up\n"
        wait_for(lambda: seen[-1][0].value == "online", what="the child online")
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        wait_for(lambda: seen[-1][0].value == "offline", 60, "the Last Will")
        assert seen[-1][0].reason == "lost"
    finally:
        if child is not None and child.poll() is None:
            child.kill()
        watcher.stop()
    # a newcomer gets the Will retained, reason and all
    late: list[tuple[Status, bool]] = []
    newcomer = Bus(ejabberd.url, "analyzer", "w2", t, announce_status=False)
    newcomer.subscribe(t.status_pattern("h1", "publisher"), Status,
                       lambda r: late.append((r.message, r.retain)))
    assert newcomer.start(wait_s=10)
    try:
        wait_for(lambda: late, 10, "the retained status")
        status, retained = late[0]
        assert (status.value, status.reason, retained) == ("offline", "lost", True)
    finally:
        newcomer.stop()
