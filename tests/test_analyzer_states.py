"""When the analyzer publishes a GPU's retained State, through a real Mosquitto: at once with an
Event, otherwise at most once per ``state_min_interval_s`` of wall time (the newest sample's
State when the interval ends, or when the analyzer stops), and never more than the in-flight
window the broker allows. Its JSON, built without a model, is the model's.

The interval's clock is the service's ``monotonic`` (a test clock here); samples keep their own
event time in ``ts``. Where a test must show that no State came, a hot sample on another GPU
(its Event and State go out at once, on the same connection, after anything before them) is
the sentinel.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from analyzer.engine import Condition, GpuTrack, _health, build_state, state_json
from analyzer.service import AnalyzerService
from gpuheal.broker import PrivateBroker, render_local_config, start_broker
from gpuheal.config import AnalyzerConfig, GpuhealConfig
from gpuheal.config.detection import UnavailableConfig
from gpuheal.models import Sample, State
from gpuheal.net import free_port
from gpuheal.options import AnalyzerOptions, CommonOptions
from gpuheal.runtime import Component
from gpuheal.topics import Topics
from gpuheal.wire import decode
from tests.factories import T0, mk
from tests.support import Collector, Speaker, wait_for


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def config(interval_s: float) -> AnalyzerConfig:
    return AnalyzerConfig(state_min_interval_s=interval_s, ha_discovery=False,
                          unavailable=UnavailableConfig(min_timeout_s=3600.0))


class Running:
    """An analyzer service on its own bus, stopped once (by the test or at the end)."""

    def __init__(self, url: str, prefix: str, cfg: AnalyzerConfig, clock: FakeClock) -> None:
        common = CommonOptions(broker=url, prefix=prefix, host_name="site",
                               config=GpuhealConfig(analyzer=cfg))
        self.svc = AnalyzerService(AnalyzerOptions(common), monotonic=clock)
        self.component = Component(self.svc, common)
        self.stopped = False

    def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            self.component.stop()


@contextmanager
def analyzer(url: str, prefix: str, cfg: AnalyzerConfig,
             clock: FakeClock | None = None) -> Iterator[Running]:
    running = Running(url, prefix, cfg, clock or FakeClock())
    status = Topics(prefix).status("site", "analyzer")
    with Collector(url, status) as seen:
        running.component.start()
        try:
            seen.wait(lambda ms: any(m.payload == b"online" for m in ms), 15, "analyzer online")
            yield running
        finally:
            running.stop()


def send(url: str, topics: Topics, samples: list[Sample]) -> None:
    """Publish samples in order, each acknowledged by the broker (QoS 1)."""
    with Speaker(url) as speaker:
        for s in samples:
            assert not speaker.send(topics.sample(s.host, s.index), s.to_json()).is_failure


def burst(url: str, topics: Topics, samples: list[Sample]) -> None:
    """Publish samples in order without waiting for each (QoS 1), then for all."""
    with Speaker(url) as speaker:
        infos = [speaker.client.publish(topics.sample(s.host, s.index), s.to_json(), qos=1)
                 for s in samples]
        for info in infos:
            info.wait_for_publish(10)
            assert info.is_published()


def states_of(col: Collector, index: int) -> list[State]:
    return [decode(State, m.payload) for m in col.on(f"/gpu/{index}/state") if m.payload]


def test_a_state_at_most_once_per_interval_the_newest_when_it_ends(broker: PrivateBroker,
                                                                     prefix: str) -> None:
    topics = Topics(prefix)
    clock = FakeClock()
    burst = [mk(T0 + 0.1 * k, k, index=0) for k in range(20)]
    col = Collector(broker.url, [topics.gpu_pattern("state"), topics.gpu_pattern("event")])
    with col, analyzer(broker.url, prefix, config(1.0), clock) as running:
        svc = running.svc
        send(broker.url, topics, burst)  # twenty samples within one interval (clock stands)
        wait_for(lambda: svc.engine.stats.processed == 20, 10, "the burst processed")
        # sentinel: GPU 1 runs hot, its Event and State go out at once
        send(broker.url, topics, [mk(T0, 0, index=1, temperature_c=95.0)])
        col.wait(lambda _: states_of(col, 1), 10, "the sentinel's State")
        assert [s.ts for s in states_of(col, 0)] == [T0]  # the first sample's only
        assert svc.state_stats.folded == 18  # 19 waited as one, the newest wins

        clock.now += 1.0  # the interval ends: the newest sample's State goes out
        col.wait(lambda _: len(states_of(col, 0)) == 2, 10, "the newest State")
        assert states_of(col, 0)[-1].ts == burst[-1].ts

        # within the next interval, a condition raised: Event and State at once
        hot = mk(T0 + 2.05, 20, index=0, temperature_c=95.0)
        send(broker.url, topics, [hot])
        col.wait(lambda _: len(states_of(col, 0)) == 3, 10, "the State with the Event")
        state = states_of(col, 0)[-1]
        assert state.ts == hot.ts and state.health != "healthy"
        assert [p["phase"] for p in col.payloads("/gpu/0/event")] == ["raised"]
        warm = mk(T0 + 2.15, 21, index=0, temperature_c=84.0)  # still warning: no change
        send(broker.url, topics, [warm])
        wait_for(lambda: svc.engine.stats.processed == 23, 10, "the last sample processed")
        running.stop()
        # the clean stop published the one that still waited
        col.wait(lambda _: states_of(col, 0)[-1].ts == warm.ts, 10, "the State at stop")
        assert len(states_of(col, 0)) == 4


def test_zero_interval_publishes_every_state_the_window_has_room_for(broker: PrivateBroker,
                                                                     prefix: str) -> None:
    topics = Topics(prefix)
    samples = [mk(T0 + k, k, index=0) for k in range(10)]
    with Collector(broker.url, topics.gpu_pattern("state")) as col, \
            analyzer(broker.url, prefix, config(0.0)), Speaker(broker.url) as speaker:
        for s in samples:  # one at a time: each State out before the next sample
            speaker.send(topics.sample(s.host, s.index), s.to_json())
            col.wait(lambda _, ts=s.ts: any(x.ts == ts for x in states_of(col, 0)), 10,
                     f"the State of {s.ts}")
    assert [s.ts for s in states_of(col, 0)] == [s.ts for s in samples]


def test_the_interval_is_wall_time_divided_by_the_simulation_speed() -> None:
    """``gpuheal up --speed 20`` tells the analyzer its samples come 20 times faster: a State
    at most every 1/20 s of wall time, as often per simulated second as at speed 1."""
    common = CommonOptions(broker="mqtt://127.0.0.1:1", prefix="p", host_name="site",
                           config=GpuhealConfig(analyzer=config(1.0)))
    assert AnalyzerService(AnalyzerOptions(common)).state_interval_s == 1.0
    assert AnalyzerService(AnalyzerOptions(common, speed=20.0)).state_interval_s == 0.05


@pytest.fixture
def small_window_broker(tmp_path: Path) -> Iterator[PrivateBroker]:
    """A Mosquitto that lets a client have only 2 QoS 1 publications in flight (its CONNACK
    Receive Maximum says so)."""
    port = free_port()
    data = tmp_path / "data"
    data.mkdir()
    conf = tmp_path / "mosquitto.conf"
    text = render_local_config(port, data)
    assert "max_inflight_messages 100" in text
    conf.write_text(text.replace("max_inflight_messages 100", "max_inflight_messages 2"))
    b = start_broker(conf, port, tmp_path / "mosquitto.log")
    yield b
    b.stop()


def test_states_never_exceed_the_in_flight_window_and_the_newest_wins(
        small_window_broker: PrivateBroker, prefix: str) -> None:
    """Thirty GPUs, five samples each in a burst, a State wanted for every sample, and a broker
    that allows 2 unacknowledged publications: no State is handed to paho beyond that window
    (the rest wait, newest per GPU), and every GPU's last State arrives."""
    url = small_window_broker.url
    topics = Topics(prefix)
    samples = [mk(T0 + r, r, index=i) for r in range(5) for i in range(30)]
    backlog: list[int] = []
    with Collector(url, topics.gpu_pattern("state")) as col, \
            analyzer(url, prefix, config(0.0)) as running:
        svc = running.svc
        bus = svc.bus
        assert bus is not None and bus.inflight_window == 2  # the broker's Receive Maximum
        publish = bus.publish

        def spying_publish(topic: str, payload: bytes | str, qos: int = 0,
                           retain: bool = False) -> Any:
            if topic.endswith("/state"):  # what paho already holds unacknowledged
                backlog.append(bus.client.unacknowledged())
            return publish(topic, payload, qos, retain)

        bus.publish = spying_publish  # type: ignore[method-assign]
        burst(url, topics, samples)
        col.wait(lambda _: all(any(s.ts == T0 + 4 for s in states_of(col, i))
                               for i in range(30)), 15, "every GPU's last State")
        stats = svc.state_stats
    assert backlog and max(backlog) < 2
    assert stats.waited_for_room > 0 and stats.published < len(samples)
    for i in range(30):  # in order per GPU, never an older State after a newer one
        ts = [s.ts for s in states_of(col, i)]
        assert ts == sorted(ts) and ts[-1] == T0 + 4


