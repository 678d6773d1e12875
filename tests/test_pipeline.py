"""The whole pipeline from one command: `gpuheal up` on the simulated GPU, closed loop.

Real processes (gpuheal up and its four components, a private Mosquitto it starts), a real
SQLite file, stopped with a real SIGINT. Event time runs 20x faster than the wall clock.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
from pathlib import Path

import pytest

from gpuheal.broker import free_port, port_answers
from gpuheal.broker_init import read_env_file
from gpuheal.models import Action, DeadLetter, Event, HealerState, Sample, SimCommand, State
from gpuheal.topics import Topics
from gpuheal.wire import PayloadError, decode
from tests.support import Collector, Received, wait_for

MODELS = {"sample": Sample, "state": State, "event": Event, "action": Action,
          "sim": SimCommand, "healer_state": HealerState, "deadletter": DeadLetter}


def check_wire_contract(topics: Topics, messages: list[Received]) -> dict[str, int]:
    """Every message under the prefix is a valid message of its topic; returns counts."""
    counts: dict[str, int] = {}
    for m in messages:
        parts = topics.parse(m.topic)
        assert parts is not None, f"unknown topic on the wire: {m.topic}"
        counts[parts.kind] = counts.get(parts.kind, 0) + 1
        if parts.kind == "status":
            assert m.payload in (b"online", b"offline"), m
            continue
        model = MODELS.get(parts.kind)
        assert model is not None, f"unexpected message kind {parts.kind} on {m.topic}"
        try:
            msg = decode(model, m.payload)
        except PayloadError as exc:
            pytest.fail(f"{m.topic}: {exc.reason}: {m.payload[:300]!r}")
        if parts.index is not None and hasattr(msg, "index"):
            assert msg.index == parts.index and msg.host == parts.host, m.topic
    return counts


def verified(messages: list[Received], action: str) -> bool:
    return any(m.topic.endswith("/action") and m.json()["action"] == action
               and m.json()["status"] == "verified" for m in messages)


@pytest.mark.timeout(240)
def test_up_heals_the_demo_with_verified_actions(tmp_path: Path, gpuheal_cmd: list[str]) -> None:
    port = free_port()
    prefix = "gpuheal"
    db = tmp_path / "demo.db"
    state_dir = tmp_path / "state"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for var in ("GPUHEAL_BROKER", "GPUHEAL_PREFIX", "GPUHEAL_HOST", "GPUHEAL_CONFIG"):
        env.pop(var, None)
    log = (tmp_path / "up.log").open("wb")
    up = subprocess.Popen(
        [*gpuheal_cmd, "up", "--broker", f"mqtt://127.0.0.1:{port}", "--source", "sim",
         "--scenario", "demo", "--speed", "20", "--db", str(db), "--host-name", "demo-host",
         "--state-dir", str(state_dir), "--log-level", "WARNING"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        viewer_env = state_dir / "broker" / "viewer.env"
        wait_for(viewer_env.exists, 30, "the private broker's credentials")
        viewer_url = read_env_file(viewer_env)["GPUHEAL_BROKER"]
        wait_for(lambda: port_answers("127.0.0.1", port), 30, "the private broker")
        watch = Collector(viewer_url, [f"{prefix}/#"]).start()
        try:
            watch.wait(lambda ms: all(verified(ms, a) for a in
                                      ("clear_llm_cache", "throttle_gpu", "reset_gpu")),
                       timeout_s=150, what="verified clear_llm_cache, throttle_gpu, reset_gpu")
        finally:
            watch.stop()
        messages = watch.snapshot()
        counts = check_wire_contract(Topics(prefix), messages)
        assert counts.get("sample", 0) > 100 and counts.get("state", 0) > 100
        events = [m.json() for m in messages if m.topic.endswith("/event")]
        phases = {(e["kind"], e["phase"]) for e in events}
        for kind in ("out_of_memory", "thermal_throttling", "gpu_hang"):
            assert (kind, "raised") in phases and (kind, "cleared") in phases, phases
        retained = Collector(viewer_url, [f"{prefix}/demo-host/gpu/0/state"]).start()
        try:
            state = retained.wait(lambda ms: [m for m in ms if m.retain], 10,
                                  "a retained State")[0].json()
        finally:
            retained.stop()
        assert state["host"] == "demo-host" and state["index"] == 0
        statuses = Collector(viewer_url, [f"{prefix}/+/+/status"]).start()
    finally:
        os.killpg(up.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        code = up.wait(30)
        log.close()
    assert code == 0, (tmp_path / "up.log").read_text()[-3000:]
    # Each component said goodbye through the broker before `up` stopped it.
    offline = {m.topic.split("/")[2] for m in statuses.snapshot() if m.payload == b"offline"}
    statuses.stop()
    assert offline == {"publisher", "analyzer", "healer", "recorder", "dashboard"}, offline
    assert "killing" not in (tmp_path / "up.log").read_text()

    with sqlite3.connect(db) as con:
        samples = con.execute("select count(*) from samples").fetchone()[0]
        event_rows = con.execute("select kind, phase from events").fetchall()
        actions = con.execute("select action, status from actions").fetchall()
    assert samples > 100
    assert ("gpu_hang", "raised") in event_rows or ("gpu_hang", "escalated") in event_rows
    for action in ("clear_llm_cache", "throttle_gpu", "reset_gpu"):
        assert (action, "verified") in actions, actions
    # The private broker went with it.
    assert not port_answers("127.0.0.1", port)

