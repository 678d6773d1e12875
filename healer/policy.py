"""The healing policy: the life of an incident, in one file (pure: no MQTT, no I/O).

Input: the States and Events of this healer's own host, the actuators' results and the
operator's commands. Output: Action messages (every decision, each skip with its reason) and
actuator requests. Everything it decides is in :class:`~healer.guards.GuardState`, which the
service persists *before* it publishes or acts (write-ahead), so a restart at any point loses
no incident and leaves no action without an outcome.

The life of an incident (one condition, one ``event_id``)::

    raised ─► OPEN ──decide a rung──► ACTING ──succeeded──► VERIFYING ──recovered──► closed
               │ ▲                      │                     │        (action verified)
               │ └─ below its ladder    │ failed, interrupted │ not recovered in the window,
               │                        ▼                     │ escalated, no samples
               │                   next rung ◄────────────────┘ (action unresolved)
               ├─ a guard holds the rung ─► WAITING ─ the guard lifts ─► decide again
               │                              └─ give_up_after_s ─► NEEDS_HUMAN (counted)
               ├─ reset_gpu of a hang ─► PROBING ─ the workload answers ─► WAITING (vetoed)
               │                            └─ it does not (or cannot say) ─► ACTING
               └─ notify, not opted in, past the top rung ─► NEEDS_HUMAN
    Any phase ends when the GPU proves healthy (``cleared``, ``cleared_by: recovered``, or a
    State without the condition), or when a person acknowledges it (``{"ack": EVENT_ID}``).

Only a real return to health verifies an action. Time is the healer's event time
(:mod:`healer.clock`): it never runs backwards, and every action also ends by wall time when
no sample comes (``no_samples``). A replayed recording (``source: replay``) is never acted
on and never moves the clock or verifies anything.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from gpuheal.config.healing import HealerConfig, Rung
from gpuheal.models import (
    SEVERITY_RANK,
    Action,
    Event,
    HealerSet,
    HealerState,
    OpenIncident,
    State,
)
from healer.actuators import Result
from healer.clock import HealerClock
from healer.guards import (
    Block,
    Context,
    GuardState,
    Incident,
    PendingAction,
    Phase,
    ThrottleEntry,
    check,
    event_key,
)
from healer.ladder import ladder_for, rung_for
from healer.messages import ActionMessages

log = logging.getLogger(__name__)

POWER_ACTIONS = frozenset({"throttle_gpu", "restore_power_limit"})
PROBE = "probe_workload"
"""The actuator request that asks the workload whether the GPU still works."""
REMEMBER_CLOSED = 1024


@dataclass(frozen=True)
class ActuatorRequest:
    """Carry out ``action`` on GPU ``index``; answer with :meth:`Policy.on_result`."""

    action_id: str
    action: str
    index: int
    params: dict[str, Any]


@dataclass
class Decisions:
    """What one input led to."""

    actions: list[Action] = field(default_factory=list)
    requests: list[ActuatorRequest] = field(default_factory=list)
    state_changed: bool = False
    """What the healer remembers changed: persist it (before publishing and acting)."""


class Policy:
    """The healer's decisions for one host."""

    def __init__(
        self,
        host: str,
        config: HealerConfig,
        guard: GuardState | None = None,
        *,
        dry_run: bool = False,
        opted_in: Iterable[str] = (),
        clock: HealerClock | None = None,
        act_on_replay: bool = False,
        wall: Callable[[], float] = time.time,
        probe: bool = True,
    ) -> None:
        """``act_on_replay``: act on conditions of replayed samples (only the simulated
        actuators do: a replay must never reset a real GPU). ``probe``: ask the workload
        before a reset (the actuators answer ``probe_workload``)."""
        self.host = host
        self.config = config
        self.g = guard if guard is not None else GuardState(host=host)
        if self.g.clock.now_ts is None and self.g.clock_ts is not None:  # a version 1 file
            self.g.clock.now_ts = self.g.clock.source_ts = self.g.clock_ts
            self.g.clock.wall_ts = wall()
        self.clock = clock or HealerClock(self.g.clock, wall,
                                          config.guards.clock_step_min_s)
        self.g.clock = self.clock.state
        self.force_dry_run = dry_run
        self.opted_in = frozenset(config.guards.destructive_opt_in) | frozenset(opted_in)
        self.act_on_replay = act_on_replay
        self.probe = probe and config.probe.enabled
        self.wall = wall
        self.msg = ActionMessages(host)
        self.gpus: dict[int, State] = {}
        self.cool_since: dict[int, float] = {}
        """Since when (healer time) a throttled GPU has had no thermal condition."""

    # --- switches and time -------------------------------------------------------------
    @property
    def guard(self) -> GuardState:
        return self.g

    @property
    def enabled(self) -> bool:
        override = self.g.enabled_override
        return self.config.guards.enabled if override is None else override

    @property
    def dry_run(self) -> bool:
        if self.force_dry_run:
            return True
        override = self.g.dry_run_override
        return self.config.guards.dry_run if override is None else override

    def now(self) -> float:
        """The healer's event time (the wall clock before any event time was seen)."""
        now = self.clock.now()
        return self.wall() if now is None else now

    def _context(self) -> Context:
        return Context(enabled=self.enabled, opted_in=self.opted_in, now_ts=self.now())

    # --- inputs --------------------------------------------------------------------------
    def resume(self) -> Decisions:
        """After a restart: an action that was running has an unknown outcome: it ends
        ``failed`` (``interrupted``) and the ladder goes on; verifications go on."""
        out = Decisions()
        for pending in list(self.g.pending.values()):
            if pending.phase == "verifying":
                continue
            del self.g.pending[pending.action_id]
            out.state_changed = True
            inc = self.g.incidents.get(pending.event_id or "")
            if pending.phase == "probing":
                if inc is not None:
                    inc.phase = Phase.OPEN
                    self._decide(inc, pending.rung, out)
                continue
            out.actions.append(self.msg.step(pending, "failed", "interrupted", self.now(), {
                "message": "the healer restarted while this action ran: its outcome is "
                           "unknown"}))
            if inc is not None and pending.action != "restore_power_limit":
                self._escalate(inc, pending.rung, out)
        return out

    def on_state(self, state: State, retained: bool = False) -> Decisions:
        """A GPU's State: verification, restores, rebuilding incidents after a (re)connect.

        ``retained``: the broker replayed it on subscribe (history, not news): it never moves
        the clock, and is ignored when it is older than the State already known."""
        out = Decisions()
        if state.host != self.host or (state.source == "replay" and not self.act_on_replay):
            return out
        index = state.index
        previous = self.gpus.get(index)
        if retained and previous is not None and state.ts < previous.ts:
            return out
        if not retained:
            self.clock.observe(state.ts)
        self.gpus[index] = state
        if state.power.limit_w is not None and index not in self.g.default_limits_w:
            self.g.default_limits_w[index] = state.power.limit_w
            out.state_changed = True
        if retained:
            self._rebuild(state, out)
        self._reconcile(state, out)
        if previous is None:
            self._retry(out, index=index)
        self._verify_restore(state, out)
        self._tick(out)
        return out

    def on_event(self, event: Event) -> Decisions:
        """A condition raised, escalated or cleared on one of this host's GPUs."""
        out = Decisions()
        if event.host != self.host:
            return out
        replayed = event.evidence.get("source") == "replay"
        if replayed and not self.act_on_replay:
            if event.phase != "cleared" and self.g.remember(
                    event_key(event.event_id, "replayed", "-"),
                    self.config.guards.remember_events):
                out.state_changed = True
                out.actions.append(self.msg.about(
                    event.event_id, event.index, self._first_action(event), "skipped",
                    "replayed", {"kind": event.kind, "severity": event.severity,
                                 "message": "a condition of replayed samples: recorded, never "
                                            "acted on"}, self.now()))
            return out
        if event.index in self.gpus:
            self.clock.observe(event.ts)
        if not self.g.remember(event_key(event.event_id, event.phase, event.severity),
                               self.config.guards.remember_events):
            log.info("event %s (%s, %s) was handled before; ignoring the redelivery",
                     event.event_id, event.phase, event.severity)
            return out
        out.state_changed = True
        inc = self.g.incidents.get(event.event_id)
        if event.phase == "cleared":
            if inc is not None:
                self._ended(inc, event.cleared_by or "recovered", out)
            self._tick(out)
            return out
        if inc is None:
            if event.event_id in self.g.closed:
                return out  # a person took it over, or it ended: never reopened by an event
            inc = self._open(event.event_id, event.index, event.kind, event.severity,
                             ladder_for(self.config, event), event.ts)
        else:
            self._raise_severity(inc, event.severity, event)
            inc.last_event_ts = max(inc.last_event_ts, event.ts)
        if event.index not in self.gpus:
            self._wait(inc, rung_for(inc.rungs, inc.severity), Block("unknown_gpu", {
                "message": f"no State seen for GPU {event.index} of {self.host} yet"}), out)
            return out
        state = self.gpus[event.index]
        if (state.ts > event.ts and inc.event_id not in {c.event_id for c in state.active}
                and self._pending_of(inc) is None):
            self._skip(inc, inc.action(rung_for(inc.rungs, inc.severity)), "already_cleared",
                       out, {"state_ts": state.ts})
            self.g.close(inc.event_id, REMEMBER_CLOSED)
            return out
        self._on_severity(inc, out)
        self._tick(out)
        return out

    def on_result(self, action_id: str, result: Result) -> Decisions:
        """What an actuator answered for one request."""
        out = Decisions()
        pending = self.g.pending.get(action_id)
        if pending is None or pending.phase not in ("probing", "running"):
            log.warning("result for unknown or finished action %s ignored", action_id)
            return out
        out.state_changed = True
        if pending.phase == "probing":
            self._probed(pending, result, out)
            return out
        inc = self.g.incidents.get(pending.event_id or "")
        if pending.action == "restore_power_limit":
            self._restore_result(pending, result, out)
            return out
        if not result.ok:
            out.actions.append(self.msg.step(pending, "failed", result.reason or "error",
                                             self.now(), result.detail, result.duration_s))
            del self.g.pending[action_id]
            if inc is not None and inc.ended_by is not None:
                self._close(inc)
            elif inc is not None:
                self._escalate(inc, pending.rung, out)
            self._retry(out, index=pending.index)
            return out
        out.actions.append(self.msg.step(pending, "succeeded", None, self.now(), result.detail,
                                         result.duration_s))
        if inc is None or inc.ended_by is not None:  # the condition ended while it ran
            ended = inc.ended_by if inc is not None else "incident_closed"
            recovered = ended == "recovered"
            self._conclude(pending, "verified" if recovered else "unresolved",
                           None if recovered else ended, out)
            if inc is not None:
                self._close(inc)
            self._retry(out, index=pending.index)
            return out
        target = rung_for(inc.rungs, inc.severity)
        if target is not None and target > pending.rung:  # it got worse while the action ran
            self._conclude(pending, "unresolved", "escalated", out, {"severity": inc.severity})
            self._decide(inc, target, out)
            self._retry(out, index=pending.index)
            return out
        self._verify(pending)
        inc.phase = Phase.VERIFYING
        self._retry(out, index=pending.index)
        return out

    def on_set(self, command: HealerSet) -> Decisions:
        """An operator's ``healer/set`` command."""
        out = Decisions(state_changed=True)
        if command.enabled is not None:
            self.g.enabled_override = command.enabled
            log.warning("healing %s by the operator", "enabled" if command.enabled else "paused")
        if command.dry_run is not None:
            self.g.dry_run_override = command.dry_run
            if self.force_dry_run and not command.dry_run:
                log.warning("dry-run stays on: the healer was started with --dry-run")
        if command.reset_breaker:
            log.warning("circuit breaker reset by the operator (was: %s)", self.g.breaker_reason)
            self.g.reset_breaker()
        if command.ack is not None:
            self._acknowledge(command.ack, out)
        self._tick(out)
        return out

    def tick(self) -> Decisions:
        """Deadlines (event and wall time), guards that lifted, restores due."""
        out = Decisions()
        self._tick(out)
        return out

    # --- the life of an incident ---------------------------------------------------------
    def _open(self, event_id: str, index: int, kind: str, severity: str, rungs: list[Rung],
              ts: float) -> Incident:
        inc = Incident(event_id=event_id, index=index, kind=kind, severity=severity,
                       rungs=rungs, since_ts=self.now(), last_event_ts=ts)
        self.g.incidents[event_id] = inc
        return inc

    def _raise_severity(self, inc: Incident, severity: str, event: Event | None) -> None:
        if SEVERITY_RANK[severity] <= SEVERITY_RANK[inc.severity]:
            return
        inc.severity = severity
        if inc.kind == "xid_error" and event is not None:
            # a worse XID brings its own catalog action (reset, a person): a new rung
            inc.rungs.append(Rung(action=ladder_for(self.config, event)[0].action,
                                  min_severity=severity))

    def _on_severity(self, inc: Incident, out: Decisions) -> None:
        """Decide the rung the incident's severity calls for."""
        target = rung_for(inc.rungs, inc.severity)
        pending = self._pending_of(inc)
        if pending is not None:
            if pending.phase == "verifying" and target is not None and target > pending.rung:
                self._conclude(pending, "unresolved", "escalated", out,
                               {"severity": inc.severity})
                self._decide(inc, target, out)
            return  # while it runs, the new severity is taken into account at its result
        if inc.phase == Phase.NEEDS_HUMAN and (target is None or target <= inc.rung):
            return
        if inc.phase == Phase.WAITING and target == inc.wanted:
            return  # still held back for that rung
        self._decide(inc, target, out)

    def _decide(self, inc: Incident, rung: int | None, out: Decisions) -> None:
        """Act on ``rung`` of ``inc`` unless a guard holds it back."""
        if rung is None:
            first = inc.rungs[0]
            reason = "hang_unconfirmed" if inc.kind == "gpu_hang" else "below_ladder"
            if inc.reason != reason:
                self._skip(inc, first.action, reason, out,
                           {"min_severity": first.min_severity})
            inc.phase, inc.reason = Phase.OPEN, reason
            return
        if rung <= inc.rung and inc.phase != Phase.WAITING:
            return
        action = inc.rungs[rung].action
        block = check(self.g, self.config.guards, self._context(), inc, action)
        if block is not None:
            self._wait(inc, rung, block, out)
            return
        inc.wanted, inc.reason, inc.blocked_since = None, None, None
        if self.dry_run:
            inc.rung = max(inc.rung, rung)
            inc.phase = Phase.OPEN
            message, _ = self.msg.decision(inc, action, "dry_run", None,
                                           self._trigger(inc, rung), self.now())
            out.actions.append(message)
            out.state_changed = True
            return
        if action == "reset_gpu" and inc.kind == "gpu_hang" and self.probe:
            self._start_probe(inc, rung, out)
            return
        self._start(inc, rung, action, out)

    def _wait(self, inc: Incident, rung: int | None, block: Block, out: Decisions) -> None:
        """A guard holds ``rung`` back: wait for it to lift, or hand over to a person."""
        action = inc.action(rung)
        changed = inc.reason != block.reason
        if not block.lifts and block.final == "needs_human":
            inc.phase, inc.reason, inc.wanted = Phase.NEEDS_HUMAN, block.reason, None
            if rung is not None:
                inc.rung = max(inc.rung, rung)
        elif not block.lifts:
            inc.phase, inc.reason, inc.wanted = Phase.OPEN, block.reason, None
        else:
            inc.phase, inc.reason, inc.wanted = Phase.WAITING, block.reason, rung
            if inc.blocked_since is None:
                inc.blocked_since = self.now()
        out.state_changed = True
        if changed:  # a guard that still holds says nothing new
            self._skip(inc, action, block.reason, out, block.detail)

    def _start(self, inc: Incident, rung: int, action: str, out: Decisions,
               extra: dict[str, Any] | None = None) -> None:
        now = self.now()
        params = self._params(inc.index, action)
        message, attempt = self.msg.decision(inc, action, "started", None, {
            **self._trigger(inc, rung), "params": params, **(extra or {})}, now)
        params["action_id"] = message.action_id
        pending = PendingAction(action_id=message.action_id, event_id=inc.event_id,
                                action=action, index=inc.index, attempt=attempt, rung=rung,
                                started_ts=now, started_wall=self.wall())
        self.g.pending[pending.action_id] = pending
        self.g.spend_budget(now)
        self.g.set_cooldown(inc.index, action, now + self.config.guards.cooldown_s, now)
        if action == "throttle_gpu" and inc.index not in self.g.throttled:
            self.g.throttled[inc.index] = ThrottleEntry(
                event_id=inc.event_id, restore_limit_w=params.get("power_limit_w")
                or self.g.default_limits_w.get(inc.index))
            self.cool_since.pop(inc.index, None)
        inc.phase, inc.rung = Phase.ACTING, max(inc.rung, rung)
        out.state_changed = True
        out.actions.append(message)
        out.requests.append(ActuatorRequest(pending.action_id, action, inc.index, params))

    def _start_probe(self, inc: Incident, rung: int, out: Decisions) -> None:
        """Before a reset of a hang: does the workload on this GPU still answer?"""
        action_id = f"{inc.event_id}-probe-{inc.attempts + 1}"
        pending = PendingAction(action_id=action_id, event_id=inc.event_id, action="reset_gpu",
                                index=inc.index, attempt=inc.attempts + 1, rung=rung,
                                phase="probing", started_ts=self.now(), started_wall=self.wall())
        self.g.pending[action_id] = pending
        inc.phase = Phase.PROBING
        out.state_changed = True
        out.requests.append(ActuatorRequest(action_id, PROBE, inc.index,
                                            {"action_id": action_id,
                                             **self._params(inc.index, PROBE)}))

    def _probed(self, pending: PendingAction, result: Result, out: Decisions) -> None:
        del self.g.pending[pending.action_id]
        inc = self.g.incidents.get(pending.event_id or "")
        if inc is None or inc.ended_by is not None:
            if inc is not None:
                self._close(inc)
            self._retry(out, index=pending.index)
            return
        verdict = result.detail.get("verdict") if result.ok else "error"
        probe = {"verdict": verdict, **{k: v for k, v in result.detail.items()
                                        if k != "verdict"}}
        if verdict == "answers":
            until = self.now() + self.config.guards.cooldown_s
            self.g.set_cooldown(inc.index, "reset_gpu", until, self.now())
            self._wait(inc, pending.rung, Block("workload_answers", {
                "probe": probe, "retry_after_ts": until,
                "message": "the workload on this GPU answers: it is not hung; no reset"}), out)
            self._retry(out, index=pending.index)
            return
        inc.phase = Phase.OPEN
        block = check(self.g, self.config.guards, self._context(), inc, "reset_gpu")
        if block is not None:
            self._wait(inc, pending.rung, block, out)
            return
        self._start(inc, pending.rung, "reset_gpu", out, {"probe": probe})

    def _verify(self, pending: PendingAction) -> None:
        """Wait for the GPU to prove healthy: a window of event time, and of wall time for
        when no sample comes."""
        window = self.config.guards.verify_window_s
        pending.phase = "verifying"
        pending.deadline_ts = self.now() + window
        pending.deadline_wall = (self.wall() + self.clock.wall_seconds_for(window)
                                 + self.config.guards.verify_wall_grace_s)

    def _conclude(self, pending: PendingAction, status: str, reason: str | None,
                  out: Decisions, detail: dict[str, Any] | None = None) -> None:
        """End an action in flight with ``verified`` or ``unresolved``."""
        out.actions.append(self.msg.step(pending, status, reason, self.now(), detail,
                                         max(0.0, self.now() - pending.started_ts)))
        self.g.pending.pop(pending.action_id, None)
        out.state_changed = True

    def _escalate(self, inc: Incident, from_rung: int, out: Decisions,
                  at_least: int | None = None) -> None:
        """One rung up (or straight to ``at_least``); past the top: a person, counted."""
        nxt = from_rung + 1 if at_least is None else max(from_rung + 1, at_least)
        inc.phase = Phase.OPEN
        if nxt < len(inc.rungs):
            self._decide(inc, nxt, out)
            return
        self._give_up(inc, "ladder_exhausted", out, {
            "last_action": inc.rungs[-1].action,
            "message": "every rung was tried; a person has to look"})

    def _give_up(self, inc: Incident, reason: str, out: Decisions,
                 detail: dict[str, Any]) -> None:
        """Nothing more is automated for ``inc``: a person's turn; the breaker counts it."""
        opened = self.g.count_unresolved(
            self.config.guards.breaker_threshold,
            f"{inc.kind} on GPU {inc.index} (event {inc.event_id}): {reason}")
        inc.phase, inc.reason, inc.wanted, inc.blocked_since = (Phase.NEEDS_HUMAN, reason,
                                                                None, None)
        out.state_changed = True
        self._skip(inc, "notify", reason, out, {
            **detail, "unresolved_count": self.g.unresolved_count, "breaker_opened": opened})
        if opened:
            log.error("circuit breaker open: %s", self.g.breaker_reason)

    def _ended(self, inc: Incident, cleared_by: str, out: Decisions) -> None:
        """The condition is gone: verified when the GPU recovered, else just over."""
        pending = self._pending_of(inc)
        recovered = cleared_by == "recovered"
        if pending is not None and pending.phase in ("running", "probing"):
            inc.ended_by = cleared_by  # the result verifies (or not) and closes it
            out.state_changed = True
            return
        if pending is not None:
            self._conclude(pending, "verified" if recovered else "unresolved",
                           None if recovered else cleared_by, out)
        self._close(inc)
        out.state_changed = True
        self._retry(out, index=inc.index)

    def _close(self, inc: Incident) -> None:
        self.g.close(inc.event_id, REMEMBER_CLOSED)

    def _acknowledge(self, event_id: str, out: Decisions) -> None:
        """A person takes over ``event_id``: the healer stops working on it."""
        inc = self.g.incidents.get(event_id)
        if inc is None:
            log.warning("acknowledgement of %s: no open incident of %s has that id", event_id,
                        self.host)
            return
        pending = self._pending_of(inc)
        if pending is not None and pending.phase == "verifying":
            self._conclude(pending, "unresolved", "acknowledged", out)
        out.actions.append(self.msg.about(inc.event_id, inc.index, "notify", "acknowledged",
                                          "operator", {"kind": inc.kind,
                                                       "severity": inc.severity,
                                                       "phase": inc.phase.value,
                                                       "message": "a person took it over"},
                                          self.now()))
        out.state_changed = True
        if pending is not None and pending.phase in ("running", "probing"):
            inc.ended_by = "acknowledged"  # its result closes it
            return
        self._close(inc)
        self._retry(out, index=inc.index)

    # --- States: rebuilding and reconciling -------------------------------------------------
    def _rebuild(self, state: State, out: Decisions) -> None:
        """After a (re)connect: an active condition the healer has no incident for (an Event
        missed while away) becomes one and is decided as if it had just been raised."""
        for cond in state.active:
            if cond.event_id in self.g.incidents or cond.event_id in self.g.closed:
                continue
            if self.g.seen(event_key(cond.event_id, "raised", cond.severity)):
                continue
            event = Event(event_id=cond.event_id, host=state.host, index=state.index,
                          kind=cond.kind, severity=cond.severity, phase="raised",
                          started_ts=cond.started_ts, ts=state.ts,
                          message=cond.message or cond.kind,
                          recommended_action=_xid_action(cond.kind, cond.severity))
            self.g.remember(event_key(cond.event_id, "raised", cond.severity),
                            self.config.guards.remember_events)
            inc = self._open(cond.event_id, state.index, cond.kind, cond.severity,
                             ladder_for(self.config, event), state.ts)
            log.warning("GPU %s: %s (%s) is active but was never handled (missed while away): "
                        "deciding it now", state.index, cond.kind, cond.severity)
            out.state_changed = True
            self._on_severity(inc, out)

    def _reconcile(self, state: State, out: Decisions) -> None:
        """A condition the State no longer holds ended; one it holds worse is escalated."""
        active = {c.event_id: c for c in state.active}
        for inc in [i for i in self.g.incidents.values() if i.index == state.index]:
            cond = active.get(inc.event_id)
            if cond is None:
                if state.ts >= inc.last_event_ts:
                    self._ended(inc, "recovered" if state.health != "unavailable"
                                else "gpu_unavailable", out)
                continue
            if SEVERITY_RANK[cond.severity] > SEVERITY_RANK[inc.severity]:
                self._raise_severity(inc, cond.severity, None)
                out.state_changed = True
                self._on_severity(inc, out)

    def _pending_of(self, inc: Incident) -> PendingAction | None:
        return next((p for p in self.g.pending.values() if p.event_id == inc.event_id
                     and p.action != "restore_power_limit"), None)

    # --- guards lifting, deadlines, restores -------------------------------------------------
    def _tick(self, out: Decisions) -> None:
        self._deadlines(out)
        self._retry(out)
        for index in list(self.g.throttled):
            self._maybe_restore(index, out)

    def _deadlines(self, out: Decisions) -> None:
        now, wall = self.clock.now(), self.wall()
        for pending in list(self.g.pending.values()):
            if pending.phase != "verifying" or pending.action_id not in self.g.pending:
                continue
            by_event = now is not None and pending.deadline_ts is not None \
                and now >= pending.deadline_ts
            by_wall = pending.deadline_wall is not None and wall >= pending.deadline_wall
            if not (by_event or by_wall):
                continue
            reason = "not_cleared" if by_event else "no_samples"
            if pending.action == "restore_power_limit":
                state = self.gpus.get(pending.index)
                self._conclude(pending, "unresolved", "limit_not_restored" if by_event
                               else reason, out, {"target_limit_w": pending.target_limit_w,
                                                  "limit_w": state.power.limit_w if state
                                                  else None})
                continue
            self._conclude(pending, "unresolved", reason, out, {
                "verify_window_s": self.config.guards.verify_window_s})
            inc = self.g.incidents.get(pending.event_id or "")
            if inc is not None:
                self._escalate(inc, pending.rung, out)
            self._retry(out, index=pending.index)

    def _retry(self, out: Decisions, index: int | None = None) -> None:
        """Decide again each incident a guard held back once the guard lifts (and the newest
        State still holds its condition); give up on one held back too long."""
        now = self.now()
        for inc in list(self.g.incidents.values()):
            if inc.phase != Phase.WAITING or (index is not None and inc.index != index
                                              and inc.reason != "busy"):
                continue
            state = self.gpus.get(inc.index)
            if state is None:
                continue
            if inc.reason != "unknown_gpu" and inc.event_id not in {
                    c.event_id for c in state.active}:
                continue  # only a condition the newest State still holds is acted on
            if (inc.blocked_since is not None
                    and now - inc.blocked_since >= self.config.guards.give_up_after_s):
                self._give_up(inc, "held_back_too_long", out, {
                    "guard": inc.reason, "waited_s": round(now - inc.blocked_since, 1),
                    "message": f"held back by {inc.reason} for too long; a person has to "
                               "look"})
                continue
            rung = inc.wanted if inc.wanted is not None else rung_for(inc.rungs, inc.severity)
            if rung is None:
                inc.phase = Phase.OPEN
                continue
            if inc.reason == "unknown_gpu":
                inc.reason = None
                self._decide(inc, rung, out)
                continue
            block = check(self.g, self.config.guards, self._context(), inc,
                          inc.rungs[rung].action)
            if block is not None and block.reason == inc.reason:
                continue  # still held back by the same guard: nothing new to say
            self._decide(inc, rung, out)

    def _maybe_restore(self, index: int, out: Decisions) -> None:
        """Give a throttled GPU its power limit back once it has been cool long enough (a
        thermal condition holds it back; other conditions do not)."""
        entry = self.g.throttled.get(index)
        state = self.gpus.get(index)
        if entry is None or state is None:
            return
        if state.health == "unavailable" or any(c.kind == "thermal_throttling"
                                                for c in state.active):
            self.cool_since.pop(index, None)
            return
        now = self.now()
        since = self.cool_since.setdefault(index, now)
        if now - since < self.config.guards.restore_after_s:
            return
        if (self.g.pending_on(index) is not None or not self.enabled or self.dry_run
                or self.g.cooldown_until(index, "restore_power_limit", now) is not None):
            return
        target = entry.restore_limit_w or self.g.default_limits_w.get(index)
        if target is None:
            log.warning("GPU %s: no power limit known to give back; forgetting the throttle",
                        index)
            del self.g.throttled[index]
            out.state_changed = True
            return
        entry.restores += 1
        action = "restore_power_limit"
        params = {**self._params(index, action), "restore_limit_w": target}
        message = self.msg.maintenance(entry.event_id, index, action, entry.restores,
                                       "started", None, {"cool_s": round(now - since, 1),
                                                         "params": params}, now)
        params["action_id"] = message.action_id
        self.g.pending[message.action_id] = PendingAction(
            action_id=message.action_id, event_id=entry.event_id, action=action, index=index,
            attempt=entry.restores, started_ts=now, started_wall=self.wall(),
            target_limit_w=target)
        self.g.set_cooldown(index, action, now + self.config.guards.cooldown_s, now)
        out.state_changed = True
        out.actions.append(message)
        out.requests.append(ActuatorRequest(message.action_id, action, index, params))

    def _restore_result(self, pending: PendingAction, result: Result, out: Decisions) -> None:
        if not result.ok:
            out.actions.append(self.msg.step(pending, "failed", result.reason or "error",
                                             self.now(), result.detail, result.duration_s))
            del self.g.pending[pending.action_id]
            return  # the throttle stays recorded: tried again after the cooldown
        out.actions.append(self.msg.step(pending, "succeeded", None, self.now(), result.detail,
                                         result.duration_s))
        self._verify(pending)
        state = self.gpus.get(pending.index)
        if state is not None:
            self._verify_restore(state, out)

    def _verify_restore(self, state: State, out: Decisions) -> None:
        """A restore is verified when the State shows the limit given back."""
        pending = next((p for p in self.g.pending.values()
                        if p.index == state.index and p.action == "restore_power_limit"
                        and p.phase == "verifying"), None)
        limit = state.power.limit_w
        if pending is None or limit is None or pending.target_limit_w is None:
            return
        tolerance = max(1.0, pending.target_limit_w * self.config.guards.restore_tolerance_pct
                        / 100.0)
        if abs(limit - pending.target_limit_w) <= tolerance:
            self._conclude(pending, "verified", None, out, {"limit_w": limit})
            self.g.throttled.pop(state.index, None)
            self.cool_since.pop(state.index, None)

    # --- messages ----------------------------------------------------------------------------
    def _skip(self, inc: Incident, action: str, reason: str, out: Decisions,
              detail: dict[str, Any] | None = None) -> None:
        log.info("GPU %s %s: %s skipped (%s)", inc.index, inc.kind, action, reason)
        message, _ = self.msg.decision(inc, action, "skipped", reason, detail or {},
                                       self.now())
        out.actions.append(message)
        out.state_changed = True

    def _first_action(self, event: Event) -> str:
        rungs = ladder_for(self.config, event)
        target = rung_for(rungs, event.severity)
        return rungs[target if target is not None else 0].action

    def _trigger(self, inc: Incident, rung: int) -> dict[str, Any]:
        return {"rung": rung, "ladder": [r.action for r in inc.rungs]}

    def _params(self, index: int, action: str) -> dict[str, Any]:
        state = self.gpus.get(index)
        params: dict[str, Any] = {"gpu_name": state.name if state else None}
        if action in POWER_ACTIONS:
            entry = self.g.throttled.get(index)
            params["power_limit_w"] = state.power.limit_w if state else None
            params["default_power_limit_w"] = self.g.default_limits_w.get(index)
            params["restore_limit_w"] = entry.restore_limit_w if entry else None
            params["throttle_pct"] = self.config.actuators.throttle_pct
        return params

    # --- the published guard state -----------------------------------------------------------
    def healer_state(self, fallback_ts: float = 0.0) -> HealerState:
        now = self.clock.now()
        per_hour = self.config.guards.budget_per_hour
        incidents = [
            OpenIncident(event_id=i.event_id, index=i.index, kind=i.kind,  # type: ignore[arg-type]
                         severity=i.severity, phase=i.phase.value,  # type: ignore[arg-type]
                         reason=i.reason, action=i.action(), since_ts=max(0.0, i.since_ts))
            for i in self.g.incidents.values()
        ]
        return HealerState(
            host=self.host,
            enabled=self.enabled,
            dry_run=self.dry_run,
            breaker_open=self.g.breaker_open,
            breaker_reason=self.g.breaker_reason,
            unresolved_count=self.g.unresolved_count,
            budget_left=max(0, per_hour - self.g.budget_used(now)),
            budget_per_hour=per_hour,
            cooldowns=self.g.active_cooldowns(now),
            throttled=sorted(self.g.throttled),
            incidents=incidents,
            ts=now if now is not None else fallback_ts,
        )


def _xid_action(kind: str, severity: str) -> str | None:
    """An XID condition rebuilt from a State (which carries no recommended action): the
    catalog's action for its severity."""
    if kind != "xid_error":
        return None
    return {"emergency": "notify", "critical": "reset_gpu"}.get(severity,
                                                                 "restart_llm_service")
