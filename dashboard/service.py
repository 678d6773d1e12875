"""The dashboard as a service: MQTT in, HTTP out.

* subscribes (QoS 1) to every host's retained States, component statuses and healer states,
  and to Events and Actions (``--only-host``: one host); the handlers only update the
  :class:`~dashboard.live.LiveModel` and hand the message to the stream's fan-out;
* serves :mod:`dashboard.api` with uvicorn on a thread of its own (its own event loop); the
  listening socket is bound when the service is built, so a port in use fails at once, in
  one line (exit 1);
* a tick thread notices a lost or regained broker connection and GPUs turning stale, and
  tells the page;
* writes publish on ``P/H/healer/set`` (QoS 1) and wait for the broker's acknowledgement.

Bound to anything but loopback it refuses to start without ``GPUHEAL_DASHBOARD_TOKEN`` and
says at start that every write needs it.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time

import uvicorn

from dashboard.api import AppContext, WriteFailed, build_app, is_loopback
from dashboard.history import History
from dashboard.live import LiveModel
from dashboard.llm import LlmProbe
from dashboard.stream import Broadcaster
from gpuheal.models import Action, Event
from gpuheal.mqtt import Bus
from gpuheal.options import DashboardOptions
from gpuheal.runtime import BusOptions, RunFailure, UsageError, run_service
from gpuheal.status import subscribe_snapshot

log = logging.getLogger(__name__)

TICK_S = 1.0
"""Wall seconds between checks of the broker connection and of stale GPUs."""
START_WAIT_S = 10.0
"""How long the HTTP server may take to start."""
PUBLISH_WAIT_S = 5.0
"""How long a write waits for the broker's acknowledgement."""


