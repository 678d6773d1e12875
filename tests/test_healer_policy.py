"""The healing policy without a broker: the life of an incident, guards, verification,
persistence, clock steps. Each input is fed with a wall clock that moves with event time
(as a live source does), unless a test makes the source clock step."""

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
from healer.guards import Phase
from healer.policy import ActuatorRequest, Decisions, Policy
from healer.store import load_guard_state, save_guard_state

HOST = "node1"
T0 = 1_700_000_000.0
W0 = 1_800_000_000.0
"""The wall clock at T0 (another epoch: the healer must not mix them up)."""


def make_config(**guards: Any) -> HealerConfig:
    probe = guards.pop("probe", None)
    data: dict[str, Any] = {"guards": guards}
    if probe is not None:
        data["probe"] = probe
    return HealerConfig.model_validate(data)


def make_state(index: int = 0, ts: float = T0, active: tuple[tuple[str, str, str], ...] = (),
               health: str | None = None, limit_w: float | None = 350.0,
               host: str = HOST, source: str | None = "nvml") -> State:
    conditions = [ActiveCondition(event_id=e, kind=k, severity=s, started_ts=ts)
                  for e, k, s in active]
    return State(host=host, index=index, name="NVIDIA L40S",
                 health=health or ("warning" if active else "healthy"),
                 timestamp=iso_utc(ts), ts=ts, power=Power(draw_w=200.0, limit_w=limit_w),
                 active=conditions, source=source)


def make_event(event_id: str, kind: str, severity: str, ts: float, phase: str = "raised",
               index: int = 0, recommended: str | None = None, host: str = HOST,
               cleared_by: str | None = None) -> Event:
    if phase == "cleared" and cleared_by is None:
        cleared_by = "recovered"
    return Event(event_id=event_id, host=host, index=index, kind=kind, severity=severity,
                 phase=phase, started_ts=T0, ts=ts, message=f"{kind} {severity}",
                 recommended_action=recommended, cleared_by=cleared_by)


class Wall:
    """A wall clock the test moves (with event time, unless a test steps the source)."""

    def __init__(self) -> None:
        self.now = W0

    def __call__(self) -> float:
        return self.now


class Harness:
    """Drives a Policy and keeps everything it said."""

    def __init__(self, config: HealerConfig | None = None, gpus: int = 1, **kw: Any) -> None:
        self.wall = Wall()
        kw.setdefault("probe", False)
        self.policy = Policy(HOST, config or make_config(), wall=self.wall, **kw)
        self.actions: list[Any] = []
        self.requests: list[ActuatorRequest] = []
        self.changed = 0
        for i in range(gpus):
            self.state(T0, index=i)

    def at(self, ts: float) -> None:
        """The wall clock at event time ``ts`` (a live source's pace)."""
        self.wall.now = max(self.wall.now, W0 + (ts - T0))

    def _take(self, d: Decisions) -> Decisions:
        self.actions.extend(d.actions)
        self.requests.extend(d.requests)
        self.changed += int(d.state_changed)
        return d

    def state(self, ts: float, active: tuple[tuple[str, str, str], ...] = (), index: int = 0,
              retained: bool = False, pace: bool = True, **kw: Any) -> Decisions:
        if pace and not retained:
            self.at(ts)
        return self._take(self.policy.on_state(make_state(index, ts, active, **kw),
                                               retained=retained))

    def event(self, *args: Any, pace: bool = True, **kw: Any) -> Decisions:
        event = make_event(*args, **kw)
        if pace:
            self.at(event.ts)
        return self._take(self.policy.on_event(event))

    def result(self, ok: bool = True, reason: str | None = None,
               detail: dict[str, Any] | None = None) -> Decisions:
        request = self.requests.pop(0)
        return self._take(self.policy.on_result(
            request.action_id, Result(ok, detail or {"test": True}, 0.5, reason)))

    def set(self, **kw: Any) -> Decisions:
        return self._take(self.policy.on_set(HealerSet(**kw)))

    def tick(self) -> Decisions:
        return self._take(self.policy.tick())

    def log(self) -> list[tuple[str, str, str | None]]:
        return [(a.action, a.status, a.reason) for a in self.actions]

    def phase(self, event_id: str) -> Phase | None:
        inc = self.policy.guard.incidents.get(event_id)
        return inc.phase if inc else None


