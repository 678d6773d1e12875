"""The fleet simulator (``bench/fleet_sim.py``) speaks the wire contract, on a real Mosquitto.

What it publishes is decoded the one way every component decodes (``gpuheal.wire.decode``)
and checked against its topic (``topic_mismatch``); its hosts announce themselves the way
publishers do (retained status, Last Will with ``gpuheal-reason``), so real sharded analyzers
discover and serve them, and a real healer's simulator commands cool an incident down.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from gpuheal.broker import PrivateBroker
from gpuheal.models import Sample, Status
from gpuheal.options import shard_of
from gpuheal.topics import Topics
from gpuheal.wire import STATUS_REASON_PROPERTY, decode, topic_mismatch
from tests.support import REPO, wait_for

FLEET_SIM = REPO / "bench" / "fleet_sim.py"


def load_fleet_sim() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fleet_sim", FLEET_SIM)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["fleet_sim"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


class Wire:
    """A bare paho subscriber that keeps topic, payload, retain flag and user properties."""

    def __init__(self, port: int, pattern: str) -> None:
        self.messages: list[tuple[str, bytes, bool, dict[str, str]]] = []
        self._lock = threading.Lock()
        subscribed = threading.Event()
        self.client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                                  protocol=paho.MQTTv5)

        def on_message(_c: Any, _u: Any, m: Any) -> None:
            props = dict(getattr(m.properties, "UserProperty", None) or [])
            with self._lock:
                self.messages.append((m.topic, bytes(m.payload), bool(m.retain), props))

        self.client.on_message = on_message
        self.client.on_connect = lambda c, *_a: c.subscribe(pattern, qos=1)
        self.client.on_subscribe = lambda *_a: subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert subscribed.wait(10), "no SUBACK"

    def snapshot(self) -> list[tuple[str, bytes, bool, dict[str, str]]]:
        with self._lock:
            return list(self.messages)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def run_sim(url: str, prefix: str, tmp: Path, *args: str) -> dict[str, Any]:
    report = tmp / "fleet.json"
    done = subprocess.run([sys.executable, str(FLEET_SIM), "--broker", url, "--prefix", prefix,
                           "--report", str(report), "--start-delay", "0.2", *args],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr
    return json.loads(report.read_text())


def retained_statuses(port: int, prefix: str, hosts: int) -> dict[str, tuple[bytes, str | None]]:
    """What a newcomer gets: each host's retained publisher status and its reason."""
    late = Wire(port, Topics(prefix).status_pattern(None, "publisher"))
    try:
        wait_for(lambda: len(late.snapshot()) >= hosts, 10, "the retained statuses")
        return {t.split("/")[1]: (p, props.get(STATUS_REASON_PROPERTY))
                for t, p, retain, props in late.snapshot() if retain}
    finally:
        late.close()


