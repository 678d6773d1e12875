"""Unavailable GPU (``unavailable``): the source says it is lost, or it fell silent.

* A sample with ``available = false`` raises the condition (critical, ``notify``) at once; the
  next available sample clears it.
* Silence is judged in EVENT time, so the same recording gives the same verdicts at any replay
  speed: the timeout is ``max(min_timeout_s, missed_intervals x the observed event interval)``
  event seconds (an exponential moving average of the sample interval). Two paths, one
  verdict:

  - a GPU silent NOW: the timeout is converted to wall seconds with the GPU's observed
    event/wall rate (1 live, 10 for a replay at 10x; measured over the last one to two minutes
    of wall time, so a short burst of late samples does not shrink it), never less than
    ``min_wall_timeout_s`` (delivery jitter is wall time whatever the speed);
  - a gap in the samples' own clock: a sample whose ``ts`` is more than the timeout after the
    previous one shows the GPU missed its deadline, even when the wall clock did not notice
    (a fast replay): the condition is raised then, and the sample clears it.

  Either way the event carries the event time at which the GPU missed its deadline (the last
  ``ts`` plus the timeout) and an event-time message: the same events at any speed.
* A publisher that said goodbye (:meth:`SilenceTracker.stop`) is not judged until its next
  sample.
"""

from __future__ import annotations

import math
from typing import Any

from analyzer.detectors.base import Detector, Finding, Verdict
from gpuheal.config.detection import UnavailableConfig
from gpuheal.models import Sample, Severity

EMA_ALPHA = 0.2
"""Weight of the newest inter-arrival interval in the moving averages."""
RATE_HORIZON_S = 60.0
"""Wall seconds after which the newer rate anchor moves up (the rate spans 1-2 horizons)."""


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
            evidence={"available": False, "error": sample.error, "source": sample.source,
                      "xids": list(sample.xids or ())},
            recommended_action="notify",
        )

    def cleared(self, sample: Sample) -> tuple[str, dict[str, Any]]:
        readings = {"temperature_c": sample.temperature_c,
                    "utilization_pct": sample.utilization_pct,
                    "memory_used_mb": sample.memory_used_mb,
                    "power_draw_w": sample.power_draw_w}
        shown = ", ".join(f"{k} {v:g}" for k, v in readings.items() if v is not None)
        return (f"cleared: the GPU answers again ({shown or 'no readings'})",
                {"available": True, **readings})

    def restore(self, severity: Severity, started_ts: float, state_ts: float) -> None:
        return None


