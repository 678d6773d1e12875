"""Actuators: what carries out a recovery action on this machine.

Every actuator has one method, ``run(action, index, params) -> Result``. It is called on a
worker thread (never on paho's network thread) and bounds its own work with a timeout. A
failure is a ``Result(ok=False, reason=...)`` with a clear detail, never an exception.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class Result:
    """How an action went: ``ok``, a JSON-able ``detail``, wall ``duration_s``, and on
    failure a short machine-readable ``reason`` (``timeout``, ``processes_remain``...)."""

    ok: bool
    detail: dict[str, Any] = field(default_factory=dict)
    duration_s: float = 0.0
    reason: str | None = None


class Actuator(Protocol):
    def run(self, action: str, index: int, params: dict[str, Any]) -> Result:
        """Carry out ``action`` on GPU ``index``; never raises."""
        ...


class InvalidIndexError(ValueError):
    """A GPU index that must never reach a command line."""


def validate_index(index: object) -> int:
    """The GPU index as a plain non-negative int (0..65535), or :class:`InvalidIndexError`.

    Only the value returned here is ever formatted into an argv.
    """
    if isinstance(index, bool) or not isinstance(index, int):
        raise InvalidIndexError(f"GPU index must be an int, got {type(index).__name__}")
    if not 0 <= index <= 65535:
        raise InvalidIndexError(f"GPU index out of range: {index}")
    return int(index)
