"""The engine's semantics: ordering, restore, coalescing, silence, the State it writes."""

from __future__ import annotations

import gc
import tracemalloc

import pytest

from analyzer.engine import Analyzer, fast_iso_utc
from gpuheal.config import AnalyzerConfig
from gpuheal.config.detection import UnavailableConfig
from gpuheal.models import Event, State, iso_utc, make_event_id
from gpuheal.wire import decode
from tests.factories import (
    T0,
    all_streams,
    frozen_stream,
    mk,
    of,
    run_engine,
    thermal_flap_stream,
)


class FakeClock:
    """A wall clock the test moves by hand (UNIX s)."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def engine(config: AnalyzerConfig | None = None, clock: FakeClock | None = None,
           started_ts: float = T0) -> Analyzer:
    return Analyzer(config or AnalyzerConfig(), started_ts=started_ts, clock=clock or FakeClock())


# --- ordering ----------------------------------------------------------------------------------
def test_duplicates_and_out_of_order_samples_are_ignored_and_counted() -> None:
    a = engine()
    assert a.process(mk(T0 + 10, 10))
    assert a.process(mk(T0 + 10, 10)) == []          # exact duplicate
    assert a.process(mk(T0 + 11, 10)) == []          # same seq: duplicate
    assert a.process(mk(T0 + 5, 5)) == []            # older: out of order
    assert a.process(mk(T0 + 10, 11)) == []          # ts not newer
    assert a.stats.duplicates == 3 and a.stats.out_of_order == 1
    assert a.process(mk(T0 + 12, 11))
    assert a.stats.processed == 2


def test_publisher_restart_resets_seq_and_is_not_a_duplicate() -> None:
    a = engine()
    a.process(mk(T0 + 1, 500))
    out = a.process(mk(T0 + 2, 0))
    assert out and a.stats.publisher_restarts == 1 and a.stats.duplicates == 0


def test_duplicate_of_a_raising_sample_raises_nothing_twice() -> None:
    a = engine()
    hot = mk(T0, 1, temperature_c=88.0)
    first = [o for o in a.process(hot) if isinstance(o, Event)]
    again = a.process(hot)
    assert len(first) == 1 and again == []


# --- conditions and ids --------------------------------------------------------------------------
def test_event_id_is_deterministic_from_host_gpu_kind_and_start() -> None:
    events, _ = run_engine([mk(T0 + 3, 3, temperature_c=86.0), mk(T0 + 4, 4, temperature_c=70.0)])
    raised, cleared = events
    assert raised.event_id == cleared.event_id == make_event_id("node1", 0, "thermal_throttling",
                                                                T0 + 3)
    assert raised.started_ts == cleared.started_ts == T0 + 3
    assert cleared.ts == T0 + 4 and cleared.evidence["duration_s"] == 1.0


def test_replay_at_two_speeds_gives_identical_events() -> None:
    """The same ts stream with arrivals 1 s apart, then 10 ms apart: identical events."""
    results = []
    for wall_step in (1.0, 0.01):
        clock = FakeClock()
        a = engine(clock=clock)
        events = []
        for s in all_streams():
            clock.now += wall_step
            events += [o.model_dump() for o in a.process(s) if isinstance(o, Event)]
        results.append(events)
    assert results[0] == results[1]
    assert len({e["event_id"] for e in results[0]}) >= 4


# --- restore -------------------------------------------------------------------------------------
def test_restore_keeps_the_event_id_and_does_not_reraise() -> None:
    flap = thermal_flap_stream(index=0)
    first, states = run_engine(flap[:10])
    raised = of(first, "thermal_throttling")
    assert [e.phase for e in raised] == ["raised"]
    retained = decode(State, states[-1].to_json())  # as it comes off the wire

    b = engine(started_ts=T0 + 10_000)
    assert b.restore(retained)
    assert not b.restore(retained)                     # only once
    more = [*flap[10:], mk(flap[-1].ts + 5, 999, index=0, temperature_c=70.0)]
    events, b_states = run_engine(more, analyzer=b)
    assert [(e.phase, e.event_id) for e in of(events, "thermal_throttling")] == [
        ("cleared", raised[0].event_id)]
    assert b_states[0].active[0].event_id == raised[0].event_id
    assert b_states[0].analyzer_started_ts == T0 + 10_000  # says it restarted


def test_restore_continues_a_suspected_hang_and_escalates_it() -> None:
    samples, freeze_ts = frozen_stream()
    cut = next(i for i, s in enumerate(samples) if s.ts >= freeze_ts - 10)
    events, states = run_engine(samples[:cut])
    assert [e.phase for e in of(events, "gpu_hang")] == ["raised"]
    b = engine()
    b.restore(states[-1])
    later, _ = run_engine(samples[cut:], analyzer=b)
    hang = of(later, "gpu_hang")
    assert [(e.phase, e.severity) for e in hang] == [("escalated", "critical")]
    assert hang[0].event_id == of(events, "gpu_hang")[0].event_id


def test_restore_after_a_sample_is_refused_and_old_samples_are_ignored() -> None:
    a = engine()
    a.process(mk(T0 + 100, 1))
    state = State(host="node1", index=0, health="healthy", timestamp=iso_utc(T0), ts=T0)
    assert not a.restore(state)
    b = engine()
    b.restore(State(host="node1", index=0, health="healthy", timestamp=iso_utc(T0), ts=T0))
    assert b.process(mk(T0 - 1, 1)) == [] and b.stats.out_of_order == 1


# --- state ---------------------------------------------------------------------------------------
def test_state_is_the_origin_object_with_worst_health() -> None:
    a = engine(started_ts=T0 - 60)
    out = a.process(mk(T0 + 0.25, 1, temperature_c=91.0, memory_used_mb=79000.0,
                       memory_total_mb=80000.0, fan_pct=55.0))
    state = out[-1]
    assert isinstance(state, State)
    wire = decode(State, state.to_json())
    assert wire.health == "critical"            # emergency maps to critical
    assert wire.error in ("thermal_throttling", "out_of_memory")
    assert wire.memory.percent == 98.8 and wire.memory.total_mb == 80000.0
    assert wire.power.draw_w == 200.0 and wire.clocks.graphics_mhz == 1980.0
    assert wire.fan_speed == 55.0 and wire.temperature == 91.0
    assert wire.timestamp == iso_utc(T0 + 0.25) and wire.ts == T0 + 0.25
    assert {c.kind for c in wire.active} == {"thermal_throttling", "out_of_memory"}
    assert wire.analyzer_started_ts == T0 - 60
    healthy = a.process(mk(T0 + 1, 2))[-1]
    assert isinstance(healthy, State)


def test_unavailable_wins_over_severity_in_health() -> None:
    a = engine()
    a.process(mk(T0, 1, temperature_c=95.0))
    state = a.process(mk(T0 + 1, 2, available=False, error="fell off the bus",
                         temperature_c=None))[-1]
    assert state.health == "unavailable" and state.error == "unavailable"
    assert "fell off the bus" in state.error_message


def test_every_accepted_sample_makes_the_state_due_and_its_json_is_the_models() -> None:
    """The engine makes a State due for every sample it processes (not for a duplicate); when
    it goes out is the service's choice (tests/test_analyzer_states.py). Its wire form built
    without a model is the model's JSON, byte for byte."""
    a = engine()
    dues = []
    for k in range(30):
        temp = 60.0 if k < 15 else (86.0 if k == 15 else 82.0)
        _events, due = a.ingest(mk(T0 + k, k, temperature_c=temp))
        dues.append(due)
        assert a.current_state_json("node1", 0) == a.current_state("node1", 0).to_json()
    assert all(dues) and a.stats.states == 30
    assert a.ingest(mk(T0 + 29, 29)) == ([], False)  # a duplicate changes nothing


