"""The whole pipeline with least privilege, and the attacks on it, against a real Mosquitto.

The broker is started from ``init_broker`` output (no anonymous access, per-identity ACL).
Each component is a real subprocess ``python -m gpuheal <component>`` whose only credentials
are its identity's env file (``GPUHEAL_BROKER`` from ``publisher.env`` ...). The simulated GPU
hangs (event time 20x faster than the wall clock) and the healer resets it.

Then, with the real components running:

* the publisher identity forges a critical ``gpu_hang`` event for the host's GPU 0: the broker
  drops it, the healer takes no action for it;
* the viewer identity writes ``healer/set {"enabled": false}``: the healer stays enabled;
* the analyzer identity (which may write events) forges one for a GPU the healer has never
  seen a State of: at most a ``skipped`` Action (``unknown_gpu``), never an actuator.

"Nothing happened" is proven with sentinels, never with sleeps: a refused publish and then an
allowed one go out on the same connection (QoS 1, so the broker has handled the refused one
when the allowed one is acknowledged and observed); then the operator toggles dry-run twice
and waits for each change in the retained ``healer/state``, so the healer's policy thread
has handled everything that reached it before.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from gpuheal.broker import PrivateBroker, free_port, start_broker
from gpuheal.broker_init import BrokerInit, init_broker, read_env_file
from gpuheal.models import Action, DeadLetter, Event, HealerState, Sample, SimCommand, State
from gpuheal.topics import Topics
from gpuheal.wire import PayloadError, decode
from tests.support import Collector, Received, Speaker, wait_for

pytestmark = pytest.mark.timeout(180)

REPO = Path(__file__).resolve().parent.parent
PREFIX = "secpipe"
HOST = "node1"
T = Topics(PREFIX)
COMPONENTS = ("publisher", "analyzer", "healer", "recorder")
HEAL_TIMEOUT_S = 90.0
"""Wall seconds for the simulated hang to be detected, reset and verified (about 10 s on a
fast machine: 60 s of healthy event time, then the hang, at 20x)."""
WIRE_MODELS: dict[str, Any] = {"sample": Sample, "state": State, "event": Event,
                               "action": Action, "sim": SimCommand,
                               "healer_state": HealerState, "deadletter": DeadLetter}


# --- the running pipeline ----------------------------------------------------------------
@dataclass
class Pipeline:
    """A secure broker, the four components as subprocesses, and a viewer watching it all."""

    init: BrokerInit
    broker: PrivateBroker
    workdir: Path
    db: Path
    watch: Collector
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    exit_codes: dict[str, int] = field(default_factory=dict)

    def url(self, identity: str) -> str:
        return self.init.urls[identity]

    def log(self, component: str) -> str:
        path = self.workdir / f"{component}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def logs(self) -> str:
        return "\n".join(f"--- {c} ---\n{self.log(c)}" for c in COMPONENTS)

    def assert_running(self) -> None:
        for name, proc in self.procs.items():
            assert proc.poll() is None, f"{name} exited with {proc.returncode}:\n{self.log(name)}"

    def stop_components(self) -> dict[str, int]:
        """SIGINT every component (a clean stop), wait, and return the exit codes."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for name, proc in self.procs.items():
            try:
                self.exit_codes[name] = proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                self.exit_codes[name] = proc.wait(5)
        return self.exit_codes