OOM = ("e-oom", "out_of_memory")
THERMAL = ("e-hot", "thermal_throttling")
HOT = (("e-hot", "thermal_throttling", "warning"),)


# --- the ladder -------------------------------------------------------------------------------
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
    assert h.phase("e-oom") == Phase.VERIFYING
    h.state(T0 + 125, (("e-oom", "out_of_memory", "warning"),))  # window (120 s) over
    assert h.log()[-2:] == [("clear_llm_cache", "unresolved", "not_cleared"),
                            ("reset_gpu_session", "started", None)]
    h.result(ok=True)
    h.state(T0 + 130)  # the condition is gone from a healthy State
    assert h.log() == [
        ("clear_llm_cache", "started", None), ("clear_llm_cache", "succeeded", None),
        ("clear_llm_cache", "unresolved", "not_cleared"),
        ("reset_gpu_session", "started", None), ("reset_gpu_session", "succeeded", None),
        ("reset_gpu_session", "verified", None),
    ]
    assert [a.attempt for a in h.actions] == [1, 1, 1, 2, 2, 2]
    assert h.actions[-1].duration_s == pytest.approx(130 - 125)
    assert h.policy.guard.incidents == {} and h.policy.guard.pending == {}


def test_escalation_during_verification_jumps_to_the_severity_rung() -> None:
    h = Harness()
    h.event(*THERMAL, "warning", T0 + 1)
    h.result(ok=True)
    h.event(*THERMAL, "emergency", T0 + 10, phase="escalated")
    assert h.log()[-2:] == [("throttle_gpu", "unresolved", "escalated"),
                            ("stop_llm_service", "skipped", "not_opted_in")]
    assert h.phase("e-hot") == Phase.NEEDS_HUMAN


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
    assert h.phase("hang1") == Phase.NEEDS_HUMAN  # a person is still needed
    h.event("hang2", "gpu_hang", "critical", T0 + 400, index=0)
    assert h.log()[-1] == ("reset_gpu", "started", None)
    h.result(ok=True)
    h.state(T0 + 600, (("hang2", "gpu_hang", "critical"), ("hang1", "gpu_hang", "critical")))
    assert h.log()[-3:] == [("reset_gpu", "succeeded", None),
                            ("reset_gpu", "unresolved", "not_cleared"),
                            ("notify", "skipped", "ladder_exhausted")]
    assert h.policy.guard.breaker_open and h.actions[-1].detail["breaker_opened"] is True
    h.event(*OOM, "warning", T0 + 700)
    assert h.log()[-1] == ("clear_llm_cache", "skipped", "breaker_open")
    h.set(reset_breaker=True)  # only a person closes it
    assert not h.policy.guard.breaker_open and h.policy.guard.unresolved_count == 0
    h.event(*OOM, "critical", T0 + 710, phase="escalated")
    assert h.log()[-1] == ("reset_gpu_session", "started", None)


# --- guards -----------------------------------------------------------------------------------
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


