"""Home Assistant MQTT discovery: one device per GPU, one healer switch per host.

Every builder returns ``(topic, payload)`` pairs; the service publishes them retained (QoS 1)
once per new GPU / host, again when ``homeassistant/status`` says ``online`` and on every
reconnect. The GPU entities read the retained State (``P/H/gpu/I/state``) and are available
while the analyzer's status topic says ``online``.
"""

from __future__ import annotations

import json
import re
from typing import Any

from gpuheal.topics import Topics

Config = tuple[str, bytes]

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
HEALTH_OPTIONS = ["healthy", "warning", "critical", "unavailable"]


def object_id(*parts: str | int) -> str:
    """A discovery object id / unique id: the parts joined by ``_``, reduced to [A-Za-z0-9_-]."""
    return _UNSAFE.sub("_", "_".join(str(p) for p in parts))


def _availability(topic: str) -> dict[str, str]:
    return {"topic": topic, "payload_available": "online", "payload_not_available": "offline"}


def healer_device_id(topics: Topics, host: str) -> str:
    return object_id("gpuheal", topics.prefix, host, "healer")


def gpu_device_id(topics: Topics, host: str, index: int) -> str:
    return object_id("gpuheal", topics.prefix, host, "gpu", index)


def _config(topics: Topics, platform: str, oid: str, payload: dict[str, Any]) -> Config:
    return topics.ha_config(platform, oid), json.dumps(payload, ensure_ascii=False).encode()


def gpu_discovery(
    topics: Topics,
    host: str,
    index: int,
    gpu_name: str | None,
    uuid: str | None,
    analyzer_status_topic: str,
) -> list[Config]:
    """Sensors (temperature, utilization, memory, power, health) and a problem binary sensor
    for one GPU, all reading its retained State."""
    state = topics.state(host, index)
    device: dict[str, Any] = {
        "identifiers": [gpu_device_id(topics, host, index)],
        "name": f"{host} GPU {index}",
        "manufacturer": "NVIDIA",
        "model": gpu_name or "GPU",
        "via_device": healer_device_id(topics, host),
    }
    if uuid:
        device["serial_number"] = uuid
    common: dict[str, Any] = {
        "state_topic": state,
        "availability": [_availability(analyzer_status_topic)],
        "device": device,
        "origin": {"name": "gpuheal"},
    }
    sensors: list[tuple[str, dict[str, Any]]] = [
        ("temperature", {"name": "Temperature", "value_template": "{{ value_json.temperature }}",
                         "unit_of_measurement": "°C", "device_class": "temperature",
                         "state_class": "measurement"}),
        ("utilization", {"name": "Utilization", "value_template": "{{ value_json.utilization }}",
                         "unit_of_measurement": "%", "state_class": "measurement",
                         "icon": "mdi:gauge"}),
        ("memory_used", {"name": "Memory used",
                         "value_template": "{{ value_json.memory.used_mb }}",
                         "unit_of_measurement": "MiB", "device_class": "data_size",
                         "state_class": "measurement"}),
        ("memory_percent", {"name": "Memory used percent",
                            "value_template": "{{ value_json.memory.percent }}",
                            "unit_of_measurement": "%", "state_class": "measurement",
                            "icon": "mdi:memory"}),
        ("power", {"name": "Power", "value_template": "{{ value_json.power.draw_w }}",
                   "unit_of_measurement": "W", "device_class": "power",
                   "state_class": "measurement"}),
        ("health", {"name": "Health", "value_template": "{{ value_json.health }}",
                    "device_class": "enum", "options": HEALTH_OPTIONS,
                    "json_attributes_topic": state,
                    "json_attributes_template": (
                        "{{ {'error': value_json.error, 'error_message': "
                        "value_json.error_message} | tojson }}")}),
    ]
    out = []
    for key, extra in sensors:
        oid = object_id("gpuheal", topics.prefix, host, "gpu", index, key)
        out.append(_config(topics, "sensor", oid, {**extra, "unique_id": oid, **common}))
    oid = object_id("gpuheal", topics.prefix, host, "gpu", index, "problem")
    out.append(_config(topics, "binary_sensor", oid, {
        "name": "Problem",
        "unique_id": oid,
        "device_class": "problem",
        "value_template": "{{ 'ON' if value_json.health != 'healthy' else 'OFF' }}",
        "payload_on": "ON",
        "payload_off": "OFF",
        **common,
    }))
    return out


def healer_discovery(topics: Topics, host: str, analyzer_status_topic: str) -> list[Config]:
    """The ``switch`` that turns healing on and off for one host (``P/H/healer/set``), its
    state read from the retained ``P/H/healer/state``; available while both the analyzer and
    that host's healer are online."""
    oid = object_id("gpuheal", topics.prefix, host, "healing_enabled")
    payload = {
        "name": "Healing enabled",
        "unique_id": oid,
        "command_topic": topics.healer_set(host),
        "payload_on": json.dumps({"enabled": True}),
        "payload_off": json.dumps({"enabled": False}),
        "state_topic": topics.healer_state(host),
        "value_template": "{{ 'ON' if value_json.enabled else 'OFF' }}",
        "state_on": "ON",
        "state_off": "OFF",
        "qos": 1,
        "retain": False,
        "icon": "mdi:medical-bag",
        "availability": [_availability(analyzer_status_topic),
                         _availability(topics.status(host, "healer"))],
        "availability_mode": "all",
        "device": {
            "identifiers": [healer_device_id(topics, host)],
            "name": f"gpuheal {host}",
            "manufacturer": "gpuheal",
            "model": "healer",
        },
        "origin": {"name": "gpuheal"},
    }
    return [_config(topics, "switch", oid, payload)]
