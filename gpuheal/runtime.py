"""One lifecycle for every component: signals, the bus, the status topic, exit codes, logs.

A component is a :class:`Service`: it says what connection it needs (:meth:`bus_options`),
registers its subscriptions and re-announce hooks on the :class:`~gpuheal.mqtt.Bus`
(:meth:`attach`), starts and stops its own threads. :func:`run_service` does the rest, the same
way for all of them:

* SIGINT, SIGTERM and SIGHUP stop it cleanly (retained ``offline``, reason ``stopped``);
* it never prints a traceback for an operator's mistake: one line on stderr and an exit code;
* once started, the garbage collector is tuned for a message pump (:func:`tune_gc`).

Exit codes (the same for every command):

=====  =======================================================================================
0      stopped cleanly (a signal, ``--count`` rounds done, a replay finished)
1      it ran and failed: no GPU source works, the database cannot be used, the broker was
       never reached by a run that has an end
2      it could not start: a bad option, config file or broker URL; the broker refused the
       credentials of a one-shot command
=====  =======================================================================================
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from gpuheal.mqtt import BrokerURLError, Bus, Rejected
from gpuheal.options import CommonOptions

log = logging.getLogger("gpuheal")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
GC_THRESHOLDS = (50_000, 20, 100)
"""Python's collector after start (the defaults are 700, 10, 10). A component allocates a
few dozen short-lived objects per message, almost all freed at once by reference counting; at
the default thresholds the collector still ran a young collection every few dozen messages and
a full one every few thousand, walking every GPU's state each time (bench/bench_analyzer.py
measured it). Cyclic garbage is rare here, so collecting it seldom costs little memory."""


class UsageError(Exception):
    """The component cannot start as asked (exit 2); the message is one line for a person."""


class RunFailure(Exception):
    """The component cannot do its work here (exit 1); the message is one line for a person."""


@dataclass(frozen=True)
class BusOptions:
    """What a component needs from its broker connection (see :class:`gpuheal.mqtt.Bus`)."""

    client_id: str | None = None
    clean_start: bool = True
    session_expiry_s: int | None = None
    manual_ack: bool = False
    receive_maximum: int | None = None
    announce_status: bool = True
    on_reject: Callable[[Rejected], None] | None = None
    exclusive: bool = False
    """One per host (publisher, healer): a second one for the same host takes over."""


class Service(Protocol):
    """A component: built from its options, attached to a bus, started, stopped."""

    component: str
    finished: threading.Event
    """Set when the service ends on its own (``--count`` rounds, a replay that is over)."""

    def bus_options(self) -> BusOptions: ...

    def attach(self, bus: Bus) -> None:
        """Register subscriptions and re-announce hooks (before the bus connects)."""

    def start(self) -> None:
        """Start the service's own threads (the bus is connecting in the background)."""

    def stop(self) -> None:
        """Stop, drain and release everything (the bus is still connected)."""

    def summary(self) -> str:
        """One line of what it did, logged at stop."""