def test_service_actions_are_host_wide() -> None:
    """Two GPUs asking for the same service restart: it restarts once; the other waits (one
    slot per host), then the host-wide cooldown holds it; it is healed by the first."""
    h = Harness(make_config(cooldown_s=300), gpus=2)
    h.event("a", "out_of_memory", "critical", T0 + 1, index=0)
    h.event("b", "out_of_memory", "critical", T0 + 2, index=1)
    assert h.log() == [("reset_gpu_session", "started", None),
                       ("reset_gpu_session", "skipped", "busy")]
    assert h.actions[-1].detail["host_wide"] is True
    h.state(T0 + 3, (("b", "out_of_memory", "critical"),), index=1)
    h.result()  # the restart is done: GPU 1's incident is decided again: host-wide cooldown
    assert h.log()[-2:] == [("reset_gpu_session", "succeeded", None),
                            ("reset_gpu_session", "skipped", "cooldown")]
    assert h.actions[-1].detail["host_wide"] is True
    [cooldown] = [c for c in h.policy.healer_state().cooldowns
                  if c.action == "reset_gpu_session"]
    assert cooldown.index is None  # every GPU of the host
    h.state(T0 + 10, index=1)  # the one restart healed GPU 1 too
    assert h.policy.guard.incidents.get("b") is None
    assert sum(1 for a in h.log() if a[1] == "started") == 1


def test_budget_per_rolling_hour() -> None:
    h = Harness(make_config(budget_per_hour=2, cooldown_s=0))
    for n, ts in enumerate((T0 + 1, T0 + 10, T0 + 20)):
        h.event(f"e{n}", "out_of_memory", "warning", ts)
        if h.requests:
            h.result()
            h.event(f"e{n}", "out_of_memory", "warning", ts + 1, phase="cleared")
    assert h.log()[-1] == ("clear_llm_cache", "skipped", "budget_exhausted")
    assert h.policy.healer_state().budget_left == 0
    h.event("e9", "out_of_memory", "warning", T0 + 3602)  # the first one left the hour
    assert h.log()[-1] == ("clear_llm_cache", "started", None)


def test_one_action_at_a_time_per_gpu_then_the_waiting_incident() -> None:
    h = Harness()
    h.event(*OOM, "warning", T0 + 1)
    h.event(*THERMAL, "warning", T0 + 2)
    assert h.log()[-1] == ("throttle_gpu", "skipped", "busy")
    h.state(T0 + 2, (("e-oom", "out_of_memory", "warning"), *HOT))
    h.result()
    h.event(*OOM, "warning", T0 + 3, phase="cleared")
    assert h.log()[-2:] == [("clear_llm_cache", "verified", None),
                            ("throttle_gpu", "started", None)]
    assert h.actions[-1].attempt == 2  # the busy skip was attempt 1


def test_a_lost_gpu_needs_a_human_even_while_an_action_runs() -> None:
    h = Harness()
    h.event(*OOM, "warning", T0 + 1)
    h.event("lost", "unavailable", "critical", T0 + 2)
    assert h.log()[-1] == ("notify", "skipped", "needs_human")


def test_pause_and_resume() -> None:
    h = Harness()
    h.set(enabled=False)
    assert not h.policy.healer_state().enabled
    h.event(*OOM, "warning", T0 + 1)
    assert h.log() == [("clear_llm_cache", "skipped", "paused")]
    h.set(enabled=True)
    h.event(*THERMAL, "warning", T0 + 2)
    assert h.log()[-1] == ("throttle_gpu", "skipped", "busy") or \
        h.log()[-1] == ("throttle_gpu", "started", None)


@pytest.mark.parametrize("how", ["flag", "config", "set"])
def test_dry_run_executes_nothing(how: str) -> None:
    h = Harness(make_config(dry_run=how == "config"), dry_run=how == "flag")
    if how == "set":
        h.set(dry_run=True)
    h.event(*OOM, "warning", T0 + 1)
    h.event(*OOM, "critical", T0 + 2, phase="escalated")
    assert h.log() == [("clear_llm_cache", "dry_run", None),
                       ("reset_gpu_session", "dry_run", None)]
    assert h.requests == [] and h.policy.guard.pending == {}
    assert h.policy.healer_state().dry_run


def test_dry_run_flag_wins_over_the_operator() -> None:
    h = Harness(dry_run=True)
    h.set(dry_run=False)
    assert h.policy.dry_run


def test_opt_in_by_argument() -> None:
    h = Harness(opted_in=["stop_llm_service"])
    h.event(*THERMAL, "emergency", T0 + 1)
    assert h.log() == [("stop_llm_service", "started", None)]


