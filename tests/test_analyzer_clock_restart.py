"""A source clock that restarts behind the analyzer (a new simulation, a clock stepped back)."""

from __future__ import annotations

from analyzer.engine import Analyzer
from gpuheal.config import AnalyzerConfig
from gpuheal.models import Event, State
from tests.factories import mk


def hot(ts: float, seq: int):
    return mk(ts, seq, temperature_c=88.0)


def test_restored_future_conditions_are_cleared_when_the_source_restarts_behind() -> None:
    first = Analyzer(AnalyzerConfig(), started_ts=0.0)
    outputs = []
    for seq, ts in enumerate(range(10_000, 10_010)):
        outputs += first.process(hot(float(ts), seq))
    retained = [o for o in outputs if isinstance(o, State)][-1]
    raised = next(o for o in outputs if isinstance(o, Event))
    assert retained.active and raised.kind == "thermal_throttling"

    second = Analyzer(AnalyzerConfig(), started_ts=1.0)
    assert second.restore(retained)
    # The new run's clock is 9,000 s behind the retained State; its first sample has seq 0.
    out = second.process(hot(1_000.0, 0))
    events = [o for o in out if isinstance(o, Event)]
    assert next((e.phase, e.event_id) for e in events) == ("cleared", raised.event_id)
    assert events[1].phase == "raised" and events[1].event_id != raised.event_id
    assert events[1].started_ts == 1_000.0
    # From then on the new clock is followed; a repeat of seq 0 is a duplicate.
    assert second.process(hot(1_000.0, 0)) == []
    assert second.stats.duplicates == 1
    assert [o for o in second.process(hot(1_001.0, 1)) if isinstance(o, State)]


def test_older_samples_of_the_same_run_are_still_ignored() -> None:
    engine = Analyzer(AnalyzerConfig(), started_ts=0.0)
    for seq in range(5):
        engine.process(mk(100.0 + seq, seq))
    assert engine.process(mk(101.5, 2)) == []
    assert engine.stats.out_of_order + engine.stats.duplicates == 1
