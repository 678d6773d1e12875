"""Unavailable GPU (``unavailable``): the source says it is lost, or it fell silent.

* A sample with ``available = false`` raises the condition (critical, ``notify``) at once; the
  next available sample clears it.
* Silence: no sample for ``missed_intervals`` times the GPU's observed WALL-clock inter-arrival
  interval (an exponential moving average; never less than ``min_timeout_s``) raises it too.
  The event carries an event time extrapolated from the last sample: the last ``ts`` plus
  ``missed_intervals`` observed event-time intervals (deterministic for a given stream).
"""

from __future__ import annotations

import math

from analyzer.detectors.base import Detector, Finding, Verdict
from gpuheal.config.detection import UnavailableConfig
from gpuheal.models import Sample, Severity

EMA_ALPHA = 0.2
"""Weight of the newest inter-arrival interval in the moving averages."""


class UnavailableDetector(Detector):
    """``available = false`` in a sample → critical; an available sample → clear."""

    __slots__ = ()
    kind = "unavailable"

    def update(self, sample: Sample) -> Verdict:
        if sample.available:
            return None
        reason = sample.error or "the source reports the GPU lost"
        return Finding(
            severity="critical",
            message=f"GPU unavailable: {reason}",
            evidence={"available": False, "error": sample.error, "source": sample.source},
            recommended_action="notify",
        )

    def restore(self, severity: Severity, started_ts: float, state_ts: float) -> None:
        return None


class SilenceTracker:
    """When did this GPU last speak, how often does it speak (wall and event time)?"""

    __slots__ = ("_config", "deadline_wall", "ema_event_s", "ema_wall_s", "last_ts",
                 "last_wall")

    def __init__(self, config: UnavailableConfig) -> None:
        self._config = config
        self.last_wall: float | None = None
        """Wall clock (UNIX s) when the latest sample arrived."""
        self.last_ts: float | None = None
        """Event time of the latest sample."""
        self.ema_wall_s: float | None = None
        self.ema_event_s: float | None = None
        self.deadline_wall = math.inf
        """Wall time at which the GPU counts as silent (inf while the interval is unknown)."""

    def arrived(self, ts: float, wall: float) -> None:
        """Record a processed sample (event time ``ts``, arrival wall time ``wall``)."""
        if self.last_wall is not None and self.last_ts is not None:
            dw = max(0.0, wall - self.last_wall)
            de = max(0.0, ts - self.last_ts)
            self.ema_wall_s = dw if self.ema_wall_s is None else (
                self.ema_wall_s + EMA_ALPHA * (dw - self.ema_wall_s))
            self.ema_event_s = de if self.ema_event_s is None else (
                self.ema_event_s + EMA_ALPHA * (de - self.ema_event_s))
        self.last_wall = wall
        self.last_ts = ts
        self._rearm()

    def _rearm(self) -> None:
        timeout = self.timeout_s()
        if timeout is not None and self.last_wall is not None:
            self.deadline_wall = self.last_wall + timeout

    def hold(self, now_wall: float) -> None:
        """Start the silence clock again at ``now_wall`` (if it was running earlier)."""
        if self.last_wall is not None and now_wall > self.last_wall:
            self.last_wall = now_wall
            self._rearm()

    def timeout_s(self) -> float | None:
        """Wall seconds of silence that make the GPU unavailable (None: not known yet)."""
        if self.ema_wall_s is None:
            return None
        return max(self._config.min_timeout_s, self._config.missed_intervals * self.ema_wall_s)

    def silent(self, now_wall: float) -> Finding | None:
        """A finding when the GPU has been silent too long at wall time ``now_wall``."""
        if now_wall < self.deadline_wall:
            return None
        timeout = self.timeout_s()
        if timeout is None or self.last_wall is None or self.last_ts is None:
            return None
        silent_s = now_wall - self.last_wall
        if silent_s < timeout:
            return None
        return Finding(
            severity="critical",
            message=f"GPU unavailable: no sample for {silent_s:.1f} s (timeout {timeout:.1f} s)",
            evidence={
                "silent_wall_s": round(silent_s, 3),
                "timeout_wall_s": round(timeout, 3),
                "last_sample_ts": self.last_ts,
                "interval_s": self.ema_event_s,
            },
            recommended_action="notify",
        )

    def extrapolated_ts(self) -> float:
        """Event time at which the GPU missed its ``missed_intervals``-th sample."""
        assert self.last_ts is not None
        return self.last_ts + self._config.missed_intervals * (self.ema_event_s or 0.0)
