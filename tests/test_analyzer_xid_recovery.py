"""XID conditions never recover by a timer alone, and a person can take a condition over
(issue 10, defects 7, 11 and 12).

Each case is a list of steps at one sample every ``STEP_S`` seconds of event time; a step is a
dict of reading overrides plus the markers ``lost`` (an unavailable sample), ``boot`` (the
host's boot time in that sample) and ``reset`` (the healer's ``reset_gpu`` succeeded just
before that sample). Expected: ``(step, phase, severity, cleared_by)`` of the ``xid_error``
events.
"""

from __future__ import annotations

from typing import Any

import pytest

from analyzer.engine import Analyzer
from gpuheal.config import AnalyzerConfig
from gpuheal.config.detection import XidConfig
from gpuheal.models import Event, Sample, State
from tests.factories import T0, mk

STEP_S = 10.0
QUIET_S = 60.0
BOOT = T0 - 86_400.0
REBOOT = T0 + 1_000.0
CONFIG = AnalyzerConfig(xid=XidConfig(clear_after_s=QUIET_S))
LOST = {k: None for k in ("temperature_c", "utilization_pct", "memory_used_mb",
                          "memory_total_mb", "power_draw_w", "power_limit_w", "sm_clock_mhz",
                          "mem_clock_mhz")}

Expected = list[tuple[int, str, str, str | None]]


def sample(k: int, step: dict[str, Any]) -> Sample:
    step = dict(step)
    lost = step.pop("lost", False)
    boot = step.pop("boot", BOOT)
    step.pop("reset", None)
    readings = {**LOST, "available": False, "error": "GPU has fallen off the bus"} if lost \
        else {}
    return mk(T0 + k * STEP_S, k, host_boot_ts=boot, **{**readings, **step})


def play(steps: list[dict[str, Any]], config: AnalyzerConfig = CONFIG,
         analyzer: Analyzer | None = None, start: int = 0) -> tuple[Expected, list[Event]]:
    a = analyzer if analyzer is not None else Analyzer(config, started_ts=T0,
                                                       clock=lambda: 0.0)
    got: Expected = []
    events: list[Event] = []
    for k, step in enumerate(steps, start):
        if step.get("reset"):
            a.note_reset("node1", 0, T0 + k * STEP_S - 1.0)
        for out in a.process(sample(k, step)):
            if isinstance(out, Event) and out.kind == "xid_error":
                got.append((k, out.phase, out.severity, out.cleared_by))
                events.append(out)
    return got, events


def quiet(n: int, **extra: Any) -> list[dict[str, Any]]:
    return [dict(extra) for _ in range(n)]


XID: list[tuple[str, list[dict[str, Any]], Expected]] = [
    ("restart-app code clears after 60 s of quiet available samples",
     [{"xids": [31]}, *quiet(8)],
     [(0, "raised", "warning", None), (6, "cleared", "warning", "recovered")]),
    ("a new XID restarts the quiet time",
     [{"xids": [31]}, *quiet(3), {"xids": [13]}, *quiet(8)],
     [(0, "raised", "warning", None), (10, "cleared", "warning", "recovered")]),
    # Time while the GPU is unavailable never counts, and it starts the quiet time again.
    ("unavailable samples restart the quiet time",
     [{"xids": [94]}, *quiet(4), *quiet(5, lost=True), *quiet(8)],
     [(0, "raised", "warning", None), (16, "cleared", "warning", "recovered")]),
    ("unknown code, same rule", [{"xids": [154]}, *quiet(7)],
     [(0, "raised", "warning", None), (6, "cleared", "warning", "recovered")]),
    # Reset-class codes: no amount of quiet time without a reset (it used to clear after
    # clear_after_s, so every XID action looked "verified").
    ("reset-class code without a reset stays open", [{"xids": [62]}, *quiet(90)],
     [(0, "raised", "critical", None)]),
    ("reset-class code: a reset, then the quiet time",
     [{"xids": [95]}, *quiet(20), {"reset": True}, *quiet(8)],
     [(0, "raised", "critical", None), (27, "cleared", "critical", "recovered")]),
    ("reset-class code: a reboot, then the quiet time",
     [{"xids": [120]}, *quiet(20), *quiet(8, boot=REBOOT)],
     [(0, "raised", "critical", None), (27, "cleared", "critical", "recovered")]),
    ("an XID after the reset needs another reset",
     [{"xids": [64]}, *quiet(3), {"reset": True}, {"xids": [64]}, *quiet(20)],
     [(0, "raised", "critical", None)]),
    ("a milder XID after the reset restarts the quiet time only",
     [{"xids": [46]}, {"reset": True}, *quiet(2), {"xids": [13]}, *quiet(7)],
     [(0, "raised", "critical", None), (10, "cleared", "critical", "recovered")]),
    # XID 79 arrives with the GPU lost: still seen. It needs a reboot (or a reset) AND the
    # GPU available again, then the quiet time.
    ("XID 79 in a lost sample, lost for good", [{"xids": [79], "lost": True},
                                                *quiet(40, lost=True)],
     [(0, "raised", "emergency", None)]),
    ("XID 79: back after a reset but never quiet long while lost",
     [{"xids": [79], "lost": True}, *quiet(5, lost=True), {"reset": True, "lost": True},
      *quiet(4, lost=True), *quiet(8)],
     [(0, "raised", "emergency", None), (17, "cleared", "emergency", "recovered")]),
    ("XID 79: a reboot brings it back",
     [{"xids": [79], "lost": True}, *quiet(30, lost=True), *quiet(8, boot=REBOOT)],
     [(0, "raised", "emergency", None), (37, "cleared", "emergency", "recovered")]),
    ("XID 79 with the GPU still answering, no reboot", [{"xids": [79]}, *quiet(100)],
     [(0, "raised", "emergency", None)]),
    ("a boot time appearing late is no reboot",
     [{"xids": [79], "boot": None}, *quiet(3, boot=None), *quiet(20)],
     [(0, "raised", "emergency", None)]),
]


