"""``gpuheal status``: every GPU's retained State, its age, the components' liveness and the
healers' guards, as a table; ``--watch`` refreshes it in place; ``--forget HOST`` clears a
host's retained topics (a machine gone for good).

A State is *stale* when its analyzer says ``offline`` (it no longer writes) or it is older
than :data:`STALE_AFTER_S`: then its health is shown as ``stale``, never as ``healthy``.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol, TextIO

from gpuheal.models import HealerState, State, Status
from gpuheal.mqtt import Bus, Received
from gpuheal.options import CommonOptions
from gpuheal.runtime import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from gpuheal.topics import TopicParts

QUIET_S = 0.3
"""Retained messages arrive in one burst after subscribing; stop after this much quiet."""
STALE_AFTER_S = 120.0
"""A State older than this (seconds of the wall clock) is shown as stale."""
COMPONENTS_SHOWN = ("publisher", "analyzer", "healer", "recorder", "dashboard")


@dataclass
class Snapshot:
    """What the broker holds (retained) under a prefix, kept current while subscribed."""

    states: dict[tuple[str, int], State] = field(default_factory=dict)
    statuses: dict[tuple[str, str], Status] = field(default_factory=dict)
    healers: dict[str, HealerState] = field(default_factory=dict)
    retained_topics: set[str] = field(default_factory=set)
    last_change: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def on_state(self, received: Received[State]) -> None:
        s = received.message
        with self.lock:
            self.states[(s.host, s.index)] = s
            self._touch(received)

    def on_status(self, received: Received[Status]) -> None:
        parts = received.parts
        if parts.host is None or parts.component is None:
            return
        with self.lock:
            self.statuses[(parts.host, parts.component)] = received.message
            self._touch(received)

    def on_healer(self, received: Received[HealerState]) -> None:
        with self.lock:
            self.healers[received.message.host] = received.message
            self._touch(received)

    def on_cleared(self, parts: TopicParts) -> None:
        with self.lock:
            if parts.kind == "state" and parts.host is not None and parts.index is not None:
                self.states.pop((parts.host, parts.index), None)
            elif parts.kind == "status" and parts.host and parts.component:
                self.statuses.pop((parts.host, parts.component), None)
            elif parts.kind == "healer_state" and parts.host:
                self.healers.pop(parts.host, None)
            self.last_change = time.monotonic()

    def _touch(self, received: Received[object]) -> None:
        if received.retain:
            self.retained_topics.add(received.topic)
        self.last_change = time.monotonic()

    def copy(self) -> Snapshot:
        with self.lock:
            return Snapshot(dict(self.states), dict(self.statuses), dict(self.healers),
                            set(self.retained_topics), self.last_change)


class RetainedView(Protocol):
    """What keeps the retained picture: a :class:`Snapshot`, the dashboard's live model."""

    def on_state(self, received: Received[State]) -> None: ...
    def on_status(self, received: Received[Status]) -> None: ...
    def on_healer(self, received: Received[HealerState]) -> None: ...
    def on_cleared(self, parts: TopicParts) -> None: ...


def subscribe_snapshot(bus: Bus, common: CommonOptions, snapshot: RetainedView,
                       host: str | None = None) -> None:
    """Keep ``snapshot`` current from ``bus`` (States, statuses, healer states, and their
    deletion)."""
    t = common.topics
    bus.subscribe(t.gpu_pattern("state", host), State, snapshot.on_state,
                  on_cleared=snapshot.on_cleared)
    bus.subscribe(t.status_pattern(host), Status, snapshot.on_status,
                  on_cleared=snapshot.on_cleared)
    bus.subscribe(t.healer_state_pattern(host), HealerState, snapshot.on_healer,
                  on_cleared=snapshot.on_cleared)


