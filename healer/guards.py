"""What the healer remembers across a restart, and the guard rules (one place: :func:`check`).

Everything here is persisted to the state file (:mod:`healer.store`) *before* the healer says
or does what it decided (write-ahead): the guards (overrides, breaker, budget, cooldowns, the
throttled GPUs and the limits to give back), the open incidents, the actions in flight and the
clock. All times are the healer's event time (:mod:`healer.clock`) unless named ``_wall``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from gpuheal.config.healing import DESTRUCTIVE_ACTIONS, HOST_WIDE_ACTIONS, GuardsConfig, Rung
from gpuheal.models import SEVERITY_RANK, Cooldown, GpuIndex
from healer.clock import ClockState

BUDGET_WINDOW_S = 3600.0
"""The action budget is counted over a rolling hour of event time."""
HUMAN_ACTIONS: frozenset[str] = frozenset({"notify"})
"""Never automated: published as ``skipped`` with reason ``needs_human``."""


class Phase(StrEnum):
    """Where an incident is in its life (see :mod:`healer.policy`)."""

    OPEN = "open"
    """Raised; nothing decided yet (below its ladder's first rung, e.g. a suspected hang)."""
    PROBING = "probing"
    """Asking the workload whether the GPU still works, before a reset."""
    ACTING = "acting"
    """An action runs."""
    VERIFYING = "verifying"
    """The action succeeded; waiting for the GPU to prove healthy."""
    WAITING = "waiting"
    """A guard holds the wanted rung back; decided again when it lifts."""
    NEEDS_HUMAN = "needs_human"
    """Nothing more is automated: a person acknowledges it, or the GPU recovers."""


class _Persisted(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class Incident(_Persisted):
    """One condition (one ``event_id``) and how far up its ladder the healer went."""

    event_id: str
    index: GpuIndex
    kind: str
    severity: str
    rungs: list[Rung]
    since_ts: float
    """Healer time the incident opened."""
    last_event_ts: float
    """Source ``ts`` of the newest event (compared with States' source ``ts``)."""
    phase: Phase = Phase.OPEN
    rung: int = -1
    """Highest rung decided so far (-1: none yet)."""
    wanted: int | None = None
    """The rung a guard holds back (phase WAITING)."""
    reason: str | None = None
    """Why it waits, or why a person is needed."""
    blocked_since: float | None = None
    attempts: int = 0
    """Action messages so far; the next one is ``attempts + 1`` (part of action ids)."""
    ended_by: str | None = None
    """Set when the condition ended while an action still ran (``recovered``,
    ``acknowledged``, ``source_restarted``...): the action's result then closes it."""

    def action(self, rung: int | None = None) -> str:
        """The action of ``rung`` (default: the wanted, else the highest decided, else the
        first)."""
        at = rung if rung is not None else (self.wanted if self.wanted is not None
                                             else max(self.rung, 0))
        return self.rungs[min(at, len(self.rungs) - 1)].action


class PendingAction(_Persisted):
    """An action running or being verified (or the probe before a reset)."""

    action_id: str
    event_id: str | None
    action: str
    index: GpuIndex
    attempt: int
    rung: int = -1
    phase: str = "running"
    """``probing``, ``running`` (the actuator works) or ``verifying`` (waiting for health)."""
    started_ts: float
    started_wall: float
    deadline_ts: float | None = None
    deadline_wall: float | None = None
    target_limit_w: float | None = None
    """For ``restore_power_limit``: the limit the State must show."""

    @property
    def host_wide(self) -> bool:
        return self.action in HOST_WIDE_ACTIONS or self.action == "reset_gpu"


class ThrottleEntry(_Persisted):
    """A GPU whose power limit the healer lowered (and will give back)."""

    event_id: str | None = None
    restores: int = 0
    """Restore attempts so far (part of the restore's action id)."""
    restore_limit_w: float | None = None
    """The limit before the throttle (watts): what a restore gives back."""


class GuardState(_Persisted):
    """Everything the healer remembers; persisted after every change, before acting."""

    version: int = 2
    host: str
    enabled_override: bool | None = None
    """Set by ``healer/set {"enabled": ...}``; None: the config's ``guards.enabled``."""
    dry_run_override: bool | None = None
    """Set by ``healer/set {"dry_run": ...}``; None: the config's (``--dry-run`` always wins)."""
    breaker_open: bool = False
    breaker_reason: str | None = None
    unresolved_count: int = Field(default=0, ge=0)
    budget_ts: list[float] = Field(default_factory=list)
    """Event times of actions started within the last hour."""
    cooldowns: list[Cooldown] = Field(default_factory=list)
    throttled: dict[GpuIndex, ThrottleEntry] = Field(default_factory=dict)
    default_limits_w: dict[GpuIndex, float] = Field(default_factory=dict)
    """The first power limit seen per GPU (watts): a restore's fallback."""
    clock: ClockState = Field(default_factory=ClockState)
    clock_ts: float | None = None
    """Version 1's clock (read once, then ``clock``)."""
    incidents: dict[str, Incident] = Field(default_factory=dict)
    """Open incidents by event id, oldest first."""
    closed: list[str] = Field(default_factory=list)
    """Event ids of incidents closed lately (bounded): a retained State never reopens them."""
    pending: dict[str, PendingAction] = Field(default_factory=dict)
    """Actions in flight by action id."""
    handled: list[str] = Field(default_factory=list)
    """Keys ``event_id|phase|severity`` already handled, oldest first (bounded)."""
    _handled_cache: set[str] | None = PrivateAttr(default=None)

    # --- budget ----------------------------------------------------------------------
    def budget_used(self, now_ts: float | None) -> int:
        """Actions started in the hour before ``now_ts`` (drops older entries)."""
        if now_ts is not None:
            self.budget_ts = [t for t in self.budget_ts if 0 <= now_ts - t < BUDGET_WINDOW_S]
        return len(self.budget_ts)

    def budget_frees_at(self) -> float | None:
        return min(self.budget_ts) + BUDGET_WINDOW_S if self.budget_ts else None

    def spend_budget(self, now_ts: float) -> None:
        self.budget_ts.append(now_ts)

    # --- cooldowns -------------------------------------------------------------------
    @staticmethod
    def cooldown_scope(index: int, action: str) -> int | None:
        """The GPU a cooldown is for; None for the host-wide service actions."""
        return None if action in HOST_WIDE_ACTIONS else index

    def cooldown_until(self, index: int, action: str, now_ts: float) -> float | None:
        """When the cooldown of ``action`` on GPU ``index`` (or host-wide) ends, if running."""
        scope = self.cooldown_scope(index, action)
        for c in self.cooldowns:
            if c.index == scope and c.action == action and c.until_ts > now_ts:
                return c.until_ts
        return None

    def set_cooldown(self, index: int, action: str, until_ts: float, now_ts: float) -> None:
        """Start a cooldown; forget expired ones on the way."""
        scope = self.cooldown_scope(index, action)
        self.cooldowns = [
            c for c in self.cooldowns
            if c.until_ts > now_ts and not (c.index == scope and c.action == action)
        ]
        self.cooldowns.append(Cooldown(index=scope, action=action, until_ts=until_ts))

    def active_cooldowns(self, now_ts: float | None) -> list[Cooldown]:
        if now_ts is None:
            return list(self.cooldowns)
        return [c for c in self.cooldowns if c.until_ts > now_ts]

    # --- idempotence -----------------------------------------------------------------
    def remember(self, key: str, limit: int) -> bool:
        """Record a handled event key; False when it was handled before (a redelivery)."""
        if key in self._handled_set():
            return False
        self.handled.append(key)
        if len(self.handled) > limit:
            del self.handled[: len(self.handled) - limit]
        self._handled_cache = None
        return True

    def seen(self, key: str) -> bool:
        return key in self._handled_set()

    def _handled_set(self) -> set[str]:
        if self._handled_cache is None or len(self._handled_cache) != len(self.handled):
            self._handled_cache = set(self.handled)
        return self._handled_cache

    def close(self, event_id: str, limit: int) -> Incident | None:
        """Forget an incident (it ended); remember that it did."""
        inc = self.incidents.pop(event_id, None)
        if event_id not in self.closed:
            self.closed.append(event_id)
            if len(self.closed) > limit:
                del self.closed[: len(self.closed) - limit]
        return inc

    # --- breaker ---------------------------------------------------------------------
    def count_unresolved(self, threshold: int, why: str) -> bool:
        """Count one incident left unresolved; True when this opens the breaker."""
        self.unresolved_count += 1
        if threshold > 0 and self.unresolved_count >= threshold and not self.breaker_open:
            self.breaker_open = True
            self.breaker_reason = (
                f"{self.unresolved_count} unresolved incidents (threshold {threshold}); "
                f"last: {why}"
            )
            return True
        return False

    def reset_breaker(self) -> None:
        self.breaker_open = False
        self.breaker_reason = None
        self.unresolved_count = 0

    # --- in flight -------------------------------------------------------------------
    def pending_on(self, index: int) -> PendingAction | None:
        """The action running or verified on GPU ``index``, if any."""
        return next((p for p in self.pending.values() if p.index == index), None)

    def host_wide_pending(self) -> PendingAction | None:
        """A service action (or a reset, which stops the service) in flight on this host."""
        return next((p for p in self.pending.values() if p.host_wide and p.phase != "verifying"),
                    None)


def event_key(event_id: str, phase: str, severity: str) -> str:
    """The idempotence key of one event delivery: a redelivery has the same key."""
    return f"{event_id}|{phase}|{severity}"


# --- the guard rules ---------------------------------------------------------------------
@dataclass(frozen=True)
class Block:
    """Why an action must not run now."""

    reason: str
    detail: dict[str, Any] = field(default_factory=dict)
    lifts: bool = True
    """True: the incident waits and is decided again when the guard lifts."""
    final: str | None = None
    """When it does not lift: where the incident goes (``needs_human`` or ``open``)."""


@dataclass(frozen=True)
class Context:
    """What the guards look at besides the remembered state."""

    enabled: bool
    opted_in: frozenset[str]
    now_ts: float


def check(g: GuardState, cfg: GuardsConfig, ctx: Context, inc: Incident, action: str) -> \
        Block | None:
    """Why ``action`` must not run now for ``inc``, or None when it may. The order is the
    order of the README's table: what a person must do, what the evidence does not allow,
    what a person switched off, then what protects the host (busy, cooldown, budget)."""
    if action in HUMAN_ACTIONS:
        return Block("needs_human", {"kind": inc.kind, "severity": inc.severity,
                                     "message": "a person has to handle this condition"},
                     lifts=False, final="needs_human")
    if (action == "reset_gpu" and inc.kind == "gpu_hang"
            and SEVERITY_RANK[inc.severity] < SEVERITY_RANK["critical"]):
        return Block("hang_unconfirmed", {"severity": inc.severity,
                                          "message": "a suspected hang (busy is not hung)"},
                     lifts=False, final="open")
    if not ctx.enabled:
        return Block("paused")
    if g.breaker_open:
        return Block("breaker_open", {"breaker_reason": g.breaker_reason})
    if action in DESTRUCTIVE_ACTIONS and action not in ctx.opted_in:
        return Block("not_opted_in", {"message": f"{action} is destructive: opt in with "
                                                 f"guards.destructive_opt_in or --allow {action}"},
                     lifts=False, final="needs_human")
    busy = g.pending_on(inc.index)
    if busy is not None:
        return Block("busy", {"busy_with": busy.action, "busy_action_id": busy.action_id})
    if action in HOST_WIDE_ACTIONS or action == "reset_gpu":
        other = g.host_wide_pending()
        if other is not None:
            return Block("busy", {"busy_with": other.action, "busy_action_id": other.action_id,
                                  "host_wide": True, "gpu": other.index})
    until = g.cooldown_until(inc.index, action, ctx.now_ts)
    if until is not None:
        return Block("cooldown", {"until_ts": until, "cooldown_s": cfg.cooldown_s,
                                  "host_wide": action in HOST_WIDE_ACTIONS})
    used = g.budget_used(ctx.now_ts)
    if used >= cfg.budget_per_hour:
        return Block("budget_exhausted", {"used": used, "budget_per_hour": cfg.budget_per_hour})
    return None
