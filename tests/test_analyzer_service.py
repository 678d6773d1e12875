"""The analyzer service through a real Mosquitto: the issue's "Done when", dead letters,
restart without re-raising, silence, Home Assistant discovery.

Crafted samples carry their event time in ``ts`` and are published as fast as the broker takes
them: nothing waits in real time for the detectors' windows.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from analyzer.service import run
from gpuheal.broker import PrivateBroker, start_local_broker
from gpuheal.config import AnalyzerConfig, GpuhealConfig
from gpuheal.config.detection import UnavailableConfig
from gpuheal.models import DeadLetter, Event, Sample, State
from gpuheal.mqtt import BrokerURL
from gpuheal.options import AnalyzerOptions, CommonOptions
from gpuheal.topics import Topics
from gpuheal.wire import decode
from tests.factories import (
    HOST,
    T0,
    all_streams,
    check_flap,
    check_frozen,
    check_healthy_busy,
    check_memory_crossings,
    frozen_stream,
    memory_ramp_stream,
    mk,
    of,
    thermal_flap_stream,
)
from tests.support import Collector, publish

QUIET = AnalyzerConfig(unavailable=UnavailableConfig(min_timeout_s=3600.0))
"""No silence events while a test's burst of samples pauses."""


@contextmanager
def analyzer(url: str, prefix: str, config: AnalyzerConfig = QUIET,
             discovery_prefix: str = "homeassistant") -> Iterator[None]:
    """``analyzer.service.run`` in a thread until the block ends; it must stop with 0."""
    common = CommonOptions(broker=url, prefix=prefix, host_name="site",
                           discovery_prefix=discovery_prefix,
                           config=GpuhealConfig(analyzer=config))
    stop = threading.Event()
    result: dict[str, int] = {}
    status = Topics(prefix).status("site", "analyzer")
    with Collector(url, status) as seen:
        before = len([m for m in seen.snapshot() if m.payload == b"online"])
        thread = threading.Thread(
            target=lambda: result.setdefault("rc", run(AnalyzerOptions(common), stop)))
        thread.start()
        try:
            seen.wait(lambda ms: len([m for m in ms if m.payload == b"online"]) > before,
                      what="analyzer online")
            yield
        finally:
            stop.set()
            thread.join(10)
    assert not thread.is_alive() and result.get("rc") == 0


def publish_samples(url: str, topics: Topics, samples: list[Sample], paced: bool = False) -> None:
    """Publish samples in order (QoS 1); ``paced``: one at a time, each acknowledged first."""
    broker = BrokerURL.parse(url)
    client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        infos = []
        for s in samples:
            info = client.publish(topics.sample(s.host, s.index), s.to_json(), qos=1)
            if paced:
                info.wait_for_publish(5)
            infos.append(info)
        for info in infos:
            info.wait_for_publish(10)
            assert info.is_published()
    finally:
        client.disconnect()
        client.loop_stop()


def final_states_seen(col: Collector, samples: list[Sample]) -> None:
    """Wait until every GPU's State for its last sample is on the wire."""
    last = {(s.host, s.index): s.ts for s in samples}

    def done(_: Any) -> bool:
        got = {(p["host"], p["index"]): p["ts"] for p in col.payloads("/state")}
        return all(got.get(k, -1) >= ts for k, ts in last.items())

    col.wait(done, timeout_s=30, what="final states")


def events_of(col: Collector) -> list[Event]:
    return [decode(Event, m.payload) for m in col.on("/event")]


def run_streams(url: str, prefix: str, samples: list[Sample], paced: bool) -> list[Event]:
    topics = Topics(prefix)
    with Collector(url, [topics.gpu_pattern("event"), topics.gpu_pattern("state")]) as col, \
            analyzer(url, prefix):
        publish_samples(url, topics, samples, paced=paced)
        final_states_seen(col, samples)
    return events_of(col)