class ConnectError(RuntimeError):
    """No broker, or the broker refused us; ``code`` is the exit code to use."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def viewer_bus(common: CommonOptions) -> Bus:
    """A connection that only listens (no status of its own)."""
    return Bus(common.broker, "dashboard", common.host_name, common.topics,
               announce_status=False)


def connect(bus: Bus, timeout_s: float) -> None:
    """Connect or raise ConnectError with one clear line (fails fast on bad credentials)."""
    if bus.start(wait_s=timeout_s):
        return
    bus.stop()
    reason = bus.last_connect_error or f"no broker answered at {bus.broker.redacted()}"
    raise ConnectError(reason, EXIT_USAGE)


def collect(common: CommonOptions, timeout_s: float = 2.0,
            host: str | None = None) -> Snapshot:
    """The retained States, statuses and healer states on the broker now."""
    snapshot = Snapshot()
    bus = viewer_bus(common)
    subscribe_snapshot(bus, common, snapshot, host)
    connect(bus, timeout_s)
    try:
        wait_quiet(snapshot, timeout_s)
    finally:
        bus.stop()
    return snapshot


def wait_quiet(snapshot: Snapshot, timeout_s: float) -> None:
    """Until the retained burst is over (QUIET_S without news), at most ``timeout_s``."""
    snapshot.last_change = time.monotonic()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with snapshot.lock:
            quiet = time.monotonic() - snapshot.last_change
        if quiet >= QUIET_S:
            return
        time.sleep(0.05)


# --- rendering ---------------------------------------------------------------------------------
def _fmt(value: float | None, unit: str = "", digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}{unit}"


def age_text(seconds: float) -> str:
    if seconds < 0:
        seconds = 0.0
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.0f}h"
    return f"{seconds / 86400:.0f}d"


def is_stale(state: State, snapshot: Snapshot, now: float) -> bool:
    """No analyzer writes this State any more: its analyzer is offline, or it is old."""
    if state.analyzer is not None:
        status = snapshot.statuses.get((state.analyzer, "analyzer"))
        if status is not None and status.value == "offline":
            return True
    return now - state.ts > STALE_AFTER_S


def format_table(snapshot: Snapshot, now: float | None = None) -> str:
    """The GPU table, then one line per host with its components and its healer."""
    now = time.time() if now is None else now
    header = ("HOST", "GPU", "NAME", "HEALTH", "TEMP", "UTIL", "MEMORY", "POWER", "AGE",
              "CONDITION")
    rows = [header]
    for (_host, _index), s in sorted(snapshot.states.items()):
        mem = (f"{_fmt(s.memory.used_mb)}/{_fmt(s.memory.total_mb)} MiB"
               if s.memory.total_mb is not None else _fmt(s.memory.used_mb, " MiB"))
        health = "stale" if is_stale(s, snapshot, now) else s.health
        condition = s.error_message or ("-" if s.error == "none" else s.error)
        rows.append((s.host, str(s.index), (s.name or "-")[:32], health,
                     _fmt(s.temperature, " C"), _fmt(s.utilization, " %"), mem,
                     _fmt(s.power.draw_w, " W", 1), age_text(now - s.ts), condition[:60]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in rows]
    hosts = sorted({h for h, _ in snapshot.states} | {h for h, _ in snapshot.statuses}
                   | set(snapshot.healers))
    if hosts:
        lines.append("")
    for host in hosts:
        parts = []
        for comp in COMPONENTS_SHOWN:
            status = snapshot.statuses.get((host, comp))
            if status is not None:
                text = status.value
                if status.value == "offline" and status.reason == "lost":
                    text = "lost"
                parts.append(f"{comp} {text}")
        healer = snapshot.healers.get(host)
        if healer is not None:
            parts.append(healer_text(healer))
        lines.append(f"{host}: " + (", ".join(parts) or "no component status"))
    return "\n".join(lines)


def healer_text(h: HealerState) -> str:
    """The healer's guards in a few words."""
    mode = "paused" if not h.enabled else ("dry-run" if h.dry_run else "healing")
    breaker = f"breaker OPEN ({h.breaker_reason})" if h.breaker_open else "breaker closed"
    text = f"healer {mode}, {breaker}, budget {h.budget_left}/{h.budget_per_hour}"
    if h.throttled:
        text += f", throttled GPU {', '.join(map(str, h.throttled))}"
    return text


