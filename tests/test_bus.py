"""The one way in and out of the bus: typed subscriptions, one parse path, one dead-letter
path, status with reasons, reconnects, refusals — against a real Mosquitto."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from gpuheal.models import HealerSet, Sample, Status
from gpuheal.mqtt import Bus, Received, describe_connect_error
from gpuheal.net import free_port
from gpuheal.topics import Topics
from tests.support import Collector, publish, wait_for

SAMPLE = (b'{"v":1,"host":"h1","index":2,"source":"sim","ts":1700000000.0,"seq":3,'
          b'"temperature_c":51.0,"future_field":{"x":[1]}}')


def test_a_handler_gets_a_parsed_paho_free_message(broker, prefix) -> None:
    topics = Topics(prefix)
    got: list[Received[Sample]] = []
    bus = Bus(broker.url, "analyzer", "h1", topics)
    bus.subscribe(topics.gpu_pattern("sample"), Sample, got.append)
    assert bus.start(wait_s=5)
    try:
        publish(broker.url, topics.sample("h1", 2), SAMPLE)
        wait_for(lambda: got, what="a received sample")
    finally:
        bus.stop()
    r = got[0]
    assert isinstance(r.message, Sample) and r.message.temperature_c == 51.0
    assert (r.parts.host, r.parts.index, r.parts.kind) == ("h1", 2, "sample")
    assert r.retain is False and r.qos == 1 and r.received_ts > 1.7e9
    assert "paho" not in type(r).__module__
    try:
        r.message = None  # type: ignore[misc]
    except AttributeError:
        pass
    else:
        raise AssertionError("Received must be frozen")


def test_invalid_payloads_never_reach_a_handler_and_go_to_the_dead_letter_topic(
        broker, prefix) -> None:
    topics = Topics(prefix)
    got: list[Received[Sample]] = []
    bad = {
        b"not json": "not JSON",
        SAMPLE.replace(b'"index":2', b'"index":true'): "invalid Sample: index",
        SAMPLE.replace(b'"seq":3', b'"seq":"3"'): "invalid Sample: seq",
        SAMPLE.replace(b'"temperature_c":51.0', b'"temperature_c":NaN'): "not JSON",
        SAMPLE.replace(b'"source":"sim"', b'"source":"sim","available":"no"'):
            "invalid Sample: available",
        SAMPLE.replace(b'"host":"h1"', b'"host":"h9"'): "topic mismatch",
    }
    with Collector(broker.url, topics.deadletter_pattern()) as watch:
        bus = Bus(broker.url, "analyzer", "h1", topics)
        bus.subscribe(topics.gpu_pattern("sample"), Sample, got.append)
        assert bus.start(wait_s=5)
        try:
            for payload in bad:
                publish(broker.url, topics.sample("h1", 2), payload)
            watch.wait(lambda ms: len(ms) >= len(bad), what="every dead letter")
            letters = watch.snapshot()
        finally:
            bus.stop()
    assert got == []
    reasons = [m.json()["reason"] for m in letters]
    for reason, expected in zip(reasons, bad.values(), strict=True):
        assert reason.startswith(expected), (reason, expected)
    assert bus.deadletter_count == len(bad)


def test_reconnect_resubscribes_and_reruns_the_hooks(broker, prefix) -> None:
    topics = Topics(prefix)
    got: list[Received[HealerSet]] = []
    hooks: list[int] = []
    with Collector(broker.url, f"{prefix}/#") as watch:
        bus = Bus(broker.url, "healer", "h1", topics)
        bus.subscribe(topics.healer_set("h1"), HealerSet, got.append)
        bus.on_connected(lambda: hooks.append(1))
        assert bus.start(wait_s=5)
        watch.wait(lambda ms: any(m.topic == topics.status("h1", "healer")
                                  and m.payload == b"online" for m in ms), what="online")
        publish(broker.url, topics.healer_set("h1"), b'{"enabled": false}')
        wait_for(lambda: got, what="handler call")
        bus.client._sock_close()  # a network drop: paho reconnects by itself
        wait_for(lambda: len(hooks) >= 2, what="re-announce after reconnect")
        publish(broker.url, topics.healer_set("h1"), b'{"enabled": true}')
        wait_for(lambda: len(got) >= 2, what="handler after reconnect")
        bus.stop()
        watch.wait(lambda ms: ms[-1].topic == topics.status("h1", "healer")
                   and ms[-1].payload == b"offline", what="offline on clean stop")
    assert [r.message.enabled for r in got] == [False, True]


def test_a_handler_bug_is_logged_and_the_bus_goes_on(broker, prefix) -> None:
    topics = Topics(prefix)
    calls: list[int] = []

    def boom(_received: Received[HealerSet]) -> None:
        calls.append(1)
        raise RuntimeError("handler bug")

    bus = Bus(broker.url, "healer", "h1", topics)
    bus.subscribe(topics.healer_set("h1"), HealerSet, boom)
    assert bus.start(wait_s=5)
    try:
        publish(broker.url, topics.healer_set("h1"), b"{}")
        publish(broker.url, topics.healer_set("h1"), b"{}")
        wait_for(lambda: bus.stats.handler_errors == 2, what="both errors counted")
        assert bus.connected and len(calls) == 2
    finally:
        bus.stop()


BUS_CHILD = textwrap.dedent("""
    import sys, threading
    from gpuheal.mqtt import Bus
    from gpuheal.topics import Topics
    bus = Bus(sys.argv[1], "publisher", "h1", Topics(sys.argv[2]))
    assert bus.start(wait_s=5)
    print("up", flush=True)
    threading.Event().wait()