def component_env(init: BrokerInit, identity: str) -> dict[str, str]:
    """The environment of a component: the caller's, minus any GPUHEAL_*, plus the identity's
    env file (its ``GPUHEAL_BROKER`` with credentials, the prefixes)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUHEAL_")}
    env.update(read_env_file(init.env_files[identity]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def component_argv(component: str, tmp: Path) -> list[str]:
    argv = [sys.executable, "-m", "gpuheal", component, "--host-name", HOST,
            "--log-level", "INFO"]
    extra = {
        "publisher": ["--source", "sim", "--scenario", "hang", "--speed", "20"],
        "analyzer": ["--speed", "20"],
        "healer": ["--source", "sim", "--state-file", str(tmp / "healer-state.json")],
        "recorder": ["--db", str(tmp / "pipeline.db")],
    }[component]
    return argv + extra


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    tmp = tmp_path_factory.mktemp("secpipe")
    port = free_port()
    assert port != 1883
    init = init_broker(tmp / "broker", port, prefix=PREFIX)
    broker = start_broker(init.conf_path, port, init.log_path)
    watch = Collector(init.urls["viewer"], [T.everything()]).start()
    p = Pipeline(init, broker, tmp, tmp / "pipeline.db", watch)
    try:
        # The recorder first, so its persistent session holds everything from the start.
        for component in ("recorder", "healer", "analyzer", "publisher"):
            with (tmp / f"{component}.log").open("wb") as log:
                p.procs[component] = subprocess.Popen(
                    component_argv(component, tmp), env=component_env(init, component),
                    cwd=REPO, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
            if component == "recorder":
                watch.wait(lambda ms: any(m.topic == T.status(HOST, "recorder")
                                          and m.payload == b"online" for m in ms), 30,
                           f"the recorder online:\n{p.logs()}")
        yield p
    finally:
        p.stop_components()
        watch.stop()
        broker.stop()


# --- helpers -------------------------------------------------------------------------------
def jsons(messages: list[Received], kind: str) -> list[dict[str, Any]]:
    """The JSON payloads of the messages of one kind (``sample``, ``state``, ``action``...)."""
    out = []
    for m in messages:
        parts = T.parse(m.topic)
        if parts is not None and parts.kind == kind and m.payload:
            out.append(m.json())
    return out


def actions(messages: list[Received]) -> list[dict[str, Any]]:
    return jsons(messages, "action")


def latest_gpu0_ts(p: Pipeline) -> float:
    """Event time of the newest State of GPU 0 (so a forged event looks current)."""
    states = [s for s in jsons(p.watch.snapshot(), "state") if s["index"] == 0]
    assert states, "no State of GPU 0 yet"
    return float(states[-1]["ts"])


def forged_event(index: int, ts: float, tag: str) -> Event:
    """A well-formed critical hang event, as the analyzer would write it."""
    return Event(event_id=f"forged-{tag}-{uuid.uuid4().hex[:12]}", host=HOST, index=index,
                 kind="gpu_hang", severity="critical", phase="raised", started_ts=ts - 40.0,
                 ts=ts, message="utilization 100 % for 40 s with flat power and memory",
                 evidence={"utilization_pct": 100.0, "flat_s": 40.0},
                 recommended_action="reset_gpu")


def healer_states(p: Pipeline) -> list[dict[str, Any]]:
    return [m.json() for m in p.watch.snapshot() if m.topic == T.healer_state(HOST)]


def healer_round(p: Pipeline) -> None:
    """Prove the healer's policy thread has handled everything that reached it so far.

    The operator (allowed to write ``healer/set``) turns dry-run on and off again; each
    change is processed in order after the messages queued before it, and shows as a new
    retained ``healer/state``. Leaves dry-run off."""
    with Speaker(p.url("operator")) as operator:
        for value in (True, False):
            seen = len(healer_states(p))
            assert not operator.send(T.healer_set(HOST), json.dumps({"dry_run": value})
                                     ).is_failure
            p.watch.wait(lambda _m, v=value, n=seen: any(
                s["dry_run"] is v for s in healer_states(p)[n:]), 15,
                f"healer/state with dry_run {value}")


def retained_healer_state(p: Pipeline) -> dict[str, Any]:
    """The retained ``healer/state`` as a new subscriber gets it."""
    with Collector(p.url("viewer"), T.healer_state(HOST)) as fresh:
        got = fresh.wait(lambda ms: [m for m in ms if m.retain], 5, "retained healer/state")
    return got[-1].json()


def check_wire(messages: list[Received]) -> None:
    """Every message the viewer saw under the prefix is a valid message of its topic."""
    for m in messages:
        parts = T.parse(m.topic)
        assert parts is not None, f"unknown topic on the wire: {m.topic}"
        if parts.kind == "status":
            assert m.payload in (b"online", b"offline"), m
            continue
        model = WIRE_MODELS[parts.kind]
        try:
            decode(model, m.payload)
        except PayloadError as exc:
            pytest.fail(f"{m.topic}: {exc.reason}: {m.payload[:200]!r}")


def db_rows(db: Path, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    """Rows from the recorder's SQLite file (read-only; empty while it is being created)."""
    if not db.exists():
        return []
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=2)
        try:
            return con.execute(sql, args).fetchall()
        finally:
            con.close()
    except sqlite3.OperationalError:  # no such table yet, or locked for a moment
        return []


