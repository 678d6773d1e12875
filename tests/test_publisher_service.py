"""The publisher service through a real Mosquitto: Samples on the wire, per-GPU seq, simulator
commands over MQTT, dead letters, failing rounds, replay, and a real ``gpuheal publisher``
process stopped with SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import pairwise
from typing import Any

import pytest

from gpuheal.broker import PrivateBroker, free_port
from gpuheal.models import DeadLetter, Sample, SimCommand
from gpuheal.options import CommonOptions, PublisherOptions
from gpuheal.runtime import Component
from gpuheal.topics import Topics
from publisher import service
from publisher.service import PublisherService, run
from publisher.sources.base import SourceError
from tests.support import Collector, publish, wait_for

HOST = "simhost"


def options(url: str, prefix: str, **kw: Any) -> PublisherOptions:
    common = CommonOptions(broker=url, prefix=prefix, host_name=HOST)
    kw = {"source": "sim", "scenario": "healthy", "speed": 50.0, "interval_s": 1.0} | kw
    return PublisherOptions(common=common, **kw)


@contextmanager
def running(opts: PublisherOptions) -> Iterator[list[int]]:
    """``run(opts, stop)`` in a thread; yields the list its exit code lands in."""
    stop = threading.Event()
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(run(opts, stop)), daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join(timeout=15)
        assert not thread.is_alive(), "the publisher did not stop"


def samples(collector: Collector) -> list[Sample]:
    return [Sample.model_validate_json(m.payload) for m in collector.on("/sample")]


def check_seq(found: list[Sample], indexes: set[int]) -> None:
    by_gpu: dict[int, list[int]] = {}
    for s in found:
        by_gpu.setdefault(s.index, []).append(s.seq)
    assert set(by_gpu) == indexes
    for seqs in by_gpu.values():
        assert seqs == list(range(len(seqs))), "seq starts at 0 and grows by 1 per sample"


def test_samples_on_the_wire(broker: PrivateBroker, prefix: str) -> None:
    topics = Topics(prefix)
    with Collector(broker.url, topics.everything()) as col, \
            running(options(broker.url, prefix, gpus=2)) as result:
        col.wait(lambda ms: len([m for m in ms if m.topic.endswith("/sample")]) >= 20,
                 10, "20 samples")
        assert result == []
    assert result == [0]
    found = samples(col)
    for msg in col.on("/sample"):
        parts = topics.parse(msg.topic)
        sample = Sample.model_validate_json(msg.payload)
        assert parts is not None and parts.kind == "sample" and not msg.retain
        assert (parts.host, parts.index) == (sample.host, sample.index) == (HOST, sample.index)
        assert sample.source == "sim" and sample.name == "NVIDIA Jetson AGX Orin (simulated)"
    check_seq(found, {0, 1})
    first = [s for s in found if s.index == 0]
    assert [round(b.ts - a.ts, 6) for a, b in pairwise(first)] == \
        [1.0] * (len(first) - 1), "1 s of simulated time per round"
    status = [m.payload for m in col.on(f"/{HOST}/publisher/status")]
    assert status[0] == b"online" and status[-1] == b"offline"


def test_count_and_qos_one(broker: PrivateBroker, prefix: str) -> None:
    opts = options(broker.url, prefix, count=5, gpus=3)
    opts.common.config.publisher.sample_qos = 1
    with Collector(broker.url, Topics(prefix).everything()) as col:
        assert run(opts) == 0
        col.wait(lambda ms: len([m for m in ms if m.topic.endswith("/sample")]) == 15, 5,
                 "15 samples")
    check_seq(samples(col), {0, 1, 2})
    assert {m.qos for m in col.on("/sample")} == {1}


def test_sim_commands_over_mqtt_change_the_simulator(broker: PrivateBroker,
                                                     prefix: str) -> None:
    topics = Topics(prefix)
    with Collector(broker.url, topics.everything()) as col, \
            running(options(broker.url, prefix, gpus=2, speed=20.0)):
        col.wait(lambda ms: any(m.topic.endswith("/sample") for m in ms), 10, "a sample")
        command = SimCommand(command="set_power_limit", action_id="a1", power_limit_w=30.0)
        publish(broker.url, topics.sim(HOST, 1), command.to_json())
        col.wait(lambda _: any(s.index == 1 and s.power_limit_w == 30.0
                               for s in samples(col)), 10, "GPU 1 at 30 W")
        publish(broker.url, topics.sim(HOST, 1), SimCommand(command="fan_max",
                                                            action_id="a2").to_json())
        col.wait(lambda _: any(s.index == 1 and s.fan_pct == 100.0 for s in samples(col)),
                 10, "GPU 1 fan at 100 %")
    assert all(s.power_limit_w == 60.0 for s in samples(col) if s.index == 0)


def test_invalid_commands_are_dead_letters_and_the_publisher_stays(
        broker: PrivateBroker, prefix: str) -> None:
    topics = Topics(prefix)
    bad = [
        (topics.sim(HOST, 0), b"not json"),
        (topics.sim(HOST, 0), b'{"v": 1, "command": "explode", "action_id": "x"}'),
        (topics.sim(HOST, 0), b'{"v": 1, "command": "set_power_limit", "action_id": "x", '
                              b'"power_limit_w": NaN}'),
        (topics.sim(HOST, 7), SimCommand(command="reset", action_id="x").to_json()),
    ]
    with Collector(broker.url, topics.everything()) as col, \
            running(options(broker.url, prefix)):
        col.wait(lambda ms: any(m.topic.endswith("/sample") for m in ms), 10, "a sample")
        for topic, payload in bad:
            publish(broker.url, topic, payload)
        col.wait(lambda _: len(col.on("/deadletter/publisher")) == 4, 10, "4 dead letters")
        letters = [DeadLetter.model_validate_json(m.payload)
                   for m in col.on("/deadletter/publisher")]
        seen = len(col.on("/sample"))
        col.wait(lambda _: len(col.on("/sample")) > seen + 5, 10, "samples after the letters")
    assert [(d.topic, d.component) for d in letters] == [(t, "publisher") for t, _ in bad]
    assert "not JSON" in letters[0].reason
    assert "command" in letters[1].reason
    assert "not a finite number" in letters[2].reason
    assert "unknown GPU" in letters[3].reason
    assert letters[0].payload == "not json"
    assert col.on(f"/{HOST}/publisher/status")[-1].payload == b"offline"


class FlakySource:
    """Fails every other round, like a driver that hiccups."""

    name = "sim"

    def __init__(self) -> None:
        self.calls = 0

    def read(self, ts: float) -> list[dict[str, Any]]:
        self.calls += 1
        if self.calls % 2 == 0:
            raise SourceError("driver hiccup")
        if self.calls == 3:
            raise RuntimeError("a bug in a source")
        bad = {"index": 1, "temperature_c": float("nan")}
        return [{"index": 0, "temperature_c": 40.0}, bad]

    def next_wait_s(self) -> float:
        return 0.01

    def close(self) -> None:
        pass


def test_failed_rounds_are_logged_and_sampling_goes_on(broker: PrivateBroker, prefix: str,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    topics = Topics(prefix)
    source = FlakySource()
    opts = options(broker.url, prefix, count=10)
    svc = PublisherService(opts, source)
    component = Component(svc, opts.common)
    with Collector(broker.url, topics.gpu_pattern("sample")) as col:
        assert component.start(wait_s=5)
        assert svc.finished.wait(10)
        component.stop()
        col.wait(lambda ms: len(ms) == 4, 5, "4 samples")
    assert svc.rounds == 10 and svc.errors == 6 and svc.published == 4
    assert [s.seq for s in samples(col)] == [0, 1, 2, 3]
    assert {s.index for s in samples(col)} == {0}, "the NaN reading is dropped, not sent"
    assert "driver hiccup" in caplog.text and "a bug in a source" in caplog.text


def test_replay_keeps_time_and_seq_and_ends(broker: PrivateBroker, prefix: str) -> None:
    recorded = [Sample(host="old-host", index=i % 2, source="sim", ts=1000.0 + i * 0.5,
                       seq=40 + i // 2, temperature_c=50.0 + i) for i in range(8)]
    opts = options(broker.url, prefix, source="replay", speed=100.0,
                   replay_samples=iter(recorded),
                   replay_hosts={"old-host": "new-host"})
    with Collector(broker.url, Topics(prefix).gpu_pattern("sample")) as col:
        assert run(opts) == 0
        col.wait(lambda ms: len(ms) == 8, 5, "8 replayed samples")
    replayed = samples(col)
    assert [(s.ts, s.seq, s.temperature_c) for s in replayed] == \
        [(r.ts, r.seq, r.temperature_c) for r in recorded]
    assert {(s.host, s.source) for s in replayed} == {("new-host", "replay")}
    assert {m.topic.split("/")[1] for m in col.on("/sample")} == {"new-host"}


def test_no_source_is_a_clear_error(broker: PrivateBroker, prefix: str,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert run(options(broker.url, prefix, source="nvidia-smi",
                       nvidia_smi="/nonexistent/nvidia-smi")) == 1
    assert "source nvidia-smi does not work here" in capsys.readouterr().err
    assert run(options(broker.url, prefix, source="replay")) == 1
    assert "recorded samples" in capsys.readouterr().err
    assert run(options(broker.url, prefix, scenario="no-such-scenario")) == 1
    assert "unknown scenario" in capsys.readouterr().err


def test_unreachable_broker_is_reported(monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(service, "CONNECT_WAIT_S", 0.2)
    assert run(options(f"mqtt://127.0.0.1:{free_port()}", "p", count=2)) == 1
    assert "never reached the broker" in capsys.readouterr().err


def test_sigterm_publishes_retained_offline(broker: PrivateBroker, prefix: str,
                                            gpuheal_cmd: list[str]) -> None:
    topics = Topics(prefix)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUHEAL_")}
    with Collector(broker.url, topics.everything()) as col:
        proc = subprocess.Popen(
            [*gpuheal_cmd, "publisher", "--broker", broker.url, "--prefix", prefix,
             "--host-name", HOST, "--source", "sim", "--scenario", "demo", "--speed", "50",
             "--log-level", "WARNING"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        try:
            col.wait(lambda ms: len([m for m in ms if m.topic.endswith("/sample")]) >= 5, 20,
                     "samples from the subprocess")
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=20)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 0, out.decode(errors="replace")
    check_seq(samples(col), {0})
    with Collector(broker.url, topics.status(HOST, "publisher")) as late:
        late.wait(lambda ms: len(ms) == 1, 5, "the retained status")
        assert late.messages[0].retain and late.messages[0].payload == b"offline"
    wait_for(lambda: proc.poll() is not None, 1, "process gone")