def test_unknown_gpu_is_skipped_with_a_real_time() -> None:
    h = Harness()
    h.event("x", "out_of_memory", "warning", T0 + 1, index=5)
    assert h.log() == [("clear_llm_cache", "skipped", "unknown_gpu")]
    assert h.actions[0].index == 5 and h.actions[0].ts > 0
    fresh = Harness(gpus=0)  # nothing seen at all: the wall clock, never 0.0
    fresh.event("y", "out_of_memory", "warning", T0 + 1, index=3)
    assert fresh.actions[0].ts == W0 + 1


def test_event_before_the_first_state_is_decided_when_the_state_arrives() -> None:
    h = Harness(gpus=0)
    h.event(*THERMAL, "warning", T0 + 1)
    assert h.log() == [("throttle_gpu", "skipped", "unknown_gpu")]
    h.state(T0 + 1, HOT)
    assert h.log()[-1] == ("throttle_gpu", "started", None)


def test_event_before_a_state_that_no_longer_has_it_is_not_acted_on() -> None:
    h = Harness(gpus=0)
    h.event(*THERMAL, "warning", T0 + 1)
    h.state(T0 + 2)  # already healthy
    assert h.log() == [("throttle_gpu", "skipped", "unknown_gpu")]
    assert h.requests == [] and h.policy.guard.incidents == {}


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


def test_late_event_for_an_already_cleared_condition() -> None:
    h = Harness()
    h.state(T0 + 10)
    h.event(*OOM, "warning", T0 + 5)
    assert h.log() == [("clear_llm_cache", "skipped", "already_cleared")]


# --- a held-back rung is never lost --------------------------------------------------------------
def test_a_condition_held_back_by_pause_is_healed_when_healing_resumes() -> None:
    h = Harness()
    h.set(enabled=False)
    h.state(T0 + 1, ((*OOM, "warning"),))
    h.event(*OOM, "warning", T0 + 1)
    assert h.log() == [("clear_llm_cache", "skipped", "paused")]
    assert h.phase("e-oom") == Phase.WAITING
    h.state(T0 + 2, ((*OOM, "warning"),))
    h.tick()
    assert h.log() == [("clear_llm_cache", "skipped", "paused")]  # no repeat while paused
    h.set(enabled=True)
    assert h.log()[-1] == ("clear_llm_cache", "started", None)


def test_an_escalation_held_back_by_a_cooldown_runs_when_it_ends() -> None:
    """Defect 4: the unresolved throttle wants the next rung, which a cooldown holds back;
    the rung is remembered and runs when the cooldown ends."""
    h = Harness(make_config(cooldown_s=400, verify_window_s=60))
    h.event("old", "thermal_throttling", "critical", T0 + 1)  # restart_llm_service now
    h.result()
    h.state(T0 + 2)  # healed
    h.event(*THERMAL, "warning", T0 + 100)
    h.state(T0 + 100, HOT)
    h.result()
    h.state(T0 + 170, HOT)  # the throttle did not help: restart_llm_service, in cooldown
    assert h.log()[-2:] == [("throttle_gpu", "unresolved", "not_cleared"),
                            ("restart_llm_service", "skipped", "cooldown")]
    assert h.phase("e-hot") == Phase.WAITING
    h.state(T0 + 300, HOT)
    assert h.log()[-1] == ("restart_llm_service", "skipped", "cooldown")  # said once
    h.state(T0 + 402, HOT)
    assert h.log()[-1] == ("restart_llm_service", "started", None)


def test_a_rung_held_back_too_long_goes_to_a_person_and_counts() -> None:
    h = Harness(make_config(give_up_after_s=600, breaker_threshold=5))
    h.set(enabled=False)
    h.event(*OOM, "warning", T0 + 1)
    h.state(T0 + 1, ((*OOM, "warning"),))
    h.state(T0 + 700, ((*OOM, "warning"),))
    assert h.log()[-1] == ("notify", "skipped", "held_back_too_long")
    assert h.actions[-1].detail["guard"] == "paused"
    assert h.phase("e-oom") == Phase.NEEDS_HUMAN and h.policy.guard.unresolved_count == 1


