"""gpuheal's Home Assistant discovery in a real Home Assistant (core 2024.3).

Needs a Home Assistant installation: ``bash scripts/check_home_assistant.sh`` installs it
(cached) and runs this file with ``GPUHEAL_HA_PYTHON`` set to the python of its virtual
environment. It is slow (Home Assistant takes seconds to start), so CI skips it.

What runs, all real: the locked-down Mosquitto of ``gpuheal broker init``; Home Assistant with
its own config directory, onboarded through its HTTP API (an owner user, a token) and connected
to the broker by the MQTT integration's own config flow with the ``operator`` identity (what
examples/home-assistant/README.md tells a user to do); the analyzer, the healer (simulated
actuators) and two simulated publishers as subprocesses: host ``ha-host`` with two GPUs
running the ``thermal`` scenario and host ``ha-lost`` with one GPU that is lost. Then, over
Home Assistant's REST API: one device per GPU with live sensors, every discovery payload
through Home Assistant's own schema, the health and problem entities (a lost GPU reads
``lost``, never ``unavailable``), the "Last action" sensor, the healing switch (both ways,
through the healer's retained state), the breaker-reset button, no error in Home Assistant's
log, every entity unavailable once the analyzer stops, and a host that ``gpuheal status
--forget`` clears leaving Home Assistant.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from gpuheal.broker import PrivateBroker, start_broker
from gpuheal.broker_init import BrokerInit, init_broker, read_env_file
from gpuheal.mqtt import BrokerURL
from gpuheal.net import free_port
from gpuheal.topics import HA_GPU_ENTITIES, HA_HOST_ENTITIES, Topics
from tests.support import Collector, Received, wait_for

HA_PYTHON = os.environ.get("GPUHEAL_HA_PYTHON", "")
REPO = Path(__file__).resolve().parent.parent
PREFIX = "hatest"
HOST = "ha-host"
"""Two simulated GPUs that overheat (``thermal``); its healer runs."""
LOST_HOST = "ha-lost"
"""One simulated GPU that is lost after a minute of simulated time; no healer runs there."""
T = Topics(PREFIX)
SPEED = "20"
"""Simulated time runs this many times faster (the thermal incident within seconds)."""
HEALTH_STATES = {"healthy", "warning", "critical", "lost"}
README = REPO / "examples" / "home-assistant" / "README.md"
README_HOST = "orin"
"""The host name of the README's examples."""

pytestmark = pytest.mark.skipif(
    not (HA_PYTHON and os.access(HA_PYTHON, os.X_OK)),
    reason="Home Assistant not available: set GPUHEAL_HA_PYTHON to the python of a Home "
           "Assistant 2024.3 virtual environment (scripts/check_home_assistant.sh installs "
           "it and runs this test; slow, not in CI)")

# The entity ids Home Assistant derives from the discovery configs: "<device name> <entity
# name>", slugified (the names are in analyzer/discovery.py; the README's card uses them).
GPU_ENTITY_NAMES = {"temperature": "temperature", "utilization": "utilization",
                    "memory_used": "memory_used", "memory_percent": "memory_used_percent",
                    "power": "power", "health": "health", "last_action": "last_action",
                    "problem": "problem"}
HOST_ENTITY_NAMES = {"healing_enabled": "healing_enabled",
                     "reset_breaker": "reset_circuit_breaker"}


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text.lower())


def gpu_entity(host: str, index: int, key: str) -> str:
    platform = dict((k, p) for p, k in HA_GPU_ENTITIES)[key]
    return f"{platform}.{slug(host)}_gpu_{index}_{GPU_ENTITY_NAMES[key]}"


def host_entity(host: str, key: str) -> str:
    platform = dict((k, p) for p, k in HA_HOST_ENTITIES)[key]
    return f"{platform}.gpuheal_{slug(host)}_{HOST_ENTITY_NAMES[key]}"


