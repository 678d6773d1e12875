"""Message factories shared by the test modules (a test module never imports another).

* Recorded messages (``make_sample``, ``make_state``, ``make_event``, ``make_action``,
  ``make_healer_state``): valid messages of host ``h1`` at ``NOW``, any field overridable.
* The analyzer's crafted sample streams (``mk``, ``series``, the four "Done when" GPUs,
  ``run_engine``) and their checks, in event time from ``T0``, host ``node1``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

from analyzer.engine import Analyzer
from gpuheal.config import AnalyzerConfig
from gpuheal.models import (
    Action,
    Event,
    HealerState,
    Sample,
    State,
    iso_utc,
    make_action_id,
    make_event_id,
)
from gpuheal.topics import Topics

# --- recorded messages ------------------------------------------------------------------------
T = Topics("p")
NOW = 1_700_000_000.0


def make_sample(seq: int = 1, ts: float = NOW, host: str = "h1", index: int = 0,
                **fields: object) -> Sample:
    base: dict[str, object] = dict(
        host=host, index=index, source="sim", ts=ts, seq=seq, name="Sim GPU",
        temperature_c=60.0, utilization_pct=50.0, memory_used_mb=1000.0,
        memory_total_mb=8000.0, power_draw_w=150.0, power_limit_w=300.0)
    return Sample.model_validate(base | fields)


def make_event(n: int = 0, phase: str = "raised", severity: str = "warning",
               host: str = "h1", index: int = 0, ts: float | None = None,
               kind: str = "out_of_memory") -> Event:
    started = NOW + n
    return Event(event_id=make_event_id(host, index, kind, started), host=host, index=index,
                 kind=kind, severity=severity, phase=phase, started_ts=started,
                 ts=started if ts is None else ts, message=f"{kind} #{n} {phase}",
                 evidence={"memory_used_mb": 37000.0}, recommended_action="clear_llm_cache")


def make_action(event: Event, status: str = "started", ts: float | None = None,
                action: str = "clear_llm_cache", attempt: int = 1, **fields: object) -> Action:
    return Action.model_validate(dict(
        action_id=make_action_id(event.event_id, action, attempt, event.host, event.index),
        event_id=event.event_id, host=event.host, index=event.index, action=action,
        status=status, attempt=attempt, ts=event.ts + 1 if ts is None else ts) | fields)


def make_state(ts: float = NOW, health: str = "healthy", host: str = "h1",
               index: int = 0) -> State:
    return State(host=host, index=index, health=health, timestamp=iso_utc(ts), ts=ts,
                 temperature=60.0, memory={"used_mb": 1000.0, "total_mb": 8000.0,
                                           "percent": 12.5})


def make_healer_state(ts: float = NOW, host: str = "h1") -> HealerState:
    return HealerState(host=host, enabled=True, dry_run=False, breaker_open=False,
                       budget_left=5, budget_per_hour=6, ts=ts,
                       cooldowns=[{"index": 0, "action": "throttle_gpu", "until_ts": NOW + 60}])


# --- analyzer sample streams ------------------------------------------------------------------
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


# --- the "Done when" checks (asserts with their own messages: pytest rewrites only test
# modules) ------------------------------------------------------------------------------------
def check_frozen(events: list[Event], freeze_ts: float) -> Event:
    """Exactly one confirmed hang, 30-45 s of event time after the freeze."""
    confirmed = [e for e in events if e.severity == "critical" and e.phase != "cleared"]
    assert len(confirmed) == 1, confirmed
    delay = confirmed[0].ts - freeze_ts
    assert 30.0 <= delay <= 45.0, delay
    assert confirmed[0].recommended_action == "reset_gpu", confirmed[0]
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
    assert got == expected, (got, expected)
    assert len({e.event_id for e in events}) == 1, events