# --- the State's JSON without a model -------------------------------------------------------------
def _reading(rnd: random.Random) -> float | None:
    r = rnd.random()
    if r < 0.2:
        return None
    if r < 0.4:
        return rnd.choice([0.0, -0.0, 1e-5, 1.5e-6, 2.5e-10, 9.99e-5, 1e16, 1e21, 123.456,
                           -5.0, 0.1, 1e300, 5e-324, 81559.0, 1700000000.123])
    return rnd.uniform(-1e6, 1e6) * 10 ** rnd.randint(-9, 9)


def test_state_json_is_the_models_json_byte_for_byte() -> None:
    """Thousands of States: readings None or odd floats (pydantic writes 1.5e-05 as 0.000015),
    unicode and control characters in names and messages, zero to three active conditions,
    no sample at all, an analyzer name the model refuses: the same bytes, or the same refusal
    (ValueError), as ``build_state(...).to_json()``; and the same State after ``decode``."""
    rnd = random.Random(13)
    names = [None, "NVIDIA H100 80GB HBM3", "GPU é中😀", 'q"uo\\te\n\t\x01\x7f', "\u2028x", ""]
    kinds = ["thermal_throttling", "out_of_memory", "gpu_hang", "unavailable", "xid_error"]
    cfg = AnalyzerConfig()
    refused = 0
    for i in range(3000):
        track = GpuTrack(f"host-{i % 7}", i % 9, cfg)
        track.uuid, track.name = rnd.choice(names), rnd.choice(names)
        track.source = rnd.choice([None, "sim", "nvml", "replay"])
        for kind in rnd.sample(kinds, rnd.randint(0, 3)):
            track.active[kind] = Condition(
                event_id=f"{rnd.randrange(16 ** 20):020x}", kind=kind,  # type: ignore[arg-type]
                severity=rnd.choice(["warning", "critical", "emergency"]),
                started_ts=rnd.uniform(0, 2e9), message=rnd.choice(["hot", 'é "x"\n', ""]))
        sample = None
        if rnd.random() < 0.85:
            sample = Sample(host=track.host, index=track.index, source="sim", ts=T0, seq=1,
                            temperature_c=_reading(rnd), utilization_pct=_reading(rnd),
                            memory_used_mb=_reading(rnd), memory_total_mb=_reading(rnd),
                            power_draw_w=_reading(rnd), power_limit_w=_reading(rnd),
                            sm_clock_mhz=_reading(rnd), mem_clock_mhz=_reading(rnd),
                            fan_pct=_reading(rnd))
        ts = rnd.choice([rnd.uniform(0, 2e9), 0.0, T0 + 0.9995, 1e-5])
        name = rnd.choice([None, "site", "a-b_c", "site-shard0of2", "bad.name"])
        health, worst = _health(track.active)
        try:
            expected: Any = build_state(track, sample, ts, health, worst, T0 + 0.123,
                                        name).to_json()
        except ValueError:
            expected = ValueError
        try:
            got: Any = state_json(track, sample, ts, health, worst, T0 + 0.123, name)
        except ValueError:
            got = ValueError
        assert got == expected, (track.active, sample, ts, name)
        if expected is ValueError:
            refused += 1
        else:
            assert decode(State, got) == decode(State, expected)
    assert 0 < refused < 3000  # both kinds were exercised
