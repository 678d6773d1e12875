"""The Action messages the policy publishes: one place that builds them.

One action's life is several Action messages with the same ``action_id`` (``started`` →
``succeeded`` → ``verified``...); a decision not to act is one message (``skipped`` with its
reason, or ``dry_run``). Ids are deterministic (:func:`gpuheal.models.make_action_id`), so a
redelivered event never gives a second action.
"""

from __future__ import annotations

from typing import Any

from gpuheal.models import Action, make_action_id
from healer.guards import Incident, PendingAction


class ActionMessages:
    """Builds the Action messages of one host; ``ts`` is the healer's event time."""

    def __init__(self, host: str) -> None:
        self.host = host

    def decision(self, inc: Incident, action: str, status: str, reason: str | None,
                 detail: dict[str, Any], ts: float) -> tuple[Action, int]:
        """A new decision about ``inc`` (skipped, dry_run, started): the next attempt."""
        inc.attempts += 1
        attempt = inc.attempts
        message = Action(action_id=make_action_id(inc.event_id, action, attempt, self.host,
                                                  inc.index),
                         event_id=inc.event_id, host=self.host, index=inc.index, action=action,
                         status=status, reason=reason, attempt=attempt, ts=ts,
                         detail={"kind": inc.kind, "severity": inc.severity, **detail})
        return message, attempt

    def step(self, pending: PendingAction, status: str, reason: str | None, ts: float,
             detail: dict[str, Any] | None = None, duration_s: float | None = None) -> Action:
        """The next message in the life of an action in flight."""
        return Action(action_id=pending.action_id, event_id=pending.event_id, host=self.host,
                      index=pending.index, action=pending.action, status=status, reason=reason,
                      attempt=pending.attempt, ts=ts, duration_s=duration_s,
                      detail=detail or {})

    def maintenance(self, event_id: str | None, index: int, action: str, attempt: int,
                    status: str, reason: str | None, detail: dict[str, Any],
                    ts: float) -> Action:
        """An action that belongs to no open incident (the throttle's restore)."""
        return Action(action_id=make_action_id(event_id, action, attempt, self.host, index),
                      event_id=event_id, host=self.host, index=index, action=action,
                      status=status, reason=reason, attempt=attempt, ts=ts, detail=detail)

    def about(self, event_id: str | None, index: int, action: str, status: str,
              reason: str | None, detail: dict[str, Any], ts: float, attempt: int = 1) -> Action:
        """A message about an event the healer keeps no incident for (unknown GPU, replayed,
        a person's acknowledgement)."""
        return Action(action_id=make_action_id(event_id, f"{action}:{status}:{reason}", attempt,
                                               self.host, index),
                      event_id=event_id, host=self.host, index=index, action=action,
                      status=status, reason=reason, attempt=attempt, ts=ts, detail=detail)