""")


def test_status_says_why_a_component_went_offline(broker, prefix, tmp_path: Path) -> None:
    """A clean stop says ``stopped``; a killed process's Last Will says ``lost`` (MQTT v5 user
    property ``gpuheal-reason``): the analyzer tells a goodbye from a crash by it."""
    topics = Topics(prefix)
    seen: list[Status] = []
    watcher = Bus(broker.url, "analyzer", "w", topics, announce_status=False)
    watcher.subscribe(topics.status_pattern("h1", "publisher"), Status,
                      lambda r: seen.append(r.message))
    assert watcher.start(wait_s=5)
    try:
        clean = Bus(broker.url, "publisher", "h1", topics, keepalive_s=5)
        assert clean.start(wait_s=5)
        wait_for(lambda: any(s.value == "online" for s in seen), what="online")
        clean.stop()
        wait_for(lambda: seen[-1].value == "offline", what="clean offline")
        assert seen[-1].reason == "stopped"
        child = subprocess.Popen([sys.executable, "-c", BUS_CHILD, broker.url, prefix],
                                 stdout=subprocess.PIPE, env=dict(os.environ))
        assert child.stdout is not None and child.stdout.readline() == b"up\n"
        wait_for(lambda: seen[-1].value == "online", what="child online")
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        wait_for(lambda: seen[-1].value == "offline", 60, what="the Last Will")
        assert seen[-1].reason == "lost"
    finally:
        watcher.stop()


def test_connection_failures_are_one_clear_line(tmp_path: Path) -> None:
    port = free_port()
    bus = Bus(f"mqtt://127.0.0.1:{port}", "recorder", "h1")
    assert not bus.start(wait_s=1.5)
    bus.stop()
    assert bus.last_connect_error == f"cannot reach broker 127.0.0.1:{port} (connection refused)"
    import ssl

    from gpuheal.mqtt import BrokerURL

    tls = describe_connect_error(BrokerURL.parse("mqtts://h:1883"),
                                 ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version"))
    assert "use mqtt://" in tls


def test_rejected_credentials_fail_fast(tmp_path: Path) -> None:
    from gpuheal.broker import start_broker
    from gpuheal.broker_init import init_broker

    port = free_port()
    init = init_broker(tmp_path / "b", port)
    broker = start_broker(init.conf_path, port, tmp_path / "m.log")
    try:
        bus = Bus(f"mqtt://recorder:wrong@127.0.0.1:{port}", "recorder", "h1")
        t0 = time.monotonic()
        assert not bus.start(wait_s=30)  # returns as soon as the broker says no
        waited = time.monotonic() - t0
        bus.stop()
        assert bus.auth_failed and waited < 30
        assert bus.last_connect_error == (f"broker 127.0.0.1:{port} rejected user 'recorder' "
                                          "(Not authorized)")
    finally:
        broker.stop()


def test_a_second_publisher_for_the_same_host_takes_over_and_the_first_stops(
        broker, prefix, gpuheal_cmd) -> None:
    """Two publishers claiming one host name are reported, never silently interleaved: the
    newest takes the session over, the first says so and exits 1."""
    base = [*gpuheal_cmd, "publisher", "--broker", broker.url, "--prefix", prefix,
            "--host-name", "twin", "--source", "sim", "--scenario", "healthy", "--speed", "20"]
    with Collector(broker.url, f"{prefix}/twin/publisher/status") as status:
        first = subprocess.Popen(base, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True)
        status.wait(lambda ms: any(m.payload == b"online" for m in ms), 20, "first online")
        second = subprocess.Popen(base, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True)
        try:
            out, _ = first.communicate(timeout=30)
            assert first.returncode == 1, out
            assert "another publisher started for host twin and took over" in out
            assert second.poll() is None  # the newest goes on
        finally:
            second.send_signal(signal.SIGTERM)
            second.wait(20)
            if first.poll() is None:
                first.kill()