class SilenceTracker:
    """When did this GPU last speak, how often does it speak, and how fast does its event time
    run against the wall clock?"""

    __slots__ = ("_a_ts", "_a_wall", "_b_ts", "_b_wall", "_config", "_known_rate",
                 "_skip_interval", "deadline_wall", "ema_event_s", "ema_wall_s", "last_ts",
                 "last_wall", "stopped")

    def __init__(self, config: UnavailableConfig) -> None:
        self._config = config
        self.restart()

    def restart(self) -> None:
        """Forget everything measured: the source started anew (another run, maybe another
        speed)."""
        self.last_wall: float | None = None
        """Wall clock (UNIX s) when the latest sample arrived."""
        self.last_ts: float | None = None
        """Event time of the latest sample."""
        self.ema_wall_s: float | None = None
        self.ema_event_s: float | None = None
        """Moving averages of the sample interval in wall and event seconds."""
        self.deadline_wall = math.inf
        """Wall time at which the GPU counts as silent (inf while not judged)."""
        self.stopped = False
        """The publisher said goodbye: silence is not judged until the next sample."""
        self._a_ts = self._a_wall = self._b_ts = self._b_wall = math.nan
        """Two (event, wall) anchors: the rate is measured from the older one."""
        self._known_rate: float | None = None
        """The rate measured before the anchors last started again (used until measured)."""
        self._skip_interval = False
        """The next arrival ends a gap that is no sample interval (goodbye, cut-off, restart)."""

    def arrived(self, ts: float, wall: float) -> None:
        """Record a processed sample (event time ``ts``, arrival wall time ``wall``)."""
        if self.stopped:
            self.stopped = False
            self.restart_rate()
        if self._skip_interval:
            self._skip_interval = False
        elif self.last_wall is not None and self.last_ts is not None:
            dw = max(0.0, wall - self.last_wall)
            de = max(0.0, ts - self.last_ts)
            self.ema_wall_s = dw if self.ema_wall_s is None else (
                self.ema_wall_s + EMA_ALPHA * (dw - self.ema_wall_s))
            self.ema_event_s = de if self.ema_event_s is None else (
                self.ema_event_s + EMA_ALPHA * (de - self.ema_event_s))
        self.last_wall = wall
        self.last_ts = ts
        if math.isnan(self._a_ts):
            self._a_ts = self._b_ts = ts
            self._a_wall = self._b_wall = wall
        elif wall - self._b_wall >= RATE_HORIZON_S:
            self._a_ts, self._a_wall = self._b_ts, self._b_wall
            self._b_ts, self._b_wall = ts, wall
        self._rearm()

    def rate(self) -> float | None:
        """Event seconds per wall second of this stream (None: not known yet)."""
        if self.last_ts is None or self.last_wall is None or math.isnan(self._a_ts):
            return self._known_rate
        dw = self.last_wall - self._a_wall
        de = self.last_ts - self._a_ts
        if dw <= 0.0 or de <= 0.0:
            return self._known_rate
        return de / dw

    def _rearm(self) -> None:
        timeout = self.timeout_s()
        if timeout is None or self.last_wall is None or self.stopped:
            self.deadline_wall = math.inf
        else:
            self.deadline_wall = self.last_wall + timeout

    def hold(self, now_wall: float) -> None:
        """Start the silence clock again at ``now_wall`` (if it was running earlier). The
        time cut off says nothing about the rate: it is measured again from the next sample
        (the one measured so far holds until then)."""
        if self.last_wall is not None and now_wall > self.last_wall:
            self.restart_rate()
            self.last_wall = now_wall
            self._rearm()

    def stop(self) -> None:
        """The publisher stopped cleanly: no silence verdict until its next sample."""
        self.stopped = True
        self.deadline_wall = math.inf

    def restart_rate(self) -> None:
        """Measure the event/wall rate again from the next sample (the one measured so far
        holds until then); the gap up to that sample is no sample interval."""
        self._known_rate = self.rate()
        self._skip_interval = True
        self._a_ts = self._a_wall = self._b_ts = self._b_wall = math.nan

    def shift(self, delta_s: float) -> None:
        """Move the stored event times by ``delta_s`` (a re-anchored source clock step)."""
        if self.last_ts is not None:
            self.last_ts += delta_s
        self._a_ts += delta_s
        self._b_ts += delta_s

    def timeout_event_s(self) -> float | None:
        """Event seconds of silence that make the GPU unavailable (None: not known yet)."""
        if self.ema_event_s is None:
            return None
        return max(self._config.min_timeout_s, self._config.missed_intervals * self.ema_event_s)

    def timeout_s(self) -> float | None:
        """Wall seconds of silence that make the GPU unavailable now (None: not known yet):
        the event-time timeout at the observed rate, at least ``min_wall_timeout_s``."""
        timeout = self.timeout_event_s()
        rate = self.rate()
        if timeout is None or rate is None:
            return None
        return max(timeout / rate, self._config.min_wall_timeout_s)

    def _finding(self) -> Finding:
        timeout = self.timeout_event_s() or 0.0
        interval = self.ema_event_s or 0.0
        return Finding(
            severity="critical",
            message=(f"GPU unavailable: no sample for more than {timeout:.3g} s of event time "
                     f"(its interval is {interval:.3g} s)"),
            evidence={
                "timeout_event_s": round(timeout, 3),
                "interval_s": round(interval, 3),
                "last_sample_ts": self.last_ts,
            },
            recommended_action="notify",
        )

    def silent(self, now_wall: float) -> Finding | None:
        """A finding when the GPU has been silent too long at wall time ``now_wall``."""
        if now_wall < self.deadline_wall or self.stopped:
            return None
        timeout = self.timeout_s()
        if timeout is None or self.last_wall is None or self.last_ts is None:
            return None
        if now_wall - self.last_wall < timeout:
            return None
        return self._finding()

    def gap(self, ts: float) -> Finding | None:
        """Before :meth:`arrived`: a finding when the sample at ``ts`` ends a stretch of its own
        clock longer than the timeout (the GPU missed its deadline in event time, whatever the
        wall clock said). None after a goodbye, a cut-off or a restart: that gap says nothing."""
        if self._skip_interval or self.stopped or self.last_ts is None:
            return None
        timeout = self.timeout_event_s()
        if timeout is None or ts - self.last_ts <= timeout:
            return None
        return self._finding()

    def extrapolated_ts(self) -> float:
        """Event time at which the GPU missed its deadline (last ``ts`` plus the timeout)."""
        assert self.last_ts is not None
        return self.last_ts + (self.timeout_event_s() or 0.0)
