"""The analyzer as an MQTT service: a thin adapter around :class:`analyzer.engine.Analyzer`.

* subscribes to the retained States of every host (``P/+/gpu/+/state``, No Local) FIRST: a
  retained State that arrives before the first sample of its GPU seeds the engine
  (``Analyzer.restore``), so a restarted analyzer continues the same conditions (same
  ``event_id``) instead of raising them again; non-retained States (live traffic, echoes)
  are ignored;
* then to the samples (``P/+/gpu/+/sample``, or one host with ``--only-host``), QoS 1;
* publishes each State retained (QoS 1) on ``P/H/gpu/I/state`` and each Event (QoS 1) on
  ``P/H/gpu/I/event``;
* rejects invalid payloads to ``P/deadletter/analyzer`` (never a crash);
* a timer thread raises ``unavailable`` for silent GPUs and (re)publishes Home Assistant
  discovery when asked (``homeassistant/status`` = ``online``, every reconnect).

Samples are processed inline in paho's network thread: the engine is fast (tens of
microseconds per sample, see bench/bench_analyzer.py) and one lock serializes it with the
timer thread. Events are published at once; States are built and published by a flusher
thread, newest per GPU, so a burst of samples folds into fewer retained States.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable

import paho.mqtt.client as paho
from pydantic import ValidationError

from analyzer.discovery import gpu_discovery, healer_discovery
from analyzer.engine import Analyzer, Output
from gpuheal.config.detection import AnalyzerConfig
from gpuheal.models import (
    MAX_JSON_DEPTH,
    MAX_PAYLOAD_BYTES,
    Event,
    PayloadError,
    Sample,
    State,
    parse_payload,
)
from gpuheal.mqtt import BrokerURLError, Bus
from gpuheal.options import AnalyzerOptions
from gpuheal.topics import Topics

log = logging.getLogger(__name__)

TICK_S = 0.25
"""Wall seconds between silence checks (and pending discovery announcements)."""
STATE_FLUSH_S = 0.1
"""Wall seconds between two publications of retained States (latest per GPU wins)."""


def parse_sample(payload: bytes) -> Sample:
    """A Sample from wire bytes, or :class:`PayloadError` with the reason.

    Fast path: pydantic's JSON parser in one pass (every number field already rejects NaN
    and Infinity). On failure the slower ``parse_payload`` states the reason in the shared
    wording.
    """
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise PayloadError(f"payload too large: {len(payload)} bytes > {MAX_PAYLOAD_BYTES}")
    if payload.count(b"{") + payload.count(b"[") > MAX_JSON_DEPTH or b"\\u" in payload:
        return parse_payload(Sample, payload)  # the shared depth and surrogate rules
    try:
        return Sample.model_validate_json(payload)
    except ValidationError:
        return parse_payload(Sample, payload)


class AnalyzerService:
    """Wires an :class:`Analyzer` to a :class:`Bus` (subscriptions, publishing, discovery)."""

    def __init__(
        self,
        bus: Bus,
        engine: Analyzer,
        config: AnalyzerConfig,
        *,
        only_host: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.bus = bus
        self.engine = engine
        self.config = config
        self.topics: Topics = bus.topics
        self.only_host = only_host
        self._clock = clock
        self._lock = threading.Lock()
        self._gpu_topics: dict[tuple[str, int], tuple[str, str, str]] = {}
        """(sample, state, event) topics per GPU, built once."""
        self._announced_hosts: set[str] = set()
        self._announce_all = threading.Event()
        self._was_connected = False
        self.status_topic = bus.status_topic or self.topics.status(bus.host, "analyzer")
        self.restored = 0
        self.ignored_states = 0
        self._dirty: dict[tuple[str, int], None] = {}
        """GPUs whose State is due, in the order they became due (latest wins)."""
        self._state_due = threading.Event()

    # --- wiring ----------------------------------------------------------------------
    def attach(self) -> None:
        """Register the subscriptions (states first, then samples) and the reconnect hook."""
        t = self.topics
        self.bus.subscribe(t.gpu_pattern("state", self.only_host), self.on_state, qos=1,
                           no_local=True)
        self.bus.subscribe(t.gpu_pattern("sample", self.only_host), self.on_sample, qos=1)
        if self.config.ha_discovery:
            self.bus.subscribe(t.ha_status(), self.on_ha_status, qos=1)
            self.bus.on_connected(self._announce_all.set)

    # --- handlers (paho's network thread) ----------------------------------------------
    def on_sample(self, msg: paho.MQTTMessage) -> None:
        payload = bytes(msg.payload)
        try:
            sample = parse_sample(payload)
        except PayloadError as exc:
            self.bus.deadletter(msg.topic, payload, exc.reason)
            return
        if msg.topic != self._topics_of(sample.host, sample.index)[0]:
            self.bus.deadletter(msg.topic, payload,
                                f"topic mismatch: sample of {sample.host}/gpu/{sample.index}")
            return
        key = (sample.host, sample.index)
        with self._lock:
            new = self.engine.track(*key) is None
            events, state_due = self.engine.ingest(sample)
            if new:
                self._announce_gpu(sample.host, sample.index, sample.name, sample.uuid)
            self._publish(events)
            if state_due:
                self._dirty[key] = None
        if state_due:
            self._state_due.set()

    def on_state(self, msg: paho.MQTTMessage) -> None:
        if not msg.retain:
            return  # live traffic (our own or another writer's), not a restore input
        payload = bytes(msg.payload)
        if not payload:
            return  # a cleared retained message
        try:
            state = parse_payload(State, payload)
        except PayloadError as exc:
            self.bus.deadletter(msg.topic, payload, exc.reason)
            return
        parts = self.topics.parse(msg.topic)
        if parts is None or parts.host != state.host or parts.index != state.index:
            self.bus.deadletter(msg.topic, payload,
                                f"topic mismatch: state of {state.host}/gpu/{state.index}")
            return
        with self._lock:
            if not self.engine.restore(state):
                self.ignored_states += 1
                return
            self.restored += 1
            self._announce_gpu(state.host, state.index, state.name, state.uuid)
        log.info("analyzer: continuing %d condition(s) of %s/gpu/%d from its retained state",
                 len(state.active), state.host, state.index)

    def on_ha_status(self, msg: paho.MQTTMessage) -> None:
        if bytes(msg.payload).strip().lower() == b"online":
            self._announce_all.set()

    # --- timer thread --------------------------------------------------------------------
    def tick(self) -> None:
        """Silence check, then any pending discovery re-announcement.

        While the analyzer itself is disconnected no sample can arrive, so silence is not
        judged; after a reconnect every GPU's silence clock starts again."""
        now = self._clock()
        connected = self.bus.connected
        with self._lock:
            if not connected or not self._was_connected:
                self.engine.hold_silence(now)
            else:
                self._publish(self.engine.check_silence(now))
        self._was_connected = connected
        if self._announce_all.is_set() and self.bus.connected:
            self._announce_all.clear()
            self.announce_all()

    def flush_states(self) -> int:
        """Publish the newest State of every GPU whose State is due; returns how many.

        States are published from their own thread: when samples arrive faster than States
        can be published, several samples of a GPU fold into one retained State (latest
        wins, as DESIGN.md allows), while Events are always published at once, in order.
        """
        states: list[State] = []
        with self._lock:
            due, self._dirty = self._dirty, {}
            for host, index in due:
                try:
                    states.append(self.engine.current_state(host, index))
                except ValueError:  # one GPU's bad State must not hold back the others
                    log.exception("analyzer: cannot build the State of %s/gpu/%d", host, index)
        for state in states:
            self.bus.publish(self._topics_of(state.host, state.index)[1], state.to_json(),
                             qos=1, retain=True)
        return len(states)

    def flush_loop(self, stop: threading.Event) -> None:
        while not stop.is_set():
            if not self._state_due.wait(TICK_S):
                continue
            self._state_due.clear()
            try:
                self.flush_states()
            except Exception:  # the flusher must survive a bug in one State; it is logged
                log.exception("analyzer: publishing states failed")
            # At most one State per GPU per STATE_FLUSH_S of wall time: a GPU sampled faster
            # (a replay, a flood) gets its newest State then, not every one of them.
            stop.wait(STATE_FLUSH_S)
        self.flush_states()

    def tick_loop(self, stop: threading.Event) -> None:
        while not stop.wait(TICK_S):
            try:
                self.tick()
            except Exception:  # the timer must survive a bug in one tick; it is logged
                log.exception("analyzer: tick failed")

    # --- publishing ------------------------------------------------------------------------
    def _topics_of(self, host: str, index: int) -> tuple[str, str, str]:
        """(sample, state, event) topics of one GPU; cached only for GPUs the engine tracks."""
        key = (host, index)
        found = self._gpu_topics.get(key)
        if found is None:
            t = self.topics
            found = (t.sample(host, index), t.state(host, index), t.event(host, index))
            if self.engine.track(host, index) is not None:
                self._gpu_topics[key] = found
        return found

    def _publish(self, outputs: list[Output]) -> None:
        for out in outputs:
            _, state_topic, event_topic = self._topics_of(out.host, out.index)
            if isinstance(out, Event):
                self.bus.publish(event_topic, out.to_json(), qos=1)
                log.info("analyzer: %s %s %s %s/gpu/%d: %s", out.phase, out.severity,
                         out.kind, out.host, out.index, out.message)
            else:
                self.bus.publish(state_topic, out.to_json(), qos=1, retain=True)

    def _announce_gpu(self, host: str, index: int, name: str | None, uuid: str | None) -> None:
        if not self.config.ha_discovery:
            return
        if host not in self._announced_hosts:
            self._announced_hosts.add(host)
            self._send(healer_discovery(self.topics, host, self.status_topic))
        self._send(gpu_discovery(self.topics, host, index, name, uuid, self.status_topic))

    def announce_all(self) -> None:
        """Re-publish the discovery configs of every known host and GPU."""
        with self._lock:
            gpus = [(t.host, t.index, t.name, t.uuid)
                    for t in (self.engine.track(h, i) for h, i in self.engine.gpus()) if t]
        for host in sorted({g[0] for g in gpus}):
            self._send(healer_discovery(self.topics, host, self.status_topic))
        for host, index, name, uuid in gpus:
            self._send(gpu_discovery(self.topics, host, index, name, uuid, self.status_topic))

    def _send(self, configs: list[tuple[str, bytes]]) -> None:
        for topic, payload in configs:
            self.bus.publish(topic, payload, qos=1, retain=True)