def test_a_held_back_condition_that_cleared_meanwhile_is_left_alone() -> None:
    h = Harness()
    h.set(enabled=False)
    h.state(T0 + 1, ((*OOM, "warning"),))
    h.event(*OOM, "warning", T0 + 1)
    h.state(T0 + 5)  # the condition went away by itself
    h.set(enabled=True)
    assert h.log() == [("clear_llm_cache", "skipped", "paused")]
    assert not h.requests and h.policy.guard.incidents == {}


# --- only a real return to health verifies -------------------------------------------------------
def test_cleared_event_verifies() -> None:
    h = Harness()
    h.event(*OOM, "warning", T0 + 1)
    h.result(ok=True)
    h.event(*OOM, "warning", T0 + 5, phase="cleared")
    assert h.log()[-1] == ("clear_llm_cache", "verified", None)
    assert h.policy.guard.pending == {}


@pytest.mark.parametrize("cleared_by", ["source_restarted", "acknowledged"])
def test_a_condition_that_ended_without_recovering_does_not_verify(cleared_by: str) -> None:
    h = Harness(make_config(destructive_opt_in=["reset_gpu"]))
    h.event("x", "xid_error", "critical", T0 + 1, recommended="reset_gpu")
    h.result(ok=True)
    h.event("x", "xid_error", "critical", T0 + 5, phase="cleared", cleared_by=cleared_by)
    assert h.log()[-1] == ("reset_gpu", "unresolved", cleared_by)


def test_a_condition_gone_while_the_gpu_is_unavailable_does_not_verify() -> None:
    h = Harness()
    h.event(*OOM, "warning", T0 + 1)
    h.result(ok=True)
    h.state(T0 + 5, (("lost", "unavailable", "critical"),), health="unavailable")
    assert h.log()[-1] == ("clear_llm_cache", "unresolved", "gpu_unavailable")


def test_verification_ends_by_wall_time_when_samples_stop() -> None:
    """Defect 6: a wedged GPU or a dead publisher: no State moves event time; the action
    still reaches a final status (by the wall clock), and the ladder goes on."""
    h = Harness(make_config(verify_window_s=120, verify_wall_grace_s=30))
    h.event(*OOM, "warning", T0 + 1)
    h.result(ok=True)
    h.wall.now += 100
    h.tick()
    assert h.log()[-1] == ("clear_llm_cache", "succeeded", None)
    h.wall.now += 60  # 120 s of window + 30 s of grace, in wall time
    h.tick()
    assert h.log()[-2:] == [("clear_llm_cache", "unresolved", "no_samples"),
                            ("reset_gpu_session", "started", None)]


def test_a_recovery_while_the_action_runs_verifies_at_its_result() -> None:
    h = Harness()
    h.event(*OOM, "warning", T0 + 1)
    h.event(*OOM, "warning", T0 + 2, phase="cleared")
    assert h.phase("e-oom") == Phase.ACTING
    h.result(ok=True)
    assert h.log()[-2:] == [("clear_llm_cache", "succeeded", None),
                            ("clear_llm_cache", "verified", None)]
    assert h.policy.guard.incidents == {}


# --- a person ------------------------------------------------------------------------------------
def test_a_condition_that_needs_a_person_stays_open_until_acknowledged() -> None:
    """Defect 12: an XID 79 incident needs a person until the GPU proves healthy again or a
    person acknowledges it."""
    h = Harness()
    h.event("x79", "xid_error", "emergency", T0 + 1, recommended="notify")
    h.state(T0 + 200, (("x79", "xid_error", "emergency"),))
    assert h.phase("x79") == Phase.NEEDS_HUMAN
    [incident] = h.policy.healer_state().incidents
    assert (incident.phase, incident.reason) == ("needs_human", "needs_human")
    h.set(ack="x79")
    assert h.log()[-1] == ("notify", "acknowledged", "operator")
    assert h.actions[-1].event_id == "x79"
    assert h.policy.healer_state().incidents == []
    h.state(T0 + 300, (("x79", "xid_error", "emergency"),))  # until the analyzer catches up
    assert h.policy.guard.incidents == {}  # never reopened


