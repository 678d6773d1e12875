"""``gpuheal tail``: what happens, as it happens, one readable line per event and action.

    12:04:31 node1/0 thermal_throttling warning — temperature 84.2 °C (warning at 83 °C)
        12:04:31 throttle_gpu started
        12:04:33 throttle_gpu succeeded
        12:05:02 throttle_gpu verified
    12:05:02 node1/0 thermal_throttling cleared — cleared: temperature 79.1 °C, below 80 °C

At the start, every GPU's retained State is summarised once. On a terminal the lines are
coloured by severity (events) and outcome (actions); ``--json`` prints the messages as JSON
lines instead. ``--host``, ``--gpu`` and ``--kind`` filter.
"""

from __future__ import annotations

import queue
import sys
import threading
import time
from dataclasses import dataclass
from typing import TextIO

from gpuheal.models import Action, Event, State
from gpuheal.mqtt import Bus, Received
from gpuheal.options import CommonOptions
from gpuheal.runtime import EXIT_OK
from gpuheal.status import ConnectError, connect

RESET = "\x1b[0m"
COLORS = {
    "warning": "\x1b[33m", "critical": "\x1b[31m", "emergency": "\x1b[1;31m",
    "cleared": "\x1b[32m", "verified": "\x1b[32m", "succeeded": "\x1b[36m",
    "started": "\x1b[36m", "failed": "\x1b[31m", "unresolved": "\x1b[31m",
    "skipped": "\x1b[33m", "dry_run": "\x1b[2m", "acknowledged": "\x1b[35m",
    "healthy": "\x1b[32m", "unavailable": "\x1b[1;31m",
}
INDENT = "    "


@dataclass(frozen=True)
class Filters:
    host: str | None = None
    gpu: int | None = None
    kind: str | None = None

    def keep(self, host: str, index: int, kind: str | None = None) -> bool:
        return ((self.host is None or host == self.host)
                and (self.gpu is None or index == self.gpu)
                and (self.kind is None or kind is None or kind == self.kind))


def clock_text(ts: float) -> str:
    """``HH:MM:SS`` (local time) of a UNIX time."""
    return time.strftime("%H:%M:%S", time.localtime(ts))


def _paint(text: str, key: str, color: bool) -> str:
    code = COLORS.get(key)
    return f"{code}{text}{RESET}" if color and code else text


def format_state(state: State, color: bool = False) -> str:
    """One summary line of a GPU's State."""
    def num(value: float | None, unit: str) -> str:
        return "-" if value is None else f"{value:.0f}{unit}"

    mem = state.memory
    memory = (f"{num(mem.used_mb, '')}/{num(mem.total_mb, ' MiB')}" if mem.total_mb
              else num(mem.used_mb, " MiB"))
    health = _paint(state.health, state.health if state.health != "warning" else "warning",
                    color)
    line = (f"{state.host}/{state.index} {state.name or 'GPU'}: {health}, "
            f"{num(state.temperature, ' °C')}, {num(state.utilization, ' %')}, {memory}, "
            f"{num(state.power.draw_w, ' W')}")
    if state.error_message:
        line += f" — {state.error_message}"
    return line


def format_event(event: Event, color: bool = False) -> str:
    """``HH:MM:SS host/gpu kind severity — message`` (``cleared`` instead of the severity)."""
    label = "cleared" if event.phase == "cleared" else event.severity
    if event.phase == "escalated":
        label = f"{event.severity} (escalated)"
    key = "cleared" if event.phase == "cleared" else event.severity
    return (f"{clock_text(event.ts)} {event.host}/{event.index} {event.kind} "
            f"{_paint(label, key, color)} — {event.message}")


def format_action(action: Action, color: bool = False) -> str:
    """An action line, indented beneath its incident: ``HH:MM:SS action status (reason)``."""
    status = _paint(action.status, action.status, color)
    line = f"{INDENT}{clock_text(action.ts)} {action.action} {status}"
    if action.reason:
        line += f" ({action.reason})"
    message = action.detail.get("message") if isinstance(action.detail, dict) else None
    if isinstance(message, str) and action.status in ("failed", "skipped", "unresolved"):
        line += f": {message[:120]}"
    return line


def tail(common: CommonOptions, filters: Filters, out: TextIO = sys.stdout,
         as_json: bool = False, stop: threading.Event | None = None,
         timeout_s: float = 5.0, color: bool | None = None) -> int:
    """Print until ``stop`` is set (Ctrl-C). Retained States first (a summary), then every
    Event and Action as it arrives."""
    stop = stop or threading.Event()
    color = out.isatty() if color is None else color
    lines: queue.Queue[str] = queue.Queue()
    t = common.topics
    host = filters.host

    def on_state(received: Received[State]) -> None:
        s = received.message
        if received.retain and filters.keep(s.host, s.index):
            lines.put(s.model_dump_json() if as_json else format_state(s, color))

    def on_event(received: Received[Event]) -> None:
        e = received.message
        if filters.keep(e.host, e.index, e.kind):
            lines.put(e.model_dump_json() if as_json else format_event(e, color))

    def on_action(received: Received[Action]) -> None:
        a = received.message
        kind = a.detail.get("kind") if isinstance(a.detail, dict) else None
        if filters.keep(a.host, a.index, kind if isinstance(kind, str) else None):
            lines.put(a.model_dump_json() if as_json else format_action(a, color))

    bus = Bus(common.broker, "dashboard", common.host_name, t, announce_status=False)
    bus.subscribe(t.gpu_pattern("state", host), State, on_state)
    bus.subscribe(t.gpu_pattern("event", host), Event, on_event)
    bus.subscribe(t.gpu_pattern("action", host), Action, on_action)
    try:
        connect(bus, timeout_s)
    except ConnectError as exc:
        print(f"gpuheal tail: {exc}", file=sys.stderr)
        return exc.code
    try:
        while not stop.is_set():
            try:
                line = lines.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                out.write(line + "\n")
                out.flush()
            except BrokenPipeError:
                return EXIT_OK  # the reader (head, less) went away
    finally:
        bus.stop()
    return EXIT_OK