def test_done_when_streams_through_the_broker_and_replay(broker: PrivateBroker,
                                                           prefix: str) -> None:
    samples = all_streams()
    first = run_streams(broker.url, prefix, samples, paced=False)
    _, freeze_ts = frozen_stream()
    check_frozen(of(first, "gpu_hang", 0), freeze_ts)
    check_healthy_busy(of(first, "gpu_hang", 1))
    check_flap(of(first, "thermal_throttling", 2))
    check_memory_crossings(of(first, "out_of_memory", 3), memory_ramp_stream())

    # the same ts stream again, to a fresh prefix and another analyzer, one sample at a time
    replay = run_streams(broker.url, prefix + "_replay", samples, paced=True)

    def key(e: Event) -> tuple[Any, ...]:
        return (e.event_id, e.phase, e.severity, e.ts, e.index)

    assert sorted(map(key, replay)) == sorted(map(key, first))
    assert len(first) >= 5


def test_invalid_payloads_go_to_the_dead_letter_topic_and_the_analyzer_stays_up(
        broker: PrivateBroker, prefix: str) -> None:
    topics = Topics(prefix)
    url = broker.url
    with Collector(url, [topics.deadletter("analyzer"), topics.gpu_pattern("state"),
                         topics.status("site", "analyzer")]) as col, analyzer(url, prefix):
        good = mk(T0, 1)
        publish(url, topics.sample("node1", 0), b"not json at all")
        publish(url, topics.sample("node1", 0),
                good.to_json().replace(b'"temperature_c":55.0', b'"temperature_c":NaN'))
        publish(url, topics.sample("node1", 0), b'{"v": 1, "host": "node1"}')
        publish(url, topics.sample("other", 7), good.to_json())          # topic mismatch
        col.wait(lambda ms: len([m for m in ms if "/deadletter/" in m.topic]) >= 4,
                 what="four dead letters")
        publish(url, topics.sample("node1", 0), good.to_json())
        col.wait(lambda ms: any(m.topic.endswith("/state") for m in ms), what="a state")
        letters = [decode(DeadLetter, m.payload) for m in col.on("/deadletter/analyzer")]
        reasons = [d.reason for d in letters]
        assert reasons[0].startswith("not JSON")
        assert "finite" in reasons[1] or "NaN" in reasons[1] or "invalid" in reasons[1]
        assert reasons[2].startswith("invalid Sample")
        assert reasons[3].startswith("topic mismatch")
        assert all(d.component == "analyzer" for d in letters)
        assert col.on("/analyzer/status")[-1].payload == b"online"


def test_restarted_analyzer_continues_conditions_without_reraising(
        broker: PrivateBroker, prefix: str) -> None:
    topics = Topics(prefix)
    url = broker.url
    flap = thermal_flap_stream(index=0)
    cool = mk(flap[-1].ts + 5, 500, index=0, temperature_c=70.0)
    with Collector(url, [topics.gpu_pattern("event"), topics.gpu_pattern("state")]) as col:
        with analyzer(url, prefix):
            publish_samples(url, topics, flap[:10])
            final_states_seen(col, flap[:10])
        first_run = events_of(col)
        a_started = col.payloads("/state")[-1]["analyzer_started_ts"]
        with analyzer(url, prefix):
            publish_samples(url, topics, [*flap[10:], cool])
            final_states_seen(col, [cool])
        events = events_of(col)
    raised = of(first_run, "thermal_throttling")
    assert [e.phase for e in raised] == ["raised"]
    second_run = events[len(first_run):]
    assert [(e.phase, e.event_id) for e in second_run] == [("cleared", raised[0].event_id)]
    states = [decode(State, m.payload) for m in col.on("/state")]
    b_states = [s for s in states if s.analyzer_started_ts != a_started]
    assert b_states and b_states[0].analyzer_started_ts > a_started
    assert b_states[0].active[0].event_id == raised[0].event_id


def test_silent_gpu_becomes_unavailable_and_returns(broker: PrivateBroker, prefix: str) -> None:
    topics = Topics(prefix)
    url = broker.url
    config = AnalyzerConfig(unavailable=UnavailableConfig(missed_intervals=3, min_timeout_s=0.5))
    samples = [mk(T0 + k, k) for k in range(4)]
    with Collector(url, [topics.gpu_pattern("event"), topics.gpu_pattern("state")]) as col, \
            analyzer(url, prefix, config):
        publish_samples(url, topics, samples, paced=True)
        col.wait(lambda _: of(events_of(col), "unavailable"), timeout_s=10,
                 what="unavailable raised")
        publish_samples(url, topics, [mk(T0 + 10, 10)])
        col.wait(lambda _: len(of(events_of(col), "unavailable")) == 2, what="cleared")
    raised, cleared = of(events_of(col), "unavailable")
    assert (raised.phase, cleared.phase) == ("raised", "cleared")
    assert raised.event_id == cleared.event_id and raised.ts > T0 + 3
    assert any(p["health"] == "unavailable" for p in col.payloads("/state"))


