"""Crafted sample streams of the analyzer's "Done when", checked on the pure engine.

The builders and checks live in tests/factories.py; tests/test_analyzer_service.py sends the
same streams through a real Mosquitto. Every stream is in event time (``ts``); nothing waits in
real time.
"""

from __future__ import annotations

from tests.factories import (
    all_streams,
    check_flap,
    check_frozen,
    check_healthy_busy,
    check_memory_crossings,
    frozen_stream,
    healthy_busy_stream,
    memory_ramp_stream,
    mk,
    of,
    run_engine,
    thermal_flap_stream,
)


# --- tests on the pure engine ----------------------------------------------------------
def test_frozen_gpu_is_confirmed_30_to_45_s_after_the_freeze() -> None:
    samples, freeze_ts = frozen_stream()
    events, _ = run_engine(samples)
    hang = of(events, "gpu_hang")
    assert [e.phase for e in hang] == ["raised", "escalated"]
    assert hang[0].severity == "warning" and hang[0].recommended_action is None
    check_frozen(hang, freeze_ts)


def test_gpu_freezing_from_idle_is_raised_critical_directly() -> None:
    samples, freeze_ts = frozen_stream(freeze_at_s=60.0)
    idle = [mk(s.ts, s.seq, index=s.index) if s.ts < freeze_ts else s for s in samples]
    events, _ = run_engine(idle)
    hang = of(events, "gpu_hang")
    assert [(e.phase, e.severity) for e in hang] == [("raised", "critical")]
    assert hang[0].ts - freeze_ts == 30.0


def test_healthy_busy_gpu_is_never_confirmed_in_ten_minutes() -> None:
    events, _ = run_engine(healthy_busy_stream())
    hang = of(events, "gpu_hang")
    check_healthy_busy(hang)
    assert len(hang) <= 1  # at most one suspected hang, held, never re-raised


def test_flapping_82_86_gives_at_most_four_thermal_edges() -> None:
    events, _ = run_engine(thermal_flap_stream())
    check_flap(of(events, "thermal_throttling"))


def test_memory_warnings_at_the_crossings() -> None:
    samples = memory_ramp_stream()
    events, _ = run_engine(samples)
    check_memory_crossings(of(events, "out_of_memory"), samples)


def test_all_streams_together_and_replay_determinism() -> None:
    first, _ = run_engine(all_streams())
    second, _ = run_engine(all_streams())
    assert [(e.event_id, e.phase, e.ts) for e in first] == [
        (e.event_id, e.phase, e.ts) for e in second]
    _, freeze_ts = frozen_stream()
    check_frozen(of(first, "gpu_hang", 0), freeze_ts)
    check_healthy_busy(of(first, "gpu_hang", 1))
    check_flap(of(first, "thermal_throttling", 2))
    check_memory_crossings(of(first, "out_of_memory", 3), memory_ramp_stream())