def setup_logging(level: str = "INFO") -> None:
    """One log format for every command. Under systemd (journald reads stderr, which it
    announces in ``JOURNAL_STREAM``) or with ``GPUHEAL_LOG_FORMAT=journal``: no timestamps (the
    journal has its own) and a ``<N>`` syslog priority prefix, so ``journalctl -p warning``
    works."""
    journal = os.environ.get("GPUHEAL_LOG_FORMAT") == "journal" or _stderr_is_journal()
    handler = logging.StreamHandler(sys.stderr)
    if journal:
        handler.setFormatter(_JournalFormatter("%(name)s %(levelname)s %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)


class _JournalFormatter(logging.Formatter):
    """``<N>`` (sd-daemon's syslog priority) before each line."""

    PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
                logging.CRITICAL: 2}

    def format(self, record: logging.LogRecord) -> str:
        return f"<{self.PRIORITY.get(record.levelno, 6)}>{super().format(record)}"


def _stderr_is_journal() -> bool:
    stream = os.environ.get("JOURNAL_STREAM", "")
    if ":" not in stream:
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return stream == f"{st.st_dev}:{st.st_ino}"


def fail(component: str, message: str, code: int) -> int:
    """Say why ``component`` cannot go on, in one line on stderr; return ``code``."""
    print(f"gpuheal {component}: {message}", file=sys.stderr, flush=True)
    return code


def stop_on_signals(stop: threading.Event) -> None:
    """Set ``stop`` on SIGINT, SIGTERM and SIGHUP (only possible from the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return

    def handle(signum: int, _frame: object) -> None:
        log.info("signal %s: stopping", signal.Signals(signum).name)
        stop.set()

    for sig in STOP_SIGNALS:
        signal.signal(sig, handle)


class Component:
    """A service on a bus of its own: what :func:`run_service` drives, and what tests and
    programs embedding a component use (``start()``, then ``stop()``)."""

    def __init__(self, service: Service, common: CommonOptions) -> None:
        """Raises BrokerURLError for a broker URL that cannot be used."""
        self.service = service
        opts = service.bus_options()
        self.bus = Bus(common.broker, service.component, common.host_name, common.topics,
                       client_id=opts.client_id, clean_start=opts.clean_start,
                       session_expiry_s=opts.session_expiry_s, manual_ack=opts.manual_ack,
                       receive_maximum=opts.receive_maximum,
                       announce_status=opts.announce_status, on_reject=opts.on_reject,
                       exclusive=opts.exclusive)
        service.attach(self.bus)

    def start(self, wait_s: float | None = None) -> bool:
        """Connect (in the background) and start the service; with ``wait_s``, wait that
        long for the connection and say whether it came."""
        self.bus.start()
        self.service.start()
        return True if wait_s is None else self.bus.wait_connected(wait_s)

    def stop(self) -> None:
        """Stop the service (it drains while still connected), then say goodbye."""
        try:
            self.service.stop()
        finally:
            self.bus.stop()


def tune_gc() -> None:
    """Collect once, move everything alive now (modules, config, the service's own set-up) out
    of the collector's sight for good (``gc.freeze``), and collect the rest seldom
    (:data:`GC_THRESHOLDS`). Only for a process that is one component (:func:`run_service`)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def run_service(component: str, make: Callable[[], Service], common: CommonOptions,
                stop: threading.Event | None = None) -> int:
    """Build, attach, start and run one component until ``stop`` (or a signal when no
    ``stop`` is given) or until it finishes by itself; returns the exit code."""
    if stop is None:
        stop = threading.Event()
        stop_on_signals(stop)
    try:
        service = make()
    except UsageError as exc:
        return fail(component, str(exc), EXIT_USAGE)
    except RunFailure as exc:
        return fail(component, str(exc), EXIT_FAILED)
    try:
        running = Component(service, common)
    except (BrokerURLError, ValueError) as exc:
        _close(service)
        return fail(component, str(exc), EXIT_USAGE)
    bus = running.bus
    try:
        running.start()
    except RunFailure as exc:
        running.stop()
        return fail(component, str(exc), EXIT_FAILED)
    log.info("%s: running for host %s on %s (prefix %s)", component, common.host_name,
             bus.broker.redacted(), common.prefix)
    if threading.current_thread() is threading.main_thread():
        tune_gc()  # a process of its own (tests run services in threads of one process)
    try:
        while not stop.wait(0.2):
            if service.finished.is_set() or bus.taken_over.is_set():
                break
    finally:
        running.stop()
    log.info("%s: stopped; %s", component, service.summary())
    if bus.taken_over.is_set():
        return fail(component, f"another {component} started for host {common.host_name} "
                               "and took over (two must not share one --host-name)",
                    EXIT_FAILED)
    if bus.stats.connects == 0:
        reason = f" ({bus.last_connect_error})" if bus.last_connect_error else ""
        return fail(component, f"never reached the broker at {bus.broker.redacted()}{reason}",
                    EXIT_FAILED)
    return EXIT_OK


def _close(service: Service) -> None:
    """Release what a built but never started service holds (a database, a source)."""
    try:
        service.stop()
    except Exception:  # best effort on the way out of a failed start
        log.debug("stopping a service that never started failed", exc_info=True)