def test_an_unknown_acknowledgement_changes_nothing() -> None:
    h = Harness()
    h.set(ack="nope")
    assert h.actions == []


# --- the workload probe --------------------------------------------------------------------------
@pytest.mark.parametrize(("verdict", "expected"), [
    ("answers", ("reset_gpu", "skipped", "workload_answers")),
    ("stuck", ("reset_gpu", "started", None)),
    ("inconclusive", ("reset_gpu", "started", None)),
])
def test_a_workload_that_answers_vetoes_the_reset(verdict: str, expected: tuple) -> None:
    h = Harness(make_config(destructive_opt_in=["reset_gpu"]), probe=True)
    h.event("hang", "gpu_hang", "critical", T0 + 1)
    [probe] = h.requests
    assert probe.action == "probe_workload" and h.actions == []
    assert h.phase("hang") == Phase.PROBING
    h.result(ok=True, detail={"verdict": verdict, "model": "llama3.1:8b"})
    assert h.log() == [expected]
    assert h.actions[0].detail.get("probe", h.actions[0].detail.get("probe"))["verdict"] == \
        verdict


def test_a_vetoed_reset_is_probed_again_after_the_cooldown() -> None:
    h = Harness(make_config(destructive_opt_in=["reset_gpu"], cooldown_s=300), probe=True)
    hung = (("hang", "gpu_hang", "critical"),)
    h.event("hang", "gpu_hang", "critical", T0 + 1)
    h.result(ok=True, detail={"verdict": "answers"})
    h.state(T0 + 100, hung)
    assert h.requests == []
    h.state(T0 + 302, hung)
    assert [r.action for r in h.requests] == ["probe_workload"]
    h.result(ok=True, detail={"verdict": "stuck"})
    assert h.log()[-1] == ("reset_gpu", "started", None)


# --- replay, clock ------------------------------------------------------------------------------
def test_replayed_conditions_are_recorded_but_never_acted_on() -> None:
    h = Harness(make_config(destructive_opt_in=["reset_gpu"]))
    event = make_event("e-replay", "gpu_hang", "critical", T0 + 1)
    event.evidence["source"] = "replay"
    h._take(h.policy.on_event(event))
    assert h.log() == [("reset_gpu", "skipped", "replayed")]
    assert not h.requests
    sim = Harness(make_config(destructive_opt_in=["reset_gpu"]), act_on_replay=True)
    sim._take(sim.policy.on_event(event))
    assert sim.log() == [("reset_gpu", "started", None)]


def test_a_replay_onto_a_live_host_cannot_touch_its_guards() -> None:
    """Defect 8: replayed States (a day old) neither rewind the clock nor verify the live
    throttle; the live cooldown and budget stay."""
    h = Harness(make_config(cooldown_s=300))
    h.event(*THERMAL, "warning", T0 + 1000)
    h.state(T0 + 1000, HOT)
    h.result()
    budget = h.policy.healer_state().budget_left
    day_old = T0 + 1000 - 86_400
    for n in range(5):
        h.state(day_old + n, source="replay")  # no condition: would "verify" the throttle
    assert h.policy.now() == T0 + 1000
    assert h.log()[-1] == ("throttle_gpu", "succeeded", None)
    assert h.policy.healer_state().budget_left == budget
    h.event("b", "thermal_throttling", "warning", T0 + 1010, index=0)
    assert h.log()[-1] == ("throttle_gpu", "skipped", "busy")