# --- the pipeline itself -------------------------------------------------------------------
def test_pipeline_heals_a_hang_with_least_privilege(pipeline: Pipeline) -> None:
    p = pipeline
    try:
        p.watch.wait(lambda ms: any(a["action"] == "reset_gpu" and a["status"] == "verified"
                                    for a in actions(ms)),
                     HEAL_TIMEOUT_S, "a verified reset_gpu")
    except AssertionError:
        raise AssertionError(f"no verified reset_gpu:\n{p.logs()}") from None
    p.assert_running()
    messages = p.watch.snapshot()
    check_wire(messages)
    assert len(jsons(messages, "sample")) > 20
    assert len(jsons(messages, "state")) > 5
    events = jsons(messages, "event")
    assert any(e["kind"] == "gpu_hang" and e["severity"] == "critical" for e in events), events
    life = [a["status"] for a in actions(messages) if a["action"] == "reset_gpu"]
    assert life[:3] == ["started", "succeeded", "verified"], life
    sims = jsons(messages, "sim")
    assert [s["command"] for s in sims] == ["reset"], sims
    for component in COMPONENTS:
        statuses = [m.text for m in messages if m.topic == T.status(HOST, component)]
        assert statuses and statuses[-1] == "online", (component, statuses)
    assert not [m for m in messages if T.parse(m.topic).kind == "deadletter"], \
        "a component dead-lettered a message of the pipeline itself"
    # The recorder, reading with its own identity, stores all of it.
    wait_for(lambda: db_rows(p.db, "select 1 from actions where action = 'reset_gpu' and "
                                   "status = 'verified'"), 15, "the verified reset in SQLite")
    assert db_rows(p.db, "select count(*) from samples")[0][0] > 20
    assert db_rows(p.db, "select host, gpu from states") == [(HOST, 0)]  # latest per GPU
    assert db_rows(p.db, "select 1 from events where kind = 'gpu_hang' and "
                         "severity = 'critical'")


# --- the attacks ---------------------------------------------------------------------------
def actions_for(p: Pipeline, event_id: str) -> list[dict[str, Any]]:
    return [a for a in actions(p.watch.snapshot()) if a["event_id"] == event_id]


def send_event(p: Pipeline, event: Event) -> dict[str, Any]:
    """Publish ``event`` as the analyzer identity; the healer's first Action for it."""
    with Speaker(p.url("analyzer")) as analyzer:
        assert not analyzer.send(T.event(event.host, event.index), event.to_json()).is_failure
    return p.watch.wait(lambda _m: actions_for(p, event.event_id), 10,
                        f"the healer's answer to {event.event_id}")[0]


def test_an_event_for_an_unseen_gpu_cannot_lift_the_cooldowns(pipeline: Pipeline) -> None:
    p = pipeline
    p.assert_running()
    ts = latest_gpu0_ts(p) + 30.0
    control = send_event(p, forged_event(0, ts, "clock-control"))
    if control["status"] != "skipped" or control["reason"] != "cooldown":
        pytest.skip(f"the reset_gpu cooldown of GPU 0 is not active any more: {control}")
    unseen = send_event(p, forged_event(7, ts + 100_000.0, "clock-jump"))
    assert (unseen["status"], unseen["reason"]) == ("skipped", "unknown_gpu")
    again = send_event(p, forged_event(0, latest_gpu0_ts(p) + 30.0, "clock-after"))
    assert (again["status"], again["reason"]) == ("skipped", "cooldown"), again


def test_publisher_cannot_forge_an_event_the_healer_acts_on(pipeline: Pipeline) -> None:
    p = pipeline
    p.assert_running()
    forged = forged_event(0, latest_gpu0_ts(p) + 30.0, "publisher")
    sentinel = f"sentinel-{uuid.uuid4().hex}"
    with Speaker(p.url("publisher")) as publisher:
        publisher.send(T.event(HOST, 0), forged.to_json(), qos=0)
        assert publisher.send(T.event(HOST, 0), forged.to_json()).getName() == "Not authorized"
        # Allowed, and on the same connection: once the viewer has it, the broker has long
        # handled (and dropped) the forged event. A sample topic of another host, so the
        # running analyzer only dead-letters it.
        assert not publisher.send(T.sample("sentinel-host", 0), sentinel).is_failure
    p.watch.wait(lambda ms: any(m.text == sentinel for m in ms), 10, "the publisher's sentinel")
    healer_round(p)
    messages = p.watch.snapshot()
    assert not [m for m in messages if m.topic == T.event(HOST, 0)
                and forged.event_id in m.text], "the forged event was delivered"
    assert not [a for a in actions(messages) if a["event_id"] == forged.event_id]
    p.assert_running()


