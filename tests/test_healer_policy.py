"""The healing policy without a broker: ladders, verification, guards, persistence."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gpuheal.config import HealerConfig
from gpuheal.models import (
    ActiveCondition,
    Event,
    HealerSet,
    Power,
    State,
    iso_utc,
    make_action_id,
)
from healer.actuators import Result
from healer.policy import ActuatorRequest, Decisions, EventClock, Policy
from healer.store import load_guard_state, save_guard_state

HOST = "node1"
T0 = 1_700_000_000.0


def make_config(**guards: Any) -> HealerConfig:
    return HealerConfig.model_validate({"guards": guards})


def make_state(index: int = 0, ts: float = T0, active: tuple[tuple[str, str, str], ...] = (),
               health: str | None = None, limit_w: float | None = 300.0,
               host: str = HOST) -> State:
    conditions = [ActiveCondition(event_id=e, kind=k, severity=s, started_ts=ts)
                  for e, k, s in active]
    return State(host=host, index=index, name="NVIDIA H100 80GB HBM3",
                 health=health or ("warning" if active else "healthy"),
                 timestamp=iso_utc(ts), ts=ts, power=Power(draw_w=200.0, limit_w=limit_w),
                 active=conditions)


def make_event(event_id: str, kind: str, severity: str, ts: float, phase: str = "raised",
               index: int = 0, recommended: str | None = None, host: str = HOST) -> Event:
    return Event(event_id=event_id, host=host, index=index, kind=kind, severity=severity,
                 phase=phase, started_ts=T0, ts=ts, message=f"{kind} {severity}",
                 recommended_action=recommended)


class Harness:
    """Drives a Policy and keeps everything it said."""

    def __init__(self, config: HealerConfig | None = None, gpus: int = 1, **kw: Any) -> None:
        self.policy = Policy(HOST, config or make_config(), **kw)
        self.actions: list[Any] = []
        self.requests: list[ActuatorRequest] = []
        self.changed = 0
        for i in range(gpus):
            self.state(T0, index=i)

    def _take(self, d: Decisions) -> Decisions:
        self.actions.extend(d.actions)
        self.requests.extend(d.requests)
        self.changed += int(d.state_changed)
        return d

    def state(self, ts: float, active: tuple[tuple[str, str, str], ...] = (), index: int = 0,
              retained: bool = False, **kw: Any) -> Decisions:
        return self._take(self.policy.on_state(make_state(index, ts, active, **kw),
                                               retained=retained))

    def event(self, *args: Any, **kw: Any) -> Decisions:
        return self._take(self.policy.on_event(make_event(*args, **kw)))

    def result(self, ok: bool = True, reason: str | None = None) -> Decisions:
        request = self.requests.pop(0)
        return self._take(self.policy.on_result(
            request.action_id, Result(ok, {"test": True}, 0.5, reason)))

    def set(self, **kw: Any) -> Decisions:
        return self._take(self.policy.on_set(HealerSet(**kw)))

    def log(self) -> list[tuple[str, str, str | None]]:
        return [(a.action, a.status, a.reason) for a in self.actions]


OOM = ("e-oom", "out_of_memory")
THERMAL = ("e-hot", "thermal_throttling")


@pytest.mark.parametrize(
    ("kind", "severity", "recommended", "opt_in", "expected"),
    [
        ("out_of_memory", "warning", None, [], ("clear_llm_cache", "started", None)),
        ("out_of_memory", "critical", None, [], ("reset_gpu_session", "started", None)),
        ("out_of_memory", "emergency", None, ["stop_llm_service"],
         ("stop_llm_service", "started", None)),
        ("out_of_memory", "emergency", None, [], ("stop_llm_service", "skipped", "not_opted_in")),
        ("thermal_throttling", "warning", None, [], ("throttle_gpu", "started", None)),
        ("thermal_throttling", "critical", None, [], ("restart_llm_service", "started", None)),
        ("thermal_throttling", "emergency", None, [],
         ("stop_llm_service", "skipped", "not_opted_in")),
        ("gpu_hang", "warning", None, ["reset_gpu"], ("reset_gpu", "skipped", "hang_unconfirmed")),
        ("gpu_hang", "critical", None, ["reset_gpu"], ("reset_gpu", "started", None)),
        ("gpu_hang", "critical", None, [], ("reset_gpu", "skipped", "not_opted_in")),
        ("xid_error", "critical", "restart_llm_service", [],
         ("restart_llm_service", "started", None)),
        ("xid_error", "critical", "reset_gpu", ["reset_gpu"], ("reset_gpu", "started", None)),
        ("xid_error", "emergency", "notify", [], ("notify", "skipped", "needs_human")),
        ("xid_error", "critical", None, [], ("notify", "skipped", "needs_human")),
        ("unavailable", "critical", None, [], ("notify", "skipped", "needs_human")),
        ("critical_health", "warning", None, ["reset_gpu"],
         ("reset_gpu", "skipped", "below_ladder")),
        ("unknown_error", "critical", None, [], ("notify", "skipped", "needs_human")),
    ],
)
def test_first_decision_follows_the_ladder(kind: str, severity: str, recommended: str | None,
                                           opt_in: list[str], expected: tuple) -> None:
    h = Harness(make_config(destructive_opt_in=opt_in))
    h.event("e1", kind, severity, T0 + 1, recommended=recommended)
    assert h.log() == [expected]
    action = h.actions[0]
    assert action.attempt == 1 and action.event_id == "e1" and action.host == HOST
    assert action.action_id == make_action_id("e1", expected[0], 1, HOST, 0)
    assert len(h.requests) == (1 if expected[1] == "started" else 0)


def test_ladder_climbs_when_unresolved_and_verifies_when_cleared() -> None:
    h = Harness()
    h.event(*OOM, "warning", T0 + 1)
    h.state(T0 + 1, (("e-oom", "out_of_memory", "warning"),))
    h.result(ok=True)
    h.state(T0 + 60, (("e-oom", "out_of_memory", "warning"),))
    assert h.log()[-1] == ("clear_llm_cache", "succeeded", None)  # still inside the window
    h.state(T0 + 125, (("e-oom", "out_of_memory", "warning"),))  # window (120 s) over
    assert h.log()[-2:] == [("clear_llm_cache", "unresolved", "not_cleared"),
                            ("reset_gpu_session", "started", None)]
    h.result(ok=True)
    h.state(T0 + 130)  # the condition is gone from the State
    assert h.log() == [
        ("clear_llm_cache", "started", None), ("clear_llm_cache", "succeeded", None),
        ("clear_llm_cache", "unresolved", "not_cleared"),
        ("reset_gpu_session", "started", None), ("reset_gpu_session", "succeeded", None),
        ("reset_gpu_session", "verified", None),
    ]
    first, second = h.actions[:3], h.actions[3:]
    assert len({a.action_id for a in first}) == 1 and len({a.action_id for a in second}) == 1
    assert [a.attempt for a in h.actions] == [1, 1, 1, 2, 2, 2]
    assert h.actions[-1].duration_s == pytest.approx(130 - 125)


def test_cleared_event_verifies() -> None:
    h = Harness()
    h.event(*OOM, "warning", T0 + 1)
    h.result(ok=True)
    h.event(*OOM, "warning", T0 + 5, phase="cleared")
    assert h.log()[-1] == ("clear_llm_cache", "verified", None)
    assert h.policy.pending == {}


def test_escalation_during_verification_jumps_to_the_severity_rung() -> None:
    h = Harness()
    h.event(*THERMAL, "warning", T0 + 1)
    h.result(ok=True)
    h.event(*THERMAL, "emergency", T0 + 10, phase="escalated")
    assert h.log()[-2:] == [("throttle_gpu", "unresolved", "escalated"),
                            ("stop_llm_service", "skipped", "not_opted_in")]


def test_escalation_while_running_is_decided_at_the_result() -> None:
    h = Harness()
    h.event(*OOM, "warning", T0 + 1)
    h.event(*OOM, "critical", T0 + 2, phase="escalated")
    assert h.log() == [("clear_llm_cache", "started", None)]
    h.result(ok=True)
    assert h.log()[1:] == [("clear_llm_cache", "succeeded", None),
                           ("clear_llm_cache", "unresolved", "escalated"),
                           ("reset_gpu_session", "started", None)]


def test_failed_action_escalates_and_exhausted_ladder_counts_towards_breaker() -> None:
    h = Harness(make_config(breaker_threshold=2, destructive_opt_in=["reset_gpu"]))
    h.event("hang1", "gpu_hang", "critical", T0 + 1)
    h.result(ok=False, reason="processes_remain")
    assert h.log() == [("reset_gpu", "started", None),
                       ("reset_gpu", "failed", "processes_remain"),
                       ("notify", "skipped", "ladder_exhausted")]
    assert h.policy.guard.unresolved_count == 1 and not h.policy.guard.breaker_open
    # a second incident: succeeds but never clears -> unresolved -> exhausted -> breaker opens
    h.state(T0 + 10)
    h.event("hang2", "gpu_hang", "critical", T0 + 400)
    h.result(ok=True)
    h.state(T0 + 600, (("hang2", "gpu_hang", "critical"),))
    assert h.log()[-3:] == [("reset_gpu", "succeeded", None),
                            ("reset_gpu", "unresolved", "not_cleared"),
                            ("notify", "skipped", "ladder_exhausted")]
    assert h.policy.guard.breaker_open and h.actions[-1].detail["breaker_opened"] is True
    assert h.policy.healer_state().breaker_open
    # open breaker: everything is skipped, even on another kind
    h.event(*OOM, "warning", T0 + 700)
    assert h.log()[-1] == ("clear_llm_cache", "skipped", "breaker_open")
    # only the operator closes it
    h.set(reset_breaker=True)
    assert not h.policy.guard.breaker_open and h.policy.guard.unresolved_count == 0
    h.event(*OOM, "critical", T0 + 710, phase="escalated")
    assert h.log()[-1] == ("reset_gpu_session", "started", None)


def test_cooldown_per_gpu_and_action() -> None:
    h = Harness(make_config(cooldown_s=300), gpus=2)
    h.event("a", "out_of_memory", "warning", T0 + 1)
    h.result()
    h.event("a", "out_of_memory", "warning", T0 + 2, phase="cleared")
    h.event("b", "out_of_memory", "warning", T0 + 100)  # same GPU, same action, in cooldown
    assert h.log()[-1] == ("clear_llm_cache", "skipped", "cooldown")
    assert h.actions[-1].detail["until_ts"] == T0 + 301
    h.event("c", "out_of_memory", "warning", T0 + 101, index=1)  # another GPU: no cooldown
    assert h.log()[-1] == ("clear_llm_cache", "started", None)
    h.result()
    h.event("c", "out_of_memory", "warning", T0 + 102, phase="cleared", index=1)
    h.event("d", "out_of_memory", "warning", T0 + 302)  # cooldown over
    assert h.log()[-1] == ("clear_llm_cache", "started", None)


def test_budget_per_rolling_hour() -> None:
    h = Harness(make_config(budget_per_hour=2, cooldown_s=0))
    for n, ts in enumerate((T0 + 1, T0 + 10, T0 + 20)):
        h.event(f"e{n}", "out_of_memory", "warning", ts)
        if h.requests:
            h.result()
            h.event(f"e{n}", "out_of_memory", "warning", ts + 1, phase="cleared")
    assert [s for _, s, _ in h.log() if s in ("started", "skipped")] == [
        "started", "started", "skipped"]
    assert h.log()[-1] == ("clear_llm_cache", "skipped", "budget_exhausted")
    assert h.policy.healer_state().budget_left == 0
    h.event("e9", "out_of_memory", "warning", T0 + 3602)  # the first one left the hour
    assert h.log()[-1] == ("clear_llm_cache", "started", None)


def test_one_action_at_a_time_per_gpu_then_the_waiting_incident() -> None:
    h = Harness()
    h.event(*OOM, "warning", T0 + 1)
    h.event(*THERMAL, "warning", T0 + 2)
    assert h.log()[-1] == ("throttle_gpu", "skipped", "busy")
    h.result()
    h.event(*OOM, "warning", T0 + 3, phase="cleared")
    assert h.log()[-2:] == [("clear_llm_cache", "verified", None),
                            ("throttle_gpu", "started", None)]
    assert h.actions[-1].attempt == 2  # the busy skip was attempt 1


def test_pause_and_resume() -> None:
    h = Harness()
    h.set(enabled=False)
    assert not h.policy.healer_state().enabled
    h.event(*OOM, "warning", T0 + 1)
    assert h.log() == [("clear_llm_cache", "skipped", "paused")]
    h.set(enabled=True)
    h.event(*THERMAL, "warning", T0 + 2)
    assert h.log()[-1] == ("throttle_gpu", "started", None)


@pytest.mark.parametrize("how", ["flag", "config", "set"])
def test_dry_run_executes_nothing(how: str) -> None:
    h = Harness(make_config(dry_run=how == "config"), dry_run=how == "flag")
    if how == "set":
        h.set(dry_run=True)
    h.event(*OOM, "warning", T0 + 1)
    h.event(*OOM, "critical", T0 + 2, phase="escalated")
    assert h.log() == [("clear_llm_cache", "dry_run", None),
                       ("reset_gpu_session", "dry_run", None)]
    assert h.requests == [] and h.policy.pending == {}
    assert h.policy.healer_state().dry_run


def test_dry_run_flag_wins_over_the_operator() -> None:
    h = Harness(dry_run=True)
    h.set(dry_run=False)
    assert h.policy.dry_run


def test_opt_in_by_argument() -> None:
    h = Harness(opted_in=["stop_llm_service"])
    h.event(*THERMAL, "emergency", T0 + 1)
    assert h.log() == [("stop_llm_service", "started", None)]


def test_unknown_gpu_is_skipped_and_published() -> None:
    h = Harness()
    h.event("x", "out_of_memory", "warning", T0 + 1, index=5)
    assert h.log() == [("clear_llm_cache", "skipped", "unknown_gpu")]
    assert h.actions[0].index == 5


def test_event_before_the_first_state_is_decided_when_the_state_arrives() -> None:
    # The analyzer publishes a sample's Events before its State: a GPU hot at its first
    # sample must still be healed, not skipped for good as an unknown GPU.
    h = Harness(gpus=0)
    h.event(*THERMAL, "warning", T0 + 1)
    assert h.log() == [("throttle_gpu", "skipped", "unknown_gpu")]
    h.state(T0 + 1, (("e-hot", "thermal_throttling", "warning"),))
    assert h.log()[-1] == ("throttle_gpu", "started", None)
    assert [r.action for r in h.requests] == ["throttle_gpu"]


def test_event_before_a_state_that_no_longer_has_it_is_not_acted_on() -> None:
    h = Harness(gpus=0)
    h.event(*THERMAL, "warning", T0 + 1)
    h.state(T0 + 2)  # already healthy
    assert h.log() == [("throttle_gpu", "skipped", "unknown_gpu")]
    assert h.requests == []


def test_worse_xid_escalates_to_its_own_catalog_action() -> None:
    h = Harness(make_config(destructive_opt_in=["reset_gpu"]))
    h.event("x1", "xid_error", "warning", T0 + 1, recommended="restart_llm_service")
    h.result(ok=True)
    h.event("x1", "xid_error", "critical", T0 + 2, phase="escalated", recommended="reset_gpu")
    assert h.log()[-2:] == [("restart_llm_service", "unresolved", "escalated"),
                            ("reset_gpu", "started", None)]
    h.result(ok=True)
    h.event("x1", "xid_error", "emergency", T0 + 3, phase="escalated", recommended="notify")
    assert h.log()[-2:] == [("reset_gpu", "unresolved", "escalated"),
                            ("notify", "skipped", "needs_human")]


def test_other_hosts_are_ignored() -> None:
    h = Harness()
    assert h.event("x", "out_of_memory", "warning", T0 + 1, host="other").actions == []
    assert h.policy.on_state(make_state(ts=T0 + 2, host="other")).actions == []


def test_redelivered_event_acts_once() -> None:
    h = Harness()
    h.event(*OOM, "warning", T0 + 1)
    h.event(*OOM, "warning", T0 + 1)
    h.result()
    h.event(*OOM, "warning", T0 + 1)
    assert h.log() == [("clear_llm_cache", "started", None),
                       ("clear_llm_cache", "succeeded", None)]
    assert h.requests == []


def test_late_event_for_an_already_cleared_condition() -> None:
    h = Harness()
    h.state(T0 + 10)
    h.event(*OOM, "warning", T0 + 5)
    assert h.log() == [("clear_llm_cache", "skipped", "already_cleared")]


def test_throttle_is_restored_after_healthy_time() -> None:
    h = Harness(make_config(restore_after_s=300))
    hot = (("e-hot", "thermal_throttling", "warning"),)
    h.event(*THERMAL, "warning", T0 + 1)
    assert h.requests[0].params["default_power_limit_w"] == 300.0
    h.state(T0 + 2, hot)
    h.result()
    assert h.policy.guard.throttled.keys() == {0}
    h.state(T0 + 50, hot, limit_w=240.0)
    h.state(T0 + 60, limit_w=240.0)  # healthy from here
    assert h.log()[-1] == ("throttle_gpu", "verified", None)
    h.state(T0 + 200, limit_w=240.0)
    assert h.requests == []
    h.state(T0 + 300, hot, limit_w=240.0)  # hot again: the healthy time starts over
    h.state(T0 + 310, limit_w=240.0)
    h.state(T0 + 600, limit_w=240.0)
    assert h.requests == []
    h.state(T0 + 611, limit_w=240.0)
    assert h.log()[-1] == ("restore_power_limit", "started", None)
    request = h.requests[0]
    assert request.action == "restore_power_limit"
    assert request.params["default_power_limit_w"] == 300.0  # the first limit seen
    h.result()
    assert h.log()[-1] == ("restore_power_limit", "succeeded", None)
    assert h.policy.guard.throttled == {} and h.policy.healer_state().throttled == []
    ids = {a.action_id for a in h.actions if a.action == "restore_power_limit"}
    assert len(ids) == 1 and h.actions[-1].event_id == "e-hot"


def test_guard_state_survives_a_restart(tmp_path: Path) -> None:
    config = make_config(breaker_threshold=1, destructive_opt_in=["reset_gpu"])
    h = Harness(config)
    h.event(*OOM, "warning", T0 + 1)
    h.result()
    h.event(*OOM, "warning", T0 + 2, phase="cleared")
    h.event("hang", "gpu_hang", "critical", T0 + 3)
    h.result(ok=False, reason="processes_remain")
    h.set(enabled=False)
    assert h.policy.guard.breaker_open
    path = tmp_path / "sub" / "healer-node1.json"
    save_guard_state(path, h.policy.guard)
    assert not list(path.parent.glob("*.tmp"))

    again = Harness(config, guard=load_guard_state(path, HOST))
    state = again.policy.healer_state()
    assert state.breaker_open and not state.enabled and state.unresolved_count == 1
    assert {(c.index, c.action) for c in state.cooldowns} == {(0, "clear_llm_cache"),
                                                              (0, "reset_gpu")}
    assert state.budget_left == state.budget_per_hour - 2
    again.event("hang", "gpu_hang", "critical", T0 + 3)  # redelivered after the restart
    assert again.actions == []
    again.set(enabled=True, reset_breaker=True)
    again.event("oom2", "out_of_memory", "warning", T0 + 100)
    assert again.log() == [("clear_llm_cache", "skipped", "cooldown")]


def test_corrupt_state_file_is_kept_aside(tmp_path: Path) -> None:
    path = tmp_path / "healer.json"
    path.write_text("{not json")
    state = load_guard_state(path, HOST)
    assert state.breaker_open is False
    assert (tmp_path / "healer.json.corrupt").read_text() == "{not json"


def test_injected_clock_drives_deadlines() -> None:
    clock = EventClock()
    h = Harness(clock=clock)
    h.event(*OOM, "warning", T0 + 1)
    h.result()
    clock.observe(T0 + 500)
    h._take(h.policy.tick())
    assert h.log()[-2:] == [("clear_llm_cache", "unresolved", "not_cleared"),
                            ("reset_gpu_session", "started", None)]


def test_a_new_source_clock_keeps_the_remaining_cooldown() -> None:
    h = Harness(make_config(cooldown_s=300))
    h.event("a", "out_of_memory", "warning", T0 + 1)
    h.result()
    h.event("a", "out_of_memory", "warning", T0 + 2, phase="cleared")
    restart = T0 - 10_000  # the simulation started again, earlier in time
    h.state(restart)
    assert h.policy.now() == restart
    [cooldown] = h.policy.healer_state().cooldowns
    assert cooldown.until_ts == pytest.approx(restart + 299)  # 299 s were left
    h.event("b", "out_of_memory", "warning", restart + 100)
    assert h.log()[-1] == ("clear_llm_cache", "skipped", "cooldown")
    h.event("c", "out_of_memory", "warning", restart + 300)
    assert h.log()[-1] == ("clear_llm_cache", "started", None)


def test_retained_history_never_moves_the_clock_back() -> None:
    h = Harness()
    h.state(T0 + 5000)
    h.state(T0, retained=True, active=(("old", "out_of_memory", "warning"),))
    assert h.policy.now() == T0 + 5000 and h.policy.gpus[0].ts == T0 + 5000
    h.state(T0 + 4990)  # live, a little older (another GPU's pace): no new timeline
    assert h.policy.now() == T0 + 5000


def test_the_clock_is_persisted_to_tell_a_new_timeline(tmp_path: Path) -> None:
    h = Harness(make_config(cooldown_s=300))
    h.state(T0 + 10_000)
    h.event("a", "out_of_memory", "warning", T0 + 10_001)
    path = tmp_path / "s.json"
    save_guard_state(path, h.policy.guard)
    again = Harness(make_config(cooldown_s=300), guard=load_guard_state(path, HOST))
    assert again.policy.now() == T0  # the first live State started the new timeline
    again.event("b", "out_of_memory", "warning", T0 + 250)
    assert again.log() == [("clear_llm_cache", "skipped", "cooldown")]
    again.event("c", "out_of_memory", "warning", T0 + 305)
    assert again.log()[-1] == ("clear_llm_cache", "started", None)


def test_ladder_validation() -> None:
    with pytest.raises(ValueError, match="climb"):
        HealerConfig.model_validate({"ladders": {"out_of_memory": [
            {"action": "reset_gpu_session", "min_severity": "critical"},
            {"action": "clear_llm_cache", "min_severity": "warning"}]}})
    with pytest.raises(ValueError, match="unknown condition kind"):
        HealerConfig.model_validate({"ladders": {"oom": []}})
    with pytest.raises(ValueError, match="only destructive"):
        make_config(destructive_opt_in=["clear_llm_cache"])


def test_replayed_conditions_are_recorded_but_never_acted_on() -> None:
    """`gpuheal replay` into a live host's topics must not reset a real GPU."""
    h = Harness(make_config(destructive_opt_in=["reset_gpu"]))
    event = make_event("e-replay", "gpu_hang", "critical", T0 + 1)
    event.evidence["source"] = "replay"
    h._take(h.policy.on_event(event))
    assert h.log() == [("reset_gpu", "skipped", "replayed")]
    assert not h.requests
    # The simulated actuators may act on a replay (that is how a recorded incident is
    # replayed through the whole pipeline in a demo).
    sim = Harness(make_config(destructive_opt_in=["reset_gpu"]), act_on_replay=True)
    sim._take(sim.policy.on_event(event))
    assert sim.log() == [("reset_gpu", "started", None)]


