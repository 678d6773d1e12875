"""The publisher service: a thin MQTT adapter around a GPU source.

It samples in its own thread (never in paho's network thread), publishes one Sample per GPU
per round on ``P/H/gpu/I/sample`` (QoS ``[publisher] sample_qos``), and, for the simulated
GPU, takes simulator commands from ``P/H/gpu/+/sim``: each is validated, an invalid one (or one
for a GPU the simulator does not have) goes to ``P/deadletter/publisher``, a valid one is queued
for the simulator and applied before its next step. A failed round is logged and sampling goes
on. It finishes by itself after ``--count`` rounds, or when a replay is over.
"""

from __future__ import annotations

import logging
import threading
import time

from gpuheal.models import SimCommand
from gpuheal.mqtt import Bus, Received
from gpuheal.options import PublisherOptions
from gpuheal.runtime import BusOptions, RunFailure, UsageError, run_service
from publisher.sampling import Stamper, sample_round
from publisher.sources import NoSourceError, Source, SourceError, interval_of, open_source
from publisher.sources.sim import SimSource

log = logging.getLogger(__name__)

CONNECT_WAIT_S = 10.0
"""Wall seconds the first round waits for the broker (QoS 0 samples are not queued)."""


def next_wait_s(source: Source, interval_s: float) -> float | None:
    """Wall seconds until the next round: the source's own pacing (simulator, replay) or the
    interval. None: the source has nothing more (a replay is over)."""
    pace = getattr(source, "next_wait_s", None)
    return pace() if callable(pace) else interval_s


class PublisherService:
    """Samples a source in a thread and publishes its Samples."""

    component = "publisher"

    def __init__(self, opts: PublisherOptions, source: Source | None = None) -> None:
        common = opts.common
        self.topics = common.topics
        self.host = common.host_name
        self.qos = common.config.publisher.sample_qos
        self.count = opts.count
        try:
            self.interval_s = interval_of(opts)
        except NoSourceError as exc:
            raise UsageError(str(exc)) from None
        blind = common.config.analyzer.blind_spots(self.interval_s)
        if blind and opts.source != "replay":
            raise UsageError("--interval: " + "; ".join(blind))
        try:
            self.source = source or open_source(opts, self.interval_s)
        except NoSourceError as exc:
            raise RunFailure(str(exc)) from None
        self.stamper = Stamper(self.host)
        self.bus: Bus | None = None
        self.finished = threading.Event()
        self.rounds = 0
        self.published = 0
        self.unsent = 0
        self.errors = 0
        self.commands = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="publisher-sampler", daemon=True)
        log.info("publisher: source %s, every %g s", self.source.name, self.interval_s)

    # --- lifecycle -------------------------------------------------------------------------
    def bus_options(self) -> BusOptions:
        return BusOptions(exclusive=True)  # two for one host: the newest wins, the other stops

    def attach(self, bus: Bus) -> None:
        self.bus = bus
        if isinstance(self.source, SimSource):
            bus.subscribe(self.topics.gpu_pattern("sim", self.host), SimCommand, self._on_sim)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self.source.close()

    def summary(self) -> str:
        return (f"{self.rounds} rounds, {self.published} samples published, {self.unsent} "
                f"unsent, {self.errors} failed rounds")

    # --- MQTT side (the network thread: validate and queue only) -----------------------------
    def _on_sim(self, received: Received[SimCommand]) -> None:
        index = received.parts.index
        source = self.source
        if index is None or not isinstance(source, SimSource) or not source.has_gpu(index):
            if self.bus is not None:
                self.bus.deadletter(received.topic, received.payload,
                                    "unknown GPU: no simulated GPU at this index")
            return
        command = received.message
        source.command(index, command)
        self.commands += 1
        log.info("sim command %s for GPU %d (action %s)", command.command, index,
                 command.action_id)

    # --- sampling thread ---------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            bus = self.bus
            if bus is not None and not bus.wait_connected(CONNECT_WAIT_S):
                log.warning("publisher: broker %s not reachable yet (%s); sampling anyway, "
                            "reconnecting in the background", bus.broker.redacted(),
                            bus.last_connect_error or "no answer")
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
        bus = self.bus
        for sample in samples:
            if bus is None:
                break
            delivery = bus.publish(self.topics.sample(sample.host, sample.index),
                                   sample.to_json(), qos=self.qos)
            if delivery.queued:
                self.published += 1
            else:
                self.unsent += 1


def run(opts: PublisherOptions, stop: threading.Event | None = None) -> int:
    """Run the publisher until ``stop`` is set (or SIGINT/SIGTERM/SIGHUP when no ``stop`` is
    given); the exit code of :mod:`gpuheal.runtime`."""
    return run_service("publisher", lambda: PublisherService(opts), opts.common, stop)