def _stop_on_signals(stop: threading.Event) -> None:
    """Set ``stop`` on SIGINT/SIGTERM (only possible from the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())


def run(opts: AnalyzerOptions, stop: threading.Event | None = None) -> int:
    """Run the analyzer until ``stop`` is set (or SIGINT/SIGTERM); 0 on a clean stop."""
    if stop is None:
        stop = threading.Event()
        _stop_on_signals(stop)
    common = opts.common
    config = common.config.analyzer
    try:
        bus = Bus(common.broker, component="analyzer", host=common.host_name,
                  topics=common.topics)
    except BrokerURLError as exc:
        log.error("analyzer: %s", exc)
        return 2
    engine = Analyzer(config, started_ts=time.time())
    service = AnalyzerService(bus, engine, config, only_host=common.only_host)
    service.attach()
    bus.start()
    log.info("analyzer: serving %s on %s (prefix %s)",
             f"host {common.only_host}" if common.only_host else "every host",
             bus.broker.redacted(), common.prefix)
    ticker = threading.Thread(target=service.tick_loop, args=(stop,), name="analyzer-tick",
                              daemon=True)
    ticker.start()
    flusher = threading.Thread(target=service.flush_loop, args=(stop,),
                               name="analyzer-states", daemon=True)
    flusher.start()
    stop.wait()
    ticker.join(timeout=5)
    flusher.join(timeout=5)
    bus.stop()
    s = engine.stats
    log.info("analyzer: stopped; %d samples processed, %d duplicates, %d out of order, "
             "%d events, %d dead letters", s.processed, s.duplicates, s.out_of_order, s.events,
             bus.deadletter_count)
    return 0
