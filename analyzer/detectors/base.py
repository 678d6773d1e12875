"""What every detector returns, and the helpers they share.

A detector is a small stateful object for ONE GPU. ``update(sample)`` returns:

* a :class:`Finding` — the condition holds now, at this severity (the engine raises it, or
  escalates it when the severity is higher than the one it holds; severity never goes down
  within a condition);
* ``None`` — the condition does not hold (the engine clears it when it is active);
* :data:`KEEP` — this sample says nothing either way (a missing reading is not evidence of
  health), so nothing changes.

When the engine clears an active condition on ``None`` it asks the detector
:meth:`Detector.cleared` for the message and evidence of the reading that cleared it (only
then: a healthy sample costs nothing more). Every stored event time moves with
:meth:`Detector.shift` when the engine re-anchors a stepped source clock.

Detectors keep O(1) state: a few numbers, never a growing list.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Final, Literal

from gpuheal.models import SEVERITY_RANK, ActionName, ConditionKind, Sample, Severity


class _Keep(Enum):
    KEEP = "keep"


KEEP: Final = _Keep.KEEP
"""A detector's answer when the sample carries no evidence for its condition."""

Keep = Literal[_Keep.KEEP]

LEVELS: tuple[Severity, ...] = ("warning", "critical", "emergency")


@dataclass(slots=True)
class Finding:
    """A condition that holds on this sample."""

    severity: Severity
    message: str
    evidence: dict[str, Any] = field(default_factory=dict)
    recommended_action: ActionName | None = None


Verdict = Finding | None | Keep


class Detector:
    """Base of the per-GPU detectors (one instance per GPU and kind)."""

    __slots__ = ()
    kind: ConditionKind

    def update(self, sample: Sample) -> Verdict:  # pragma: no cover - abstract
        raise NotImplementedError

    def restore(self, severity: Severity, started_ts: float, state_ts: float) -> None:
        """Continue a condition that a previous analyzer held (from its retained State).

        ``started_ts`` is when the condition started, ``state_ts`` the event time of the
        retained State (both UNIX seconds of the source clock).
        """

    def cleared(self, sample: Sample) -> tuple[str, dict[str, Any]]:
        """Message and evidence of the reading that ends the active condition (``sample`` is
        the one this detector just answered None to)."""
        return "cleared: the condition no longer holds", {}

    def shift(self, delta_s: float) -> None:
        """Move every stored event time by ``delta_s`` seconds (the source clock stepped and
        the engine re-anchored it, so that no window elapses or restarts by the step)."""

    def acknowledged(self) -> None:
        """A person took the active condition over: forget its evidence (it is not raised
        again for the same evidence; the engine mutes the kind until it stops holding)."""


def worse(a: Severity | None, b: Severity | None) -> Severity | None:
    """The higher of two severities (None is lower than any)."""
    if a is None:
        return b
    if b is None:
        return a
    return a if SEVERITY_RANK[a] >= SEVERITY_RANK[b] else b


def level_of(value: float, warning: float, critical: float, emergency: float) -> Severity | None:
    """The severity whose threshold ``value`` reaches (``>=``), or None below warning."""
    if value >= emergency:
        return "emergency"
    if value >= critical:
        return "critical"
    if value >= warning:
        return "warning"
    return None


class BandedLevel:
    """A threshold ladder with a hysteresis band: the core of the memory and thermal detectors.

    The condition starts when the value reaches the warning threshold (possibly straight at a
    higher severity) and ends only when the value falls below ``warning - hysteresis``, the
    band under the threshold that raised it. While it holds, the reported severity is the
    level of the current value, at least ``warning`` (the engine never lowers a condition's
    severity anyway).
    """

    __slots__ = ("active",)

    def __init__(self) -> None:
        self.active = False

    def step(
        self, value: float, warning: float, critical: float, emergency: float, hysteresis: float
    ) -> Severity | None:
        """Feed one value (same unit as the thresholds); the severity that holds, or None."""
        level = level_of(value, warning, critical, emergency)
        if level is not None:
            self.active = True
            return level
        if self.active and value >= warning - hysteresis:
            return "warning"
        self.active = False
        return None
