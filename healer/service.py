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
import signal
import threading
import time
from pathlib import Path
from typing import Any, get_args

import paho.mqtt.client as paho

from gpuheal.config.healing import DESTRUCTIVE_ACTIONS
from gpuheal.models import (
    ActionName,
    Event,
    HealerSet,
    PayloadError,
    SimCommand,
    State,
    parse_payload,
)
from gpuheal.mqtt import BrokerURLError, Bus
from gpuheal.options import HealerOptions
from gpuheal.topics import Topics
from healer.actuators import Actuator, Result
from healer.actuators.dispatch import real_actuators, sim_actuators, watchdog_s
from healer.actuators.power import load_nvml
from healer.policy import Decisions, Policy
from healer.runner import ActionRunner
from healer.store import default_state_file, load_guard_state, save_guard_state

log = logging.getLogger(__name__)

TICK_S = 0.2
"""Wall seconds between checks of the verification deadlines."""
KNOWN_ACTIONS: frozenset[str] = frozenset(get_args(ActionName))
PUBLISH_WAIT_S = 5.0


class OptionsError(ValueError):
    """Healer options that cannot be used."""


def opted_in_actions(opts: HealerOptions) -> set[str]:
    """Destructive actions this run may take: config + ``--allow`` (+ all of them with sim)."""
    unknown = sorted(set(opts.allow) - KNOWN_ACTIONS)
    if unknown:
        raise OptionsError(f"--allow: unknown action(s) {', '.join(unknown)}; "
                           f"destructive ones are {', '.join(sorted(DESTRUCTIVE_ACTIONS))}")
    allowed = set(opts.common.config.healer.guards.destructive_opt_in) | set(opts.allow)
    if opts.source == "sim":
        allowed |= DESTRUCTIVE_ACTIONS
    return allowed


class HealerService:
    """Owns the policy on one thread; MQTT callbacks only validate and enqueue."""

    def __init__(self, opts: HealerOptions, actuator: Actuator | None = None) -> None:
        common = opts.common
        self.opts = opts
        self.host = common.host_name
        self.topics: Topics = common.topics
        self.config = common.config.healer
        self.state_file = Path(opts.state_file) if opts.state_file else default_state_file(
            self.host)
        opted_in = opted_in_actions(opts)
        guard = load_guard_state(self.state_file, self.host)
        self.policy = Policy(self.host, self.config, guard, dry_run=opts.dry_run,
                             opted_in=opted_in, act_on_replay=opts.source == "sim")
        self.bus = Bus(common.broker, "healer", self.host, self.topics)
        self.inbox: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._state_lock = threading.Lock()
        self._state_payload: bytes | None = None
        self._state_key: str | None = None
        if actuator is None:
            if opts.source == "sim":
                log.warning("healer: simulated actuators (--source sim): actions go to the "
                            "simulated GPU, so every destructive action is opted in")
                actuator = sim_actuators(self._publish_sim, self.config.actuators)
            else:
                actuator = real_actuators(self.config.actuators, nvml=load_nvml())
        self.runner = ActionRunner(actuator, self._on_result,
                                   watchdog_s(self.config.actuators))
        log.info("healer for %s: state file %s, opted in: %s, dry-run: %s", self.host,
                 self.state_file, ", ".join(sorted(opted_in)) or "none", self.policy.dry_run)

    # --- MQTT side (paho's thread: validate and enqueue only) -----------------------------
    def _subscribe(self) -> None:
        t = self.topics
        self.bus.subscribe(t.gpu_pattern("event", self.host), self._on_event_msg, qos=1)
        self.bus.subscribe(t.gpu_pattern("state", self.host), self._on_state_msg, qos=1)
        self.bus.subscribe(t.healer_set(self.host), self._on_set_msg, qos=1)
        self.bus.on_connected(self._announce)

    def _on_event_msg(self, msg: paho.MQTTMessage) -> None:
        self._enqueue(msg, Event, "event")

    def _on_state_msg(self, msg: paho.MQTTMessage) -> None:
        if not msg.payload:  # a cleared retained State
            return
        self._enqueue(msg, State, "retained_state" if msg.retain else "state")

    def _on_set_msg(self, msg: paho.MQTTMessage) -> None:
        self._enqueue(msg, HealerSet, "set")

    def _enqueue(self, msg: paho.MQTTMessage, model: type, kind: str) -> None:
        payload = bytes(msg.payload)
        try:
            message = parse_payload(model, payload)
        except PayloadError as exc:
            self.bus.deadletter(msg.topic, payload, exc.reason)
            return
        if kind in ("event", "state", "retained_state"):
            parts = self.topics.parse(msg.topic)
            if parts is None or parts.host != message.host or parts.index != message.index:
                self.bus.deadletter(msg.topic, payload,
                                    "topic mismatch: the payload's host/index differ from the "
                                    "topic's")
                return
        self.inbox.put((kind, message))

    def _announce(self) -> None:
        """Re-publish the retained HealerState on every (re)connect."""
        with self._state_lock:
            payload = self._state_payload
        if payload is not None:
            self.bus.publish(self.topics.healer_state(self.host), payload, qos=1, retain=True)

    # --- worker side ---------------------------------------------------------------------
    def _on_result(self, action_id: str, result: Result) -> None:
        self.inbox.put(("result", (action_id, result)))

    def _publish_sim(self, index: int, command: SimCommand) -> bool:
        info = self.bus.publish(self.topics.sim(self.host, index), command.to_json(), qos=1)
        try:
            info.wait_for_publish(PUBLISH_WAIT_S)
        except (RuntimeError, ValueError) as exc:
            log.warning("simulator command not published: %s", exc)
            return False
        return info.is_published()

    # --- the policy thread ---------------------------------------------------------------
    def run(self, stop: threading.Event) -> int:
        self._subscribe()
        self._publish_state(force=True)
        self.bus.start()
        try:
            next_tick = time.monotonic()
            while not stop.is_set():
                timeout = max(0.0, next_tick - time.monotonic())
                try:
                    kind, item = self.inbox.get(timeout=min(timeout, TICK_S))
                except queue.Empty:
                    kind, item = "", None
                if kind:
                    self._apply(self._handle(kind, item))
                if time.monotonic() >= next_tick:
                    next_tick = time.monotonic() + TICK_S
                    self.runner.check_overdue()
                    self._apply(self.policy.tick())
        finally:
            self.runner.shutdown()
            self._save()
            self.bus.stop()
        return 0

    def _handle(self, kind: str, item: Any) -> Decisions:
        if kind == "event":
            return self.policy.on_event(item)
        if kind in ("state", "retained_state"):
            return self.policy.on_state(item, retained=kind == "retained_state")
        if kind == "set":
            return self.policy.on_set(item)
        action_id, result = item
        return self.policy.on_result(action_id, result)

    def _apply(self, decisions: Decisions) -> None:
        for action in decisions.actions:
            self.bus.publish(self.topics.action(self.host, action.index), action.to_json(), qos=1)
        if decisions.state_changed:
            self._save()
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
        if self.bus.connected:
            self.bus.publish(self.topics.healer_state(self.host), payload, qos=1, retain=True)


def run(opts: HealerOptions, stop: threading.Event | None = None) -> int:
    """Run the healer until ``stop`` is set (or SIGINT/SIGTERM when no ``stop`` is given)."""
    if stop is None:
        stop = threading.Event()
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda *_: stop.set())
    try:
        service = HealerService(opts)
    except (OptionsError, BrokerURLError, ValueError) as exc:
        log.error("healer: %s", exc)
        return 2
    return service.run(stop)
