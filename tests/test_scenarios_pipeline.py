"""The simulated GPU's scenarios through publisher, analyzer and healer (real processes).

oom, thermal and hang end with verified actions in ladder order; a GPU saturated by healthy
work (noisy, pinned at its power cap, or sitting on a lowered cap) never gets a GPU reset.
Event time runs 50x faster than the wall.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.support import Collector

SPEED = "50"


@contextmanager
def pipeline(url: str, prefix: str, scenario: str, tmp_path: Path, cmd: list[str],
             count: int | None = None) -> Iterator[tuple[Collector, subprocess.Popen[bytes]]]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for var in ("GPUHEAL_BROKER", "GPUHEAL_PREFIX", "GPUHEAL_HOST", "GPUHEAL_CONFIG"):
        env.pop(var, None)
    common = ["--broker", url, "--prefix", prefix, "--host-name", "simhost",
              "--log-level", "WARNING"]

    def spawn(*args: str) -> subprocess.Popen[bytes]:
        log = (tmp_path / f"{args[0]}.log").open("wb")
        return subprocess.Popen([*cmd, *args, *common], env=env, stdout=log,
                                stderr=subprocess.STDOUT)

    procs = [spawn("analyzer"),
             spawn("healer", "--source", "sim", "--state-file", str(tmp_path / "h.json"))]
    with Collector(url, [f"{prefix}/#"]) as watch:
        watch.wait(lambda ms: {m.topic.split("/")[2] for m in ms if m.payload == b"online"}
                   >= {"analyzer", "healer"}, 30, "analyzer and healer online")
        extra = ["--count", str(count)] if count else []
        publisher = spawn("publisher", "--source", "sim", "--scenario", scenario,
                          "--speed", SPEED, *extra)
        procs.append(publisher)
        try:
            yield watch, publisher
        finally:
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            for p in procs:
                p.wait(20)


def action_log(watch: Collector) -> list[tuple[str, str]]:
    return [(a["action"], a["status"]) for a in watch.payloads("/action")]


def verified_actions(watch: Collector) -> list[str]:
    return [a for a, s in action_log(watch) if s == "verified"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("scenario", "ladder"),
    [
        ("oom", ["clear_llm_cache", "reset_gpu_session"]),
        ("thermal", ["throttle_gpu", "restart_llm_service"]),
        ("hang", ["reset_gpu"]),
    ],
)
def test_scenario_heals_in_ladder_order(broker, prefix: str, tmp_path: Path,
                                        gpuheal_cmd: list[str], scenario: str,
                                        ladder: list[str]) -> None:
    with pipeline(broker.url, prefix, scenario, tmp_path, gpuheal_cmd) as (watch, _):
        watch.wait(lambda _ms: ladder[-1] in verified_actions(watch), 90,
                   f"{ladder[-1]} verified in the {scenario} scenario")
        log = action_log(watch)
    started = [a for a, s in log if s == "started"]
    assert started[: len(ladder)] == ladder, log
    # Every rung below the last was tried and did not clear the condition.
    for rung in ladder[:-1]:
        assert (rung, "unresolved") in log, log
        assert log.index((rung, "unresolved")) < log.index((ladder[-1], "started"))
    assert verified_actions(watch)[0] == ladder[-1]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("scenario", ["healthy-busy", "healthy-capped", "healthy-throttled"])
def test_healthy_saturated_gpu_is_never_reset(broker, prefix: str, tmp_path: Path,
                                              gpuheal_cmd: list[str], scenario: str) -> None:
    """15 minutes of event time of a GPU saturated by healthy work: noisy (busy), pinned flat
    at its power cap with constant memory (capped), or sitting on the lower cap the healer's
    own throttle gave it (throttled): never a confirmed hang, never a reset."""
    rounds = 900  # 15 minutes of event time
    with pipeline(broker.url, prefix, scenario, tmp_path, gpuheal_cmd,
                  count=rounds) as (watch, publisher):
        assert publisher.wait(90) == 0
        samples = watch.wait(lambda _ms: len(watch.payloads("/sample")) == rounds and
                             watch.payloads("/sample"), 30, "every sample")
        last_ts = max(s["ts"] for s in samples)
        watch.wait(lambda _ms: any(s["ts"] == last_ts for s in watch.payloads("/gpu/0/state")),
                   30, "the analyzer's State of the last sample")
    states = watch.payloads("/gpu/0/state")
    assert max(s["utilization"] or 0 for s in states) >= 99.0  # it really was saturated
    if scenario == "healthy-throttled":  # the healer's own throttle put it on a lower cap
        assert ("throttle_gpu", "verified") in action_log(watch)
        assert min(s["power"]["limit_w"] for s in states) < 400.0
    events = watch.payloads("/event")
    hang = [e for e in events if e["kind"] == "gpu_hang"]
    assert all(e["severity"] == "warning" for e in hang), hang  # suspected, never confirmed
    log = action_log(watch)
    assert not [a for a in log if a[0] == "reset_gpu" and a[1] != "skipped"], log
    assert all(a["reason"] == "hang_unconfirmed" for a in watch.payloads("/action")
               if a["action"] == "reset_gpu")
