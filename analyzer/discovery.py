"""Home Assistant MQTT discovery: one device per GPU, one healer switch per host.

Every builder returns ``(topic, payload)`` pairs; the service publishes them retained (QoS 1)
once per new GPU / host, again when ``homeassistant/status`` says ``online`` and on every
reconnect. The GPU entities read the retained State (``P/H/gpu/I/state``) and are available
while the analyzer's status topic says ``online``.
"""

from __future__ import annotations

import json
from typing import Any

from gpuheal.topics import HA_GPU_ENTITIES, HA_HOST_ENTITIES, Topics

Config = tuple[str, bytes]

HEALTH_OPTIONS = ["healthy", "warning", "critical", "lost"]
"""The health sensor's states. The wire says ``unavailable`` for a lost GPU; Home Assistant
reserves that word for an entity it cannot read (a stopped analyzer), so it reads ``lost``."""
HEALTH_TEMPLATE = ("{{ 'lost' if value_json.health == 'unavailable' "
                   "else value_json.health }}")
EXPIRE_AFTER_S = 300
"""A reading (temperature, utilization, memory, power) whose State has not come for this long
reads unavailable in Home Assistant: a GPU that disappeared has no readings. Its health and
problem sensors do not expire (they say ``lost`` and ON)."""


def _availability(topic: str) -> dict[str, str]:
    return {"topic": topic, "payload_available": "online", "payload_not_available": "offline"}


def healer_device_id(topics: Topics, host: str) -> str:
    return topics.ha_object_id(host, "healer")


def gpu_device_id(topics: Topics, host: str, index: int) -> str:
    return topics.ha_object_id(host, "gpu", index)


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
    """Sensors (temperature, utilization, memory, power, health, the last action) and a
    problem binary sensor for one GPU: the readings from its retained State, the last action
    from its Actions."""
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
        "expire_after": EXPIRE_AFTER_S,
    }
    sensors: dict[str, dict[str, Any]] = {
        "temperature": {"name": "Temperature", "value_template": "{{ value_json.temperature }}",
                        "unit_of_measurement": "°C", "device_class": "temperature",
                        "state_class": "measurement"},
        "utilization": {"name": "Utilization", "value_template": "{{ value_json.utilization }}",
                        "unit_of_measurement": "%", "state_class": "measurement",
                        "icon": "mdi:gauge"},
        "memory_used": {"name": "Memory used",
                        "value_template": "{{ value_json.memory.used_mb }}",
                        "unit_of_measurement": "MiB", "device_class": "data_size",
                        "state_class": "measurement"},
        "memory_percent": {"name": "Memory used percent",
                           "value_template": "{{ value_json.memory.percent }}",
                           "unit_of_measurement": "%", "state_class": "measurement",
                           "icon": "mdi:memory"},
        "power": {"name": "Power", "value_template": "{{ value_json.power.draw_w }}",
                  "unit_of_measurement": "W", "device_class": "power",
                  "state_class": "measurement"},
        "health": {"name": "Health", "value_template": HEALTH_TEMPLATE,
                   "device_class": "enum", "options": HEALTH_OPTIONS,
                   "json_attributes_topic": state,
                   "json_attributes_template": (
                       "{{ {'error': value_json.error, 'error_message': "
                       "value_json.error_message} | tojson }}")},
        "last_action": {"name": "Last action", "icon": "mdi:medical-bag",
                        "state_topic": topics.action(host, index),
                        "value_template": "{{ value_json.action }}: {{ value_json.status }}",
                        "json_attributes_topic": topics.action(host, index),
                        "json_attributes_template": (
                            "{{ {'action': value_json.action, 'status': value_json.status, "
                            "'reason': value_json.reason, 'event_id': value_json.event_id, "
                            "'attempt': value_json.attempt} | tojson }}")},
    }
    out = []
    for platform, key in HA_GPU_ENTITIES:
        oid = topics.ha_object_id(host, "gpu", index, key)
        if platform == "binary_sensor":
            problem = {"name": "Problem", "unique_id": oid, "device_class": "problem",
                       "value_template": "{{ 'ON' if value_json.health != 'healthy' else 'OFF' }}",
                       "payload_on": "ON", "payload_off": "OFF", **common}
            problem.pop("expire_after")  # a silent GPU still has a problem
            out.append(_config(topics, platform, oid, problem))
            continue
        entity = {**common, **sensors[key], "unique_id": oid}
        if key in ("last_action", "health"):
            # the last action stays true however long ago it was; a silent GPU's health says
            # "lost" (never Home Assistant's "unavailable": that means gpuheal is down)
            entity.pop("expire_after")
        out.append(_config(topics, platform, oid, entity))
    return out


def healer_discovery(topics: Topics, host: str, analyzer_status_topic: str) -> list[Config]:
    """For one host's healer: the ``switch`` that turns healing on and off and the ``button``
    that resets its circuit breaker (both on ``P/H/healer/set``); available while both the
    analyzer and that host's healer are online."""
    device = {
        "identifiers": [healer_device_id(topics, host)],
        "name": f"gpuheal {host}",
        "manufacturer": "gpuheal",
        "model": "healer",
    }
    availability = {"availability": [_availability(analyzer_status_topic),
                                     _availability(topics.status(host, "healer"))],
                    "availability_mode": "all", "device": device, "origin": {"name": "gpuheal"},
                    "qos": 1, "retain": False, "command_topic": topics.healer_set(host)}
    entities = {
        "healing_enabled": {
            "name": "Healing enabled",
            "payload_on": json.dumps({"enabled": True}),
            "payload_off": json.dumps({"enabled": False}),
            "state_topic": topics.healer_state(host),
            "value_template": "{{ 'ON' if value_json.enabled else 'OFF' }}",
            "state_on": "ON",
            "state_off": "OFF",
            "icon": "mdi:medical-bag",
        },
        "reset_breaker": {
            "name": "Reset circuit breaker",
            "payload_press": json.dumps({"reset_breaker": True}),
            "icon": "mdi:electric-switch-closed",
        },
    }
    out = []
    for platform, key in HA_HOST_ENTITIES:
        oid = topics.ha_object_id(host, key)
        out.append(_config(topics, platform, oid,
                           {**entities[key], "unique_id": oid, **availability}))
    return out