# --- a real Home Assistant ---------------------------------------------------------------
class HomeAssistant:
    """A Home Assistant subprocess with its own config directory and log file, driven over
    its HTTP API (onboarding, config flows, states, services, templates)."""

    def __init__(self, python: str, config_dir: Path, extra_config: str = "") -> None:
        config_dir.mkdir(parents=True)
        self.config_dir = config_dir
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = config_dir / "home-assistant.log"
        self.token: str | None = None
        # Only what the test needs besides Home Assistant's defaults (which it always sets
        # up): the REST API, config entries / flows, onboarding. No default_config: its
        # discovery integrations (zeroconf, ssdp, dhcp...) would look at the network.
        (config_dir / "configuration.yaml").write_text(
            "homeassistant:\n"
            "  name: gpuheal check\n"
            "  unit_system: metric\n"
            "  time_zone: UTC\n"
            "  country: DE\n"
            "  currency: EUR\n"
            "  latitude: 0\n"
            "  longitude: 0\n"
            "  elevation: 0\n"
            "http:\n"
            "  server_host: [127.0.0.1]\n"
            f"  server_port: {self.port}\n"
            "api:\n"
            "config:\n"
            "onboarding:\n"
            "websocket_api:\n"
            "logger:\n"
            "  default: info\n" + extra_config, encoding="utf-8")
        # --skip-pip: scripts/check_home_assistant.sh installed every requirement; nothing
        # is fetched at start.
        env = {k: v for k, v in os.environ.items() if not k.startswith("GPUHEAL_")}
        with (config_dir / "stderr.log").open("wb") as stderr:
            self.process = subprocess.Popen(
                [python, "-m", "homeassistant", "--config", str(config_dir), "--skip-pip",
                 "--log-no-color", "--log-file", str(self.log_path)],
                stdout=subprocess.DEVNULL, stderr=stderr, stdin=subprocess.DEVNULL, env=env,
                cwd=config_dir)

    def log(self) -> str:
        return (self.log_path.read_text(encoding="utf-8", errors="replace")
                if self.log_path.exists() else "")

    def alive(self) -> None:
        if self.process.poll() is not None:
            stderr = (self.config_dir / "stderr.log").read_text(errors="replace")
            raise AssertionError(f"Home Assistant exited ({self.process.returncode}):\n"
                                 f"{stderr[-3000:]}\n{self.log()[-5000:]}")

    def request(self, method: str, path: str, body: Any = None,
                form: dict[str, str] | None = None) -> Any:
        headers = {}
        data = None
        if form is not None:
            data = urllib.parse.urlencode(form).encode()
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        elif body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=15) as resp:
                text = resp.read().decode()
        except urllib.error.HTTPError as e:
            raise AssertionError(f"{method} {path}: HTTP {e.code}: {e.read().decode()[:2000]}"
                                 ) from None
        return json.loads(text) if text[:1] in ("{", "[") else text

    def wait_http(self, timeout_s: float = 90.0) -> None:
        def answers() -> bool:
            self.alive()
            try:
                with urllib.request.urlopen(self.base + "/api/onboarding", timeout=2) as resp:
                    return resp.status == 200
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                return False
        wait_for(answers, timeout_s, "Home Assistant's HTTP API", interval_s=0.2)

    def onboard(self) -> None:
        """Create the owner (onboarding's first step), then a token from its auth code."""
        client_id = self.base + "/"
        created = self.request("POST", "/api/onboarding/users", {
            "client_id": client_id, "name": "Owner", "username": "owner",
            "password": "gpuheal-check", "language": "en"})
        token = self.request("POST", "/auth/token", form={
            "grant_type": "authorization_code", "code": created["auth_code"],
            "client_id": client_id})
        self.token = token["access_token"]

    def add_mqtt(self, url: str) -> dict[str, Any]:
        """Settings → Devices & services → Add integration → MQTT, as a user does it: the
        config flow's broker form with the broker's host, port, user and password."""
        broker = BrokerURL.parse(url)
        flow = self.request("POST", "/api/config/config_entries/flow",
                            {"handler": "mqtt", "show_advanced_options": False})
        assert (flow["type"], flow["step_id"]) == ("form", "broker"), flow
        fields = {f["name"] for f in flow["data_schema"]}
        assert {"broker", "port", "username", "password"} <= fields, flow
        form: dict[str, Any] = {"broker": broker.host, "port": broker.port}
        if broker.username is not None:
            form |= {"username": broker.username, "password": broker.password or ""}
        done = self.request("POST", f"/api/config/config_entries/flow/{flow['flow_id']}", form)
        assert done["type"] == "create_entry", done  # the flow connected with these
        entry_id = done["result"]["entry_id"]

        def loaded() -> dict[str, Any] | None:
            self.alive()
            for entry in self.request("GET", "/api/config/config_entries/entry?domain=mqtt"):
                if entry["entry_id"] == entry_id and entry["state"] == "loaded":
                    return entry
            return None
        return wait_for(loaded, 30, "the MQTT config entry loaded")

    def states(self) -> dict[str, dict[str, Any]]:
        return {s["entity_id"]: s for s in self.request("GET", "/api/states")}

    def state(self, entity_id: str) -> str | None:
        got = self.states().get(entity_id)
        return None if got is None else got["state"]

    def template_json(self, template: str) -> Any:
        """What a template that ends in ``| tojson`` renders, decoded."""
        got = self.request("POST", "/api/template", {"template": template})
        return json.loads(got) if isinstance(got, str) else got

    def call(self, domain: str, service: str, entity_id: str) -> None:
        self.request("POST", f"/api/services/{domain}/{service}", {"entity_id": entity_id})

    def stop(self, timeout_s: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
                raise AssertionError("Home Assistant ignored SIGTERM") from None
        return self.process.returncode


class StateHistory:
    """Every snapshot of Home Assistant's states, polled over REST in a thread, so that a
    short phase (a thermal incident lasts seconds at this speed) is seen whenever the test
    looks; ``wait`` waits for a condition on the snapshots so far."""

    def __init__(self, ha: HomeAssistant, interval_s: float = 0.2) -> None:
        self.ha = ha
        self.interval_s = interval_s
        self._snapshots: list[dict[str, dict[str, Any]]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ha-states", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                states = self.ha.states()
            except (AssertionError, OSError):  # stopping: Home Assistant went away
                continue
            with self._lock:
                self._snapshots.append(states)

    def start(self) -> StateHistory:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def snapshots(self) -> list[dict[str, dict[str, Any]]]:
        with self._lock:
            return list(self._snapshots)

    def values(self, entity_id: str) -> list[str]:
        """The states ``entity_id`` went through, in order, repeats folded."""
        out: list[str] = []
        for snapshot in self.snapshots():
            if entity_id in snapshot and (not out or out[-1] != snapshot[entity_id]["state"]):
                out.append(snapshot[entity_id]["state"])
        return out

    def wait(self, predicate: Any, timeout_s: float, what: str) -> Any:
        """The first truthy ``predicate(snapshot)`` over every snapshot so far."""
        checked = 0

        def found() -> Any:
            nonlocal checked
            self.ha.alive()
            snapshots = self.snapshots()
            for snapshot in snapshots[checked:]:
                if got := predicate(snapshot):
                    return got
            checked = len(snapshots)
            return None
        return wait_for(found, timeout_s, what, interval_s=0.1)


DEVICES_TEMPLATE = """
{%- set ns = namespace(devices=[]) -%}
{%- for d in integration_entities('mqtt') | map('device_id') | reject('none') | unique -%}
  {%- set ns.devices = ns.devices + [{
      'id': d, 'name': device_attr(d, 'name'), 'model': device_attr(d, 'model'),
      'manufacturer': device_attr(d, 'manufacturer'),
      'serial_number': device_attr(d, 'serial_number'),
      'via_device_id': device_attr(d, 'via_device_id'),
      'identifiers': device_attr(d, 'identifiers') | map('list') | list,
      'entities': device_entities(d) | sort}] -%}
{%- endfor -%}
{{ ns.devices | tojson }}
"""
"""Every device of the MQTT integration, with its entities (the device registry as templates
see it: Home Assistant's REST API has no device registry call)."""


# --- the pipeline ------------------------------------------------------------------------
@dataclass
class Rig:
    init: BrokerInit
    broker: PrivateBroker
    workdir: Path
    watch: Collector
    ha: HomeAssistant | None = None
    history: StateHistory | None = None
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def log(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def logs(self) -> str:
        return "\n".join(f"--- {name} ---\n{self.log(name)}" for name in self.procs)

    def start(self, name: str, identity: str, argv: list[str]) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GPUHEAL_")}
        env.update(read_env_file(self.init.env_files[identity]))
        env["PYTHONUNBUFFERED"] = "1"
        with (self.workdir / f"{name}.log").open("wb") as log:
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", "gpuheal", *argv, "--log-level", "INFO"], env=env,
                cwd=REPO, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)

    def assert_running(self) -> None:
        for name, proc in self.procs.items():
            assert proc.poll() is None, f"{name} exited ({proc.returncode}):\n{self.log(name)}"

    def terminate(self, name: str, timeout_s: float = 20.0) -> int:
        """SIGTERM one component (a clean stop) and return its exit code."""
        proc = self.procs[name]
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
            raise AssertionError(f"{name} ignored SIGTERM:\n{self.log(name)}") from None


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    port = free_port()
    assert port != 1883
    init = init_broker(tmp_path / "broker", port, prefix=PREFIX)
    broker = start_broker(init.conf_path, port, init.log_path)
    watch = Collector(init.urls["viewer"], [T.everything(), f"{T.discovery_prefix}/#"]).start()
    r = Rig(init, broker, tmp_path, watch)
    try:
        yield r
    finally:
        for proc in r.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in r.procs.values():
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if r.history is not None:
            r.history.stop()
        if r.ha is not None:
            r.ha.stop()
        watch.stop()
        broker.stop()


def payloads(messages: list[Received], topic: str) -> list[dict[str, Any]]:
    return [m.json() for m in messages if m.topic == topic and m.payload]


def readme_yaml() -> tuple[str, list[str]]:
    """The README's automation and its cards (its ``yaml`` blocks), for this test's host."""
    blocks = re.findall(r"^```yaml\n(.*?)^```$", README.read_text(encoding="utf-8"),
                        re.MULTILINE | re.DOTALL)
    blocks = [re.sub(rf"(?<=[._]){README_HOST}_", f"{slug(HOST)}_", b) for b in blocks]
    (automation,) = [b for b in blocks if "trigger:" in b]
    return automation, [b for b in blocks if b is not automation]


def of_kind(messages: list[Received], kind: str) -> list[dict[str, Any]]:
    """The JSON payloads of one kind of GPU message (``state``, ``action``...), in order."""
    out = []
    for m in messages:
        parts = T.parse(m.topic)
        if parts is not None and parts.kind == kind and m.payload:
            out.append(m.json())
    return out


SCHEMA_CHECK = r"""
import importlib, json, sys

def dropped(given, kept, path):
    # Keys Home Assistant's schema removed (it drops unknown keys of a discovery payload
    # silently), at any depth.
    out = []
    if isinstance(given, dict) and isinstance(kept, dict):
        for key, value in given.items():
            if key not in kept:
                out.append(path + key)
            else:
                out += dropped(value, kept[key], path + key + ".")
    elif isinstance(given, list) and isinstance(kept, list):
        for i, (a, b) in enumerate(zip(given, kept)):
            out += dropped(a, b, f"{path}{i}.")
    return out

result = {}
for topic, payload in json.load(sys.stdin):
    platform = topic.split("/")[1]
    schema = importlib.import_module(f"homeassistant.components.mqtt.{platform}")
    try:
        valid = schema.DISCOVERY_SCHEMA(json.loads(json.dumps(payload)))
    except Exception as e:  # voluptuous.Invalid: Home Assistant refuses the entity
        result[topic] = f"invalid: {e}"
        continue
    result[topic] = dropped(payload, valid, "")
json.dump(result, sys.stdout)
"""
"""Runs in Home Assistant's python: each discovery payload through the MQTT platform's own
``DISCOVERY_SCHEMA``, the one Home Assistant applies to it; prints what it refuses or drops."""

DROPPED_BY_2024_3 = {"health": ["options"]}
"""What Home Assistant 2024.3 drops of gpuheal's discovery: its MQTT sensor learnt ``options``
(the enum's list of states) in 2024.9 (home-assistant/core#123248); 2024.3 ignores it
silently, and the health sensor still reads one of the four states."""


def discovery_configs(messages: list[Received]) -> dict[str, dict[str, Any]]:
    """The newest (retained) discovery config per topic, as the watcher saw them."""
    configs: dict[str, dict[str, Any]] = {}
    for m in messages:
        if m.topic.startswith(f"{T.discovery_prefix}/") and m.topic.endswith("/config"):
            if m.payload:
                configs[m.topic] = m.json()
            else:
                configs.pop(m.topic, None)
    return configs


# --- the check ---------------------------------------------------------------------------
def test_discovery_in_a_real_home_assistant(rig: Rig, tmp_path: Path) -> None:
    # The README's automation, loaded as a user would put it in configuration.yaml.
    automation, cards = readme_yaml()
    ha = rig.ha = HomeAssistant(HA_PYTHON, tmp_path / "home-assistant",
                                "automation:\n" + automation)
    ha.wait_http()
    ha.onboard()
    entry = ha.add_mqtt(rig.init.urls["operator"])  # the flow tried these credentials
    assert (entry["title"], entry["state"]) == ("127.0.0.1", "loaded")
    # Home Assistant's birth message: it is connected and subscribed to discovery.
    rig.watch.wait(lambda ms: any(m.topic == T.ha_status() and m.payload == b"online"
                                  for m in ms), 30, "Home Assistant's birth message")
    history = rig.history = StateHistory(ha).start()

    rig.start("analyzer", "analyzer", ["analyzer", "--host-name", HOST])
    rig.start("healer", "healer", ["healer", "--host-name", HOST, "--source", "sim",
                                   "--state-file", str(tmp_path / "healer-state.json")])
    rig.start("publisher", "publisher", ["publisher", "--host-name", HOST, "--source", "sim",
                                         "--gpus", "2", "--scenario", "thermal",
                                         "--speed", SPEED])
    rig.start("publisher-lost", "publisher", ["publisher", "--host-name", LOST_HOST,
                                              "--source", "sim", "--gpus", "1",
                                              "--scenario", "lost", "--speed", SPEED])
    gpus = [(HOST, 0), (HOST, 1), (LOST_HOST, 0)]

    check_devices(rig, ha, gpus)
    check_schemas(rig, gpus)
    check_readme(ha, cards, automation)
    check_live_sensors(rig, ha, history)
    check_health(rig, ha, history)
    check_automation(ha)
    check_last_action(rig, ha)
    check_switch(rig, ha)
    check_button(rig, ha)
    problems = log_problems(ha.log().splitlines())
    assert not problems, "\n".join(problems)

    # --- availability: the analyzer stops → every gpuheal entity is unavailable ----------
    assert rig.terminate("analyzer") == 0, rig.log("analyzer")
    entities = [gpu_entity(h, i, k) for h, i in gpus for _, k in HA_GPU_ENTITIES]
    entities += [host_entity(h, k) for h in (HOST, LOST_HOST) for _, k in HA_HOST_ENTITIES]

    def unavailable() -> bool:
        states = ha.states()
        return all(states[e]["state"] == "unavailable" for e in entities)
    wait_for(unavailable, 30, "every gpuheal entity unavailable once the analyzer stopped",
             interval_s=0.3)

    # --- a host gone for good leaves Home Assistant -------------------------------------
    seen_lines = len(ha.log().splitlines())
    check_forget(rig, ha)
    for name in ("healer", "publisher"):
        assert rig.terminate(name) == 0, rig.log(name)
    assert ha.stop() == 0
    problems = log_problems(ha.log().splitlines()[seen_lines:])
    assert not problems, "\n".join(problems)


def check_devices(rig: Rig, ha: HomeAssistant, gpus: list[tuple[str, int]]) -> None:
    """One device per GPU with its eight entities, one per healer with the switch and the
    button; a GPU's device hangs off its host's healer device."""
    expected = {f"{h} GPU {i}": sorted(gpu_entity(h, i, k) for _, k in HA_GPU_ENTITIES)
                for h, i in gpus}
    expected |= {f"gpuheal {h}": sorted(host_entity(h, k) for _, k in HA_HOST_ENTITIES)
                 for h in (HOST, LOST_HOST)}

    def complete() -> list[dict[str, Any]] | None:
        rig.assert_running()
        ha.alive()
        got = ha.template_json(DEVICES_TEMPLATE)
        return got if {d["name"]: d["entities"] for d in got} == expected else None
    try:
        found = wait_for(complete, 60, "one device per GPU and per healer in Home Assistant",
                         interval_s=0.5)
    except AssertionError as e:
        raise AssertionError(f"{e}\n{ha.template_json(DEVICES_TEMPLATE)}\n{rig.logs()}"
                             ) from None
    assert len(found) == len(expected)  # no device twice
    by_name = {d["name"]: d for d in found}
    on_bus = {(s["host"], s["index"]): s for s in of_kind(rig.watch.snapshot(), "state")}
    for host, index in gpus:
        device = by_name[f"{host} GPU {index}"]
        assert device["manufacturer"] == "NVIDIA"
        assert device["model"] == on_bus[(host, index)]["name"]
        assert device["serial_number"] == on_bus[(host, index)]["uuid"]
        assert device["identifiers"] == [["mqtt", T.ha_object_id(host, "gpu", index)]]
        assert device["via_device_id"] == by_name[f"gpuheal {host}"]["id"]
    for host in (HOST, LOST_HOST):
        device = by_name[f"gpuheal {host}"]
        assert (device["manufacturer"], device["model"]) == ("gpuheal", "healer")
        assert device["identifiers"] == [["mqtt", T.ha_object_id(host, "healer")]]


def check_schemas(rig: Rig, gpus: list[tuple[str, int]]) -> None:
    """Every discovery payload passes Home Assistant's own schema for its platform, and the
    schema drops nothing but what 2024.3 does not know yet."""
    expected: dict[str, list[str]] = {}
    for host, index in gpus:
        for platform, key in HA_GPU_ENTITIES:
            topic = T.ha_config(platform, T.ha_object_id(host, "gpu", index, key))
            expected[topic] = DROPPED_BY_2024_3.get(key, [])
    for host in (HOST, LOST_HOST):
        for platform, key in HA_HOST_ENTITIES:
            expected[T.ha_config(platform, T.ha_object_id(host, key))] = []
    configs = discovery_configs(rig.watch.snapshot())
    assert sorted(configs) == sorted(expected)
    done = subprocess.run([HA_PYTHON, "-c", SCHEMA_CHECK],
                          input=json.dumps(list(configs.items())), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == expected


def check_readme(ha: HomeAssistant, cards: list[str], automation: str) -> None:
    """The README's card and automation are YAML and name only entities that exist."""
    done = subprocess.run(
        [HA_PYTHON, "-c", "import json, sys, yaml; "
         "print(json.dumps([yaml.safe_load(b) for b in json.load(sys.stdin)]))"],
        input=json.dumps([*cards, automation]), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert all(json.loads(done.stdout)), done.stdout
    named = set(re.findall(r"\b(?:sensor|binary_sensor|switch|button)\.[a-z0-9_]+",
                           "\n".join([*cards, automation])))
    assert named, "the README names no entity"
    assert named <= set(ha.states()), sorted(named - set(ha.states()))


def check_automation(ha: HomeAssistant) -> None:
    """The README's automation ran when GPU 0's problem sensor turned on (its templates
    rendered: an error would be in the log, which is checked later)."""
    automations = {e: s for e, s in ha.states().items() if e.startswith("automation.")}
    assert len(automations) == 1, automations
    ((entity_id, state),) = automations.items()
    assert state["state"] == "on", state  # loaded and enabled
    wait_for(lambda: ha.states()[entity_id]["attributes"].get("last_triggered"), 30,
             "the README's automation triggered by the problem sensor")


def check_live_sensors(rig: Rig, ha: HomeAssistant, history: StateHistory) -> None:
    """The readings change in Home Assistant, and each value is one the analyzer published."""
    live = {key: gpu_entity(HOST, 0, key) for key in ("temperature", "utilization", "power")}

    def seen() -> dict[str, set[str]]:
        return {key: set(history.values(entity_id)) - {"unknown", "unavailable"}
                for key, entity_id in live.items()}
    wait_for(lambda: all(len(values) >= 3 for values in seen().values()), 60,
             "live sensors changing in Home Assistant", interval_s=0.2)
    shown = seen()
    wire = {"temperature": lambda s: s["temperature"], "utilization": lambda s: s["utilization"],
            "power": lambda s: s["power"]["draw_w"]}

    def published(messages: list[Received]) -> bool:
        """Every value Home Assistant showed is in a State of the GPU (the watcher may get a
        State a moment after Home Assistant)."""
        states = [s for s in of_kind(messages, "state") if (s["host"], s["index"]) == (HOST, 0)]
        return all({float(v) for v in values}
                   <= {float(wire[key](s)) for s in states if wire[key](s) is not None}
                   for key, values in shown.items())
    rig.watch.wait(published, 10, f"the values Home Assistant showed ({shown}) on the bus")
    states = ha.states()
    attributes = states[gpu_entity(HOST, 0, "temperature")]["attributes"]
    assert (attributes["unit_of_measurement"], attributes["device_class"]) == ("°C",
                                                                              "temperature")
    attributes = states[gpu_entity(HOST, 1, "memory_used")]["attributes"]
    assert (attributes["unit_of_measurement"], attributes["device_class"]) == ("MiB",
                                                                              "data_size")
    assert float(states[gpu_entity(HOST, 1, "memory_used")]["state"]) > 0
    assert 0 < float(states[gpu_entity(HOST, 1, "memory_percent")]["state"]) <= 100


def check_health(rig: Rig, ha: HomeAssistant, history: StateHistory) -> None:
    """The thermal incident shows in health and problem; the lost GPU reads ``lost``; once
    it has read a State, no health ever reads anything but its four states."""
    def incident(snapshot: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
        health = snapshot.get(gpu_entity(HOST, 0, "health"), {})
        problem = snapshot.get(gpu_entity(HOST, 0, "problem"), {})
        if health.get("state") in ("warning", "critical") and problem.get("state") == "on":
            return health
        return None
    health = history.wait(incident, 60, "GPU 0's thermal incident in Home Assistant")
    assert health["attributes"]["error"] == "thermal_throttling", health
    assert health["attributes"]["error_message"], health

    def lost(snapshot: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
        health = snapshot.get(gpu_entity(LOST_HOST, 0, "health"), {})
        problem = snapshot.get(gpu_entity(LOST_HOST, 0, "problem"), {})
        return health if (health.get("state"), problem.get("state")) == ("lost", "on") else None
    health = history.wait(lost, 60, "the lost GPU's health reading 'lost'")
    assert health["attributes"]["error"] == "unavailable", health
    # ...while on the wire the analyzer says "unavailable", as DESIGN.md has it.
    assert any(s["health"] == "unavailable" for s in of_kind(rig.watch.snapshot(), "state")
               if s["host"] == LOST_HOST)
    for key in ("temperature", "utilization", "power"):  # no reading: unknown, not unavailable
        assert ha.state(gpu_entity(LOST_HOST, 0, key)) == "unknown"
    for host, index in ((HOST, 0), (HOST, 1), (LOST_HOST, 0)):
        # A new entity reads unavailable until its availability topic's retained "online"
        # arrives (moments), unknown until its first State; after that, only the four.
        went = history.values(gpu_entity(host, index, "health"))
        while went and went[0] in ("unavailable", "unknown"):
            went.pop(0)
        assert went and set(went) <= HEALTH_STATES, (host, index, went)


def check_last_action(rig: Rig, ha: HomeAssistant) -> None:
    """The "Last action" sensor reads the healer's newest Action of the GPU: ``what:
    outcome``, and why in its attributes."""
    def newest() -> tuple[dict[str, Any], dict[str, Any]] | None:
        sensor = ha.states()[gpu_entity(HOST, 0, "last_action")]
        actions = [a for a in of_kind(rig.watch.snapshot(), "action")
                   if (a["host"], a["index"]) == (HOST, 0)]
        if not actions or sensor["state"] != f"{actions[-1]['action']}: {actions[-1]['status']}":
            return None
        return sensor, actions[-1]
    sensor, action = wait_for(newest, 60, "the healer's last action in Home Assistant",
                              interval_s=0.3)
    why = {key: action[key] for key in ("action", "status", "reason", "event_id", "attempt")}
    assert sensor["attributes"].items() >= why.items(), sensor
    actions = of_kind(rig.watch.snapshot(), "action")
    assert any(a["action"] == "throttle_gpu" for a in actions), actions  # the thermal rung


def check_switch(rig: Rig, ha: HomeAssistant) -> None:
    """Turning the healing switch off and on in Home Assistant reaches the healer, whose
    retained state says so, and the switch follows that state."""
    switch = host_entity(HOST, "healing_enabled")
    wait_for(lambda: ha.state(switch) == "on", 30, "the healing switch on")
    for service, enabled in (("turn_off", False), ("turn_on", True)):
        ha.call("switch", service, switch)
        rig.watch.wait(lambda ms, e=enabled: (got := payloads(ms, T.healer_state(HOST)))
                       and got[-1]["enabled"] is e, 30, f"healer/state enabled {enabled}")
        with Collector(rig.init.urls["viewer"], T.healer_state(HOST)) as retained:
            got = retained.wait(lambda ms: ms, 10, "the retained healer/state")
        assert got[0].retain and got[0].json()["enabled"] is enabled
        shown = "on" if enabled else "off"
        wait_for(lambda s=shown: ha.state(switch) == s, 30, f"the switch {shown} in HA")
    commands = [m for m in rig.watch.snapshot() if m.topic == T.healer_set(HOST)]
    assert [m.json() for m in commands] == [{"enabled": False}, {"enabled": True}]
    assert all(m.qos == 1 for m in commands)


def check_button(rig: Rig, ha: HomeAssistant) -> None:
    """Pressing the breaker-reset button publishes the reset command to the healer."""
    button = host_entity(HOST, "reset_breaker")
    assert ha.state(button) == "unknown"  # never pressed
    ha.call("button", "press", button)
    rig.watch.wait(lambda ms: len(payloads(ms, T.healer_set(HOST))) == 3, 30,
                   "the button's command on healer/set")
    command = [m for m in rig.watch.snapshot() if m.topic == T.healer_set(HOST)][-1]
    assert (command.json(), command.qos) == ({"reset_breaker": True}, 1)
    assert ha.state(button) not in ("unknown", "unavailable")  # when it was last pressed


def check_forget(rig: Rig, ha: HomeAssistant) -> None:
    """A host gone for good: its publisher stops and ``gpuheal status --forget`` clears its
    retained topics, discovery configs included; Home Assistant then drops its entities and
    devices. Run with the admin identity of ``gpuheal broker init`` (the one the ACL lets
    clear every retained topic)."""
    assert rig.terminate("publisher-lost") == 0, rig.log("publisher-lost")
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUHEAL_")}
    forget = subprocess.run(
        [sys.executable, "-m", "gpuheal", "status", "--env-file",
         str(rig.init.env_files["admin"]), "--forget", LOST_HOST],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=60)
    assert forget.returncode == 0, forget
    assert f"cleared {T.state(LOST_HOST, 0)}" in forget.stdout, forget

    def gone() -> bool:
        names = {d["name"] for d in ha.template_json(DEVICES_TEMPLATE)}
        entities = [e for e in ha.states() if slug(LOST_HOST) in e]
        return names == {f"{HOST} GPU 0", f"{HOST} GPU 1", f"gpuheal {HOST}"} and not entities
    wait_for(gone, 30, f"{LOST_HOST}'s devices and entities removed from Home Assistant",
             interval_s=0.3)


def log_problems(lines: list[str]) -> list[str]:
    """Home Assistant log lines about an error, an invalid config or a template problem (at
    any level for those), or an MQTT warning."""
    return [line for line in lines
            if " ERROR " in line or " CRITICAL " in line
            or "Invalid config" in line or "Template variable" in line
            or "TemplateError" in line
            or (" WARNING " in line and "[homeassistant.components.mqtt" in line)]
