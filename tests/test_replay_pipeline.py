"""Record an incident through the real pipeline, then read it back and replay it.

`history`, `export` and `replay` work on the recorded file alone, and a replay at any speed
makes a fresh analyzer produce the same event ids as the first time.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
from pathlib import Path

import pytest

from gpuheal.models import make_event_id
from tests.support import Collector, wait_for

HOST = "rec-host"


def spawn(cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for var in ("GPUHEAL_BROKER", "GPUHEAL_PREFIX", "GPUHEAL_HOST", "GPUHEAL_CONFIG"):
        env.pop(var, None)
    return subprocess.Popen(cmd, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)


def stop_all(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        assert p.wait(20) == 0


def hang_events(db: Path) -> list[tuple[str, str]]:
    if not db.exists():
        return []
    with sqlite3.connect(db) as con:
        return con.execute("select event_id, phase from events where kind = 'gpu_hang' "
                           "order by ts, phase").fetchall()


def actions(db: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(db) as con:
        return con.execute("select action, status from actions").fetchall()


@pytest.mark.timeout(180)
def test_record_history_export_and_replay_give_the_same_event_ids(
        fresh_broker, tmp_path: Path, gpuheal_cmd: list[str]) -> None:
    url = fresh_broker.url
    db = tmp_path / "incident.db"
    common = ["--broker", url, "--prefix", "live", "--host-name", HOST]
    procs = [
        spawn([*gpuheal_cmd, "recorder", *common, "--db", str(db)], tmp_path / "rec.log"),
        spawn([*gpuheal_cmd, "analyzer", *common], tmp_path / "ana.log"),
        spawn([*gpuheal_cmd, "healer", *common, "--source", "sim",
               "--state-file", str(tmp_path / "healer.json")], tmp_path / "heal.log"),
    ]
    with Collector(url, "live/+/+/status") as status:
        status.wait(lambda ms: {m.topic.split("/")[2] for m in ms if m.payload == b"online"}
                    >= {"recorder", "analyzer", "healer"}, 30, "components online")
    procs.append(spawn([*gpuheal_cmd, "publisher", *common, "--source", "sim", "--scenario",
                        "hang", "--speed", "40"], tmp_path / "pub.log"))
    wait_for(lambda: {p for _, p in hang_events(db)} >= {"raised", "cleared"}, 90,
             "the hang raised and cleared in the recording")
    wait_for(lambda: ("reset_gpu", "verified") in actions(db), 30, "the verified reset recorded")
    stop_all(procs)
    recorded = hang_events(db)
    recorded_ids = {e for e, _ in recorded}
    assert len(recorded_ids) == 1

    history = subprocess.run([*gpuheal_cmd, "history", "--db", str(db), "--since", "1000d"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    assert "gpu_hang" in history and "reset_gpu" in history and "verified" in history

    export = subprocess.run([*gpuheal_cmd, "export", "--db", str(db), "--table", "events",
                             "--format", "jsonl"], capture_output=True, text=True,
                            timeout=30, check=True).stdout
    rows = [json.loads(line) for line in export.splitlines()]
    assert {r["event_id"] for r in rows if r["kind"] == "gpu_hang"} == recorded_ids

    # A replay speaks as its own host (HOST-replay) unless told otherwise; under the recorded
    # name it gives the very same event ids, at any speed.
    started = {e: ts for e, ts in _started(db)}
    for prefix, speed, as_host in (("replay1", "50", None), ("replay2", "200", HOST)):
        analyzer = spawn([*gpuheal_cmd, "analyzer", "--broker", url, "--prefix", prefix],
                         tmp_path / f"{prefix}.log")
        host = as_host or f"{HOST}-replay"
        expected = {(make_event_id(host, 0, "gpu_hang", started[e]), phase)
                    for e, phase in recorded}
        with Collector(url, [f"{prefix}/+/gpu/+/event", f"{prefix}/+/analyzer/status"]) as c:
            c.wait(lambda ms: any(m.payload == b"online" for m in ms), 30, "analyzer online")
            replay = subprocess.run(
                [*gpuheal_cmd, "replay", "--db", str(db), "--broker", url, "--prefix", prefix,
                 "--speed", speed, *(["--host-name", as_host] if as_host else [])],
                capture_output=True, timeout=120)
            assert replay.returncode == 0, replay.stderr[-2000:]
            c.wait(lambda ms: {(e["event_id"], e["phase"]) for e in
                               (m.json() for m in ms if m.topic.endswith("/event"))
                               if e["kind"] == "gpu_hang"} >= expected,  # noqa: B023
                   30, f"the recorded hang's events again at speed {speed}")
            replayed = [m.json() for m in c.on("/event")]
        stop_all([analyzer])
        assert {e["host"] for e in replayed} == {host}
        assert not any(e["cleared_by"] == "source_restarted" for e in replayed)
    assert {e for e, _ in expected} == recorded_ids  # under the recorded name: the same ids


def _started(db: Path) -> list[tuple[str, float]]:
    with sqlite3.connect(db) as con:
        return con.execute("select distinct event_id, started_ts from events "
                           "where kind = 'gpu_hang'").fetchall()


def test_a_replay_never_speaks_for_a_live_host(fresh_broker, tmp_path: Path,
                                               gpuheal_cmd: list[str]) -> None:
    from gpuheal.models import Sample
    from gpuheal.records import TABLES
    from recorder.store import Store
    from tests.support import publish

    db = tmp_path / "r.db"
    store = Store(db)
    rows = [TABLES["samples"].row(Sample(host="live-1", index=0, source="nvml",
                                         ts=1.7e9 + i, seq=i), 1.7e9 + i) for i in range(3)]
    store.db["samples"].insert_all(rows)
    store.close()
    publish(fresh_broker.url, "p/live-1/publisher/status", b"online", retain=True)
    base = [*gpuheal_cmd, "replay", "--db", str(db), "--broker", fresh_broker.url,
            "--prefix", "p", "--speed", "100"]
    refused = subprocess.run([*base, "--host-name", "live-1"], capture_output=True,
                             text=True, timeout=60)
    assert refused.returncode == 2 and "is live" in refused.stderr, refused.stderr
    with Collector(fresh_broker.url, "p/+/gpu/+/sample") as seen:
        done = subprocess.run(base, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        seen.wait(lambda ms: len(ms) == 3, 10, "the replayed samples")
    assert {m.topic.split("/")[1] for m in seen.snapshot()} == {"live-1-replay"}
    forced = subprocess.run([*base, "--host-name", "live-1", "--force"], capture_output=True,
                            text=True, timeout=60)
    assert forced.returncode == 0, forced.stderr