# --- silence ----------------------------------------------------------------------
def test_silence_raises_unavailable_after_missed_intervals_of_wall_time() -> None:
    clock = FakeClock(1000.0)
    a = engine(AnalyzerConfig(unavailable=UnavailableConfig(missed_intervals=3,
                                                            min_timeout_s=2.0)), clock)
    for k in range(5):                 # one sample per wall second, 5 s apart in event time
        clock.now = 1000.0 + k
        a.process(mk(T0 + 5 * k, k))
    assert a.check_silence(1004.0 + 2.9) == []
    out = a.check_silence(1004.0 + 3.1)
    event, state = out
    assert isinstance(event, Event) and event.kind == "unavailable" and event.phase == "raised"
    assert event.ts == T0 + 20 + 3 * 5           # extrapolated in event time
    assert event.recommended_action == "notify"
    assert isinstance(state, State) and state.health == "unavailable"
    assert state.temperature is None               # no made-up readings
    assert a.check_silence(1100.0) == []           # raised once
    clock.now = 1101.0
    back = a.process(mk(T0 + 100, 5))
    cleared = [o for o in back if isinstance(o, Event)]
    assert [(e.phase, e.event_id) for e in cleared] == [("cleared", event.event_id)]


def test_silence_timeout_has_a_floor_in_event_seconds_and_needs_two_samples() -> None:
    """The floor (min_timeout_s, 2 s) is event time now, like the whole timeout, so a replay at
    10x is judged by the same rule (it was 2 wall seconds whatever the speed: issue 10 #11).
    Only delivery jitter has a wall floor (min_wall_timeout_s, 1 s)."""
    for speed, wall_floor in ((1.0, 0.0), (10.0, 0.0), (10.0, 1.0)):
        clock = FakeClock(1000.0)
        a = engine(AnalyzerConfig(unavailable=UnavailableConfig(min_wall_timeout_s=wall_floor)),
                   clock)
        a.process(mk(T0, 0))
        assert a.check_silence(5000.0) == []       # one sample: interval unknown
        for k in range(1, 4):                      # 10 samples a second of event time
            clock.now = 1000.0 + 0.1 * k / speed
            a.process(mk(T0 + 0.1 * k, k))
        # 3 intervals are 0.3 s, under the 2 s floor: 2 event seconds = 2 / speed wall s
        wall_timeout = max(2.0 / speed, wall_floor)
        assert a.check_silence(clock.now + wall_timeout - 0.01) == []
        event, _state = a.check_silence(clock.now + wall_timeout + 0.01)
        assert event.evidence["timeout_event_s"] == 2.0
        assert event.ts == T0 + 0.3 + 2.0, "the same event whatever the wall floor"


