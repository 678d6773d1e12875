"""The live model: what the broker says now, kept current by the MQTT handlers.

* retained States, component statuses and healer states live in a
  :class:`gpuheal.status.Snapshot` (the same one ``gpuheal status`` reads);
* the most recent Events and Actions (a bounded window) and counters of every Event and
  Action seen since the dashboard started (Prometheus counters);
* which conditions need a person (the healer published ``notify`` for them and nobody
  acknowledged them yet);
* staleness: a State is stale when its analyzer is offline or it is old
  (:func:`gpuheal.status.is_stale`), and every State is stale while the broker is away.

The handlers run on the MQTT network thread: they only update dictionaries and hand a
message to ``sink`` (the stream's fan-out, which never blocks). Readers take copies.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

from gpuheal.models import Action, Event, HealerState, State, Status
from gpuheal.mqtt import Received
from gpuheal.status import Snapshot, is_stale
from gpuheal.topics import TopicParts

RECENT = 200
"""Events and Actions kept in memory for the page (the database holds all of them)."""
MAX_NEEDS_PERSON = 10_000

GpuKey = tuple[str, int]
Sink = Callable[[str, Callable[[], Any]], None]
"""``sink(kind, make_payload)``: where live messages go (the stream's fan-out)."""


def _drop_sink(_kind: str, _make: Callable[[], Any]) -> None:
    return None


def state_view(state: State, stale: bool) -> dict[str, Any]:
    """A State as the API shows it: the origin's ``gpu`` object (+ host, uuid, ts, active...)
    and ``stale``."""
    data = state.model_dump(mode="json")
    data["stale"] = stale
    return data


def status_view(host: str, component: str, status: Status) -> dict[str, Any]:
    return {"host": host, "component": component, "value": status.value,
            "reason": status.reason}


class LiveModel:
    """Everything the page and the live endpoints show (thread-safe)."""

    def __init__(self, recent: int = RECENT, clock: Callable[[], float] = time.time) -> None:
        self.snapshot = Snapshot()
        self.clock = clock
        self.sink: Sink = _drop_sink
        self.broker_connected = False
        self._lock = threading.Lock()
        self._events: deque[Event] = deque(maxlen=recent)
        self._actions: deque[Action] = deque(maxlen=recent)
        self.event_counts: Counter[tuple[str, str, str, str]] = Counter()
        """(host, kind, severity, phase) → Events seen since start."""
        self.action_counts: Counter[tuple[str, str, str]] = Counter()
        """(host, action, status) → Action messages seen since start."""
        self._needs_person: dict[str, Action] = {}
        """event_id → the healer's ``notify`` for a condition only a person can take over."""
        self._last_health: tuple[bool, frozenset[GpuKey]] | None = None

    # --- MQTT handlers (the network thread) ----------------------------------------------
    def on_state(self, received: Received[State]) -> None:
        self.snapshot.on_state(received)
        state = received.message
        self.sink("state", lambda: state_view(state, self.is_stale(state)))

    def on_status(self, received: Received[Status]) -> None:
        self.snapshot.on_status(received)
        parts = received.parts
        if parts.host and parts.component:
            message = received.message
            self.sink("status", lambda: status_view(parts.host or "", parts.component or "",
                                                    message))

    def on_healer(self, received: Received[HealerState]) -> None:
        self.snapshot.on_healer(received)
        healer = received.message
        self.sink("healer", lambda: healer.model_dump(mode="json"))

    def on_cleared(self, parts: TopicParts) -> None:
        """A retained topic was deleted (``gpuheal status --forget``)."""
        self.snapshot.on_cleared(parts)
        self.sink("cleared", lambda: {"kind": parts.kind, "host": parts.host,
                                      "index": parts.index, "component": parts.component})

    def on_event(self, received: Received[Event]) -> None:
        event = received.message
        with self._lock:
            self._events.append(event)
            self.event_counts[(event.host, event.kind, event.severity, event.phase)] += 1
            if event.phase == "cleared":
                self._needs_person.pop(event.event_id, None)
        self.sink("event", lambda: event.model_dump(mode="json"))

    def on_action(self, received: Received[Action]) -> None:
        action = received.message
        with self._lock:
            self._actions.append(action)
            self.action_counts[(action.host, action.action, action.status)] += 1
            if action.action == "notify" and action.event_id is not None:
                if action.status == "acknowledged":
                    self._needs_person.pop(action.event_id, None)
                elif len(self._needs_person) < MAX_NEEDS_PERSON:
                    self._needs_person[action.event_id] = action
        self.sink("action", lambda: action.model_dump(mode="json"))

    # --- staleness -------------------------------------------------------------------------
    def is_stale(self, state: State, now: float | None = None) -> bool:
        """No analyzer writes this State any more, or the broker is away."""
        if not self.broker_connected:
            return True
        return is_stale(state, self.snapshot, self.clock() if now is None else now)

    def stale_keys(self, now: float | None = None) -> frozenset[GpuKey]:
        now = self.clock() if now is None else now
        snap = self.snapshot.copy()
        return frozenset(key for key, s in snap.states.items()
                         if not self.broker_connected or is_stale(s, snap, now))

    def set_connected(self, connected: bool) -> None:
        self.broker_connected = connected

    def health_change(self, now: float | None = None) -> dict[str, Any] | None:
        """The broker connection and the stale GPUs, when either changed since the last
        call (what a periodic tick sends to the page); None when nothing changed."""
        stale = self.stale_keys(now)
        current = (self.broker_connected, stale)
        with self._lock:
            if current == self._last_health:
                return None
            self._last_health = current
        return self.health()

    def health(self, now: float | None = None) -> dict[str, Any]:
        return {"broker_connected": self.broker_connected,
                "stale": [{"host": h, "index": i} for h, i in sorted(self.stale_keys(now))]}

    # --- readers ---------------------------------------------------------------------------
    def states(self, now: float | None = None) -> list[dict[str, Any]]:
        """Every known GPU's State (with ``stale``), by host and index."""
        now = self.clock() if now is None else now
        snap = self.snapshot.copy()
        return [state_view(s, not self.broker_connected or is_stale(s, snap, now))
                for _, s in sorted(snap.states.items())]

    def state(self, host: str, index: int, now: float | None = None) -> dict[str, Any] | None:
        with self.snapshot.lock:
            s = self.snapshot.states.get((host, index))
        return None if s is None else state_view(s, self.is_stale(s, now))

    def hosts(self) -> list[dict[str, Any]]:
        """Per host: its components' statuses and its healer's state."""
        snap = self.snapshot.copy()
        names = sorted({h for h, _ in snap.states} | {h for h, _ in snap.statuses}
                       | set(snap.healers))
        out = []
        for host in names:
            components = {c: {"value": s.value, "reason": s.reason}
                          for (h, c), s in sorted(snap.statuses.items()) if h == host}
            healer = snap.healers.get(host)
            out.append({"host": host, "components": components,
                        "healer": healer.model_dump(mode="json") if healer else None})
        return out

    def recent_events(self) -> list[dict[str, Any]]:
        with self._lock:
            events = list(self._events)
        return [e.model_dump(mode="json") for e in events]

    def recent_actions(self) -> list[dict[str, Any]]:
        with self._lock:
            actions = list(self._actions)
        return [a.model_dump(mode="json") for a in actions]

    def needs_person(self) -> list[str]:
        """Event ids of conditions the healer handed to a person (not acknowledged yet)."""
        with self._lock:
            return sorted(self._needs_person)

    def counts(self) -> tuple[dict[tuple[str, str, str, str], int],
                              dict[tuple[str, str, str], int]]:
        with self._lock:
            return dict(self.event_counts), dict(self.action_counts)

    def overview(self, now: float | None = None) -> dict[str, Any]:
        """Everything the page starts from (then the stream keeps it current)."""
        return {
            "broker_connected": self.broker_connected,
            "gpus": self.states(now),
            "hosts": self.hosts(),
            "needs_person": self.needs_person(),
            "recent_events": self.recent_events(),
            "recent_actions": self.recent_actions(),
        }
