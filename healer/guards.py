"""The healer's guard state: what survives a restart, and the pure checks on it.

All times are event time (UNIX seconds of the source clock). The state is a plain pydantic
model so that it round-trips through the JSON state file (see :mod:`healer.store`).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from gpuheal.models import Cooldown, GpuIndex

BUDGET_WINDOW_S = 3600.0
"""The action budget is counted over a rolling hour of event time."""


class ThrottleEntry(BaseModel):
    """A GPU whose power limit the healer lowered (and will restore)."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)
    event_id: str | None = None
    restores: int = 0
    """Restore attempts so far (part of the restore's action id)."""


class GuardState(BaseModel):
    """Everything the guards remember; persisted to the state file after every change."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    version: int = 1
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
    """The first power limit seen per GPU (watts): what a restore returns to."""
    clock_ts: float | None = None
    """The newest event time seen, so that a restart can tell a new source clock."""
    handled: list[str] = Field(default_factory=list)
    """Keys ``event_id|phase|severity`` already handled, oldest first (bounded)."""
    _handled_cache: set[str] | None = PrivateAttr(default=None)

    # --- budget ----------------------------------------------------------------------
    def budget_used(self, now_ts: float | None) -> int:
        """Actions started in the hour before ``now_ts`` (drops older entries)."""
        if now_ts is not None:
            self.budget_ts = [t for t in self.budget_ts if now_ts - t < BUDGET_WINDOW_S]
        return len(self.budget_ts)

    def spend_budget(self, now_ts: float) -> None:
        self.budget_ts.append(now_ts)

    # --- cooldowns -------------------------------------------------------------------
    def cooldown_until(self, index: int, action: str, now_ts: float) -> float | None:
        """When the cooldown of ``action`` on GPU ``index`` ends, if it is still running."""
        for c in self.cooldowns:
            if c.index == index and c.action == action and c.until_ts > now_ts:
                return c.until_ts
        return None

    def set_cooldown(self, index: int, action: str, until_ts: float, now_ts: float) -> None:
        """Start a cooldown; forget expired ones on the way."""
        self.cooldowns = [
            c for c in self.cooldowns
            if c.until_ts > now_ts and not (c.index == index and c.action == action)
        ]
        self.cooldowns.append(Cooldown(index=index, action=action, until_ts=until_ts))

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

    def _handled_set(self) -> set[str]:
        if self._handled_cache is None or len(self._handled_cache) != len(self.handled):
            self._handled_cache = set(self.handled)
        return self._handled_cache

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


def event_key(event_id: str, phase: str, severity: str) -> str:
    """The idempotence key of one event delivery: a redelivery has the same key."""
    return f"{event_id}|{phase}|{severity}"
