"""Robust event time (issue 10, defects 9 and 11): source clock steps, publisher restarts,
silence judged in event time at any replay speed, clean goodbyes.

The wall clock is a list the test moves by hand; every stream is crafted in event time.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import pytest

from analyzer.engine import Analyzer
from gpuheal.config import AnalyzerConfig
from gpuheal.models import Event, Sample, State, make_event_id
from tests.factories import T0, mk

WALL0 = 5_000.0


class Wall:
    """A hand-moved wall clock (UNIX s)."""

    def __init__(self, now: float = WALL0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def saturated_then_frozen(t: float, freeze_at: float) -> dict[str, Any]:
    """Healthy saturated work (power moving), frozen from ``freeze_at`` s of sample time."""
    if t < freeze_at:
        return {"utilization_pct": 100.0, "power_limit_w": 350.0,
                "power_draw_w": 250.0 + 50.0 * math.sin(t / 2.0)}
    return {"utilization_pct": 100.0, "power_limit_w": 350.0, "power_draw_w": 170.0,
            "memory_used_mb": 33000.0}


def drive(a: Analyzer, wall: Wall, samples: list[Sample], wall_step: float = 1.0,
          ) -> list[tuple[int, Event]]:
    """Feed samples one wall step apart, checking silence before each; (sample no., event)."""
    got: list[tuple[int, Event]] = []
    for k, s in enumerate(samples):
        wall.now += wall_step
        got += [(k, o) for o in a.check_silence(wall.now) if isinstance(o, Event)]
        got += [(k, o) for o in a.process(s) if isinstance(o, Event)]
    return got


# --- steps back ------------------------------------------------------------------------------
def test_a_clock_step_back_is_re_anchored_and_a_hang_is_still_confirmed_in_time(
        caplog: pytest.LogCaptureFixture) -> None:
    """The clock steps back 10 minutes 15 s after the freeze; seq goes on. It used to drop
    every sample until the clock caught up (the hang came ten minutes late) and the silence
    raised a false ``unavailable``."""
    wall = Wall()
    a = Analyzer(AnalyzerConfig(), started_ts=T0, clock=wall)
    samples = [mk(T0 + k - (600.0 if k >= 35 else 0.0), k, **saturated_then_frozen(k, 20))
               for k in range(80)]
    with caplog.at_level(logging.WARNING, logger="analyzer.engine"):
        events = drive(a, wall, samples)
    assert [(k, e.kind, e.phase, e.severity) for k, e in events] == [
        (30, "gpu_hang", "raised", "warning", ), (50, "gpu_hang", "escalated", "critical")]
    confirmed = events[1][1]
    assert confirmed.ts == T0 + 50 - 600 and confirmed.evidence["power_memory_flat_s"] == 30.0
    assert confirmed.started_ts == T0 + 30, "the identity stays"
    s = a.stats
    assert (s.processed, s.duplicates, s.out_of_order, s.clock_steps) == (80, 0, 0, 1)
    steps = [r.getMessage() for r in caplog.records if "stepped" in r.getMessage()]
    assert len(steps) == 1 and "-600.0 s" in steps[0]


def test_durations_stay_right_across_a_step() -> None:
    wall = Wall()
    a = Analyzer(AnalyzerConfig(), started_ts=T0, clock=wall)
    temps = [70.0] * 5 + [84.0] * 15 + [70.0] * 5
    samples = [mk(T0 + k - (3_600.0 if k >= 10 else 0.0), k, temperature_c=t)
               for k, t in enumerate(temps)]
    events = [e for _, e in drive(a, wall, samples) if e.kind == "thermal_throttling"]
    raised, cleared = events
    assert raised.event_id == cleared.event_id == make_event_id("node1", 0,
                                                                "thermal_throttling", T0 + 5)
    assert cleared.started_ts == T0 + 5 and cleared.ts == T0 + 20 - 3_600
    assert cleared.evidence["duration_s"] == 15.0


# --- steps forward ---------------------------------------------------------------------------
def test_a_clock_step_forward_does_not_elapse_the_windows_in_one_sample() -> None:
    """+2 hours from one seq to the next while the wall clock says 1 s passed: an XID
    condition used to clear and a suspected hang to be raised at that very sample."""
    wall = Wall()
    a = Analyzer(AnalyzerConfig(), started_ts=T0, clock=wall)
    samples = [mk(T0 + k + (7_200.0 if k >= 10 else 0.0), k, utilization_pct=100.0,
                  power_draw_w=250.0 + 50.0 * math.sin(k / 2.0),
                  xids=[31] if k == 5 else None) for k in range(140)]
    events = [(k, e.kind, e.phase) for k, e in drive(a, wall, samples)]
    assert events == [(5, "xid_error", "raised"), (30, "gpu_hang", "raised"),
                      (125, "xid_error", "cleared")]
    assert a.stats.clock_steps == 1


def test_a_jump_the_wall_clock_explains_is_time_that_passed() -> None:
    """The publisher was paused for 10 minutes (wall and event time both moved): no step;
    the GPU was silent (raised at its deadline, cleared by the sample) and the XID's quiet
    time elapsed."""
    wall = Wall()
    a = Analyzer(AnalyzerConfig(), started_ts=T0, clock=wall)
    samples = [mk(T0 + k, k, xids=[31] if k == 2 else None) for k in range(10)]
    drive(a, wall, samples)
    wall.now += 600.0
    out = a.process(mk(T0 + 609, 10))
    assert [(e.kind, e.phase, e.ts) for e in out if isinstance(e, Event)] == [
        ("unavailable", "raised", T0 + 9 + 3), ("unavailable", "cleared", T0 + 609),
        ("xid_error", "cleared", T0 + 609)]
    assert a.stats.clock_steps == 0


# --- ordering: one table -----------------------------------------------------------------------
ORDER: list[tuple[str, float, int, dict[str, int], bool]] = [
    # (case, ts offset from the last sample, seq offset, expected stats change, accepted)
    ("next", 1.0, 1, {}, True),
    ("exact duplicate", 0.0, 0, {"duplicates": 1}, False),
    ("same seq, newer ts", 1.0, 0, {"duplicates": 1}, False),
    ("same ts, next seq", 0.0, 1, {"duplicates": 1}, False),
    ("older seq and ts", -3.0, -3, {"out_of_order": 1}, False),
    ("clock stepped back", -900.0, 1, {"clock_steps": 1}, True),
    ("clock stepped back, a sample lost", -900.0, 2, {"clock_steps": 1}, True),
    ("clock stepped forward", 900.0, 1, {"clock_steps": 1}, True),
    ("lost samples, not a step", 5.0, 5, {}, True),
    ("restart that continues", 1.0, -20, {"publisher_restarts": 1}, True),
    ("restart behind", -900.0, -29, {"publisher_restarts": 1}, True),
]


@pytest.mark.parametrize(("dts", "dseq", "change", "accepted"), [c[1:] for c in ORDER],
                         ids=[c[0] for c in ORDER])
def test_ordering(dts: float, dseq: int, change: dict[str, int], accepted: bool) -> None:
    wall = Wall()
    a = Analyzer(AnalyzerConfig(), started_ts=T0, clock=wall)
    drive(a, wall, [mk(T0 + k, k) for k in range(30)])
    before = vars(a.stats).copy()
    wall.now += 1.0
    out = a.process(mk(T0 + 29 + dts, 29 + dseq))
    after = vars(a.stats)
    diff = {k: after[k] - before[k] for k in after
            if k in ("duplicates", "out_of_order", "publisher_restarts", "clock_steps")
            and after[k] != before[k]}
    assert diff == change
    assert bool(out) == accepted


def test_a_publisher_restart_behind_clears_each_condition_once() -> None:
    wall = Wall()
    a = Analyzer(AnalyzerConfig(), started_ts=T0, clock=wall)
    hot = {"temperature_c": 87.0, "memory_used_mb": 79_000.0}
    drive(a, wall, [mk(T0 + k, k, xids=[13] if k == 3 else None, **hot) for k in range(10)])
    assert set(a.track("node1", 0).active) == {"thermal_throttling", "out_of_memory",
                                               "xid_error"}
    ids = {c.kind: c.event_id for c in a.track("node1", 0).active.values()}
    wall.now += 1.0
    out = a.process(mk(T0 - 500, 0, temperature_c=60.0))
    cleared = [o for o in out if isinstance(o, Event)]
    assert sorted((e.kind, e.phase, e.cleared_by) for e in cleared) == [
        ("out_of_memory", "cleared", "source_restarted"),
        ("thermal_throttling", "cleared", "source_restarted"),
        ("xid_error", "cleared", "source_restarted")]
    assert {e.kind: e.event_id for e in cleared} == ids
    assert all("the source restarted" in e.message for e in cleared)
    state = out[-1]
    assert isinstance(state, State) and state.health == "healthy"
    wall.now += 1.0
    assert not [o for o in a.process(mk(T0 - 499, 1, temperature_c=60.0))
                if isinstance(o, Event)], "nothing more"


def test_a_restart_that_continues_keeps_its_conditions() -> None:
    wall = Wall()
    a = Analyzer(AnalyzerConfig(), started_ts=T0, clock=wall)
    drive(a, wall, [mk(T0 + k, 100 + k, temperature_c=86.0) for k in range(5)])
    wall.now += 1.0
    out = a.process(mk(T0 + 5, 0, temperature_c=86.0))
    assert not [o for o in out if isinstance(o, Event)]
    assert "thermal_throttling" in a.track("node1", 0).active
    assert a.stats.publisher_restarts == 1


# --- silence: the same rule at any replay speed ----------------------------------------------
def recording(gaps: bool = True) -> list[Sample]:
    """Every 2 s for two minutes, with one missing sample (a 4 s gap) and a 16 s gap."""
    times = [t for t in range(0, 120, 2) if not gaps or (t != 20 and not 60 < t < 76)]
    return [mk(T0 + t, k) for k, t in enumerate(times)]


def replay(speed: float, tick_s: float = 0.25, gaps: bool = True,
           jitter: Callable[[int], float] = lambda k: 0.0) -> list[tuple[str, str, float]]:
    """Play the recording at ``speed``, checking silence every ``tick_s`` wall seconds;
    sample k arrives ``jitter(k)`` wall seconds late."""
    wall = Wall(0.0)
    a = Analyzer(AnalyzerConfig(), started_ts=T0, clock=wall)
    out: list[tuple[str, str, float]] = []
    pending = recording(gaps)
    while pending:
        due = (pending[0].ts - T0) / speed + jitter(pending[0].seq)
        if due <= wall.now:
            out += [(e.kind, e.phase, e.ts) for e in a.process(pending.pop(0))
                    if isinstance(e, Event)]
            continue
        wall.now = min(due, wall.now + tick_s)
        out += [(e.kind, e.phase, e.ts) for e in a.check_silence(wall.now)
                if isinstance(e, Event)]
    return out


def test_the_same_recording_gives_the_same_silence_verdicts_at_any_speed() -> None:
    # The 16 s gap is 8 intervals: unavailable 3 intervals (6 s) after the last sample. It
    # used to be raised at speed 1 and not at 10 (a 2 s WALL floor = 20 s of event time).
    # At 1 and 10 the silence check sees it; at 25 and 50 the gap in the samples' clock.
    first = replay(1.0)
    assert [(kind, phase) for kind, phase, _ in first] == [("unavailable", "raised"),
                                                           ("unavailable", "cleared")]
    assert first[0][2] == pytest.approx(T0 + 60 + 6, abs=0.05)
    assert first[1][2] == T0 + 76
    for speed in (10.0, 25.0, 50.0):
        assert replay(speed) == first, speed


def test_delivery_jitter_at_a_high_speed_is_not_silence() -> None:
    """At 50x a sample 0.3 s late by the wall clock is 15 s of event time: only the wall floor
    (min_wall_timeout_s) tells jitter from silence, and the samples' own clock has no gap."""
    late = lambda k: 0.3 if k % 7 == 3 else 0.0  # noqa: E731
    assert replay(50.0, tick_s=0.05, gaps=False, jitter=late) == []
    assert replay(1.0, gaps=False, jitter=late) == []


# --- clean goodbyes -----------------------------------------------------------------------------
def test_a_publisher_that_said_goodbye_is_not_declared_silent() -> None:
    wall = Wall()
    a = Analyzer(AnalyzerConfig(), started_ts=T0, clock=wall)
    for k in range(5):
        wall.now += 1.0
        a.process(mk(T0 + k, k, host="edge1"))
        a.process(mk(T0 + k, k, host="edge2"))
    a.source_stopped("edge1", wall.now)
    silent = [(o.host, o.kind) for o in a.check_silence(wall.now + 600) if isinstance(o, Event)]
    assert silent == [("edge2", "unavailable")]
    wall.now += 700.0
    a.process(mk(T0 + 705, 0, host="edge1"))                       # it starts again
    wall.now += 1.0
    a.process(mk(T0 + 706, 1, host="edge1"))
    assert a.check_silence(wall.now + 1.0) == []
    again = [(o.host, o.kind) for o in a.check_silence(wall.now + 600) if isinstance(o, Event)]
    assert again == [("edge1", "unavailable")], "judged again once it spoke"
