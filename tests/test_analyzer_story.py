"""An honest incident story (issue 10, defect 12): a ``cleared`` event carries the reading that
cleared it, says why it ended (``cleared_by``), and the State says where its readings came from.
"""

from __future__ import annotations

from typing import Any

import pytest

from analyzer.engine import Analyzer
from gpuheal.config import AnalyzerConfig
from gpuheal.config.detection import XidConfig
from gpuheal.models import Event, State
from tests.factories import GIB, ORIN, ORIN_TOTAL_MB, T0, all_streams, mk, run_engine

LOST = {"available": False, "error": "GPU has fallen off the bus", "temperature_c": None,
        "utilization_pct": None, "memory_used_mb": None, "power_draw_w": None}

# (kind, readings of each sample, the cleared message, evidence the cleared event must carry)
STORIES: list[tuple[str, list[dict[str, Any]], str, dict[str, Any]]] = [
    ("thermal_throttling", [{"temperature_c": 86.2}, {"temperature_c": 81.0},
                            {"temperature_c": 78.4}],
     "cleared: temperature 78.4 °C, below 80 °C (warning at 83 °C, hysteresis 3 °C)",
     {"temperature_c": 78.4, "clears_below_c": 80.0}),
    ("thermal_throttling", [{"temperature_c": 70.0, "throttle_reasons": ["hw_thermal_slowdown"]},
                            {"temperature_c": 71.5, "throttle_reasons": []}],
     "cleared: temperature 71.5 °C, below 80 °C (warning at 83 °C, hysteresis 3 °C), no "
     "thermal slowdown reported", {"temperature_c": 71.5, "slowdown_reasons": []}),
    ("out_of_memory", [{"name": ORIN, "memory_total_mb": ORIN_TOTAL_MB, "memory_used_mb": m * GIB}
                       for m in (38.5, 35.5, 34.25)],
     "cleared: memory 34.2 GiB used, below 35 GiB (warning at 36 GiB, hysteresis 1 GiB, "
     "profile jetson-agx-orin-64gb)", {"memory_used_mb": 34.25 * GIB, "clears_below": 35.0}),
    ("out_of_memory", [{"memory_total_mb": 80_000.0, "memory_used_mb": m}
                       for m in (77_000.0, 70_300.0)],
     "cleared: memory 87.9 % used, below 88 % (warning at 90 %, hysteresis 2 %, profile "
     "percent)", {"memory_used_mb": 70_300.0, "percent": 87.88}),
    ("gpu_hang", [{"utilization_pct": 100.0, "power_draw_w": 150.0, "power_limit_w": 350.0}] * 31
     + [{"utilization_pct": 7.0}] * 16,
     "cleared: utilization 7 % for 15 s, below 99 %", {"utilization_pct": 7.0, "below_s": 15.0}),
    ("xid_error", [{"xids": [31]}] + [{}] * 5,
     "cleared: no XID for 5 s of available samples (was XID 31, restart_app)",
     {"xids": [31], "quiet_s": 5.0, "available": True}),
    ("unavailable", [LOST, LOST, {"temperature_c": 51.0, "utilization_pct": 3.0}],
     "cleared: the GPU answers again (temperature_c 51, utilization_pct 3, memory_used_mb "
     "10000, power_draw_w 200)", {"available": True, "temperature_c": 51.0}),
    ("critical_health", [{"ecc_uncorrected": 4}, {"ecc_uncorrected": 0,
                                                  "remapped_rows_pending": False}],
     "cleared: uncorrectable ECC count 0 and no row remap pending",
     {"ecc_uncorrected": 0, "remapped_rows_pending": False}),
]


@pytest.mark.parametrize(("kind", "readings", "message", "evidence"), STORIES,
                         ids=[f"{s[0]}-{i}" for i, s in enumerate(STORIES)])
def test_a_cleared_event_carries_the_reading_that_cleared_it(
        kind: str, readings: list[dict[str, Any]], message: str,
        evidence: dict[str, Any]) -> None:
    config = AnalyzerConfig(xid=XidConfig(clear_after_s=5.0))
    events, _ = run_engine([mk(T0 + k, k, **r) for k, r in enumerate(readings)], config)
    mine = [e for e in events if e.kind == kind]
    raised, cleared = mine[0], mine[-1]
    assert cleared.phase == "cleared" and cleared.cleared_by == "recovered"
    assert cleared.message == message
    assert cleared.message != f"cleared: {raised.message}"
    assert evidence.items() <= cleared.evidence.items()
    assert cleared.evidence["duration_s"] == cleared.ts - raised.started_ts
    assert cleared.evidence["max_severity"] == cleared.severity


def test_every_cleared_event_says_why_and_no_other_does() -> None:
    events, _ = run_engine(all_streams())
    assert {e.phase for e in events} == {"raised", "escalated", "cleared"}
    for e in events:
        assert (e.cleared_by is not None) == (e.phase == "cleared"), e


def test_the_state_names_the_source_of_its_newest_sample() -> None:
    a = Analyzer(AnalyzerConfig(), started_ts=T0, clock=lambda: 0.0)
    live = a.process(mk(T0, 0))[-1]
    assert isinstance(live, State) and live.source == "sim"
    replayed = a.process(mk(T0 + 1, 1).model_copy(update={"source": "replay"}))[-1]
    assert isinstance(replayed, State) and replayed.source == "replay"
    assert a.current_state("node1", 0).source == "replay"
    b = Analyzer(AnalyzerConfig(), started_ts=T0 + 5, clock=lambda: 0.0)
    assert b.restore(replayed)
    assert b.current_state("node1", 0).source == "replay", "a restored State keeps it"


def test_events_are_built_with_exact_fields() -> None:
    """Models are strict: what the engine builds round-trips through the wire unchanged."""
    from gpuheal.wire import decode

    events, states = run_engine(all_streams())
    for message in [*events[:50], *states[:50]]:
        assert decode(type(message), message.to_json()) == message
        assert isinstance(message, Event | State)