# --- bounded memory ---------------------------------------------------------------
def test_memory_per_gpu_does_not_grow_with_samples() -> None:
    a = engine()
    samples = [mk(T0 + k, k, temperature_c=80 + (k % 9), utilization_pct=100.0,
                  xids=[k % 50] if k % 7 == 0 else None) for k in range(2500)]

    def feed(chunk: list) -> None:
        for s in chunk:
            a.process(s)

    tracemalloc.start()
    feed(samples[:500])
    gc.collect()
    before = tracemalloc.take_snapshot()
    feed(samples[500:])
    gc.collect()
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    grown = sum(s.size_diff for s in after.compare_to(before, "filename")
                if "/analyzer/" in s.traceback[0].filename)
    assert grown < 8_000, grown


@pytest.mark.parametrize("ts", [0.0, 1.0005, 1.9999995, T0 + 0.123, T0 + 0.9999996, 4e9 + 0.5])
def test_fast_iso_utc_matches_the_contract(ts: float) -> None:
    assert fast_iso_utc(ts) == iso_utc(ts)


def test_hold_silence_restarts_the_clocks_after_the_analyzer_was_cut_off() -> None:
    clock = FakeClock(1000.0)
    a = engine(clock=clock)
    for k in range(3):
        clock.now = 1000.0 + k
        a.process(mk(T0 + k, k))
    a.hold_silence(1030.0)                 # the broker was away from 1002 to 1030
    assert a.check_silence(1031.0) == []
    assert len(a.check_silence(1033.5)) == 2


def test_thresholds_per_gpu_model_and_host() -> None:
    """A passively cooled model may run hotter: its override raises the thermal thresholds
    for it alone, on the hosts named."""
    from gpuheal.config.detection import DetectorOverride, ThermalConfig
    from tests.factories import mk

    config = AnalyzerConfig(overrides=[DetectorOverride(
        match="L40S", hosts=["rack1"],
        thermal=ThermalConfig(warning_c=88.0, critical_c=90.0, emergency_c=95.0))])
    engine = Analyzer(config, started_ts=0.0)

    def thermal_events(host: str, name: str, index: int = 0) -> list[Event]:
        out = engine.process(mk(1000.0, 0, host=host, index=index, name=name,
                                temperature_c=86.0))
        return [o for o in out if isinstance(o, Event) and o.kind == "thermal_throttling"]

    assert thermal_events("rack1", "NVIDIA L40S") == []
    assert [e.severity for e in thermal_events("rack2", "NVIDIA L40S")] == ["critical"]
    assert [e.severity for e in thermal_events("rack1", "NVIDIA H100 80GB HBM3", 1)] == [
        "critical"]


def test_events_of_replayed_samples_say_so() -> None:
    from tests.factories import mk

    engine = Analyzer(AnalyzerConfig(), started_ts=0.0)
    live = engine.process(mk(1000.0, 0, index=0, temperature_c=86.0))
    replayed = engine.process(mk(1000.0, 0, index=1, temperature_c=86.0).model_copy(
        update={"source": "replay"}))
    assert "source" not in next(o for o in live if isinstance(o, Event)).evidence
    event = next(o for o in replayed if isinstance(o, Event))
    assert event.evidence["source"] == "replay"