# --- the command -----------------------------------------------------------------------------
def print_status(common: CommonOptions, timeout_s: float = 2.0, as_json: bool = False,
                 out: TextIO = sys.stdout, watch_s: float | None = None,
                 host: str | None = None, stop: threading.Event | None = None) -> int:
    """Print the table (or JSON lines); with ``watch_s`` redraw it in place every so often."""
    try:
        if watch_s is None:
            return _print_once(collect(common, timeout_s, host), as_json, out, common)
        return _watch(common, timeout_s, watch_s, out, host, stop or threading.Event())
    except ConnectError as exc:
        print(f"gpuheal status: {exc}", file=sys.stderr)
        return exc.code


def _print_once(snapshot: Snapshot, as_json: bool, out: TextIO, common: CommonOptions) -> int:
    if as_json:
        for _, s in sorted(snapshot.states.items()):
            out.write(s.model_dump_json() + "\n")
        return EXIT_OK
    if not snapshot.states:
        print(f"gpuheal status: no GPU state under {common.prefix}/ on the broker",
              file=sys.stderr)
        return EXIT_FAILED
    out.write(format_table(snapshot) + "\n")
    return EXIT_OK


def _watch(common: CommonOptions, timeout_s: float, every_s: float, out: TextIO,
           host: str | None, stop: threading.Event) -> int:
    snapshot = Snapshot()
    bus = viewer_bus(common)
    subscribe_snapshot(bus, common, snapshot, host)
    connect(bus, timeout_s)
    tty = out.isatty()
    try:
        wait_quiet(snapshot, timeout_s)
        while True:
            text = format_table(snapshot.copy())
            stamp = time.strftime("%H:%M:%S")
            if tty:
                out.write("\x1b[H\x1b[2J")  # home, clear: redraw in place
            out.write(f"gpuheal status  {stamp}  (every {every_s:g} s, Ctrl-C stops)\n{text}\n")
            out.flush()
            if stop.wait(every_s):
                return EXIT_OK
    finally:
        bus.stop()


FORGET_SETTLE_S = 1.0
"""Seconds between clearing a host's Home Assistant configs and its other retained topics."""


def _clear(bus: Bus, topics: list[str], out: TextIO, quiet: bool = False) -> None:
    """Delete retained ``topics`` (QoS 1) and say which the broker took."""
    deliveries = [(topic, bus.publish(topic, b"", qos=1, retain=True)) for topic in topics]
    for _, delivery in deliveries:
        delivery.wait(5.0)
    for topic, _ in deliveries:
        if topic in bus.refused_topics:
            out.write(f"refused {topic}\n")
        elif not quiet:
            out.write(f"cleared {topic}\n")


def forget_host(common: CommonOptions, host: str, timeout_s: float = 2.0,
                out: TextIO = sys.stdout) -> int:
    """Clear every retained topic of ``host`` (its States, statuses, healer state and Home
    Assistant discovery configs): for a machine that is gone for good. The broker must let
    this identity write them (the ``admin`` identity of ``gpuheal broker init`` may)."""
    t = common.topics
    snapshot = Snapshot()
    bus = Bus(common.broker, "dashboard", common.host_name, t, announce_status=False)
    subscribe_snapshot(bus, common, snapshot, host)
    connect(bus, timeout_s)
    try:
        wait_quiet(snapshot, timeout_s)
        found = set(snapshot.retained_topics)
        if not found:
            print(f"gpuheal status: nothing retained for host {host} under {common.prefix}/",
                  file=sys.stderr)
            return EXIT_FAILED
        discovery = set(t.ha_host_configs(host))
        for gpu_host, index in snapshot.states:
            discovery.update(t.ha_gpu_configs(gpu_host, index))
        # Home Assistant first: its entities go away before their State topics are emptied
        # (an entity still subscribed would read an empty State: errors in its log); it
        # removes them asynchronously, hence the pause.
        _clear(bus, sorted(discovery), out, quiet=True)
        time.sleep(FORGET_SETTLE_S)
        _clear(bus, sorted(found), out)
        if bus.refused_topics:
            print(f"gpuheal status: the broker refused {len(bus.refused_topics)} of them: use "
                  f"an identity that may write {common.prefix}/{host}/# (the admin identity "
                  "of `gpuheal broker init`: --env-file .../admin.env)", file=sys.stderr)
            return EXIT_FAILED
        return EXIT_OK
    finally:
        bus.stop()