def test_a_new_source_clock_keeps_the_remaining_cooldown() -> None:
    h = Harness(make_config(cooldown_s=300))
    h.event("a", "out_of_memory", "warning", T0 + 1)
    h.result()
    h.event("a", "out_of_memory", "warning", T0 + 2, phase="cleared")
    restart = T0 - 10_000  # the simulation started again, earlier in time
    h.state(restart, pace=False)
    assert h.policy.now() == pytest.approx(T0 + 2)  # the healer's time never goes back
    h.wall.now += 98
    h.event("b", "out_of_memory", "warning", restart + 98, pace=False)
    assert h.log()[-1] == ("clear_llm_cache", "skipped", "cooldown")
    h.wall.now += 202
    h.event("c", "out_of_memory", "warning", restart + 300, pace=False)
    assert h.log()[-1] == ("clear_llm_cache", "started", None)


def test_a_clock_step_forward_does_not_expire_a_working_throttle() -> None:
    """Defect 9: the source clock jumps an hour ahead in one second of wall time: the
    throttle being verified is not declared unresolved."""
    h = Harness()
    h.event(*THERMAL, "warning", T0 + 1)
    h.state(T0 + 1, HOT)
    h.result()
    h.wall.now += 1
    h.state(T0 + 3602, HOT, pace=False)
    assert h.log()[-1] == ("throttle_gpu", "succeeded", None)
    assert h.policy.clock.state.steps == 1
    h.wall.now += 1
    h.state(T0 + 3603)  # healthy: verified
    assert h.log()[-1] == ("throttle_gpu", "verified", None)


def test_retained_history_never_moves_the_clock() -> None:
    h = Harness()
    h.state(T0 + 5000)
    h.state(T0, retained=True)
    assert h.policy.now() == T0 + 5000 and h.policy.gpus[0].ts == T0 + 5000


# --- the throttle's restore ----------------------------------------------------------------------
def test_throttle_is_restored_even_while_another_condition_is_open() -> None:
    """Defect 10: a suspected hang on a saturated GPU does not hold the restore back; the
    restore is verified against the State's power limit."""
    h = Harness(make_config(restore_after_s=300))
    h.event(*THERMAL, "warning", T0 + 1)
    assert h.requests[0].params["power_limit_w"] == 350.0
    h.state(T0 + 2, HOT)
    h.result()
    h.state(T0 + 60, limit_w=280.0)
    assert h.log()[-1] == ("throttle_gpu", "verified", None)
    busy = (("sus", "gpu_hang", "warning"),)
    h.state(T0 + 200, busy, limit_w=280.0)
    h.state(T0 + 361, busy, limit_w=280.0)
    assert h.log()[-1] == ("restore_power_limit", "started", None)
    assert h.requests[-1].params["restore_limit_w"] == 350.0
    h.result()
    h.state(T0 + 365, busy, limit_w=280.0)
    assert h.log()[-1] == ("restore_power_limit", "succeeded", None)
    h.state(T0 + 366, busy, limit_w=350.0)
    assert h.log()[-1] == ("restore_power_limit", "verified", None)
    assert h.policy.guard.throttled == {}


def test_a_restore_that_does_not_show_is_unresolved_and_tried_again() -> None:
    h = Harness(make_config(restore_after_s=100, cooldown_s=200, verify_window_s=60))
    h.event(*THERMAL, "warning", T0 + 1)
    h.state(T0 + 2, HOT)
    h.result()
    h.state(T0 + 10, limit_w=280.0)
    h.state(T0 + 111, limit_w=280.0)
    h.result()
    h.state(T0 + 180, limit_w=280.0)
    assert h.log()[-1] == ("restore_power_limit", "unresolved", "limit_not_restored")
    assert 0 in h.policy.guard.throttled
    h.state(T0 + 312, limit_w=280.0)
    assert h.log()[-1] == ("restore_power_limit", "started", None)
    assert h.actions[-1].attempt == 2