def test_viewer_cannot_disable_the_healer(pipeline: Pipeline) -> None:
    p = pipeline
    p.assert_running()
    assert retained_healer_state(p)["enabled"] is True
    with Speaker(p.url("viewer")) as viewer:
        command = json.dumps({"enabled": False})
        viewer.send(T.healer_set(HOST), command, qos=0)
        assert viewer.send(T.healer_set(HOST), command).getName() == "Not authorized"
    healer_round(p)  # the operator's commands come after the viewer's refused ones
    assert all(s["enabled"] is True for s in healer_states(p))
    state = retained_healer_state(p)
    assert state["enabled"] is True and state["dry_run"] is False


def test_event_for_a_gpu_the_healer_never_saw_runs_no_actuator(pipeline: Pipeline) -> None:
    """The analyzer identity may write events, but the healer acts only on GPUs whose State
    it has seen: GPU 7 of this host has none."""
    p = pipeline
    p.assert_running()
    assert not [s for s in jsons(p.watch.snapshot(), "state") if s["index"] == 7]
    forged = forged_event(7, latest_gpu0_ts(p) + 30.0, "analyzer")
    with Speaker(p.url("analyzer")) as analyzer:
        assert not analyzer.send(T.event(HOST, 7), forged.to_json()).is_failure
    p.watch.wait(lambda ms: any(m.topic == T.event(HOST, 7) for m in ms), 10,
                 "the forged event at the viewer")
    healer_round(p)
    messages = p.watch.snapshot()
    answered = [a for a in actions(messages) if a["event_id"] == forged.event_id]
    assert len(answered) <= 1, answered
    for a in [*answered, *(a for a in actions(messages) if a["index"] == 7)]:
        assert (a["index"], a["status"], a["reason"]) == (7, "skipped", "unknown_gpu"), a
    assert not [m for m in messages if m.topic == T.sim(HOST, 7)], "an actuator ran for GPU 7"
    assert not [a for a in actions(messages) if a["event_id"] == forged.event_id
                and a["status"] in ("started", "succeeded", "dry_run")]
    p.assert_running()


def test_components_stop_cleanly_and_the_recording_holds_it_all(pipeline: Pipeline) -> None:
    p = pipeline
    p.assert_running()
    before = time.monotonic()
    codes = p.stop_components()
    assert codes == {c: 0 for c in COMPONENTS}, p.logs()
    assert time.monotonic() - before < 30
    messages = p.watch.snapshot()
    for component in COMPONENTS:
        statuses = [m.text for m in messages if m.topic == T.status(HOST, component)]
        assert statuses[-1] == "offline", (component, statuses)
    db = p.db
    assert db_rows(db, "select count(*) from samples")[0][0] > 20
    assert db_rows(db, "select host, gpu, health from states") == [(HOST, 0, "healthy")]
    assert db_rows(db, "select 1 from events where kind = 'gpu_hang'")
    assert ("reset_gpu", "verified") in db_rows(db, "select action, status from actions")
    # Nothing of the forged events but the healer's own refusal.
    rows = db_rows(db, "select event_id, status, reason from actions where event_id like "
                       "'forged-analyzer-%' or event_id like 'forged-publisher-%'")
    assert all(r[0].startswith("forged-analyzer-") and r[1:] == ("skipped", "unknown_gpu")
               for r in rows), rows
    assert not db_rows(db, "select 1 from events where event_id like 'forged-publisher-%'")
    recorded_actions = db_rows(db, "select action_id, status from actions")
    wire_actions = {(a["action_id"], a["status"]) for a in actions(messages)}
    assert set(recorded_actions) == wire_actions
    # The healer state persisted on stop says it is still enabled.
    saved = json.loads((p.workdir / "healer-state.json").read_text())
    assert saved.get("enabled_override") in (None, True), saved
