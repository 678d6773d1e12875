"""The healing policy: pure decisions, no MQTT and no I/O.

Input: the States and Events of this healer's own host, the results of the actuators and the
operator's commands. Output: Action messages (every decision, each skip with its reason) and
actuator requests. Time is *event time*: the clock is the newest ``ts`` seen in this host's
States and Events (:class:`EventClock`, injectable), so a replay or ``--speed X`` runs the
cooldowns, the budget and the verification windows X times faster.

The life of one action (all its Action messages share one ``action_id``)::

    started -> succeeded -> verified            (the State cleared within verify_window_s)
                         -> unresolved          (it did not: escalate one rung)
            -> failed                           (the actuator said so: escalate one rung)

Past the top rung the healer gives up on the incident (``notify`` skipped with reason
``ladder_exhausted``) and counts it towards the circuit breaker.

A new source clock (a simulation or replay started again, whose event time begins before the
newest time the healer knows) shows as a *live* message more than ``REWIND_S`` older than the
clock: every guard time is then shifted by the same amount, so a cooldown keeps its remaining
duration in the new timeline instead of lasting until the new clock catches up. Retained
messages (re-sent by the broker on every subscribe) never move the clock back.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from gpuheal.config.healing import DESTRUCTIVE_ACTIONS, HealerConfig, Rung
from gpuheal.models import (
    SEVERITY_RANK,
    Action,
    Event,
    HealerSet,
    HealerState,
    State,
    make_action_id,
)
from healer.actuators import Result
from healer.guards import GuardState, ThrottleEntry, event_key
from healer.ladder import HUMAN_ACTIONS, ladder_for, rung_for

log = logging.getLogger(__name__)

MAX_INCIDENTS = 1024
REWIND_S = 120.0
"""A live message this many event-time seconds older than the clock starts a new timeline."""
RETRY_WHEN_LIFTED = frozenset({"paused", "breaker_open", "cooldown", "budget_exhausted"})
"""Skip reasons that pass: the incident is decided again when the guard no longer blocks."""
POWER_ACTIONS = frozenset({"throttle_gpu", "restore_power_limit"})


class EventClock:
    """The healer's clock: the newest event time seen (UNIX seconds of the source clock)."""

    def __init__(self, start_ts: float | None = None) -> None:
        self._now = start_ts

    def observe(self, ts: float) -> None:
        """Move forward to ``ts``; never backwards."""
        if self._now is None or ts > self._now:
            self._now = ts

    def now(self) -> float | None:
        return self._now

    def rewind(self, ts: float) -> None:
        """Jump back to ``ts``: the source clock started again."""
        self._now = ts


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
    """The guard state changed: persist it and republish ``healer/state``."""


@dataclass
class Incident:
    """One condition (one ``event_id``) and how far up its ladder the healer went."""

    event_id: str
    index: int
    kind: str
    severity: str
    rungs: list[Rung]
    last_event_ts: float
    rung: int = -1
    """Highest rung decided so far (-1: none yet)."""
    attempts: int = 0
    """Decisions taken so far; the next one is ``attempts + 1``."""
    waiting: bool = False
    """Skipped as ``busy``: decided again once the GPU is free."""
    blocked: str | None = None
    """Skipped by a guard that lifts by itself or by a person (``paused``, ``breaker_open``,
    ``cooldown``, ``budget_exhausted``): decided again once that guard no longer blocks."""
    cleared: bool = False
    done: bool = False
    """The ladder is exhausted: nothing more is automated for this incident."""


