"""Which recovery action a condition calls for: the configured ladders, pure functions."""

from __future__ import annotations

from gpuheal.config.healing import DESTRUCTIVE_ACTIONS, XID_ACTIONS, HealerConfig, Rung
from gpuheal.models import SEVERITY_RANK, Event

__all__ = ["DESTRUCTIVE_ACTIONS", "XID_ACTIONS", "ladder_for", "rung_for"]


def ladder_for(config: HealerConfig, event: Event) -> list[Rung]:
    """The rungs for this event's condition, in climbing order.

    ``xid_error`` follows NVIDIA's catalog through the analyzer's ``recommended_action``
    (restart the application, reset the GPU, or a person); a kind without a configured ladder
    asks a person (``notify``).
    """
    if event.kind == "xid_error":
        action = event.recommended_action
        if action not in XID_ACTIONS:
            action = "notify"
        return [Rung(action=action, min_severity="warning")]
    rungs = config.ladders.get(event.kind)
    if not rungs:
        return [Rung(action="notify", min_severity="warning")]
    return list(rungs)


def rung_for(rungs: list[Rung], severity: str) -> int | None:
    """Index of the highest rung whose ``min_severity`` <= ``severity``; None when none is."""
    rank = SEVERITY_RANK[severity]
    found: int | None = None
    for i, rung in enumerate(rungs):
        if SEVERITY_RANK[rung.min_severity] <= rank:
            found = i
    return found
