"""Hang evidence that a healthy GPU cannot produce (issue 10, defects 1, 2 and 11).

Each case is a stream of readings at one sample per second of event time; the verdict is the
worst ``gpu_hang`` severity the engine reached (None: never raised). Cards, limits and
durations are ours, not the issue's examples.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import pytest
from pydantic import ValidationError

from analyzer.engine import Analyzer
from gpuheal.config import AnalyzerConfig
from gpuheal.config.detection import DetectorOverride, HangConfig
from gpuheal.models import Event
from tests.factories import T0, mk

L40S = "NVIDIA L40S"
A10 = "NVIDIA A10"
ORIN_DEVKIT = "NVIDIA Jetson AGX Orin Developer Kit"


def run(readings: list[dict[str, Any]], config: AnalyzerConfig | None = None,
        interval_s: float = 1.0) -> list[Event]:
    a = Analyzer(config or AnalyzerConfig(), started_ts=T0, clock=lambda: 0.0)
    events: list[Event] = []
    for k, r in enumerate(readings):
        r = dict(r)
        name = r.pop("name", L40S)
        events += [o for o in a.process(mk(T0 + k * interval_s, k, name=name, **r))
                   if isinstance(o, Event) and o.kind == "gpu_hang"]
    return events


def worst(events: list[Event]) -> str | None:
    order = ["warning", "critical", "emergency"]
    return max((e.severity for e in events), key=order.index, default=None)


def saturated(n: int, power: float | None, limit: float | None, *, mem: float = 41000.0,
              clock: float | None = 1740.0, reasons: list[str] | None = None,
              name: str = L40S, **extra: Any) -> list[dict[str, Any]]:
    return [{"utilization_pct": 100.0, "power_draw_w": power, "power_limit_w": limit,
             "memory_used_mb": mem, "sm_clock_mhz": clock, "throttle_reasons": reasons,
             "name": name, **extra} for _ in range(n)]


def wobble(readings: list[dict[str, Any]], key: str, amplitude: float) -> list[dict[str, Any]]:
    """The same readings with ``key`` alternating by +/- ``amplitude``."""
    return [{**r, key: r[key] + (amplitude if k % 2 else -amplitude)}
            for k, r in enumerate(readings)]


# --- defect 1: a healthy GPU at its power cap is never confirmed --------------------------------
POWER: list[tuple[str, list[dict[str, Any]], str | None]] = [
    # A frozen GPU well below its limit: power, memory and clock flat -> confirmed.
    ("L40S frozen at 190 W of 350 W", saturated(60, 190.0, 350.0), "critical"),
    # Pinned at its cap with preallocated memory and a fixed clock: flat power is no evidence.
    ("L40S pinned at 348.6 W of 350 W", saturated(60, 348.6, 350.0), "warning"),
    ("at 86 % of the limit", saturated(60, 301.0, 350.0), "warning"),
    ("at 85 % of the limit is evidence", saturated(60, 297.5, 350.0), "critical"),
    # 72 W card: 85 % is 61.2 W but the 10 W margin says below 62 W; 61 W still counts.
    ("72 W card at 61 W", saturated(60, 61.0, 72.0, name=A10), "critical"),
    ("72 W card at 61.5 W (above 85 %)", saturated(60, 61.5, 72.0, name=A10), "warning"),
    # 150 W card: 85 % is 127.5 W but within max(10 W, 5 %) of the limit from 140 W.
    ("150 W card at 127 W", saturated(60, 127.0, 150.0, name=A10), "critical"),
    # The healer's own throttle: the GPU sits on the new, lower cap (280 W of 350 W).
    ("on the healer's lowered cap", saturated(60, 279.0, 280.0), "warning"),
    ("frozen under the lowered cap", saturated(60, 150.0, 280.0), "critical"),
    # A power-cap throttle reason says the GPU is at its cap, whatever the numbers say.
    ("sw_power_cap reported", saturated(60, 190.0, 350.0, reasons=["sw_power_cap"]), "warning"),
    ("power brake reported",
     saturated(60, 190.0, 350.0, reasons=["hw_power_brake_slowdown"]), "warning"),
    ("other reasons do not matter",
     saturated(60, 190.0, 350.0, reasons=["gpu_idle", "sw_thermal_slowdown"]), "critical"),
    # Memory exactly constant (tolerance 0) and the clock within one 15 MHz bin.
    ("memory moving by 1 MiB", wobble(saturated(60, 190.0, 350.0), "memory_used_mb", 0.5),
     "warning"),
    ("clock moving by 30 MHz", wobble(saturated(60, 190.0, 350.0), "sm_clock_mhz", 15.0),
     "warning"),
    ("clock within one bin", wobble(saturated(60, 190.0, 350.0), "sm_clock_mhz", 7.0),
     "critical"),
    ("no clock reported", saturated(60, 190.0, 350.0, clock=None), "critical"),
    # Without a power limit flat power says nothing (only a hang XID would confirm) ...
    ("no power limit", saturated(60, 190.0, None), "warning"),
    ("no power limit, hang XID",
     saturated(10, 190.0, None) + saturated(1, 190.0, None, xids=[119])
     + saturated(30, 190.0, None), "critical"),
    # ... except where the config knows the budget: a Jetson AGX Orin (default: 60 W).
    ("Orin frozen at 21 W, no limit reported", saturated(60, 21.0, None, name=ORIN_DEVKIT),
     "critical"),
    ("Orin pinned at 58 W, no limit reported", saturated(60, 58.0, None, name=ORIN_DEVKIT),
     "warning"),
]


@pytest.mark.parametrize(("readings", "expected"), [c[1:] for c in POWER],
                         ids=[c[0] for c in POWER])
def test_flat_power_counts_only_well_below_the_limit(readings: list[dict[str, Any]],
                                                     expected: str | None) -> None:
    assert worst(run(readings)) == expected


def test_the_orin_budget_comes_from_the_default_override() -> None:
    frozen = saturated(60, 21.0, None, name=ORIN_DEVKIT)
    assert worst(run(frozen, AnalyzerConfig(overrides=[]))) == "warning"
    own = AnalyzerConfig(overrides=[DetectorOverride(match="orin", assumed_power_limit_w=30.0)])
    assert worst(run(frozen, own)) == "warning", "21 W is 70 % of 30 W but within 10 W of it"
    assert worst(run(saturated(60, 19.0, None, name=ORIN_DEVKIT), own)) == "critical"
    config = AnalyzerConfig()
    assert config.for_gpu(ORIN_DEVKIT, "h").hang.assumed_power_limit_w == 60.0
    assert config.for_gpu(L40S, "h").hang.assumed_power_limit_w is None


def test_a_confirmed_hang_says_which_evidence_and_a_suspected_one_why_not() -> None:
    confirmed = run(saturated(40, 190.0, 350.0))[-1]
    assert confirmed.severity == "critical" and confirmed.recommended_action == "reset_gpu"
    assert "flat for 30 s well below the power limit" in confirmed.message
    assert confirmed.evidence["power_limit_w"] == 350.0
    suspected = run(saturated(40, 348.6, 350.0))[-1]
    assert suspected.recommended_action is None
    assert "100 % of its 350 W limit" in suspected.message
    assert "limit" in suspected.evidence["not_confirmed_because"]


# --- defect 2: XIDs that mean the GPU itself is stuck, and only those ---------------------------
def busy(n: int, xid_at: int | None = None, codes: list[int] | None = None,
         ) -> list[dict[str, Any]]:
    """Saturated healthy work (power moving), with ``codes`` in sample ``xid_at``."""
    return [{"utilization_pct": 100.0,
             "power_draw_w": 240.0 + 60.0 * math.sin(k / 3.0), "power_limit_w": 350.0,
             "xids": codes if k == xid_at else None} for k in range(n)]


@pytest.mark.parametrize(("codes", "expected"), [
    ([8], "critical"), ([109], "critical"), ([119], "critical"),
    ([13], "warning"), ([31], "warning"), ([43], "warning"), ([45], "warning"),
    ([43, 45, 13], "warning"), ([45, 8], "critical"),
])
def test_only_stuck_gpu_xids_confirm_a_hang(codes: list[int], expected: str) -> None:
    assert worst(run(busy(40, xid_at=12, codes=codes))) == expected


def test_default_hang_xids_and_the_validator() -> None:
    assert HangConfig().hang_xids == [8, 109, 119]
    HangConfig(hang_xids=[8, 109, 119, 120])
    for code in (13, 31, 43, 45):
        with pytest.raises(ValidationError, match=f"XID {code} is"):
            HangConfig(hang_xids=[8, code])
    with pytest.raises(ValidationError, match="killed process"):
        AnalyzerConfig.model_validate({"hang": {"hang_xids": [45]}})


# --- defect 11: hysteresis on "suspected" ------------------------------------------------
def dipping_hour(dip_every_s: int = 41) -> list[dict[str, Any]]:
    """An hour of healthy saturated work with a 1 s dip to 70 % every ``dip_every_s``, then a
    real idle stretch of 2 minutes."""
    hour = [{"utilization_pct": 70.0 if k % dip_every_s == dip_every_s - 1 else 100.0,
             "power_draw_w": 240.0 + 60.0 * math.sin(k / 3.0), "power_limit_w": 350.0}
            for k in range(3600)]
    return hour + [{"utilization_pct": 12.0, "power_draw_w": 60.0, "power_limit_w": 350.0}] * 120


def test_one_second_dips_do_not_flap() -> None:
    # clear_after_s = 0 is the old rule (any dip ends the run): it flaps.
    old = run(dipping_hour(), AnalyzerConfig(hang=HangConfig(clear_after_s=0.0)))
    assert len(old) > 150, len(old)
    events = run(dipping_hour())
    assert [(e.phase, e.severity) for e in events] == [("raised", "warning"),
                                                       ("cleared", "warning")]
    raised, cleared = events
    assert raised.ts == T0 + 30 and cleared.ts == T0 + 3600 + 15
    assert cleared.cleared_by == "recovered"


@pytest.mark.parametrize(("below", "clear_after_s", "cleared"), [
    (14, 15.0, False), (16, 15.0, True), (4, 5.0, False), (6, 5.0, True), (1, 0.0, True)])
def test_the_run_ends_only_after_clear_after_s_below(below: int, clear_after_s: float,
                                                     cleared: bool) -> None:
    config = AnalyzerConfig(hang=HangConfig(clear_after_s=clear_after_s))
    readings = saturated(40, 190.0, 350.0) + [{"utilization_pct": 20.0}] * below
    events = run(readings, config)
    assert [e.phase for e in events] == (["raised", "cleared"] if cleared else ["raised"])


def test_a_dip_restarts_the_flatness_so_confirmation_waits_a_full_window() -> None:
    readings = (saturated(20, 190.0, 350.0) + [{"utilization_pct": 50.0}] * 3
                + saturated(40, 190.0, 350.0))
    events = run(readings)
    assert [(e.phase, e.severity, e.ts - T0) for e in events] == [
        ("raised", "warning", 30.0), ("escalated", "critical", 53.0)]


# --- a sample interval that makes hangs unconfirmable ----------------------------------------
@pytest.mark.parametrize(("interval_s", "config", "blind"), [
    (1.0, AnalyzerConfig(), []),
    (10.0, AnalyzerConfig(), []),
    (12.0, AnalyzerConfig(), ["analyzer.hang"]),
    (12.0, AnalyzerConfig(hang=HangConfig(window_s=60.0)), []),
    (25.0, AnalyzerConfig(hang=HangConfig(window_s=60.0), overrides=[
        DetectorOverride(match="L40S", hang=HangConfig(window_s=90.0)),
        DetectorOverride(name="edge", match="T4", hang=HangConfig(window_s=45.0))]),
     ["analyzer.hang", "analyzer.overrides[1] ('edge').hang"]),
])
def test_blind_spots_name_every_blind_config(interval_s: float, config: AnalyzerConfig,
                                             blind: list[str]) -> None:
    messages = config.blind_spots(interval_s)
    assert [m.split(":")[0] for m in messages] == blind
    for m in messages:
        assert f"a sample every {interval_s:g} s" in m and "never be confirmed" in m


def test_a_blind_interval_really_hides_a_frozen_gpu_and_is_logged_once(
        caplog: pytest.LogCaptureFixture) -> None:
    readings = saturated(40, 190.0, 350.0)
    with caplog.at_level(logging.WARNING, logger="analyzer.engine"):
        events = run(readings, interval_s=12.0)
    assert worst(events) == "warning", "never confirmed: the gaps restart flatness"
    warnings = [r.getMessage() for r in caplog.records if "never be confirmed" in r.getMessage()]
    assert len(warnings) == 1 and "node1/gpu/0" in warnings[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="analyzer.engine"):
        assert worst(run(readings, interval_s=5.0)) == "critical"
    assert not caplog.records