def test_everything_it_publishes_is_a_valid_message_of_its_topic(
        fresh_broker: PrivateBroker, tmp_path: Path) -> None:
    prefix = "fleet"
    topics = Topics(prefix)
    wire = Wire(fresh_broker.port, f"{prefix}/#")
    try:
        report = run_sim(fresh_broker.url, prefix, tmp_path, "--hosts", "3", "--gpus", "2",
                         "--interval", "0.1", "--seconds", "3", "--incident-hosts", "1",
                         "--first-incident", "0.2", "--incident-every", "100",
                         "--incident-tau", "0.3")
        wait_for(lambda: sum(1 for t, *_ in wire.snapshot() if t.endswith("/sample"))
                 >= report["published"], 10, "every sample")
    finally:
        wire.close()
    samples: dict[str, list[Sample]] = {}
    statuses: dict[str, list[Status]] = {}
    for topic, payload, _retain, props in wire.snapshot():
        parts = topics.parse(topic)
        assert parts is not None, topic
        if parts.kind == "sample":
            message: Sample | Status = decode(Sample, payload)
            samples.setdefault(f"{parts.host}/{parts.index}", []).append(message)
        else:
            assert (parts.kind, parts.component) == ("status", "publisher"), topic
            message = decode(Status, payload, status_reason=props.get(STATUS_REASON_PROPERTY))
            statuses.setdefault(str(parts.host), []).append(message)
        assert topic_mismatch(parts, message) is None, topic

    assert report["published"] == sum(len(s) for s in samples.values()) >= 6 * 20
    assert set(samples) == set(report["per_gpu"]) == {f"fleet00{h}/{i}" for h in range(3)
                                                      for i in range(2)}
    for key, series in samples.items():
        # one publisher run per host: seq counts from 0 without a gap, in order
        assert [s.seq for s in series] == list(range(report["per_gpu"][key])), key
        assert all(a.ts <= b.ts for a, b in itertools.pairwise(series)), key
        for s in series:
            assert s.source == "sim" and s.available and s.name == "NVIDIA H100 80GB HBM3"
            assert s.uuid and s.uuid == series[0].uuid
            assert 0 <= s.utilization_pct < 99  # below the hang detector's saturation
            assert 0 < s.memory_used_mb < s.memory_total_mb * 0.9  # below the memory warning
            assert 0 < s.power_draw_w <= s.power_limit_w
            assert 20 < s.temperature_c < 95 and s.host_boot_ts is not None
    # the incident heated fleet000's GPU 0 over the thermal warning; the others stayed cool
    assert max(s.temperature_c for s in samples["fleet000/0"]) >= 83
    assert all(s.temperature_c < 80 for k, v in samples.items() if k != "fleet000/0"
               for s in v)
    # the send time of every sample of the incident host, by its ts as written
    sent = report["sent_at"]["fleet000/0"]
    assert {f"{s.ts:.3f}" for s in samples["fleet000/0"]} == set(sent)
    # every host: online first, a clean goodbye last, and the goodbye stays retained
    for host in ("fleet000", "fleet001", "fleet002"):
        assert [s.value for s in statuses[host]] == ["online", "offline"], host
        assert statuses[host][-1].reason == "stopped"
    assert retained_statuses(fresh_broker.port, prefix, 3) == {
        f"fleet00{h}": (b"offline", "stopped") for h in range(3)}


def test_a_fleet_that_vanishes_leaves_each_hosts_last_will(
        fresh_broker: PrivateBroker, tmp_path: Path) -> None:
    run_sim(fresh_broker.url, "gone", tmp_path, "--hosts", "2", "--gpus", "1",
            "--interval", "0.1", "--seconds", "0.5", "--vanish")
    assert retained_statuses(fresh_broker.port, "gone", 2) == {
        "fleet000": (b"offline", "lost"), "fleet001": (b"offline", "lost")}


