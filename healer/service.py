"""The healer as an MQTT service: a thin adapter around :class:`healer.policy.Policy`.

* subscribes (QoS 1) to this host's Events and States and to ``P/H/healer/set``; every payload
  is validated (invalid → dead-letter, never an action) and queued;
* one thread (the caller's) owns the policy: it takes the queue, ticks every ~0.2 s for the
  verification deadlines, publishes Actions (QoS 1) and the retained HealerState, persists the
  guard state, and hands actuator requests to worker threads (never paho's network thread);
* ``--source sim`` selects the simulated actuator, which heals the simulated GPU over
  ``P/H/gpu/I/sim``; every destructive action is then opted in (the simulated GPU is harmless).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from pathlib import Path
from typing import Any, get_args

from gpuheal.config.healing import DESTRUCTIVE_ACTIONS
from gpuheal.models import ActionName, Event, HealerSet, SimCommand, State
from gpuheal.mqtt import Bus, Received
from gpuheal.options import HealerOptions
from gpuheal.paths import healer_state_file
from gpuheal.runtime import BusOptions, UsageError, run_service
from gpuheal.topics import Topics
from healer.actuators import Actuator, Result
from healer.actuators.dispatch import real_actuators, sim_actuators, watchdog_s
from healer.actuators.power import load_nvml
from healer.policy import Decisions, Policy
from healer.runner import ActionRunner
from healer.store import load_guard_state, save_guard_state

log = logging.getLogger(__name__)

TICK_S = 0.2
"""Wall seconds between checks of the verification deadlines."""
CLOCK_SAVE_S = 10.0
"""Wall seconds between saves of the state file when only the clock moved."""
KNOWN_ACTIONS: frozenset[str] = frozenset(get_args(ActionName))
PUBLISH_WAIT_S = 5.0


def opted_in_actions(opts: HealerOptions) -> set[str]:
    """Destructive actions this run may take: config + ``--allow`` (+ all of them with sim)."""
    unknown = sorted(set(opts.allow) - KNOWN_ACTIONS)
    if unknown:
        raise UsageError(f"--allow: unknown action(s) {', '.join(unknown)}; "
                         f"destructive ones are {', '.join(sorted(DESTRUCTIVE_ACTIONS))}")
    allowed = set(opts.common.config.healer.guards.destructive_opt_in) | set(opts.allow)
    if opts.source == "sim":
        allowed |= DESTRUCTIVE_ACTIONS
    return allowed


class HealerService:
    """Owns the policy on one thread; MQTT callbacks only enqueue."""

    component = "healer"

    def __init__(self, opts: HealerOptions, actuator: Actuator | None = None) -> None:
        common = opts.common
        self.opts = opts
        self.host = common.host_name
        self.topics: Topics = common.topics
        self.config = common.config.healer
        self.state_file = Path(opts.state_file) if opts.state_file else healer_state_file(
            self.host)
        opted_in = opted_in_actions(opts)
        guard = load_guard_state(self.state_file, self.host)
        self.policy = Policy(self.host, self.config, guard, dry_run=opts.dry_run,
                             opted_in=opted_in, act_on_replay=opts.source == "sim")
        self.bus: Bus | None = None
        self.finished = threading.Event()
        self.inbox: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._state_lock = threading.Lock()
        self._state_payload: bytes | None = None
        self._state_key: str | None = None
        self._simulated = actuator is None and opts.source == "sim"
        if actuator is None:
            if self._simulated:
                log.warning("healer: simulated actuators (--source sim): actions go to the "
                            "simulated GPU, so every destructive action is opted in")
                actuator = sim_actuators(self._publish_sim, self.config.actuators)
            else:
                actuator = real_actuators(self.config.actuators, nvml=load_nvml(),
                                          probe=self.config.probe)
        self.runner = ActionRunner(actuator, self._on_result,
                                   watchdog_s(self.config.actuators))
        log.info("healer for %s: state file %s, opted in: %s, dry-run: %s", self.host,
                 self.state_file, ", ".join(sorted(opted_in)) or "none", self.policy.dry_run)

    # --- lifecycle -------------------------------------------------------------------------
    def bus_options(self) -> BusOptions:
        return BusOptions(exclusive=True)  # two for one host: the newest wins, the other stops

    def attach(self, bus: Bus) -> None:
        self.bus = bus
        t = self.topics
        bus.subscribe(t.gpu_pattern("event", self.host), Event, self._on_event)
        bus.subscribe(t.gpu_pattern("state", self.host), State, self._on_state)
        bus.subscribe(t.healer_set(self.host), HealerSet, self._on_set)
        bus.on_connected(self._announce)
        self._publish_state(force=True)

    def start(self) -> None:
        self.inbox.put(("resume", None))  # first: actions a restart interrupted end explicitly
        self._thread = threading.Thread(target=self._loop, name="healer-policy", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.runner.shutdown()
        self._save()

    def summary(self) -> str:
        g = self.policy.guard
        return (f"breaker {'open' if g.breaker_open else 'closed'}, "
                f"{len(g.budget_ts)} actions in the last hour")

    # --- MQTT side (the network thread: enqueue only) ------------------------------------
    def _on_event(self, received: Received[Event]) -> None:
        self.inbox.put(("event", received.message))

    def _on_state(self, received: Received[State]) -> None:
        self.inbox.put(("retained_state" if received.retain else "state", received.message))

    def _on_set(self, received: Received[HealerSet]) -> None:
        self.inbox.put(("set", received.message))

    def _announce(self) -> None:
        """Re-publish the retained HealerState on every (re)connect."""
        with self._state_lock:
            payload = self._state_payload
        if payload is not None and self.bus is not None:
            self.bus.publish(self.topics.healer_state(self.host), payload, qos=1, retain=True)

    # --- worker side ---------------------------------------------------------------------
    def _on_result(self, action_id: str, result: Result) -> None:
        self.inbox.put(("result", (action_id, result)))

    def _publish_sim(self, index: int, command: SimCommand) -> bool:
        if self.bus is None:
            return False
        delivery = self.bus.publish(self.topics.sim(self.host, index), command.to_json(), qos=1)
        return delivery.wait(PUBLISH_WAIT_S)

    # --- the policy thread ---------------------------------------------------------------
    def _loop(self) -> None:
        next_tick = time.monotonic()
        next_save = next_tick + CLOCK_SAVE_S
        while not self._stop.is_set():
            timeout = max(0.0, next_tick - time.monotonic())
            try:
                kind, item = self.inbox.get(timeout=min(timeout, TICK_S))
            except queue.Empty:
                kind, item = "", None
            try:
                if kind:
                    self._apply(self._handle(kind, item))
                if time.monotonic() >= next_tick:
                    next_tick = time.monotonic() + TICK_S
                    self.runner.check_overdue()
                    self._apply(self.policy.tick())
                    if time.monotonic() >= next_save:  # the clock moves without decisions
                        next_save = time.monotonic() + CLOCK_SAVE_S
                        self._save()
            except Exception:  # the policy thread must survive a bug in one decision
                log.exception("healer: handling %s failed", kind or "a tick")

    def _handle(self, kind: str, item: Any) -> Decisions:
        if kind == "resume":
            return self.policy.resume()
        if kind == "event":
            return self.policy.on_event(item)
        if kind in ("state", "retained_state"):
            return self.policy.on_state(item, retained=kind == "retained_state")
        if kind == "set":
            return self.policy.on_set(item)
        action_id, result = item
        return self.policy.on_result(action_id, result)

    def _apply(self, decisions: Decisions) -> None:
        if decisions.state_changed:
            self._save()  # write ahead: what is decided is on disk before it is said or done
        if self.bus is not None:
            for action in decisions.actions:
                self.bus.publish(self.topics.action(self.host, action.index), action.to_json(),
                                 qos=1)
        self._publish_state()
        for request in decisions.requests:
            self.runner.submit(request)

    def _save(self) -> None:
        try:
            save_guard_state(self.state_file, self.policy.guard)
        except OSError as exc:
            log.error("cannot write the healer state file %s: %s", self.state_file, exc)

    def _publish_state(self, force: bool = False) -> None:
        """Publish the retained HealerState when anything but its timestamp changed."""
        state = self.policy.healer_state(fallback_ts=time.time())
        key = state.model_dump_json(exclude={"ts"})
        if not force and key == self._state_key:
            return
        payload = state.to_json()
        with self._state_lock:
            self._state_key = key
            self._state_payload = payload
        if self.bus is not None and self.bus.connected:
            self.bus.publish(self.topics.healer_state(self.host), payload, qos=1, retain=True)


def run(opts: HealerOptions, stop: threading.Event | None = None) -> int:
    """Run the healer until ``stop`` is set (or SIGINT/SIGTERM/SIGHUP when no ``stop`` is
    given); the exit code of :mod:`gpuheal.runtime`."""
    return run_service("healer", lambda: HealerService(opts), opts.common, stop)