def test_a_condition_held_back_by_pause_is_healed_when_healing_resumes() -> None:
    h = Harness(make_config())
    h.set(enabled=False)
    h.state(T0 + 1, ((*OOM, "warning"),))
    h.event(*OOM, "warning", T0 + 1)
    assert h.log() == [("clear_llm_cache", "skipped", "paused")]
    h.state(T0 + 2, ((*OOM, "warning"),))
    h._take(h.policy.tick())
    assert h.log() == [("clear_llm_cache", "skipped", "paused")]  # no repeat while paused
    h.set(enabled=True)
    h.state(T0 + 3, ((*OOM, "warning"),))
    h._take(h.policy.tick())
    assert h.log()[-1] == ("clear_llm_cache", "started", None)
    assert len(h.requests) == 1


def test_a_condition_in_cooldown_is_acted_on_when_the_cooldown_ends() -> None:
    h = Harness(make_config(cooldown_s=100))
    h.state(T0 + 1, (("a", "out_of_memory", "warning"),))
    h.event("a", "out_of_memory", "warning", T0 + 1)
    h.result()
    h.state(T0 + 2)
    h.event("a", "out_of_memory", "warning", T0 + 2, phase="cleared")
    assert h.log()[-1] == ("clear_llm_cache", "verified", None)
    h.state(T0 + 10, (("b", "out_of_memory", "warning"),))
    h.event("b", "out_of_memory", "warning", T0 + 10)
    assert h.log()[-1] == ("clear_llm_cache", "skipped", "cooldown")
    h.state(T0 + 50, (("b", "out_of_memory", "warning"),))
    h._take(h.policy.tick())
    assert h.log()[-1] == ("clear_llm_cache", "skipped", "cooldown")  # said once
    assert sum(1 for a in h.log() if a[2] == "cooldown") == 1
    h.state(T0 + 102, (("b", "out_of_memory", "warning"),))
    h._take(h.policy.tick())
    assert h.log()[-1] == ("clear_llm_cache", "started", None)


def test_a_held_back_condition_that_cleared_meanwhile_is_left_alone() -> None:
    h = Harness(make_config())
    h.set(enabled=False)
    h.state(T0 + 1, ((*OOM, "warning"),))
    h.event(*OOM, "warning", T0 + 1)
    h.state(T0 + 5)  # the condition went away by itself
    h.set(enabled=True)
    h._take(h.policy.tick())
    assert h.log() == [("clear_llm_cache", "skipped", "paused")]
    assert not h.requests
