"""The analyzer as an MQTT service: a thin adapter around :class:`analyzer.engine.Analyzer`.

* subscribes to the retained States of every host (``P/+/gpu/+/state``, No Local) FIRST: a
  retained State that arrives before the first sample of its GPU seeds the engine
  (``Analyzer.restore``), so a restarted analyzer continues the same conditions (same
  ``event_id``) instead of raising them again; non-retained States (live traffic, echoes)
  are ignored;
* then to the samples (``P/+/gpu/+/sample``, or one host with ``--only-host``), QoS 1;
* to the healer's Actions: a person's acknowledgement (``notify`` ``acknowledged``) ends that
  condition, and a ``reset_gpu`` that ``succeeded`` lets reset-class XIDs recover;
* to the publishers' status: a clean goodbye (``offline``, reason ``stopped``) is not an
  incident, so those GPUs are not declared silent;
* publishes each State retained (QoS 1) on ``P/H/gpu/I/state`` and each Event (QoS 1) on
  ``P/H/gpu/I/event``; a timer thread raises ``unavailable`` for silent GPUs and (re)publishes
  Home Assistant discovery when asked (``homeassistant/status`` = ``online``, every reconnect).

Samples are processed inline on the network thread: the engine is fast (tens of microseconds
per sample, see bench/bench_analyzer.py) and one lock serializes it with the timer threads.

When a State is published (still QoS 1, retained, newest per GPU):

* at once, with the Events that changed it (a condition raised, escalated or cleared: every
  change of health comes with one) and for a GPU's first sample;
* otherwise at most once per ``state_min_interval_s`` (default 1 s) of **wall** time per GPU
  (divided by ``--speed``, which ``gpuheal up`` passes on for a simulation it runs faster):
  a State that comes sooner waits and the newest sample's State goes out when the interval
  ends, even if no further sample comes (the retained State is never left behind);
* and only while paho's in-flight window has room (:meth:`gpuheal.mqtt.Bus.publish_room`): a
  State never queues in paho behind others; it waits here, one per GPU, newest wins. Events
  always go at once.

Wall time, not event time, because the cap bounds work per second of the machine (a replay at
100x or a backlog being drained would otherwise publish a State for every sample), and because
only a wall clock can end the interval of a GPU that falls silent.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from analyzer.discovery import gpu_discovery, healer_discovery
from analyzer.engine import Analyzer, Output
from gpuheal.models import Action, Event, Sample, State, Status
from gpuheal.mqtt import Bus, Received
from gpuheal.options import AnalyzerOptions, shard_of
from gpuheal.runtime import BusOptions, run_service
from gpuheal.topics import TopicParts, Topics

log = logging.getLogger(__name__)

GpuKey = tuple[str, int]


@dataclass
class StateStats:
    """What became of the States the engine made due."""

    published: int = 0
    folded: int = 0
    """Due States replaced by a newer one of the same GPU before they went out."""
    waited_for_room: int = 0
    """Times a due State waited because the in-flight window was full."""


TICK_S = 0.25
"""Wall seconds between silence checks (and pending discovery announcements)."""
STATE_TICK_S = 0.05
"""Wall seconds between two looks at the States that wait (for their interval or for room in
the in-flight window)."""
STOP_FLUSH_S = 3.0
"""On a clean stop, how long (wall seconds) the States that still wait may take to go out."""


class AnalyzerService:
    """Wires an :class:`Analyzer` to a :class:`Bus` (subscriptions, publishing, discovery)."""

    component = "analyzer"

    def __init__(self, opts: AnalyzerOptions, engine: Analyzer | None = None,
                 clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        """``clock``: wall time (UNIX seconds) for silence; ``monotonic``: the clock of the
        State interval (seconds)."""
        common = opts.common
        self.config = common.config.analyzer
        self.only_host = common.only_host
        self.shard = opts.shard
        self._owned: set[str] = set()
        """Hosts this analyzer serves (sharded: found from their publishers' status)."""
        self.topics: Topics = common.topics
        self.engine = engine or Analyzer(self.config, started_ts=clock(),
                                         name=common.host_name)
        self.bus: Bus | None = None
        self.finished = threading.Event()
        self._clock = clock
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._gpu_topics: dict[tuple[str, int], tuple[str, str]] = {}
        """(state, event) topics per GPU, built once."""
        self._announced_hosts: set[str] = set()
        self._announce_all = threading.Event()
        self._was_connected = False
        self.status_topic = self.topics.status(common.host_name, "analyzer")
        self.restored = 0
        self.ignored_states = 0
        self._monotonic = monotonic
        self.state_interval_s = self.config.state_min_interval_s / opts.speed
        """Wall seconds between two States of a GPU at least (the config's, at ``--speed``)."""
        self.state_stats = StateStats()
        self._waiting: dict[GpuKey, float] = {}
        """GPUs whose newest State waits, with when it may go (monotonic seconds)."""
        self._due_heap: list[tuple[float, GpuKey]] = []
        """(may go at, GPU) of the waiting States; stale entries are skipped."""
        self._state_sent: dict[GpuKey, float] = {}
        """When each GPU's last State went out (monotonic seconds)."""

    # --- lifecycle ---------------------------------------------------------------------
    def bus_options(self) -> BusOptions:
        return BusOptions()

    def attach(self, bus: Bus) -> None:
        """Register the subscriptions (states first, then samples) and the reconnect hook."""
        self.bus = bus
        t = self.topics
        host = self.only_host
        if self.shard is None:
            self._subscribe_gpus(host)
        bus.subscribe(t.status_pattern(host, "publisher"), Status, self.on_publisher_status)
        if self.config.ha_discovery:
            bus.subscribe(t.ha_status(), Status, self.on_ha_status)
            bus.on_connected(self._announce_all.set)

    def _subscribe_gpus(self, host: str | None) -> None:
        """The GPU topics of ``host`` (every host: None): retained States first (a restarted
        analyzer continues their conditions), then samples and the healer's actions."""
        assert self.bus is not None
        t = self.topics
        self.bus.subscribe(t.gpu_pattern("state", host), State, self.on_state, no_local=True,
                           on_cleared=self.on_state_cleared)
        self.bus.subscribe(t.gpu_pattern("sample", host), Sample, self.on_sample)
        self.bus.subscribe(t.gpu_pattern("action", host), Action, self.on_action)

    def _claim(self, host: str) -> bool:
        """Whether this analyzer serves ``host``; a sharded one subscribes to a host of its
        share the first time that host's publisher shows up. Samples the host sends before
        that subscription is in place (one round trip to the broker) are not analysed; the
        recorder still stores them."""
        if self.shard is None or host in self._owned:
            return True
        share, shares = self.shard
        if shard_of(host, shares) != share:
            return False
        self._owned.add(host)
        self._subscribe_gpus(host)
        log.info("analyzer: host %s is in share %d/%d: serving it", host, share, shares)
        return True

    def start(self) -> None:
        for target, name in ((self.tick_loop, "analyzer-tick"),
                             (self.state_loop, "analyzer-states")):
            thread = threading.Thread(target=target, args=(self._stop,), name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5)
        self.flush_waiting(STOP_FLUSH_S)

    def summary(self) -> str:
        s = self.engine.stats
        dead = self.bus.deadletter_count if self.bus else 0
        st = self.state_stats
        return (f"{s.processed} samples processed, {s.duplicates} duplicates, "
                f"{s.out_of_order} out of order, {s.events} events, {st.published} states "
                f"published ({st.folded} folded into newer ones), {dead} dead letters")

    # --- handlers (the network thread) -------------------------------------------------
    def on_sample(self, received: Received[Sample]) -> None:
        sample = received.message
        key = (sample.host, sample.index)
        with self._lock:
            new = self.engine.track(*key) is None
            events, state_due = self.engine.ingest(sample)
            if new:
                self._announce_gpu(sample.host, sample.index, sample.name, sample.uuid)
            if events:
                self._publish(events)
                self._send_state(key, self._monotonic())  # at once: the Events changed it
            elif state_due:
                self._state_due(key)

    def on_state(self, received: Received[State]) -> None:
        if not received.retain:
            return  # live traffic (our own or another writer's), not a restore input
        state = received.message
        with self._lock:
            if not self.engine.restore(state):
                self.ignored_states += 1
                return
            self.restored += 1
            self._announce_gpu(state.host, state.index, state.name, state.uuid)
        log.info("analyzer: continuing %d condition(s) of %s/gpu/%d from its retained state",
                 len(state.active), state.host, state.index)

    def on_state_cleared(self, parts: TopicParts) -> None:
        """A GPU's retained State was deleted (``status --forget``): forget the GPU, so it is
        not announced to Home Assistant again."""
        if parts.host is None or parts.index is None:
            return
        with self._lock:
            key = (parts.host, parts.index)
            if self.engine.forget(*key):
                self._waiting.pop(key, None)  # a stale heap entry is skipped when popped
                self._state_sent.pop(key, None)
                self._gpu_topics.pop(key, None)
                log.info("analyzer: %s/gpu/%d forgotten (its retained State was deleted)",
                         parts.host, parts.index)

    def on_action(self, received: Received[Action]) -> None:
        """The healer's word on a GPU: a person took a condition over, or a GPU was reset."""
        if received.retain:
            return
        action = received.message
        outputs: list[Output] = []
        with self._lock:
            if action.status == "acknowledged" and action.event_id is not None:
                outputs = self.engine.acknowledge(action.host, action.index, action.event_id,
                                                  action.ts)
            elif action.action == "reset_gpu" and action.status == "succeeded":
                self.engine.note_reset(action.host, action.index, action.ts)
            self._publish(outputs)

    def on_publisher_status(self, received: Received[Status]) -> None:
        """A publisher shows up (a sharded analyzer claims the hosts of its share) or says a
        clean goodbye (or a replay finished), which is not an incident."""
        status = received.message
        host = received.parts.host
        if host is None or not self._claim(host):
            return
        if status.value == "offline" and status.reason == "stopped":
            with self._lock:
                self.engine.source_stopped(host, self._clock())
            log.info("analyzer: the publisher of %s stopped cleanly; its GPUs are not "
                     "declared silent", host)

    def on_ha_status(self, received: Received[Status]) -> None:
        if received.message.value == "online":
            self._announce_all.set()

    # --- timer thread --------------------------------------------------------------------
    def tick(self) -> None:
        """Silence check, then any pending discovery re-announcement.

        While the analyzer itself is disconnected no sample can arrive, so silence is not
        judged; after a reconnect every GPU's silence clock starts again."""
        bus = self.bus
        now = self._clock()
        connected = bus is not None and bus.connected
        with self._lock:
            if not connected or not self._was_connected:
                self.engine.hold_silence(now)
            else:
                self._publish(self.engine.check_silence(now))
        self._was_connected = connected
        if self._announce_all.is_set() and connected:
            self._announce_all.clear()
            self.announce_all()

    def _state_due(self, key: GpuKey) -> None:
        """The engine made this GPU's State due: out now if its interval is over and the
        in-flight window has room, else it waits (newest wins). Holds ``_lock``."""
        now = self._monotonic()
        last = self._state_sent.get(key)
        may_go = now if last is None else last + self.state_interval_s
        if key in self._waiting:
            self.state_stats.folded += 1
            return  # the waiting one is built when it goes: from the newest sample
        if may_go <= now:
            if self.bus is not None and self.bus.publish_room() > 0:
                self._send_state(key, now)
                return
            self.state_stats.waited_for_room += 1
        self._waiting[key] = may_go
        heapq.heappush(self._due_heap, (may_go, key))

    def _send_state(self, key: GpuKey, now: float) -> None:
        """Build and publish the GPU's State now (its newest sample). Holds ``_lock``."""
        self._waiting.pop(key, None)
        if self.engine.track(*key) is None:
            return  # forgotten meanwhile
        self._state_sent[key] = now
        try:
            payload = self.engine.current_state_json(*key)
        except ValueError:  # one GPU's bad State must not hold back the others; logged
            log.exception("analyzer: cannot build the State of %s/gpu/%d", *key)
            return
        self.state_stats.published += 1
        self._send(self._topics_of(*key)[0], payload, retain=True)

    def flush_states(self, everything: bool = False) -> int:
        """Publish the waiting States whose interval is over (``everything``: all of them),
        oldest first, as many as the in-flight window has room for; returns how many."""
        sent = 0
        with self._lock:
            now = self._monotonic()
            room = self.bus.publish_room() if self.bus is not None else 0
            heap = self._due_heap
            while heap and sent < room and (everything or heap[0][0] <= now):
                may_go, key = heapq.heappop(heap)
                if self._waiting.get(key) != may_go:
                    continue  # went out since, or waits under a newer entry
                self._send_state(key, now)
                sent += 1
            if not self._waiting:
                heap.clear()
        return sent

    def flush_waiting(self, timeout_s: float) -> None:
        """Publish every State that still waits (a clean stop), as the window makes room."""
        deadline = time.monotonic() + timeout_s
        while self._waiting and time.monotonic() < deadline:
            if self.bus is None or not self.bus.connected:
                return
            if not self.flush_states(everything=True):
                self.bus.wait_publish_room(0.05)

    def state_loop(self, stop: threading.Event) -> None:
        """Publish waiting States when their interval ends or the window makes room."""
        while not stop.is_set():
            try:
                self.flush_states()
            except Exception:  # the flusher must survive a bug in one State; it is logged
                log.exception("analyzer: publishing states failed")
            if self._waiting and self.bus is not None and self.bus.publish_room() == 0:
                self.bus.wait_publish_room(STATE_TICK_S)  # woken by the next PUBACK
            else:
                stop.wait(STATE_TICK_S)

    def tick_loop(self, stop: threading.Event) -> None:
        while not stop.wait(TICK_S):
            try:
                self.tick()
            except Exception:  # the timer must survive a bug in one tick; it is logged
                log.exception("analyzer: tick failed")

    # --- publishing ------------------------------------------------------------------------
    def _topics_of(self, host: str, index: int) -> tuple[str, str]:
        """(state, event) topics of one GPU, built once."""
        key = (host, index)
        found = self._gpu_topics.get(key)
        if found is None:
            found = self._gpu_topics[key] = (self.topics.state(host, index),
                                             self.topics.event(host, index))
        return found

    def _send(self, topic: str, payload: bytes, retain: bool = False) -> None:
        if self.bus is not None:
            self.bus.publish(topic, payload, qos=1, retain=retain)

    def _publish(self, outputs: list[Output]) -> None:
        """Publish the engine's Events and States at once, in order. Holds ``_lock``."""
        for out in outputs:
            state_topic, event_topic = self._topics_of(out.host, out.index)
            if isinstance(out, Event):
                self._send(event_topic, out.to_json())
                log.info("analyzer: %s %s %s %s/gpu/%d: %s", out.phase, out.severity,
                         out.kind, out.host, out.index, out.message)
            else:
                key = (out.host, out.index)
                self._waiting.pop(key, None)
                self._state_sent[key] = self._monotonic()
                self.state_stats.published += 1
                self._send(state_topic, out.to_json(), retain=True)

    def _announce_gpu(self, host: str, index: int, name: str | None, uuid: str | None) -> None:
        if not self.config.ha_discovery:
            return
        if host not in self._announced_hosts:
            self._announced_hosts.add(host)
            self._send_all(healer_discovery(self.topics, host, self.status_topic))
        self._send_all(gpu_discovery(self.topics, host, index, name, uuid, self.status_topic))

    def announce_all(self) -> None:
        """Re-publish the discovery configs of every known host and GPU."""
        with self._lock:
            gpus = [(t.host, t.index, t.name, t.uuid)
                    for t in (self.engine.track(h, i) for h, i in self.engine.gpus()) if t]
        for host in sorted({g[0] for g in gpus}):
            self._send_all(healer_discovery(self.topics, host, self.status_topic))
        for host, index, name, uuid in gpus:
            self._send_all(gpu_discovery(self.topics, host, index, name, uuid,
                                         self.status_topic))

    def _send_all(self, configs: list[tuple[str, bytes]]) -> None:
        for topic, payload in configs:
            self._send(topic, payload, retain=True)


def run(opts: AnalyzerOptions, stop: threading.Event | None = None) -> int:
    """Run the analyzer until ``stop`` is set (or SIGINT/SIGTERM/SIGHUP when no ``stop`` is
    given); the exit code of :mod:`gpuheal.runtime`. A shard speaks (status, ``analyzer`` of
    its States) as ``<host name>-shardKofN``, so the shards of one machine stay apart."""
    if opts.shard is not None:
        share, shares = opts.shard
        common = replace(opts.common, host_name=f"{opts.common.host_name}-shard{share}of{shares}")
        opts = replace(opts, common=common)
    return run_service("analyzer", lambda: AnalyzerService(opts), opts.common, stop)
