"""Crafted sample streams of the analyzer's "Done when", checked on the pure engine.

The same builders feed tests/test_analyzer_service.py, which sends these streams through a
real Mosquitto. Every stream is in event time (``ts``); nothing waits in real time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

from analyzer.engine import Analyzer
from gpuheal.config import AnalyzerConfig
from gpuheal.models import Event, Sample, State

HOST = "node1"
H100 = "NVIDIA H100 80GB HBM3"
H100_TOTAL_MB = 81559.0
ORIN = "Orin (nvgpu)"
ORIN_TOTAL_MB = 62841.0
T0 = 1_700_000_000.0
GIB = 1024.0

BASE: dict[str, Any] = {
    "temperature_c": 55.0,
    "utilization_pct": 30.0,
    "memory_used_mb": 10000.0,
    "memory_total_mb": H100_TOTAL_MB,
    "power_draw_w": 200.0,
    "power_limit_w": 700.0,
    "sm_clock_mhz": 1980.0,
    "mem_clock_mhz": 2619.0,
    "fan_pct": None,
}


def mk(ts: float, seq: int, *, host: str = HOST, index: int = 0, name: str | None = H100,
       **readings: Any) -> Sample:
    """One sample with healthy defaults, overridden by ``readings``."""
    return Sample(host=host, index=index, name=name, uuid=f"GPU-{host}-{index}", source="sim",
                  ts=ts, seq=seq, **{**BASE, **readings})


def series(duration_s: float, interval_s: float, fn: Callable[[float], dict[str, Any]], *,
           t0: float = T0, seq0: int = 0, **fixed: Any) -> list[Sample]:
    """Samples every ``interval_s`` for ``duration_s`` (inclusive); ``fn(t)`` gives the readings
    at ``t`` seconds after ``t0``."""
    n = round(duration_s / interval_s)
    return [mk(t0 + k * interval_s, seq0 + k, **{**fixed, **fn(k * interval_s)})
            for k in range(n + 1)]


def busy(t: float) -> dict[str, Any]:
    """Healthy work at full utilization: power and memory keep moving."""
    return {"utilization_pct": 100.0,
            "power_draw_w": 330.0 + 80.0 * math.sin(2 * math.pi * t / 17.0),
            "memory_used_mb": 30000.0 + 1500.0 * math.sin(2 * math.pi * t / 61.0),
            "temperature_c": 70.0}


def frozen_stream(index: int = 0, freeze_at_s: float = 60.0, total_s: float = 180.0,
                  interval_s: float = 5.0) -> tuple[list[Sample], float]:
    """A GPU busy with healthy work that freezes at 100 % (power and memory flat)."""
    def fn(t: float) -> dict[str, Any]:
        if t < freeze_at_s:
            return busy(t)
        return {"utilization_pct": 100.0, "power_draw_w": 287.0, "memory_used_mb": 30250.0,
                "temperature_c": 66.0}
    return series(total_s, interval_s, fn, index=index), T0 + freeze_at_s


def healthy_busy_stream(index: int = 1, duration_s: float = 600.0,
                        interval_s: float = 1.0) -> list[Sample]:
    """Ten minutes saturated by healthy work: must never be confirmed as a hang."""
    return series(duration_s, interval_s, busy, index=index)


def thermal_flap_stream(index: int = 2, duration_s: float = 300.0,
                        interval_s: float = 5.0) -> list[Sample]:
    """82 ↔ 86 °C every 5 s for 5 minutes."""
    return series(duration_s, interval_s,
                  lambda t: {"temperature_c": 82.0 if round(t / interval_s) % 2 == 0 else 86.0},
                  index=index)


def memory_ramp_stream(index: int = 3) -> list[Sample]:
    """A Jetson AGX Orin 64 GB: 34 → 41 GiB in 0.25 GiB steps, then back down to 33 GiB."""
    levels = [34 + 0.25 * k for k in range(29)]          # 34 .. 41 GiB
    levels += [41 - 0.25 * k for k in range(1, 33)]      # 40.75 .. 33 GiB
    return [mk(T0 + k, k, index=index, name=ORIN, memory_used_mb=g * GIB,
               memory_total_mb=ORIN_TOTAL_MB) for k, g in enumerate(levels)]


def all_streams() -> list[Sample]:
    """The four "Done when" GPUs of one host, interleaved in event-time order."""
    frozen, _ = frozen_stream()
    merged = frozen + healthy_busy_stream() + thermal_flap_stream() + memory_ramp_stream()
    return sorted(merged, key=lambda s: (s.ts, s.index))


def run_engine(samples: Iterable[Sample], config: AnalyzerConfig | None = None,
               analyzer: Analyzer | None = None) -> tuple[list[Event], list[State]]:
    """Feed samples to an analyzer; its events and states."""
    a = analyzer if analyzer is not None else Analyzer(config or AnalyzerConfig(),
                                                       started_ts=T0 - 1, clock=lambda: 0.0)
    events: list[Event] = []
    states: list[State] = []
    for s in samples:
        for out in a.process(s):
            (events if isinstance(out, Event) else states).append(out)
    return events, states


def of(events: Iterable[Event], kind: str, index: int | None = None) -> list[Event]:
    return [e for e in events if e.kind == kind and (index is None or e.index == index)]


# --- the "Done when" checks, shared with the broker tests -------------------------------
def check_frozen(events: list[Event], freeze_ts: float) -> Event:
    """Exactly one confirmed hang, 30-45 s of event time after the freeze."""
    confirmed = [e for e in events if e.severity == "critical" and e.phase != "cleared"]
    assert len(confirmed) == 1, confirmed
    delay = confirmed[0].ts - freeze_ts
    assert 30.0 <= delay <= 45.0, delay
    assert confirmed[0].recommended_action == "reset_gpu"
    return confirmed[0]


def check_healthy_busy(events: list[Event]) -> None:
    assert not [e for e in events if e.severity != "warning"], events
    assert all(e.recommended_action is None for e in events), events


def check_flap(events: list[Event]) -> None:
    edges = [e for e in events if e.phase in ("raised", "cleared")]
    assert 1 <= len(edges) <= 4, [(e.phase, e.ts) for e in edges]


def check_memory_crossings(events: list[Event], samples: list[Sample]) -> None:
    """raised warning / escalated critical / escalated emergency at the first sample over 36,
    38, 40 GiB; cleared at the first sample under 35 GiB on the way down."""
    def first(pred: Callable[[Sample], bool], after: float = 0.0) -> float:
        return next(s.ts for s in samples if s.ts > after and pred(s))

    used = lambda s: (s.memory_used_mb or 0.0) / GIB  # noqa: E731
    peak = max(samples, key=used).ts
    expected = [
        ("raised", "warning", first(lambda s: used(s) >= 36), "clear_llm_cache"),
        ("escalated", "critical", first(lambda s: used(s) >= 38), "reset_gpu_session"),
        ("escalated", "emergency", first(lambda s: used(s) >= 40), "reset_gpu_session"),
        ("cleared", "emergency", first(lambda s: used(s) < 35, after=peak), None),
    ]
    got = [(e.phase, e.severity, e.ts, e.recommended_action) for e in events]
    assert got == expected
    assert len({e.event_id for e in events}) == 1


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