def test_sharded_analyzers_discover_and_serve_it_and_a_healer_cools_it(
        fresh_broker: PrivateBroker, tmp_path: Path) -> None:
    """Two ``--shard`` analyzers find the simulated hosts from their retained status and each
    serves its share; the incident GPU's healer throttles it, the simulator obeys, the analyzer
    sees it recover and the healer verifies its action."""
    prefix = "fleet"
    topics = Topics(prefix)
    hosts = [f"fleet00{h}" for h in range(4)]
    assert {shard_of(h, 2) for h in hosts} == {1, 2}
    url = fresh_broker.url
    base = [sys.executable, "-m", "gpuheal"]
    common = ["--broker", url, "--prefix", prefix]
    env = os.environ | {"PYTHONPATH": str(REPO)}
    procs: list[subprocess.Popen[bytes]] = []
    logs = []
    statuses = Wire(fresh_broker.port, topics.status_pattern())
    seen = Wire(fresh_broker.port, f"{prefix}/+/gpu/+/+")
    sim = None
    try:
        for argv, name in (
                ([*base, "analyzer", *common, "--host-name", "site", "--shard", "1/2"], "a1"),
                ([*base, "analyzer", *common, "--host-name", "site", "--shard", "2/2"], "a2"),
                ([*base, "healer", *common, "--host-name", "fleet000", "--source", "sim",
                  "--state-file", str(tmp_path / "healer.json")], "healer")):
            log = tmp_path / f"{name}.log"
            logs.append(log)
            with log.open("wb") as out:
                procs.append(subprocess.Popen(argv, cwd=REPO, env=env, stdout=out,
                                              stderr=subprocess.STDOUT))

        def online() -> bool:
            said = {t: p for t, p, *_ in statuses.snapshot()}
            return all(said.get(f"{prefix}/{who}/status") == b"online" for who in
                       ("site-shard1of2/analyzer", "site-shard2of2/analyzer",
                        "fleet000/healer"))

        wait_for(online, 30, "both shards and the healer online")
        report_path = tmp_path / "fleet.json"
        sim = subprocess.Popen(
            [sys.executable, str(FLEET_SIM), "--broker", url, "--prefix", prefix,
             "--hosts", "4", "--gpus", "2", "--interval", "0.2", "--seconds", "120",
             "--incident-hosts", "1", "--first-incident", "1", "--incident-every", "1000",
             "--incident-tau", "0.5", "--thermal-tau", "1", "--report", str(report_path)],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

        def actions() -> list[dict[str, Any]]:
            return [json.loads(p) for t, p, *_ in seen.snapshot() if t.endswith("/action")]

        wait_for(lambda: any(a["status"] == "verified" for a in actions()), 60,
                 "the healer's throttle verified")
        sim.send_signal(signal.SIGTERM)  # a clean goodbye: offline, reason stopped
        assert sim.wait(30) == 0, sim.stderr.read() if sim.stderr else ""
        report = json.loads(report_path.read_text())
    finally:
        if sim is not None and sim.poll() is None:
            sim.kill()
        for p in procs:
            p.send_signal(signal.SIGTERM)
        codes = [p.wait(30) for p in procs]
        statuses.close()
        seen.close()
    assert codes == [0, 0, 0], [log.read_text()[-2000:] for log in logs]

    states = [json.loads(p) for t, p, *_ in seen.snapshot() if t.endswith("/state") and p]
    writers: dict[tuple[str, int], set[str]] = {}
    for s in states:
        writers.setdefault((s["host"], s["index"]), set()).add(s["analyzer"])
    # every simulated GPU is served, each by the one shard its host hashes to
    assert writers == {(h, i): {f"site-shard{shard_of(h, 2)}of2"} for h in hosts
                       for i in range(2)}
    events = [json.loads(p) for t, p, *_ in seen.snapshot() if t.endswith("/event")]
    assert [(e["host"], e["index"], e["kind"], e["phase"]) for e in events] == [
        ("fleet000", 0, "thermal_throttling", "raised"),
        ("fleet000", 0, "thermal_throttling", "cleared")]
    assert events[1]["cleared_by"] == "recovered"
    assert [(a["action"], a["status"]) for a in actions()] == [
        ("throttle_gpu", "started"), ("throttle_gpu", "succeeded"),
        ("throttle_gpu", "verified")]
    assert {a["event_id"] for a in actions()} == {events[0]["event_id"]}
    # the simulator got the healer's command and ended the incident by it
    assert [(c["host"], c["index"], c["command"]) for c in report["commands"]] == [
        ("fleet000", 0, "set_power_limit")]
    assert report["commands"][0]["power_limit_w"] < 700
    assert [(i["host"], i["index"], i["ended_by"]) for i in report["incidents"]] == [
        ("fleet000", 0, "throttled")]
    # the crossing sample is known by its ts: its send time is in the report
    assert f"{events[0]['started_ts']:.3f}" in report["sent_at"]["fleet000/0"]