def bind_socket(bind: str, port: int) -> socket.socket:
    """A listening TCP socket on ``bind:port`` (port 0: any free one); RunFailure in one line
    when the address cannot be had."""
    try:
        infos = socket.getaddrinfo(bind, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise UsageError(f"--bind {bind}: not an address of this machine ({exc.strerror})") \
            from None
    family, kind, proto, _name, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        what = "is in use" if exc.errno in (98, 48) else f"cannot be used ({exc.strerror})"
        raise RunFailure(f"port {port} on {bind} {what}: choose another with --port") \
            from None
    sock.setblocking(False)
    return sock


def url_of(bind: str, port: int) -> str:
    host = f"[{bind}]" if ":" in bind else bind
    return f"http://{host}:{port}/"


class DashboardService:
    """The page, the API and /metrics over the pipeline's messages."""

    component = "dashboard"

    def __init__(self, opts: DashboardOptions) -> None:
        common = opts.common
        self.common = common
        self.opts = opts
        self.topics = common.topics
        self.only_host = common.only_host
        self.loopback = is_loopback(opts.bind)
        if not self.loopback and not opts.token:
            raise UsageError(f"--bind {opts.bind} is not loopback: set GPUHEAL_DASHBOARD_TOKEN "
                             "(every write then needs 'Authorization: Bearer <token>'), or "
                             "bind to 127.0.0.1")
        self.live = LiveModel()
        self.broadcaster = Broadcaster()
        self.live.sink = self.broadcaster.publish
        self.history = History(opts.db)
        self.llm = LlmProbe(common.config.healer.actuators.ollama_url)
        self.bus: Bus | None = None
        self.finished = threading.Event()
        self._stop = threading.Event()
        self._tick_thread: threading.Thread | None = None
        self._server_thread: threading.Thread | None = None
        self._write_lock = threading.Lock()
        self.sock = bind_socket(opts.bind, opts.port)
        self.port: int = self.sock.getsockname()[1]
        self.url = url_of(opts.bind, self.port)
        ctx = AppContext(live=self.live, history=self.history, llm=self.llm,
                         broadcaster=self.broadcaster, topics=self.topics,
                         host_name=common.host_name, publish=self._publish,
                         token=opts.token or None, loopback=self.loopback)
        self.app = build_app(ctx)
        self.server = uvicorn.Server(uvicorn.Config(
            self.app, log_level="warning", access_log=False, lifespan="off", ws="none",
            http="h11", timeout_graceful_shutdown=2, server_header=False))

    # --- lifecycle ---------------------------------------------------------------------------
    def bus_options(self) -> BusOptions:
        return BusOptions()

    def attach(self, bus: Bus) -> None:
        self.bus = bus
        t = self.topics
        host = self.only_host
        live = self.live
        subscribe_snapshot(bus, self.common, live, host)
        bus.subscribe(t.gpu_pattern("event", host), Event, live.on_event)
        bus.subscribe(t.gpu_pattern("action", host), Action, live.on_action)
        bus.on_connected(self._on_connected)

    def start(self) -> None:
        self._server_thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, name="dashboard-http",
            daemon=True)
        self._server_thread.start()
        deadline = time.monotonic() + START_WAIT_S
        while not self.server.started:
            if not self._server_thread.is_alive() or time.monotonic() > deadline:
                raise RunFailure(f"the HTTP server did not start on {self.url}")
            time.sleep(0.01)
        self._tick_thread = threading.Thread(target=self._tick_loop, name="dashboard-tick",
                                             daemon=True)
        self._tick_thread.start()
        writes = ("every write needs 'Authorization: Bearer <token>' (GPUHEAL_DASHBOARD_TOKEN)"
                  if self.opts.token else "writes need no token (loopback only)")
        history = f"history from {self.opts.db}" if self.opts.db else "no --db: live data only"
        (log.info if self.loopback else log.warning)("dashboard on %s: %s; %s", self.url,
                                                      writes, history)

    def stop(self) -> None:
        self._stop.set()
        self.broadcaster.close_all()
        self.server.should_exit = True
        if self._server_thread is not None:
            self._server_thread.join(timeout=5)
            if self._server_thread.is_alive():
                self.server.force_exit = True
                self._server_thread.join(timeout=2)
        if self._tick_thread is not None:
            self._tick_thread.join(timeout=5)
        with contextlib.suppress(OSError):
            self.sock.close()

    def summary(self) -> str:
        events, actions = self.live.counts()
        return (f"{len(self.live.snapshot.states)} GPUs, {sum(events.values())} events, "
                f"{sum(actions.values())} actions seen; {self.broadcaster.sent} stream "
                f"messages, {self.broadcaster.dropped} slow clients dropped")

    # --- the broker ----------------------------------------------------------------------------
    def _on_connected(self) -> None:
        # runs before the Bus calls itself connected: say so here
        self._tick(connected=True)

    def _tick_loop(self) -> None:
        while not self._stop.wait(TICK_S):
            self._tick()

    def _tick(self, connected: bool | None = None) -> None:
        if connected is None:
            connected = self.bus is not None and self.bus.connected
        self.live.set_connected(connected)
        change = self.live.health_change()
        if change is not None:
            self.broadcaster.publish("health", lambda: change)

    def _publish(self, topic: str, payload: bytes) -> None:
        bus = self.bus
        if bus is None or not bus.connected:
            raise WriteFailed("not connected to the broker: the command was not sent")
        with self._write_lock:  # one command at a time: a refusal is then ours
            refused = bus.stats.refused_publications
            delivery = bus.publish(topic, payload, qos=1)
            if not delivery.queued:
                raise WriteFailed("the MQTT client refused the command (not connected?)")
            if not delivery.wait(PUBLISH_WAIT_S):
                raise WriteFailed(f"the broker did not acknowledge the command within "
                                  f"{PUBLISH_WAIT_S:g} s")
            # the Bus counts a PUBACK with an error reason before the delivery completes
            if bus.stats.refused_publications > refused:
                raise WriteFailed(f"the broker refused the command on {topic}: may this "
                                  "identity write there? (the dashboard or operator identity "
                                  "of `gpuheal broker init` may)")


def run(opts: DashboardOptions, stop: threading.Event | None = None) -> int:
    """Run the dashboard until ``stop`` is set (or SIGINT/SIGTERM/SIGHUP when no ``stop`` is
    given); the exit code of :mod:`gpuheal.runtime`."""
    return run_service("dashboard", lambda: DashboardService(opts), opts.common, stop)