def test_home_assistant_discovery_is_retained_and_republished(broker: PrivateBroker,
                                                             prefix: str) -> None:
    topics = Topics(prefix, f"ha_{prefix}")
    url = broker.url
    pattern = f"ha_{prefix}/+/+/config"
    with Collector(url, pattern) as col, analyzer(url, prefix, discovery_prefix=f"ha_{prefix}"):
        publish_samples(url, topics, [mk(T0, 1), mk(T0 + 1, 2)])
        col.wait(lambda ms: len(ms) >= 10, what="discovery configs")
        publish(url, topics.ha_status(), b"online")
        col.wait(lambda ms: len(ms) >= 20, what="discovery re-published")
    platforms = sorted({m.topic.split("/")[1] for m in col.snapshot()})
    assert platforms == ["binary_sensor", "button", "sensor", "switch"]
    assert len({m.topic for m in col.snapshot()}) == 10  # 8 for the GPU, 2 for its healer
    # retained: a new subscriber gets them all at once
    with Collector(url, pattern) as late:
        late.wait(lambda ms: len(ms) == 10, what="retained discovery")
        assert all(m.retain for m in late.snapshot())


def test_discovery_is_republished_after_a_reconnect(tmp_path: Path, prefix: str) -> None:
    first = start_local_broker(tmp_path / "first")
    second: PrivateBroker | None = None
    topics = Topics(prefix, f"ha_{prefix}")
    pattern = f"ha_{prefix}/+/+/config"
    try:
        with analyzer(first.url, prefix, discovery_prefix=f"ha_{prefix}"):
            publish_samples(first.url, topics, [mk(T0, 1)])
            with Collector(first.url, pattern) as col:
                col.wait(lambda ms: len(ms) == 10, what="discovery on the first broker")
            first.stop()
            # a new, empty broker on the same port: the analyzer reconnects and re-announces
            second = start_local_broker(tmp_path / "second", port=first.port)
            with Collector(second.url, pattern) as col:
                col.wait(lambda ms: len(ms) == 10, timeout_s=30,
                         what="discovery re-published after the reconnect")
    finally:
        first.stop()
        if second is not None:
            second.stop()


def test_a_forgotten_gpu_is_not_announced_again(broker: PrivateBroker, prefix: str) -> None:
    """``gpuheal status --forget`` deletes a GPU's retained State: the analyzer drops the GPU,
    so Home Assistant's next birth message brings back only the GPUs still there."""
    topics = Topics(prefix, f"ha_{prefix}")
    url = broker.url
    with analyzer(url, prefix, discovery_prefix=f"ha_{prefix}"):
        publish_samples(url, topics, [mk(T0, 1, index=0), mk(T0, 1, index=1)])
        with Collector(url, [topics.state(HOST, 0), topics.state(HOST, 1)]) as states:
            states.wait(lambda ms: {m.topic for m in ms} == {topics.state(HOST, 0),
                                                            topics.state(HOST, 1)},
                        what="both retained States")
        with Collector(url, f"ha_{prefix}/+/+/config") as again:
            again.wait(lambda ms: any("_gpu_0_" in m.topic for m in ms)
                       and any("_gpu_1_" in m.topic for m in ms), what="retained configs")
            publish(url, topics.state(HOST, 0), b"", retain=True)  # forgotten
            publish(url, topics.ha_status(), b"online")  # HA restarts: re-announce
            # the analyzer re-announces GPU after GPU in index order: once GPU 1's configs
            # are back, GPU 0's would have been sent before them
            again.wait(lambda ms: any("_gpu_1_" in m.topic and not m.retain for m in ms),
                       what="GPU 1 announced again")
            gpu0 = [m.topic for m in again.snapshot() if "_gpu_0_" in m.topic and not m.retain]
            assert gpu0 == []
