"""Killing the healer at any point of an incident loses no incident and leaves no action
without a final status; an Event missed while disconnected is still healed (the retained
State lists the condition). The real analyzer, healer and simulated GPU on a real Mosquitto;
the healer is a real process killed with SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from gpuheal.config import GpuhealConfig
from gpuheal.models import ActiveCondition, Event, State, iso_utc
from gpuheal.options import CommonOptions, HealerOptions
from gpuheal.runtime import Component
from gpuheal.topics import Topics
from healer.service import HealerService
from tests.support import Collector, publish, wait_for

FINAL = {"verified", "unresolved", "failed", "skipped", "dry_run", "acknowledged"}


def spawn(cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUHEAL_")}
    return subprocess.Popen(cmd, env=env | {"PYTHONUNBUFFERED": "1"}, stdout=log.open("ab"),
                            stderr=subprocess.STDOUT)


def lives(actions: list[dict[str, Any]]) -> dict[str, list[str]]:
    by_id: dict[str, list[str]] = defaultdict(list)
    for a in actions:
        by_id[a["action_id"]].append(a["status"])
    return by_id


@pytest.mark.timeout(180)
@pytest.mark.parametrize("kill_after", ["started", "succeeded"])
def test_killing_the_healer_loses_no_incident_and_no_outcome(
        broker, prefix: str, tmp_path: Path, gpuheal_cmd: list[str], kill_after: str) -> None:
    common = ["--broker", broker.url, "--prefix", prefix, "--host-name", "dur"]
    state_file = tmp_path / "healer.json"
    healer_cmd = [*gpuheal_cmd, "healer", *common, "--source", "sim", "--state-file",
                  str(state_file)]
    procs = [spawn([*gpuheal_cmd, "analyzer", *common], tmp_path / "analyzer.log")]
    healer = spawn(healer_cmd, tmp_path / "healer.log")
    try:
        with Collector(broker.url, f"{prefix}/#") as watch:
            watch.wait(lambda ms: {m.topic.split("/")[2] for m in ms if m.payload == b"online"}
                       >= {"analyzer", "healer"}, 30, "analyzer and healer online")
            procs.append(spawn([*gpuheal_cmd, "publisher", *common, "--source", "sim",
                                "--scenario", "oom", "--speed", "20"], tmp_path / "pub.log"))
            watch.wait(lambda _: any(a["status"] == kill_after
                                     for a in watch.payloads("/action")), 90,
                       f"the first action {kill_after}")
            healer.send_signal(signal.SIGKILL)  # no goodbye, no last save
            healer.wait(10)
            healer = spawn(healer_cmd, tmp_path / "healer.log")
            watch.wait(lambda _: ("reset_gpu_session", "verified") in
                       {(a["action"], a["status"]) for a in watch.payloads("/action")}, 120,
                       "the incident healed by the ladder after the restart")
            actions = watch.payloads("/action")
        for action_id, statuses in lives(actions).items():
            assert FINAL & set(statuses), (action_id, statuses)  # every action ended
        oom = {a["event_id"] for a in actions if a["detail"].get("kind") == "out_of_memory"}
        assert len(oom) == 1  # one incident, continued (not forgotten, not doubled)
        started = [a for a in actions if a["status"] == "started"]
        assert len({a["action_id"] for a in started}) == len(started)  # nothing ran twice
    finally:
        for p in [*procs, healer]:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in [*procs, healer]:
            p.wait(20)


def test_an_event_missed_while_disconnected_is_healed_from_the_retained_state(
        broker, prefix: str, tmp_path: Path) -> None:
    t = Topics(prefix)
    ts = 1_700_000_000.0
    config = GpuhealConfig.model_validate({"healer": {"guards": {"clock_step_min_s": 1e9}}})
    common = CommonOptions(broker=broker.url, prefix=prefix, host_name="rc", config=config)
    service = HealerService(HealerOptions(common=common, source="sim",
                                          state_file=tmp_path / "h.json"))
    component = Component(service, common)
    healthy = State(host="rc", index=0, health="healthy", timestamp=iso_utc(ts), ts=ts,
                    source="sim")
    publish(broker.url, t.state("rc", 0), healthy.to_json(), retain=True)
    with Collector(broker.url, t.gpu_pattern("action", "rc")) as actions:
        assert component.start(wait_s=10)
        try:
            wait_for(lambda: 0 in service.policy.gpus, 10, "the first State")
            reconnected = service.bus.stats.connects + 1  # type: ignore[union-attr]
            service.bus.client._sock_close()  # type: ignore[union-attr] # a network drop
            hot = ActiveCondition(event_id="missed", kind="thermal_throttling",
                                  severity="critical", started_ts=ts + 5)
            publish(broker.url, t.event("rc", 0), Event(
                event_id="missed", host="rc", index=0, kind="thermal_throttling",
                severity="critical", phase="raised", started_ts=ts + 5, ts=ts + 5,
                message="too hot").to_json())  # nobody hears it
            publish(broker.url, t.state("rc", 0), healthy.model_copy(update={
                "ts": ts + 5, "health": "critical", "active": [hot]}).to_json(), retain=True)
            wait_for(lambda: service.bus.stats.connects >= reconnected, 15,  # type: ignore[union-attr]
                     "the reconnect")
            actions.wait(lambda _: ("restart_llm_service", "started") in
                         {(a["action"], a["status"]) for a in actions.payloads("/action")},
                         15, "the missed condition decided from the retained State")
        finally:
            component.stop()