@dataclass
class Pending:
    """The one action running or being verified on a GPU."""

    action_id: str
    event_id: str | None
    action: str
    index: int
    attempt: int
    started_ts: float
    incident: Incident | None
    """None for ``restore_power_limit`` (not tied to an open condition)."""
    rung: int = -1
    phase: str = "running"
    """``running`` (waiting for the actuator) or ``verifying`` (waiting for the State)."""
    deadline_ts: float | None = None


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
        clock: EventClock | None = None,
        act_on_replay: bool = False,
    ) -> None:
        """``act_on_replay``: act on events the analyzer derived from replayed samples (only
        the simulated actuators do: a replay must never reset a real GPU)."""
        self.act_on_replay = act_on_replay
        self.host = host
        self.config = config
        self.guard = guard if guard is not None else GuardState(host=host)
        self.force_dry_run = dry_run
        self.opted_in = frozenset(config.guards.destructive_opt_in) | frozenset(opted_in)
        self.clock = clock or EventClock(self.guard.clock_ts)
        self.gpus: dict[int, State] = {}
        self.incidents: OrderedDict[str, Incident] = OrderedDict()
        self.pending: dict[int, Pending] = {}
        self.healthy_since: dict[int, float] = {}

    # --- effective switches ----------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        override = self.guard.enabled_override
        return self.config.guards.enabled if override is None else override

    @property
    def dry_run(self) -> bool:
        if self.force_dry_run:
            return True
        override = self.guard.dry_run_override
        return self.config.guards.dry_run if override is None else override

    def now(self) -> float:
        """Event time now; 0.0 before anything was seen."""
        now = self.clock.now()
        return 0.0 if now is None else now

    # --- inputs ------------------------------------------------------------------------------
    def on_state(self, state: State, retained: bool = False) -> Decisions:
        """A GPU's State: verification, throttle restore, deadlines.

        ``retained``: the broker replayed it on subscribe (history, not news): it never moves
        the clock back, and is ignored when it is older than the State already known.
        """
        out = Decisions()
        if state.host != self.host:
            return out
        index = state.index
        previous = self.gpus.get(index)
        if retained and previous is not None and state.ts < previous.ts:
            log.debug("ignoring an older retained State of GPU %s", index)
            return out
        self._observe(state.ts, live=not retained)
        self.gpus[index] = state
        if state.power.limit_w is not None and index not in self.guard.default_limits_w:
            self.guard.default_limits_w[index] = state.power.limit_w
            out.state_changed = True
        active = {c.event_id for c in state.active}
        for inc in self.incidents.values():
            if (inc.index == index and not inc.cleared and inc.event_id not in active
                    and state.ts >= inc.last_event_ts):
                inc.cleared = True
        pending = self.pending.get(index)
        if (pending is not None and pending.phase == "verifying" and pending.incident is not None
                and pending.incident.cleared):
            self._conclude(pending, "verified", None, out)
            self._gpu_free(index, out)
        self._check_deadlines(out)
        if previous is None:  # events that came before this GPU's first State
            self._gpu_free(index, out)
        self._maybe_restore(index, out)
        return out

    def on_event(self, event: Event) -> Decisions:
        """A condition raised, escalated or cleared on one of this host's GPUs."""
        out = Decisions()
        if event.host != self.host:
            return out
        self._observe_event(event)
        key = event_key(event.event_id, event.phase, event.severity)
        if not self.guard.remember(key, self.config.guards.remember_events):
            log.info("event %s (%s, %s) was handled before; ignoring the redelivery",
                     event.event_id, event.phase, event.severity)
            return out
        out.state_changed = True
        if event.phase == "cleared":
            self._on_cleared(event, out)
            self._check_deadlines(out)
            return out
        inc = self._incident(event)
        if event.evidence.get("source") == "replay" and not self.act_on_replay:
            inc.cleared = True
            self._skip(inc, self._candidate(inc), "replayed", out,
                       {"message": "a condition of replayed samples: recorded, not acted on"})
            return out
        if event.index not in self.gpus:
            inc.waiting = True  # decided when the GPU's first State arrives
            self._skip(inc, self._candidate(inc), "unknown_gpu", out,
                       {"message": f"no State seen for GPU {event.index} of {self.host}"})
            return out
        state = self.gpus[event.index]
        if (state.ts > event.ts and inc.event_id not in {c.event_id for c in state.active}
                and self.pending.get(event.index) is None):
            inc.cleared = True
            self._skip(inc, self._candidate(inc), "already_cleared", out,
                       {"state_ts": state.ts})
            return out
        pending = self.pending.get(event.index)
        if pending is not None and pending.incident is inc:
            target = rung_for(inc.rungs, inc.severity)
            if pending.phase == "verifying" and target is not None and target > pending.rung:
                self._conclude(pending, "unresolved", "escalated", out,
                               {"severity": inc.severity})
                self._escalate(inc, pending.rung, out, at_least=target)
                self._gpu_free(event.index, out)
            # while the actuator runs, the new severity is taken into account at its result
        elif pending is not None:
            inc.waiting = True
            self._skip(inc, self._candidate(inc), "busy", out,
                       {"busy_with": pending.action, "busy_action_id": pending.action_id})
        else:
            self._decide_for_severity(inc, out)
        self._check_deadlines(out)
        return out

    def on_result(self, action_id: str, result: Result) -> Decisions:
        """What an actuator answered for one request."""
        out = Decisions()
        pending = next((p for p in self.pending.values() if p.action_id == action_id), None)
        if pending is None or pending.phase != "running":
            log.warning("result for unknown or finished action %s ignored", action_id)
            return out
        index = pending.index
        if not result.ok:
            self._emit(pending, "failed", result.reason or "error", out, result.detail,
                       duration_s=result.duration_s)
            del self.pending[index]
            inc = pending.incident
            if inc is not None and not inc.cleared and not inc.done:
                self._escalate(inc, pending.rung, out)
            self._gpu_free(index, out)
            return out
        self._emit(pending, "succeeded", None, out, result.detail, duration_s=result.duration_s)
        if pending.action == "throttle_gpu":
            self.guard.throttled[index] = ThrottleEntry(
                event_id=pending.incident.event_id if pending.incident else None)
            self.healthy_since.pop(index, None)
            out.state_changed = True
        inc = pending.incident
        if inc is None:  # restore_power_limit: nothing to verify
            if pending.action == "restore_power_limit":
                self.guard.throttled.pop(index, None)
                out.state_changed = True
            del self.pending[index]
            self._gpu_free(index, out)
            return out
        if inc.cleared:
            self._conclude(pending, "verified", None, out)
            self._gpu_free(index, out)
            return out
        target = rung_for(inc.rungs, inc.severity)
        if target is not None and target > pending.rung:  # escalated while it ran
            self._conclude(pending, "unresolved", "escalated", out, {"severity": inc.severity})
            self._escalate(inc, pending.rung, out, at_least=target)
            self._gpu_free(index, out)
            return out
        pending.phase = "verifying"
        pending.deadline_ts = self.now() + self.config.guards.verify_window_s
        return out

    def on_set(self, command: HealerSet) -> Decisions:
        """An operator's ``healer/set`` command."""
        out = Decisions(state_changed=True)
        if command.enabled is not None:
            self.guard.enabled_override = command.enabled
            log.warning("healing %s by the operator", "enabled" if command.enabled else "paused")
        if command.dry_run is not None:
            self.guard.dry_run_override = command.dry_run
            if self.force_dry_run and not command.dry_run:
                log.warning("dry-run stays on: the healer was started with --dry-run")
        if command.reset_breaker:
            log.warning("circuit breaker reset by the operator (was: %s)",
                        self.guard.breaker_reason)
            self.guard.reset_breaker()
        return out

    def tick(self) -> Decisions:
        """Check verification deadlines against the newest event time, and decide again the
        incidents a guard held back once it no longer does."""
        out = Decisions()
        self._check_deadlines(out)
        self._retry_blocked(out)
        return out

    def _retry_blocked(self, out: Decisions) -> None:
        """An incident skipped by a passing guard is decided again when that guard lifts
        (healing resumed, breaker reset, cooldown over, budget back): a condition that is
        still there gets its action then. Still blocked: no new message, unless the reason
        changed."""
        for inc in list(self.incidents.values()):
            if inc.blocked is None or inc.cleared or inc.done or inc.index not in self.gpus:
                continue
            if inc.event_id not in {c.event_id for c in self.gpus[inc.index].active}:
                continue  # only a condition the newest State still holds is acted on
            target = rung_for(inc.rungs, inc.severity)
            if target is None or target <= inc.rung:
                inc.blocked = None
                continue
            blocked = self._guard_reason(inc, inc.rungs[target].action)
            if blocked is not None and blocked[0] in (inc.blocked, "busy"):
                continue
            self._decide(inc, target, out)

    # --- event time ---------------------------------------------------------------------
    def _observe(self, ts: float, live: bool) -> None:
        now = self.clock.now()
        if live and now is not None and ts < now - REWIND_S:
            delta = ts - now
            log.warning("event time went back %.0f s (a restarted simulation or replay): guard "
                        "times move with it", -delta)
            self._rebase(delta)
            self.clock.rewind(ts)
        else:
            self.clock.observe(ts)
        self.guard.clock_ts = self.clock.now()

    def _observe_event(self, event: Event) -> None:
        """An event for a GPU whose State was seen moves event time as a live message does;
        one for an unknown GPU (stray or forged) never touches the clock, so it cannot make
        the next real message look like a new timeline and age cooldowns and budget away."""
        if event.index in self.gpus:
            self._observe(event.ts, live=True)

    def _rebase(self, delta: float) -> None:
        """Shift every remembered event time by ``delta`` seconds (a new timeline)."""
        g = self.guard
        g.budget_ts = [t + delta for t in g.budget_ts]
        for c in g.cooldowns:
            c.until_ts += delta
        for p in self.pending.values():
            p.started_ts += delta
            if p.deadline_ts is not None:
                p.deadline_ts += delta
        self.healthy_since = {i: t + delta for i, t in self.healthy_since.items()}
        for inc in self.incidents.values():
            inc.last_event_ts += delta
        self.gpus = {i: s.model_copy(update={"ts": s.ts + delta}) for i, s in self.gpus.items()}

    # --- the published guard state -----------------------------------------------------
    def healer_state(self, fallback_ts: float = 0.0) -> HealerState:
        now = self.clock.now()
        per_hour = self.config.guards.budget_per_hour
        return HealerState(
            host=self.host,
            enabled=self.enabled,
            dry_run=self.dry_run,
            breaker_open=self.guard.breaker_open,
            breaker_reason=self.guard.breaker_reason,
            unresolved_count=self.guard.unresolved_count,
            budget_left=max(0, per_hour - self.guard.budget_used(now)),
            budget_per_hour=per_hour,
            cooldowns=self.guard.active_cooldowns(now),
            throttled=sorted(self.guard.throttled),
            ts=now if now is not None else fallback_ts,
        )

    # --- decisions ---------------------------------------------------------------------
    def _incident(self, event: Event) -> Incident:
        inc = self.incidents.get(event.event_id)
        if inc is None:
            inc = Incident(event_id=event.event_id, index=event.index, kind=event.kind,
                           severity=event.severity, rungs=ladder_for(self.config, event),
                           last_event_ts=event.ts)
            self.incidents[event.event_id] = inc
            self._forget_old_incidents()
        else:
            if SEVERITY_RANK[event.severity] > SEVERITY_RANK[inc.severity]:
                inc.severity = event.severity
                if inc.kind == "xid_error":
                    # a worse XID brings its own catalog action (reset, a person): a new rung
                    action = ladder_for(self.config, event)[0].action
                    inc.rungs.append(Rung(action=action, min_severity=event.severity))
            inc.last_event_ts = max(inc.last_event_ts, event.ts)
            inc.cleared = False
            self.incidents.move_to_end(event.event_id)
        return inc

    def _forget_old_incidents(self) -> None:
        busy = {p.incident.event_id for p in self.pending.values() if p.incident}
        for event_id in list(self.incidents):
            if len(self.incidents) <= MAX_INCIDENTS:
                break
            if event_id not in busy:
                del self.incidents[event_id]

    def _candidate(self, inc: Incident) -> str:
        """The action a decision about ``inc`` is about (for skip messages)."""
        target = rung_for(inc.rungs, inc.severity)
        return inc.rungs[target if target is not None else 0].action

    def _decide_for_severity(self, inc: Incident, out: Decisions) -> None:
        target = rung_for(inc.rungs, inc.severity)
        if target is None:
            first = inc.rungs[0]
            reason = "hang_unconfirmed" if inc.kind == "gpu_hang" else "below_ladder"
            self._skip(inc, first.action, reason, out,
                       {"severity": inc.severity, "min_severity": first.min_severity})
            return
        if target <= inc.rung:
            log.info("incident %s at %s: rung %d already decided", inc.event_id, inc.severity,
                     target)
            return
        self._decide(inc, target, out)

    def _decide(self, inc: Incident, rung: int, out: Decisions) -> None:
        action = inc.rungs[rung].action
        blocked = self._guard_reason(inc, action)
        if blocked is not None:
            reason, detail = blocked
            if reason == "busy":
                inc.waiting = True  # decided again once the GPU is free
            elif reason in RETRY_WHEN_LIFTED:
                inc.blocked = reason  # decided again once the guard lifts
            else:
                inc.rung = max(inc.rung, rung)
            self._skip(inc, action, reason, out, detail)
            return
        inc.blocked = None
        inc.rung = max(inc.rung, rung)
        if self.dry_run:
            attempt = self._next_attempt(inc)
            out.actions.append(self._action(inc.event_id, inc.index, action, attempt, "dry_run",
                                            None, self._trigger(inc, rung)))
            return
        self._start(inc, rung, action, out)

    def _guard_reason(self, inc: Incident, action: str) -> tuple[str, dict[str, Any]] | None:
        """Why ``action`` must not run now for ``inc``, or None when it may."""
        guards = self.config.guards
        now = self.now()
        if action in HUMAN_ACTIONS:
            return "needs_human", {"kind": inc.kind, "severity": inc.severity,
                                   "message": "a person has to handle this condition"}
        if (action == "reset_gpu" and inc.kind == "gpu_hang"
                and SEVERITY_RANK[inc.severity] < SEVERITY_RANK["critical"]):
            return "hang_unconfirmed", {"severity": inc.severity}
        if not self.enabled:
            return "paused", {}
        if self.guard.breaker_open:
            return "breaker_open", {"breaker_reason": self.guard.breaker_reason}
        if action in DESTRUCTIVE_ACTIONS and action not in self.opted_in:
            return "not_opted_in", {"message": f"{action} is destructive: opt in with "
                                               f"guards.destructive_opt_in or --allow {action}"}
        pending = self.pending.get(inc.index)
        if pending is not None:
            return "busy", {"busy_with": pending.action, "busy_action_id": pending.action_id}
        until = self.guard.cooldown_until(inc.index, action, now)
        if until is not None:
            return "cooldown", {"until_ts": until, "cooldown_s": guards.cooldown_s}
        used = self.guard.budget_used(now)
        if used >= guards.budget_per_hour:
            return "budget_exhausted", {"used": used, "budget_per_hour": guards.budget_per_hour}
        return None

    def _start(self, inc: Incident, rung: int, action: str, out: Decisions) -> None:
        now = self.now()
        attempt = self._next_attempt(inc)
        action_id = make_action_id(inc.event_id, action, attempt, self.host, inc.index)
        params = self._params(inc.index, action_id, action)
        self.pending[inc.index] = Pending(action_id=action_id, event_id=inc.event_id,
                                          action=action, index=inc.index,
                                          attempt=attempt, started_ts=now, incident=inc,
                                          rung=rung)
        self.guard.spend_budget(now)
        self.guard.set_cooldown(inc.index, action, now + self.config.guards.cooldown_s, now)
        out.state_changed = True
        out.actions.append(self._action(inc.event_id, inc.index, action, attempt, "started",
                                        None, {**self._trigger(inc, rung), "params": params}))
        out.requests.append(ActuatorRequest(action_id, action, inc.index, params))

    def _escalate(self, inc: Incident, from_rung: int, out: Decisions,
                  at_least: int | None = None) -> None:
        """One rung up (or straight to ``at_least``); past the top: give up, count it."""
        nxt = from_rung + 1 if at_least is None else max(from_rung + 1, at_least)
        if nxt < len(inc.rungs):
            self._decide(inc, nxt, out)
            return
        inc.done = True
        last = inc.rungs[-1].action
        opened = self.guard.count_unresolved(
            self.config.guards.breaker_threshold,
            f"{inc.kind} on GPU {inc.index} (event {inc.event_id}) after {last}")
        out.state_changed = True
        self._skip(inc, "notify", "ladder_exhausted", out,
                   {"last_action": last, "unresolved_count": self.guard.unresolved_count,
                    "breaker_opened": opened,
                    "message": "every rung was tried; a person has to look"})
        if opened:
            log.error("circuit breaker open: %s", self.guard.breaker_reason)

    def _on_cleared(self, event: Event, out: Decisions) -> None:
        inc = self.incidents.get(event.event_id)
        if inc is None:
            return
        inc.cleared = True
        inc.waiting = False
        pending = self.pending.get(inc.index)
        if pending is not None and pending.incident is inc and pending.phase == "verifying":
            self._conclude(pending, "verified", None, out)
            self._gpu_free(inc.index, out)

    def _check_deadlines(self, out: Decisions) -> None:
        now = self.clock.now()
        if now is None:
            return
        for pending in list(self.pending.values()):
            if (pending.phase != "verifying" or pending.deadline_ts is None
                    or now < pending.deadline_ts or self.pending.get(pending.index) is not pending):
                continue
            inc = pending.incident
            assert inc is not None
            self._conclude(pending, "unresolved", "not_cleared", out,
                           {"verify_window_s": self.config.guards.verify_window_s})
            self._escalate(inc, pending.rung, out)
            self._gpu_free(pending.index, out)

    def _conclude(self, pending: Pending, status: str, reason: str | None, out: Decisions,
                  detail: dict[str, Any] | None = None) -> None:
        """End the verification of ``pending`` with ``verified`` or ``unresolved``."""
        self._emit(pending, status, reason, out, detail or {},
                   duration_s=max(0.0, self.now() - pending.started_ts))
        if self.pending.get(pending.index) is pending:
            del self.pending[pending.index]

    def _gpu_free(self, index: int, out: Decisions) -> None:
        """The GPU has no action any more: decide the incidents that waited for it."""
        for inc in list(self.incidents.values()):
            if index in self.pending:
                return
            if inc.index != index or not inc.waiting:
                continue
            inc.waiting = False
            if inc.cleared or inc.done:
                continue
            self._decide_for_severity(inc, out)
        if index not in self.pending:
            self._maybe_restore(index, out)

    def _maybe_restore(self, index: int, out: Decisions) -> None:
        """Give a throttled GPU its power limit back once it was healthy long enough."""
        entry = self.guard.throttled.get(index)
        state = self.gpus.get(index)
        if entry is None or state is None:
            self.healthy_since.pop(index, None)
            return
        if state.health != "healthy" or state.active:
            self.healthy_since.pop(index, None)
            return
        since = self.healthy_since.setdefault(index, state.ts)
        now = self.now()
        if now - since < self.config.guards.restore_after_s:
            return
        if (index in self.pending or not self.enabled or self.guard.breaker_open
                or self.dry_run
                or self.guard.cooldown_until(index, "restore_power_limit", now) is not None):
            return
        entry.restores += 1
        action = "restore_power_limit"
        action_id = make_action_id(entry.event_id, action, entry.restores, self.host, index)
        params = self._params(index, action_id, action)
        self.pending[index] = Pending(action_id=action_id, event_id=entry.event_id,
                                      action=action, index=index,
                                      attempt=entry.restores, started_ts=now, incident=None)
        self.guard.set_cooldown(index, action, now + self.config.guards.cooldown_s, now)
        out.state_changed = True
        out.actions.append(self._action(entry.event_id, index, action, entry.restores, "started",
                                        None, {"healthy_s": now - since, "params": params}))
        out.requests.append(ActuatorRequest(action_id, action, index, params))

    # --- messages ----------------------------------------------------------------------
    def _next_attempt(self, inc: Incident) -> int:
        inc.attempts += 1
        return inc.attempts

    def _skip(self, inc: Incident, action: str, reason: str, out: Decisions,
              detail: dict[str, Any] | None = None) -> None:
        attempt = self._next_attempt(inc)
        log.info("GPU %s %s: %s skipped (%s)", inc.index, inc.kind, action, reason)
        out.actions.append(self._action(inc.event_id, inc.index, action, attempt, "skipped",
                                        reason, {"kind": inc.kind, "severity": inc.severity,
                                                 **(detail or {})}))

    def _emit(self, pending: Pending, status: str, reason: str | None, out: Decisions,
              detail: dict[str, Any], duration_s: float | None = None) -> None:
        action = Action(action_id=pending.action_id, event_id=pending.event_id, host=self.host,
                        index=pending.index, action=pending.action, status=status, reason=reason,
                        attempt=pending.attempt, ts=self.now(), duration_s=duration_s,
                        detail=detail)
        log.info("GPU %s: %s %s%s", pending.index, pending.action, status,
                 f" ({reason})" if reason else "")
        out.actions.append(action)

    def _action(self, event_id: str | None, index: int, action: str, attempt: int, status: str,
                reason: str | None, detail: dict[str, Any]) -> Action:
        return Action(action_id=make_action_id(event_id, action, attempt, self.host, index),
                      event_id=event_id, host=self.host, index=index, action=action,
                      status=status, reason=reason, attempt=attempt, ts=self.now(),
                      detail=detail)

    def _trigger(self, inc: Incident, rung: int) -> dict[str, Any]:
        return {"kind": inc.kind, "severity": inc.severity, "rung": rung,
                "ladder": [r.action for r in inc.rungs]}

    def _params(self, index: int, action_id: str, action: str) -> dict[str, Any]:
        state = self.gpus.get(index)
        params: dict[str, Any] = {"action_id": action_id,
                                  "gpu_name": state.name if state else None}
        if action in POWER_ACTIONS:
            params["power_limit_w"] = state.power.limit_w if state else None
            params["default_power_limit_w"] = self.guard.default_limits_w.get(index)
            params["throttle_pct"] = self.config.actuators.throttle_pct
        return params
