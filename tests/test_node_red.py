"""The Node-RED example flow (examples/node-red/flows.json).

The file checks run always. The real run needs Node-RED 4: ``bash scripts/check_node_red.sh``
installs it (cached) and runs this file with ``GPUHEAL_NODE_RED`` set to its ``node-red``
executable; then a real Node-RED loads the flow against a real Mosquitto and is driven over
MQTT and its admin HTTP API. It is slow (Node-RED takes seconds to start), so CI skips it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gpuheal.broker import start_broker
from gpuheal.broker_init import init_broker
from gpuheal.models import (
    Action,
    Event,
    HealerSet,
    HealerState,
    Memory,
    State,
    iso_utc,
    make_action_id,
    make_event_id,
)
from gpuheal.mqtt import BrokerURL
from gpuheal.net import free_port
from gpuheal.topics import Topics
from tests.support import Collector, Received, publish, wait_for

FLOWS = Path(__file__).resolve().parent.parent / "examples" / "node-red" / "flows.json"
NODE_RED = os.environ.get("GPUHEAL_NODE_RED", "")

CORE_TYPES = frozenset({
    "tab", "group", "junction", "comment", "inject", "debug", "complete", "catch", "status",
    "link in", "link out", "link call", "global-config", "function", "switch", "change",
    "range", "template", "delay", "trigger", "exec", "rbe", "mqtt in", "mqtt out",
    "mqtt-broker", "tls-config", "http proxy", "http in", "http response", "http request",
    "websocket in", "websocket out", "websocket-listener", "websocket-client", "tcp in",
    "tcp out", "tcp request", "udp in", "udp out", "csv", "html", "json", "xml", "yaml",
    "split", "join", "sort", "batch", "file", "file in", "watch",
})
"""The node types that ship with Node-RED 4 (@node-red/nodes)."""

needs_node_red = pytest.mark.skipif(
    not (NODE_RED and os.access(NODE_RED, os.X_OK)),
    reason="Node-RED not available: set GPUHEAL_NODE_RED to a node-red executable "
           "(scripts/check_node_red.sh installs Node-RED 4 and runs this test; slow, not in CI)")


def load_flows() -> list[dict[str, Any]]:
    return json.loads(FLOWS.read_text(encoding="utf-8"))


def by_name(nodes: list[dict[str, Any]], type_: str, name: str) -> dict[str, Any]:
    found = [n for n in nodes if n["type"] == type_ and n.get("name") == name]
    assert len(found) == 1, f"expected one {type_} named {name!r}, found {len(found)}"
    return found[0]


def tab_env(nodes: list[dict[str, Any]]) -> dict[str, str]:
    (tab,) = [n for n in nodes if n["type"] == "tab"]
    return {e["name"]: e["value"] for e in tab["env"]}


# --- the file itself (always) ------------------------------------------------------------

def test_flow_uses_only_core_nodes_and_one_plain_broker() -> None:
    nodes = load_flows()
    assert {n["type"] for n in nodes} <= CORE_TYPES
    ids = [n["id"] for n in nodes]
    assert len(ids) == len(set(ids))
    for n in nodes:  # every wire leads to a node of the flow
        for out in n.get("wires", []):
            assert set(out) <= set(ids), n["name"]
    (broker,) = [n for n in nodes if n["type"] == "mqtt-broker"]
    assert (broker["broker"], broker["port"], broker["protocolVersion"]) == ("127.0.0.1", "1883",
                                                                             "5")
    assert "credentials" not in broker  # the operator / viewer identity is the user's to add
    # The viewer and operator identities have no status topic: no birth, close or will.
    assert not (broker["birthTopic"] or broker["closeTopic"] or broker["willTopic"])
    assert tab_env(nodes) == {"GPUHEAL_PREFIX": "gpuheal", "GPUHEAL_HOST": ""}


def test_control_injects_carry_valid_healer_commands() -> None:
    nodes = load_flows()
    expected = {"pause healing": {"enabled": False}, "resume healing": {"enabled": True},
                "reset breaker": {"reset_breaker": True}}
    for name, command in expected.items():
        payload = json.loads(by_name(nodes, "inject", name)["payload"])
        assert payload == command
        HealerSet.model_validate(payload)
    ack = json.loads(by_name(nodes, "inject", "acknowledge incident")["payload"])
    assert ack == {"ack": "<event_id>"}  # a placeholder the user replaces (and the flow refuses)
    out = by_name(nodes, "mqtt out", "healer/set (QoS 1)")
    assert (out["qos"], out["retain"], out["topic"]) == ("1", "false", "")


# --- a real Node-RED -----------------------------------------------------------------------

class NodeRed:
    """A Node-RED subprocess with its own user dir, its log in a file."""

    def __init__(self, workdir: Path, flows: list[dict[str, Any]],
                 credentials: dict[str, dict[str, str]] | None = None) -> None:
        workdir.mkdir(parents=True)
        self.port = free_port()
        self.log_path = workdir / "node-red.log"
        (workdir / "flows.json").write_text(json.dumps(flows), encoding="utf-8")
        if credentials:  # what the editor stores for the broker node (unencrypted here)
            (workdir / "flows_cred.json").write_text(json.dumps(credentials), encoding="utf-8")
        settings = workdir / "settings.js"
        settings.write_text(
            "module.exports = {\n"
            f"    uiHost: '127.0.0.1', uiPort: {self.port}, flowFile: 'flows.json',\n"
            "    credentialSecret: false,\n"
            "    logging: {console: {level: 'info', metrics: false, audit: false}},\n"
            "    editorTheme: {projects: {enabled: false}},\n"
            "    diagnostics: {enabled: false}, telemetry: {enabled: false},\n"
            "    externalModules: {autoInstall: false, palette: {allowInstall: false}},\n"
            "};\n", encoding="utf-8")
        env = {k: v for k, v in os.environ.items() if not k.startswith("GPUHEAL_")}
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [NODE_RED, "--userDir", str(workdir), "--settings", str(settings)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                cwd=workdir)

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def lines(self, tag: str) -> list[str]:
        """What the debug node named ``tag`` wrote to the log (one line each)."""
        marker = f"[debug:{tag}] "
        return [line.split(marker, 1)[1] for line in self.log().splitlines() if marker in line]

    def wait_log(self, pattern: str, timeout_s: float = 60.0) -> None:
        def seen() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"Node-RED exited ({self.process.returncode}):\n{self.log()}")
            return re.search(pattern, self.log()) is not None
        try:
            wait_for(seen, timeout_s, f"Node-RED log line /{pattern}/")
        except AssertionError as e:
            raise AssertionError(f"{e}; the log:\n{self.log()}") from None

    def http(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data,
                                     method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            text = resp.read().decode()
        return json.loads(text) if text.startswith(("{", "[")) else text

    def flow_context(self, tab_id: str, key: str) -> Any:
        """An object in flow context (admin API: ``GET /context/flow/<tab>/<key>``), or None
        while the key is unset (the API then says ``format: undefined``)."""
        got = self.http("GET", f"/context/flow/{tab_id}/{urllib.parse.quote(key)}")
        if not isinstance(got, dict) or got.get("format") != "Object":
            return None
        return json.loads(got["msg"])

    def stop(self, timeout_s: float = 20.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout_s)
                raise AssertionError(f"Node-RED ignored SIGTERM:\n{self.log()}") from None
        return self.process.returncode


PREFIX, HOST = "nrtest", "nr-host"


def configured_flows(broker_port: int) -> list[dict[str, Any]]:
    """The example flow with the broker's port, and the prefix and host changed in the one
    place the README names (the tab's environment variables)."""
    flows = load_flows()
    for n in flows:
        if n["type"] == "mqtt-broker":
            n["port"] = str(broker_port)
        if n["type"] == "tab":
            n["env"] = [{"name": "GPUHEAL_PREFIX", "value": PREFIX, "type": "str"},
                        {"name": "GPUHEAL_HOST", "value": HOST, "type": "str"}]
    return flows


@pytest.fixture
def node_red(fresh_broker, tmp_path: Path) -> Iterator[NodeRed]:
    """Node-RED running the example flow against ``fresh_broker`` (anonymous)."""
    nr = NodeRed(tmp_path / "node-red", configured_flows(fresh_broker.port))
    try:
        yield nr
    finally:
        nr.stop()


def wait_started(nr: NodeRed) -> None:
    nr.wait_log(r"Started flows|Waiting for missing types")  # the latter: it never starts
    log = nr.log()
    assert "Waiting for missing types" not in log, log
    nr.wait_log(r"\[mqtt-broker:gpuheal broker\] Connected to broker")
    log = nr.log()
    assert "missing node types" not in log.lower(), log
    assert "Waiting for missing types" not in log, log


def press(nr: NodeRed, name: str, props: list[dict[str, str]] | None = None) -> None:
    """Click an inject node's button (admin API ``POST /inject/<id>``); ``props`` are what the
    editor sends when the user has edited the node's properties."""
    node = by_name(load_flows(), "inject", name)
    body = {"__user_inject_props__": props} if props else None
    assert nr.http("POST", f"/inject/{node['id']}", body) == "OK"


def at_least(n: int) -> Callable[[list[Received]], bool]:
    return lambda got: len(got) >= n


@needs_node_red
def test_flow_runs_in_node_red_against_a_real_broker(node_red: NodeRed, fresh_broker) -> None:
    nr, prefix, host = node_red, PREFIX, HOST
    t = Topics(prefix)
    (tab,) = [n for n in load_flows() if n["type"] == "tab"]
    wait_started(nr)

    # Retained State and healer state: kept in flow context. The healer state's subscription
    # is the flow's last, so once it delivers, the event and action subscriptions stand too.
    now = time.time()
    state = State(host=host, index=0, name="NVIDIA H100", temperature=86.0, utilization=97.0,
                  memory=Memory(used_mb=70000.0, total_mb=81559.0, percent=85.8),
                  health="critical", error="thermal_throttling",
                  error_message="GPU 0 at 86 °C", timestamp=iso_utc(now), ts=now)
    publish(fresh_broker.url, t.state(host, 0), state.to_json(), retain=True)
    healer = HealerState(host=host, enabled=True, dry_run=False, breaker_open=False,
                         budget_left=6, budget_per_hour=6, ts=now)
    publish(fresh_broker.url, t.healer_state(host), healer.to_json(), retain=True)
    kept = wait_for(lambda: nr.flow_context(tab["id"], "gpus"), 20, "the State in flow context")
    assert kept[f"{host}/0"]["health"] == "critical"
    assert kept[f"{host}/0"]["temperature"] == 86.0
    wait_for(lambda: nr.flow_context(tab["id"], "healers"), 20, "the healer state in context")
    nr.wait_log(re.escape(f"[debug:GPU health changes] {host}/0 critical · 86 °C · 97 % · "
                          f"70000/81559 MiB · thermal_throttling"), 20)

    # Events: only critical / emergency, raised / escalated reach notify, each once.
    started = now - 5
    eid = make_event_id(host, 0, "thermal_throttling", started)

    def event(severity: str, phase: str, message: str) -> bytes:
        return Event(event_id=eid, host=host, index=0, kind="thermal_throttling",
                     severity=severity, phase=phase, started_ts=started, ts=now,
                     message=message, evidence={"temperature_c": 86.0}).to_json()

    publish(fresh_broker.url, t.event(host, 0), event("warning", "raised", "GPU 0 warm"))
    publish(fresh_broker.url, t.event(host, 0), event("critical", "cleared", "GPU 0 cooled"))
    publish(fresh_broker.url, t.event(host, 0), event("critical", "raised", "GPU 0 at 86 °C"))
    publish(fresh_broker.url, t.event(host, 0), event("critical", "raised", "GPU 0 at 86 °C"))
    publish(fresh_broker.url, t.event(host, 0),
            event("emergency", "escalated", "GPU 0 at 91 °C"))
    nr.wait_log(re.escape(f"[debug:notify] {host}/0 thermal_throttling emergency"), 20)
    assert nr.lines("notify") == [
        f"{host}/0 thermal_throttling critical — GPU 0 at 86 °C",
        f"{host}/0 thermal_throttling emergency — GPU 0 at 91 °C",
    ]

    # The healer hands the incident to a person: notify names the event id to acknowledge.
    handover = Action(action_id=make_action_id(eid, "notify", 1, host, 0), event_id=eid,
                      host=host, index=0, action="notify", status="skipped",
                      reason="needs_human", ts=now,
                      detail={"message": "a person has to handle this condition"})
    publish(fresh_broker.url, t.action(host, 0), handover.to_json())
    nr.wait_log(re.escape(f"acknowledge event {eid}"), 20)
    assert nr.lines("notify")[-1] == (f"{host}/0 needs a person (needs_human) — a person has "
                                      f"to handle this condition; acknowledge event {eid}")

    # A circuit breaker that opens is notified once, not again while it stays open.
    tripped = healer.model_copy(update={"breaker_open": True, "unresolved_count": 3,
                                        "breaker_reason": "3 unresolved actions"})
    for _ in range(2):
        publish(fresh_broker.url, t.healer_state(host), tripped.to_json(), retain=True)
    paused = tripped.model_copy(update={"enabled": False})
    publish(fresh_broker.url, t.healer_state(host), paused.to_json(), retain=True)
    nr.wait_log(re.escape(f"[debug:healer state] {host}: healing PAUSED"), 20)
    assert nr.lines("notify")[-1] == (f"{host} healer circuit breaker open — "
                                      f"3 unresolved actions")
    assert len(nr.lines("notify")) == 4

    # The control injects, pressed through the admin API, reach this host's healer/set.
    with Collector(fresh_broker.url, [t.healer_set_pattern()]) as sets:
        expected: list[dict[str, Any]] = []
        for name, command in (("pause healing", {"enabled": False}),
                              ("resume healing", {"enabled": True}),
                              ("reset breaker", {"reset_breaker": True})):
            press(nr, name)
            expected.append(command)
            sets.wait(at_least(len(expected)), 20, f"{name} on healer/set")
        press(nr, "acknowledge incident")  # still the placeholder: refused, nothing sent
        press(nr, "acknowledge incident",  # what the user does: the event id filled in
              [{"p": "payload", "v": json.dumps({"ack": eid}), "vt": "json"}])
        expected.append({"ack": eid})
        sets.wait(at_least(len(expected)), 20, "the acknowledgement")
        got = sets.snapshot()
    assert [json.loads(m.payload) for m in got] == expected
    for m in got:
        assert m.topic == t.healer_set(host)
        assert (m.qos, m.retain) == (1, False)
        HealerSet.model_validate_json(m.payload)
    nr.wait_log(r"Not sent: put the incident's event id", 5)

    assert nr.stop() == 0


@needs_node_red
def test_operator_identity_works_on_the_locked_down_broker(tmp_path: Path) -> None:
    """With the broker of ``gpuheal broker init`` and the operator's credentials in the broker
    node (what the README tells the user to do), the flow watches and pauses the healer."""
    port = free_port()
    init = init_broker(tmp_path / "broker", port, prefix=PREFIX)
    broker = start_broker(init.conf_path, port, init.log_path)
    try:
        operator = BrokerURL.parse(init.urls["operator"])
        broker_node = next(n for n in load_flows() if n["type"] == "mqtt-broker")
        nr = NodeRed(tmp_path / "node-red", configured_flows(port),
                     {broker_node["id"]: {"user": operator.username or "",
                                          "password": operator.password or ""}})
        try:
            wait_started(nr)
            t = Topics(PREFIX)
            now = time.time()
            state = State(host=HOST, index=1, health="healthy", temperature=41.0,
                          timestamp=iso_utc(now), ts=now)
            publish(init.urls["analyzer"], t.state(HOST, 1), state.to_json(), retain=True)
            (tab,) = [n for n in load_flows() if n["type"] == "tab"]
            kept = wait_for(lambda: nr.flow_context(tab["id"], "gpus"), 20, "the State")
            assert kept[f"{HOST}/1"]["health"] == "healthy"
            with Collector(init.urls["healer"], [t.healer_set_pattern()]) as sets:
                press(nr, "pause healing")
                got = sets.wait(lambda got: got, 20, "the pause on healer/set")
            assert (got[0].topic, got[0].json()) == (t.healer_set(HOST), {"enabled": False})
            assert nr.stop() == 0
        finally:
            nr.stop()
    finally:
        broker.stop()
