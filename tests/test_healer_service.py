"""The healer service through a real Mosquitto: every guard on the wire.

States and Events are crafted and published with paho; the Actions, the retained HealerState,
the simulator commands and the dead letters are collected with a real subscriber. Event time
is driven by the ``ts`` of the published States, so nothing waits for real time to pass.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gpuheal.config import GpuhealConfig
from gpuheal.models import (
    ActiveCondition,
    Event,
    HealerState,
    Power,
    SimCommand,
    State,
    iso_utc,
)
from gpuheal.options import CommonOptions, HealerOptions
from gpuheal.topics import Topics
from healer.service import run
from tests.support import FIXTURES, Collector, publish, wait_for

HOST = "hA"
T0 = 1_700_000_000.0
RECORD_ARGV = str(FIXTURES / "bin" / "record-argv")


class Wire:
    """Publishes crafted messages for one prefix and reads what the healer said."""

    def __init__(self, url: str, prefix: str, collector: Collector) -> None:
        self.url = url
        self.topics = Topics(prefix)
        self.col = collector

    def state(self, ts: float, active: tuple[tuple[str, str, str], ...] = (),
              index: int = 0) -> None:
        state = State(host=HOST, index=index, name="NVIDIA H100 80GB HBM3",
                      health="warning" if active else "healthy", timestamp=iso_utc(ts), ts=ts,
                      power=Power(draw_w=250.0, limit_w=300.0),
                      active=[ActiveCondition(event_id=e, kind=k, severity=s, started_ts=ts)
                              for e, k, s in active])
        publish(self.url, self.topics.state(HOST, index), state.to_json(), retain=True)

    def event(self, event_id: str, kind: str, severity: str, ts: float,
              phase: str = "raised", index: int = 0) -> None:
        event = Event(event_id=event_id, host=HOST, index=index, kind=kind, severity=severity,
                      phase=phase, started_ts=T0, ts=ts, message=f"{kind} {severity}")
        self.raw_event(event.to_json(), index)

    def raw_event(self, payload: bytes, index: int = 0) -> None:
        publish(self.url, self.topics.event(HOST, index), payload)

    def set(self, **command: Any) -> None:
        publish(self.url, self.topics.healer_set(HOST), json.dumps({"v": 1, **command}))

    def actions(self) -> list[dict[str, Any]]:
        return self.col.payloads("/action")

    def log(self) -> list[tuple[str, str, str | None]]:
        return [(a["action"], a["status"], a["reason"]) for a in self.actions()]

    def wait_log(self, predicate: Callable[[list[tuple[str, str, str | None]]], Any],
                 what: str, timeout_s: float = 10.0) -> list[tuple[str, str, str | None]]:
        wait_for(lambda: predicate(self.log()), timeout_s, what)
        return self.log()

    def wait_action(self, entry: tuple[str, str, str | None], count: int = 1) -> None:
        self.wait_log(lambda log: log.count(entry) >= count, f"{count} x {entry}")

    def healer_state(self) -> HealerState | None:
        states = self.col.payloads("/healer/state")
        return HealerState.model_validate(states[-1]) if states else None

    def wait_healer_state(self, predicate: Callable[[HealerState], bool], what: str) -> None:
        wait_for(lambda: (s := self.healer_state()) is not None and predicate(s), 10, what)

    def wait_online(self, count: int = 1) -> None:
        wait_for(lambda: [m.text for m in self.col.on("/healer/status")].count("online")
                 >= count, 10, f"healer online ({count})")

    def marker(self, n: int) -> None:
        """An event for a GPU the healer has never seen: its skip proves all before it were
        handled (one healer thread handles messages in order)."""
        self.event(f"marker{n}", "out_of_memory", "warning", T0, index=90 + n)
        self.wait_action(("clear_llm_cache", "skipped", "unknown_gpu"), count=n)


class RunningHealer:
    """healer.service.run in a thread, stopped through its stop Event."""

    def __init__(self, opts: HealerOptions) -> None:
        self.stop_event = threading.Event()
        self.rc: int | None = None

        def target() -> None:
            self.rc = run(opts, self.stop_event)

        self.thread = threading.Thread(target=target, name="healer-under-test", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(15)
        assert not self.thread.is_alive(), "the healer did not stop"
        assert self.rc == 0


@pytest.fixture
def wire(broker: Any, prefix: str) -> Iterator[Wire]:
    with Collector(broker.url, f"{prefix}/#") as col:
        yield Wire(broker.url, prefix, col)


@pytest.fixture
def start_healer(broker: Any, prefix: str, tmp_path: Path,
                 wire: Wire) -> Iterator[Callable[..., RunningHealer]]:
    running: list[RunningHealer] = []

    def start(source: str = "sim", dry_run: bool = False, allow: tuple[str, ...] = (),
              state_file: Path | None = None, actuators: dict[str, Any] | None = None,
              online: int = 1, **guards: Any) -> RunningHealer:
        # crafted States jump event time ahead faster than any real source: no clock steps
        guards = {"clock_step_min_s": 1e9, **guards}
        config = GpuhealConfig.model_validate(
            {"healer": {"guards": guards, "actuators": actuators or {}}})
        common = CommonOptions(broker=broker.url, prefix=prefix, host_name=HOST, config=config)
        opts = HealerOptions(common=common, source=source, dry_run=dry_run, allow=list(allow),
                             state_file=state_file or tmp_path / "healer-state.json")
        healer = RunningHealer(opts)
        running.append(healer)
        wire.wait_online(online)
        return healer

    yield start
    for healer in running:
        if healer.thread.is_alive():
            healer.stop()


OOM = "out_of_memory"
ACTIVE_OOM = (("oom1", OOM, "warning"),)


def test_closed_loop_on_the_simulated_gpu(wire: Wire, start_healer: Callable) -> None:
    start_healer()
    wire.wait_healer_state(lambda s: s.enabled and not s.breaker_open, "healer state")
    wire.state(T0, ACTIVE_OOM)
    wire.event("oom1", OOM, "warning", T0)
    wire.wait_action(("clear_llm_cache", "succeeded", None))
    sims = wire.col.payloads("/sim")
    assert [SimCommand.model_validate(s).command for s in sims] == ["unload_models"]
    wire.state(T0 + 5)  # the condition is gone
    log = wire.wait_log(lambda log: ("clear_llm_cache", "verified", None) in log, "verified")
    assert log == [("clear_llm_cache", "started", None), ("clear_llm_cache", "succeeded", None),
                   ("clear_llm_cache", "verified", None)]
    actions = wire.actions()
    assert len({a["action_id"] for a in actions}) == 1 and sims[0]["action_id"] == \
        actions[0]["action_id"]
    assert all(m.qos == 1 for m in wire.col.on("/action"))
    retained = [m for m in wire.col.on("/healer/state")]
    assert retained and all(m.qos == 1 for m in retained)
    wire.wait_healer_state(lambda s: s.budget_left == s.budget_per_hour - 1
                           and [(c.index, c.action) for c in s.cooldowns]
                           == [(0, "clear_llm_cache")], "budget and cooldown published")


def test_cooldown(wire: Wire, start_healer: Callable) -> None:
    start_healer(cooldown_s=600)
    wire.state(T0, ACTIVE_OOM)
    wire.event("oom1", OOM, "warning", T0)
    wire.wait_action(("clear_llm_cache", "succeeded", None))
    wire.state(T0 + 5)
    wire.wait_action(("clear_llm_cache", "verified", None))
    wire.state(T0 + 100, (("oom2", OOM, "warning"),))
    wire.event("oom2", OOM, "warning", T0 + 100)
    wire.wait_action(("clear_llm_cache", "skipped", "cooldown"))
    wire.state(T0 + 700, (("oom3", OOM, "warning"),))  # the cooldown is over
    wire.event("oom3", OOM, "warning", T0 + 700)
    wire.wait_action(("clear_llm_cache", "started", None), count=2)


def test_budget(wire: Wire, start_healer: Callable) -> None:
    start_healer(budget_per_hour=1)
    wire.state(T0, ACTIVE_OOM)
    wire.event("oom1", OOM, "warning", T0)
    wire.wait_action(("clear_llm_cache", "succeeded", None))
    wire.state(T0 + 5)
    wire.wait_action(("clear_llm_cache", "verified", None))
    wire.event("hot1", "thermal_throttling", "warning", T0 + 10)
    wire.wait_action(("throttle_gpu", "skipped", "budget_exhausted"))
    wire.wait_healer_state(lambda s: s.budget_left == 0, "budget_left 0")
    assert wire.col.payloads("/sim") and len(wire.col.payloads("/sim")) == 1


def test_breaker_opens_and_only_a_person_closes_it(wire: Wire, start_healer: Callable) -> None:
    start_healer(breaker_threshold=1, verify_window_s=60)
    hang = (("hang1", "gpu_hang", "critical"),)
    wire.state(T0, hang)
    wire.event("hang1", "gpu_hang", "critical", T0)
    wire.wait_action(("reset_gpu", "succeeded", None))
    wire.state(T0 + 61, hang)  # still hung after the verification window
    log = wire.wait_log(lambda log: ("notify", "skipped", "ladder_exhausted") in log,
                        "ladder exhausted")
    assert ("reset_gpu", "unresolved", "not_cleared") in log
    wire.wait_healer_state(lambda s: s.breaker_open and s.unresolved_count == 1,
                           "breaker open")
    wire.event("oom1", OOM, "warning", T0 + 70)
    wire.event("hot1", "thermal_throttling", "critical", T0 + 71)
    wire.wait_action(("clear_llm_cache", "skipped", "breaker_open"))
    wire.wait_action(("restart_llm_service", "skipped", "breaker_open"))
    wire.set(reset_breaker=False)  # invalid: only true resets; dead-lettered
    wire.col.wait(lambda msgs: any(m.topic.endswith("/deadletter/healer") for m in msgs),
                  what="dead letter for reset_breaker false")
    assert wire.healer_state() is not None and wire.healer_state().breaker_open
    wire.set(reset_breaker=True)
    wire.wait_healer_state(lambda s: not s.breaker_open and s.unresolved_count == 0,
                           "breaker closed")
    wire.event("hot1", "thermal_throttling", "emergency", T0 + 80, phase="escalated")
    wire.wait_action(("stop_llm_service", "started", None))  # sim: destructive opted in


def test_pause_and_resume(wire: Wire, start_healer: Callable) -> None:
    start_healer()
    wire.state(T0)
    wire.set(enabled=False)
    wire.wait_healer_state(lambda s: not s.enabled, "paused state")
    wire.event("oom1", OOM, "warning", T0 + 1)
    wire.wait_action(("clear_llm_cache", "skipped", "paused"))
    wire.set(enabled=True)
    wire.wait_healer_state(lambda s: s.enabled, "enabled state")
    wire.event("hot1", "thermal_throttling", "warning", T0 + 2)
    wire.wait_action(("throttle_gpu", "succeeded", None))
    sim = SimCommand.model_validate(wire.col.payloads("/sim")[-1])
    assert (sim.command, sim.power_limit_w) == ("set_power_limit", 240.0)


def test_dry_run(wire: Wire, start_healer: Callable) -> None:
    start_healer(dry_run=True)
    wire.wait_healer_state(lambda s: s.dry_run, "dry-run state")
    wire.state(T0, ACTIVE_OOM)
    wire.event("oom1", OOM, "warning", T0)
    wire.wait_action(("clear_llm_cache", "dry_run", None))
    wire.marker(1)
    assert wire.log() == [("clear_llm_cache", "dry_run", None),
                          ("clear_llm_cache", "skipped", "unknown_gpu")]
    assert wire.col.payloads("/sim") == []


def test_destructive_actions_need_an_opt_in(wire: Wire, start_healer: Callable,
                                            tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    record = tmp_path / "argv.jsonl"
    monkeypatch.setenv("RECORD_ARGV_FILE", str(record))
    commands = {"stop_llm_service": [RECORD_ARGV, "stop", "ollama"],
                "restart_llm_service": [RECORD_ARGV, "restart", "ollama"]}
    healer = start_healer(source="auto", actuators=commands,
                          state_file=tmp_path / "one.json")
    wire.state(T0)
    wire.event("hot1", "thermal_throttling", "emergency", T0 + 1)
    wire.wait_action(("stop_llm_service", "skipped", "not_opted_in"))
    healer.stop()
    assert not record.exists()

    start_healer(source="auto", actuators=commands, allow=("stop_llm_service",),
                 state_file=tmp_path / "two.json", online=2)
    wire.event("hot2", "thermal_throttling", "emergency", T0 + 2)
    wire.wait_action(("stop_llm_service", "succeeded", None))
    assert [json.loads(line)[1:] for line in record.read_text().splitlines()] == [
        ["stop", "ollama"]]
    done = next(a for a in wire.actions() if a["status"] == "succeeded")
    assert done["detail"]["argv"][1:] == ["stop", "ollama"] and done["duration_s"] > 0


def test_unknown_allow_is_refused(prefix: str, broker: Any, tmp_path: Path) -> None:
    common = CommonOptions(broker=broker.url, prefix=prefix, host_name=HOST)
    opts = HealerOptions(common=common, allow=["format_disk"], state_file=tmp_path / "s.json")
    assert run(opts, threading.Event()) == 2


def test_restart_keeps_cooldowns_and_breaker(wire: Wire, start_healer: Callable,
                                             tmp_path: Path) -> None:
    state_file = tmp_path / "persist" / "healer-hA.json"
    first = start_healer(state_file=state_file, breaker_threshold=1, cooldown_s=1000)
    wire.state(T0, ACTIVE_OOM)
    wire.event("oom1", OOM, "warning", T0)
    wire.wait_action(("clear_llm_cache", "succeeded", None))
    wire.state(T0 + 5)
    wire.wait_action(("clear_llm_cache", "verified", None))
    wire.event("hang1", "gpu_hang", "critical", T0 + 6)
    wire.wait_action(("reset_gpu", "succeeded", None))
    wire.state(T0 + 200, (("hang1", "gpu_hang", "critical"),))
    wire.wait_action(("notify", "skipped", "ladder_exhausted"))
    first.stop()
    saved = json.loads(state_file.read_text())
    assert saved["breaker_open"] is True and saved["host"] == HOST

    start_healer(state_file=state_file, breaker_threshold=1, cooldown_s=1000, online=2)
    wire.event("oom2", OOM, "warning", T0 + 210)
    wire.wait_action(("clear_llm_cache", "skipped", "breaker_open"))
    wire.set(reset_breaker=True)
    wire.wait_healer_state(lambda s: not s.breaker_open, "breaker closed")
    wire.event("oom3", OOM, "warning", T0 + 220)
    wire.wait_action(("clear_llm_cache", "skipped", "cooldown"))
    wire.wait_healer_state(lambda s: any(c.action == "clear_llm_cache" for c in s.cooldowns),
                           "cooldown still published")
    wire.event("oom1", OOM, "warning", T0)  # redelivered after the restart: nothing
    wire.marker(1)
    assert wire.log().count(("clear_llm_cache", "started", None)) == 1


def test_duplicate_event_acts_once(wire: Wire, start_healer: Callable) -> None:
    start_healer()
    wire.state(T0, ACTIVE_OOM)
    for _ in range(3):
        wire.event("oom1", OOM, "warning", T0)
    wire.marker(1)
    wire.wait_action(("clear_llm_cache", "succeeded", None))
    assert wire.log().count(("clear_llm_cache", "started", None)) == 1
    assert len(wire.col.payloads("/sim")) == 1


def test_malformed_input_is_dead_lettered_never_acted_on(wire: Wire,
                                                        start_healer: Callable) -> None:
    start_healer()
    wire.state(T0, ACTIVE_OOM)
    good = json.loads(Event(event_id="oom1", host=HOST, index=0, kind=OOM, severity="warning",
                            phase="raised", started_ts=T0, ts=T0, message="m").to_json())
    bad_payloads = [
        b"{not json",
        json.dumps({**good, "severity": "apocalyptic"}).encode(),
        json.dumps({**good, "ts": "soon"}).encode(),
        b'{"v": 1, "event_id": "x", "ts": NaN}',
        json.dumps({**good, "index": 3}).encode(),  # the topic says GPU 0
        "\udcff".encode("utf-8", "surrogatepass"),
    ]
    for payload in bad_payloads:
        wire.raw_event(payload)
    publish(wire.url, wire.topics.state(HOST, 0), b"[1, 2]")
    publish(wire.url, wire.topics.healer_set(HOST), b'{"enabled": "maybe"}')
    wire.marker(1)
    letters = wire.col.wait(
        lambda msgs: (found := [m.json() for m in msgs if m.topic.endswith(
            "/deadletter/healer")]) and len(found) >= len(bad_payloads) + 2 and found,
        what="dead letters")
    assert {d["component"] for d in letters} == {"healer"}
    assert wire.log() == [("clear_llm_cache", "skipped", "unknown_gpu")]
    assert wire.col.payloads("/sim") == []
    wire.wait_healer_state(lambda s: s.enabled, "still enabled")


def test_cli_healer_subprocess_stops_cleanly_on_sigint(wire: Wire, broker: Any, prefix: str,
                                                       tmp_path: Path,
                                                       gpuheal_cmd: list[str]) -> None:
    state_file = tmp_path / "cli" / "healer.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUHEAL_")}
    proc = subprocess.Popen(
        [*gpuheal_cmd, "healer", "--broker", broker.url, "--prefix", prefix, "--host-name",
         HOST, "--source", "sim", "--state-file", str(state_file)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wire.wait_online()
        wire.state(T0, ACTIVE_OOM)
        wire.event("oom1", OOM, "warning", T0)
        wire.wait_action(("clear_llm_cache", "succeeded", None))
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, out.decode()[-2000:]
    assert b"every destructive action is opted in" in out
    wire.col.wait(lambda msgs: [m.text for m in msgs if m.topic.endswith("/healer/status")][-1]
                  == "offline", what="offline status")
    saved = json.loads(state_file.read_text())
    assert "oom1|raised|warning" in saved["handled"] and saved["budget_ts"] == [T0]
