"""The healer's clock: event time that never runs backwards and absorbs clock steps.

Cooldowns, the hourly budget and verification windows run on *event time* (the ``ts`` of
this host's live States and Events), so a replay or a simulation at ``--speed X`` runs them X
times faster, exactly as the detectors do. The source clock is not trusted blindly:

* it never moves the healer's clock backwards: a source that starts again (a new simulation,
  a publisher restart) or steps back is *re-anchored*: the healer's time stays, and goes on
  from there with the new source's increments, so a cooldown keeps its remaining duration;
* a jump forward beyond what the wall clock allows (an NTP step, a misconfigured host) is
  re-anchored too: it advances the clock by a plausible amount, not by hours, so a running
  verification does not expire at once;
* retained messages (history the broker replays on subscribe) never move it.

The plausible advance is learnt from the stream itself: the ratio of event seconds to wall
seconds (1 live, X for a replay at ``--speed X``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from pydantic import BaseModel, ConfigDict

log = logging.getLogger(__name__)

STEP_MIN_S = 60.0
"""A forward jump smaller than this (event seconds) is never a step (the default of
``[healer.guards] clock_step_min_s``)."""
STEP_FACTOR = 10.0
"""A forward jump is a step when it exceeds this many times the expected advance."""
BACK_TOLERANCE_S = 5.0
"""Going back less than this is reordering between GPUs, not a step: ignored."""
RATE_ALPHA = 0.3
RATE_WINDOW_S = 2.0
"""Wall seconds over which one rate measurement is taken (messages come in bursts)."""
MAX_RATE = 10_000.0


class ClockState(BaseModel):
    """What the clock keeps across a restart (persisted with the guards)."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    now_ts: float | None = None
    """The healer's event time (UNIX seconds of its own timeline)."""
    source_ts: float | None = None
    """The newest source ``ts`` seen (what the next increment is measured from)."""
    wall_ts: float | None = None
    """Wall time when ``source_ts`` was seen."""
    rate: float = 1.0
    """Event seconds per wall second, learnt from the stream."""
    rate_source_ts: float | None = None
    rate_wall_ts: float | None = None
    """Where the current rate measurement started."""
    steps: int = 0
    """Source clock steps absorbed so far."""


class HealerClock:
    """Event time for the policy; ``observe`` each live message's ``ts``."""

    def __init__(self, state: ClockState | None = None,
                 wall: Callable[[], float] = time.time, step_min_s: float = STEP_MIN_S) -> None:
        self.state = state if state is not None else ClockState()
        self.wall = wall
        self.step_min_s = step_min_s

    def now(self) -> float | None:
        """The healer's event time; None before anything was seen."""
        return self.state.now_ts

    def observe(self, ts: float) -> float:
        """Take a live message's source time into account; returns the event time now."""
        s = self.state
        wall = self.wall()
        if s.now_ts is None or s.source_ts is None or s.wall_ts is None:
            s.now_ts, s.source_ts, s.wall_ts = ts, ts, wall
            s.rate_source_ts, s.rate_wall_ts = ts, wall
            return ts
        delta = ts - s.source_ts
        wall_delta = max(0.0, wall - s.wall_ts)
        if delta < 0:
            if delta < -BACK_TOLERANCE_S:
                s.steps += 1
                log.warning("the source clock went back %.0f s (a new simulation or replay, a "
                            "clock step): the healer's time goes on from %.0f", -delta, s.now_ts)
                s.source_ts, s.wall_ts = ts, wall
                s.rate_source_ts, s.rate_wall_ts = ts, wall
            return s.now_ts
        expected = max(self.step_min_s, STEP_FACTOR * (s.rate * wall_delta + 1.0))
        if delta > expected:
            s.steps += 1
            advance = min(delta, s.rate * wall_delta + 1.0)
            log.warning("the source clock jumped %.0f s ahead in %.1f s of wall time (a clock "
                        "step): the healer's time advances %.1f s", delta, wall_delta, advance)
            delta = advance
            s.rate_source_ts, s.rate_wall_ts = ts, wall
        else:
            self._learn_rate(ts, wall)
        s.now_ts += delta
        s.source_ts, s.wall_ts = ts, wall
        return s.now_ts

    def _learn_rate(self, ts: float, wall: float) -> None:
        s = self.state
        if s.rate_source_ts is None or s.rate_wall_ts is None:
            s.rate_source_ts, s.rate_wall_ts = ts, wall
            return
        span = wall - s.rate_wall_ts
        if span < RATE_WINDOW_S:
            return
        ratio = min(MAX_RATE, max(0.0, ts - s.rate_source_ts) / span)
        s.rate += RATE_ALPHA * (ratio - s.rate)
        s.rate_source_ts, s.rate_wall_ts = ts, wall

    def wall_seconds_for(self, event_s: float) -> float:
        """Wall seconds that ``event_s`` seconds of event time take at the learnt rate."""
        return event_s / max(self.state.rate, 1e-3)
