"""The publisher service: a thin MQTT adapter around a GPU source.

It samples in its own thread (never in paho's network thread), publishes one Sample per GPU
per round on ``P/H/gpu/I/sample`` (QoS ``[publisher] sample_qos``), and, for the simulated
GPU, takes simulator commands from ``P/H/gpu/+/sim``: each is validated, an invalid one (or one
for a GPU the simulator does not have) goes to ``P/deadletter/publisher``, a valid one is queued
for the simulator and applied before its next step. A failed round is logged and sampling goes
on. ``run`` returns when ``stop`` is set, after ``--count`` rounds, or when a replay is over.
"""

from __future__ import annotations

import logging
import sys
import threading
import time

import paho.mqtt.client as paho

from gpuheal.models import PayloadError, SimCommand, parse_payload
from gpuheal.mqtt import Bus, publish_ok
from gpuheal.options import PublisherOptions
from gpuheal.topics import Topics
from publisher.sampling import Stamper, sample_round
from publisher.sources import NoSourceError, Source, SourceError, interval_of, open_source
from publisher.sources.sim import SimSource

log = logging.getLogger(__name__)

CONNECT_WAIT_S = 10.0


def next_wait_s(source: Source, interval_s: float) -> float | None:
    """Wall seconds until the next round: the source's own pacing (simulator, replay) or the
    interval. None: the source has nothing more (a replay is over)."""
    pace = getattr(source, "next_wait_s", None)
    return pace() if callable(pace) else interval_s


class PublisherService:
    """Samples ``source`` in a thread and publishes through ``bus``."""

    def __init__(self, bus: Bus, source: Source, topics: Topics, host: str, interval_s: float,
                 qos: int = 0, count: int | None = None) -> None:
        self.bus = bus
        self.source = source
        self.topics = topics
        self.host = host
        self.interval_s = interval_s
        self.qos = qos
        self.count = count
        self.stamper = Stamper(host)
        self.finished = threading.Event()
        self.rounds = 0
        self.published = 0
        self.unsent = 0
        self.errors = 0
        self.commands = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="publisher-sampler", daemon=True)
        if isinstance(source, SimSource):
            bus.subscribe(topics.gpu_pattern("sim", host), self._on_sim, qos=1)

    # --- MQTT side (paho's thread: validate and queue only) ----------------------------------
    def _on_sim(self, msg: paho.MQTTMessage) -> None:
        payload = bytes(msg.payload)
        parts = self.topics.parse(msg.topic)
        try:
            command = parse_payload(SimCommand, payload)
        except PayloadError as exc:
            self.bus.deadletter(msg.topic, payload, exc.reason)
            return
        source = self.source
        if parts is None or parts.index is None or not isinstance(source, SimSource) \
                or not source.has_gpu(parts.index):
            self.bus.deadletter(msg.topic, payload, "unknown GPU: no simulated GPU at this index")
            return
        source.command(parts.index, command)
        self.commands += 1
        log.info("sim command %s for GPU %d (action %s)", command.command, parts.index,
                 command.action_id)

    # --- sampling thread ---------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _loop(self) -> None:
        try:
            due = time.monotonic()
            while not self._stop.is_set() and not self._done():
                self._round()
                if self._done():
                    break
                wait = next_wait_s(self.source, self.interval_s)
                if wait is None:
                    log.info("%s: nothing more to publish", self.source.name)
                    break
                now = time.monotonic()
                due = max(due + wait, now)  # when late, go on at once but do not catch up
                self._stop.wait(due - now)
        finally:
            self.finished.set()

    def _done(self) -> bool:
        return self.count is not None and self.rounds >= self.count

    def _round(self) -> None:
        self.rounds += 1
        try:
            samples = sample_round(self.source, self.stamper, time.time())
        except SourceError as exc:
            self.errors += 1
            log.error("%s: sampling failed: %s", self.source.name, exc)
            return
        except Exception:  # a source bug must not stop the sampling of the next rounds
            self.errors += 1
            log.exception("%s: sampling failed", self.source.name)
            return
        for sample in samples:
            info = self.bus.publish(self.topics.sample(sample.host, sample.index),
                                    sample.to_json(), qos=self.qos)
            if publish_ok(info):
                self.published += 1
            else:
                self.unsent += 1


def run(opts: PublisherOptions, stop: threading.Event | None = None) -> int:
    """Run the publisher until ``stop`` is set (or ``--count`` rounds, or the replay ends).
    Returns 0, or 1 when no source works or the broker was never reached."""
    stop = stop or threading.Event()
    common = opts.common
    topics = common.topics
    bus = Bus(common.broker, "publisher", common.host_name, topics)  # a bad URL fails here
    try:
        interval_s = interval_of(opts)
        source = open_source(opts, interval_s)
    except NoSourceError as exc:
        print(f"gpuheal publisher: {exc}", file=sys.stderr)
        return 1
    service = PublisherService(bus, source, topics, common.host_name, interval_s,
                               qos=common.config.publisher.sample_qos, count=opts.count)
    log.info("publisher: source %s, every %g s, broker %s", source.name, interval_s,
             bus.broker.redacted())
    try:
        if not bus.start(wait_s=CONNECT_WAIT_S):
            log.warning("publisher: broker %s not reachable yet (%s); sampling anyway, "
                        "reconnecting in the background", bus.broker.redacted(),
                        bus.last_connect_error or "no answer")
        service.start()
        while not stop.is_set() and not service.finished.is_set():
            stop.wait(0.2)
    finally:
        service.stop()
        source.close()
        bus.stop()
    log.info("publisher: %d rounds, %d samples published, %d unsent, %d failed rounds",
             service.rounds, service.published, service.unsent, service.errors)
    if bus.stats.connects == 0:
        print(f"gpuheal publisher: never reached the broker at {bus.broker.redacted()}",
              file=sys.stderr)
        return 1
    return 0