@pytest.mark.parametrize(("steps", "expected"), [c[1:] for c in XID], ids=[c[0] for c in XID])
def test_xid_conditions_need_their_recovery(steps: list[dict[str, Any]],
                                            expected: Expected) -> None:
    assert play(steps)[0] == expected


def test_the_cleared_event_says_what_recovered_it() -> None:
    _, events = play([{"xids": [95]}, *quiet(5), {"reset": True}, *quiet(8)])
    raised, cleared = events
    assert "needs a GPU reset" in raised.message
    assert cleared.message == ("cleared: no XID for 60 s of available samples after a GPU "
                               "reset (was XID 95, reset_gpu)")
    assert cleared.evidence["recovered_by"] == "reset" and cleared.evidence["available"]
    assert cleared.evidence["duration_s"] == 12 * STEP_S
    _, events = play([{"xids": [79], "lost": True}, *quiet(2, lost=True),
                      *quiet(8, boot=REBOOT)])
    assert "needs a reboot (or a GPU reset), or a person" in events[0].message
    assert "after a reboot" in events[-1].message
    assert events[-1].evidence["host_boot_ts"] == REBOOT


def test_an_unavailable_sample_with_an_xid_raises_both_conditions() -> None:
    a = Analyzer(CONFIG, started_ts=T0, clock=lambda: 0.0)
    out = a.process(sample(0, {"xids": [79], "lost": True}))
    events = {o.kind: o for o in out if isinstance(o, Event)}
    assert set(events) == {"unavailable", "xid_error"}
    assert events["xid_error"].severity == "emergency"
    assert events["unavailable"].evidence["xids"] == [79]
    state = out[-1]
    assert isinstance(state, State) and state.health == "unavailable"


# --- a person takes a condition over ------------------------------------------------------
def test_acknowledge_clears_a_condition_that_needs_a_person() -> None:
    a = Analyzer(CONFIG, started_ts=T0, clock=lambda: 0.0)
    _, events = play([{"xids": [79]}, *quiet(30)], analyzer=a)
    raised = events[0]
    assert a.acknowledge("node1", 0, "no-such-event", T0 + 400) == []
    assert a.acknowledge("node1", 7, raised.event_id, T0 + 400) == []
    out = a.acknowledge("node1", 0, raised.event_id, T0 + 400.5)
    event, state = out
    assert isinstance(event, Event) and isinstance(state, State)
    assert (event.phase, event.cleared_by, event.event_id) == ("cleared", "acknowledged",
                                                               raised.event_id)
    assert event.message.startswith("cleared: acknowledged, a person took it over")
    assert event.evidence["acknowledged_ts"] == T0 + 400.5
    assert event.ts == T0 + 300 and event.evidence["duration_s"] == 300
    assert state.health == "healthy" and state.active == []
    assert a.acknowledge("node1", 0, raised.event_id, T0 + 401) == [], "only once"
    # Not raised again for the same XIDs; a new XID is a new condition.
    more, _ = play([*quiet(30), {"xids": [79]}], analyzer=a, start=31)
    assert more == [(61, "raised", "emergency", None)]
    assert a.stats.acknowledged == 1


def test_an_acknowledged_condition_is_not_raised_again_while_it_lasts() -> None:
    a = Analyzer(AnalyzerConfig(), started_ts=T0, clock=lambda: 0.0)

    def thermal(k: int, temp: float) -> list[tuple[str, str, str | None]]:
        return [(o.phase, o.severity, o.cleared_by) for o in a.process(
            mk(T0 + k, k, temperature_c=temp))
            if isinstance(o, Event) and o.kind == "thermal_throttling"]

    assert thermal(0, 84.0) == [("raised", "warning", None)]
    event_id = a.track("node1", 0).active["thermal_throttling"].event_id
    assert [o.cleared_by for o in a.acknowledge("node1", 0, event_id, T0 + 0.5)
            if isinstance(o, Event)] == ["acknowledged"]
    assert thermal(1, 84.5) == [], "the same warning: muted"
    assert thermal(2, 86.0) == [("raised", "critical", None)], "worse: raised anew"
    new_id = a.track("node1", 0).active["thermal_throttling"].event_id
    assert new_id != event_id
    a.acknowledge("node1", 0, new_id, T0 + 2.5)
    assert thermal(3, 86.0) == []
    assert thermal(4, 70.0) == [], "cooled: the mute ends, nothing was active"
    assert thermal(5, 84.0) == [("raised", "warning", None)], "a new episode is raised"


def test_a_silent_gpu_a_person_took_over_is_not_declared_silent_again() -> None:
    clock = [1000.0]
    a = Analyzer(AnalyzerConfig(), started_ts=T0, clock=lambda: clock[0])
    for k in range(5):
        clock[0] = 1000.0 + k
        a.process(mk(T0 + k, k))
    raised = next(o for o in a.check_silence(1010.0) if isinstance(o, Event))
    assert raised.kind == "unavailable"
    a.acknowledge("node1", 0, raised.event_id, T0 + 10)
    assert a.check_silence(1020.0) == []
    clock[0] = 1030.0
    a.process(mk(T0 + 30, 5))
    again = [o for o in a.check_silence(1060.0) if isinstance(o, Event)]
    assert [e.phase for e in again] == ["raised"], "it spoke again, then fell silent again"