def test_the_limit_to_restore_survives_a_restart(tmp_path: Path) -> None:
    h = Harness(make_config(restore_after_s=100))
    h.event(*THERMAL, "warning", T0 + 1)
    path = tmp_path / "healer.json"
    save_guard_state(path, h.policy.guard)  # what the service writes before it acts
    again = Harness(make_config(restore_after_s=100), gpus=0,
                    guard=load_guard_state(path, HOST))
    again.wall.now = h.wall.now
    again._take(again.policy.resume())
    assert again.log() == [("throttle_gpu", "failed", "interrupted"),
                           ("restart_llm_service", "started", None)]
    again.result()
    again.state(T0 + 5, limit_w=280.0)  # healed; the throttle had been applied after all
    again.state(T0 + 110, limit_w=280.0)
    assert again.requests[-1].action == "restore_power_limit"
    assert again.requests[-1].params["restore_limit_w"] == 350.0


# --- a restart at any point ---------------------------------------------------------------------
def test_a_restart_keeps_incidents_and_verifications(tmp_path: Path) -> None:
    h = Harness()
    h.event(*OOM, "warning", T0 + 1)
    h.state(T0 + 1, ((*OOM, "warning"),))
    h.result()  # verifying now
    path = tmp_path / "healer.json"
    save_guard_state(path, h.policy.guard)
    again = Harness(gpus=0, guard=load_guard_state(path, HOST))
    again.wall.now = h.wall.now
    again._take(again.policy.resume())
    assert again.actions == []  # nothing was interrupted
    assert again.phase("e-oom") == Phase.VERIFYING
    again.state(T0 + 130, ((*OOM, "warning"),), retained=True)
    again.state(T0 + 130, ((*OOM, "warning"),))
    assert again.log() == [("clear_llm_cache", "unresolved", "not_cleared"),
                           ("reset_gpu_session", "started", None)]


def test_an_event_missed_while_away_is_rebuilt_from_the_retained_state() -> None:
    """Defect 5: the Event was published while the healer was disconnected; the retained
    State lists the condition: the healer decides it."""
    h = Harness()
    h.state(T0 + 10, (("missed", "thermal_throttling", "critical"),), retained=True)
    assert h.log() == [("restart_llm_service", "started", None)]
    h.event("missed", "thermal_throttling", "critical", T0 + 5)  # late redelivery: once only
    assert len(h.log()) == 1


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
    assert [(i.event_id, i.phase) for i in state.incidents] == [("hang", "needs_human")]
    again.event("hang", "gpu_hang", "critical", T0 + 3)  # redelivered after the restart
    assert again.actions == []


def test_corrupt_state_file_is_kept_aside(tmp_path: Path) -> None:
    path = tmp_path / "healer.json"
    path.write_text("{not json")
    state = load_guard_state(path, HOST)
    assert state.breaker_open is False
    assert (tmp_path / "healer.json.corrupt").read_text() == "{not json"


def test_a_version_1_state_file_still_loads(tmp_path: Path) -> None:
    path = tmp_path / "v1.json"
    path.write_text('{"version": 1, "host": "node1", "breaker_open": true, "clock_ts": 1000.0,'
                    ' "cooldowns": [{"index": 0, "action": "throttle_gpu", "until_ts": 1300}],'
                    ' "throttled": {"0": {"event_id": "e", "restores": 0}}}')
    h = Harness(guard=load_guard_state(path, HOST), gpus=0)
    assert h.policy.guard.breaker_open and h.policy.now() == 1000.0
    assert h.policy.guard.throttled[0].restore_limit_w is None


def test_ladder_validation() -> None:
    with pytest.raises(ValueError, match="climb"):
        HealerConfig.model_validate({"ladders": {"out_of_memory": [
            {"action": "reset_gpu_session", "min_severity": "critical"},
            {"action": "clear_llm_cache", "min_severity": "warning"}]}})
    with pytest.raises(ValueError, match="unknown condition kind"):
        HealerConfig.model_validate({"ladders": {"oom": []}})
    with pytest.raises(ValueError, match="only destructive"):
        make_config(destructive_opt_in=["clear_llm_cache"])
