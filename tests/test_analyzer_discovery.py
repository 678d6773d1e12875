"""Home Assistant discovery configs: topics, entities, the healer switch."""

from __future__ import annotations

import json

import pytest

from analyzer.discovery import gpu_discovery, healer_discovery
from gpuheal.topics import Topics, valid_host

T = Topics("gpuheal", "homeassistant")
STATUS = T.status("site", "analyzer")


def test_gpu_entities_read_the_retained_state() -> None:
    configs = dict(gpu_discovery(T, "node1", 3, "NVIDIA H100 80GB HBM3", "GPU-abc", STATUS))
    platforms = sorted(topic.split("/")[1] for topic in configs)
    assert platforms == ["binary_sensor"] + ["sensor"] * 7
    assert sorted(configs) == sorted(T.ha_gpu_configs("node1", 3))  # what --forget clears
    payloads = {topic: json.loads(p) for topic, p in configs.items()}
    last_action = payloads.pop(next(t for t in payloads if t.endswith("_last_action/config")))
    assert last_action["state_topic"] == "gpuheal/node1/gpu/3/action"
    assert "value_json.status" in last_action["value_template"]
    assert "reason" in last_action["json_attributes_template"]
    ids = set()
    for topic, p in payloads.items():
        assert topic.startswith("homeassistant/") and topic.endswith("/config")
        assert valid_host(topic.split("/")[2])
        assert p["state_topic"] == "gpuheal/node1/gpu/3/state"
        if "_health/" not in topic and "_problem/" not in topic:
            assert p["expire_after"] == 300  # a GPU gone for good: no readings
        assert p["availability"][0]["topic"] == STATUS
        assert p["device"]["identifiers"] == ["gpuheal_gpuheal_node1_gpu_3"]
        assert p["device"]["model"] == "NVIDIA H100 80GB HBM3"
        assert "value_json" in p["value_template"]
        ids.add(p["unique_id"])
    assert len(ids) == 7
    problem = next(p for p in payloads.values() if p.get("device_class") == "problem")
    assert "health != 'healthy'" in problem["value_template"]
    health = next(p for p in payloads.values() if p.get("device_class") == "enum")
    assert "unavailable" not in health["options"] and "lost" in health["options"]


def test_a_lost_gpu_does_not_read_as_home_assistants_unavailable() -> None:
    """Home Assistant reserves ``unavailable`` for an entity it cannot read; a lost GPU reads
    ``lost`` (rendered with Home Assistant's own template engine, jinja2)."""
    jinja2 = pytest.importorskip("jinja2")
    configs = dict(gpu_discovery(T, "node1", 0, None, None, STATUS))
    health = json.loads(next(p for t, p in configs.items() if t.endswith("_health/config")))
    template = jinja2.Environment().from_string(health["value_template"])
    assert template.render(value_json={"health": "unavailable"}) == "lost"
    assert template.render(value_json={"health": "critical"}) == "critical"


def test_healer_switch_and_breaker_button_command_the_healer_set_topic() -> None:
    configs = healer_discovery(T, "node1", STATUS)
    assert [t for t, _ in configs] == T.ha_host_configs("node1")
    (topic, raw), (button_topic, button_raw) = configs
    button = json.loads(button_raw)
    assert button_topic.startswith("homeassistant/button/")
    assert json.loads(button["payload_press"]) == {"reset_breaker": True}
    assert button["command_topic"] == T.healer_set("node1")
    p = json.loads(raw)
    assert topic == "homeassistant/switch/gpuheal_gpuheal_node1_healing_enabled/config"
    assert p["command_topic"] == T.healer_set("node1")
    assert json.loads(p["payload_on"]) == {"enabled": True}
    assert json.loads(p["payload_off"]) == {"enabled": False}
    assert p["state_topic"] == T.healer_state("node1")
    assert "value_json.enabled" in p["value_template"]
    assert {a["topic"] for a in p["availability"]} == {STATUS, T.status("node1", "healer")}


def test_object_ids_are_topic_safe() -> None:
    oid = Topics("site.a-b").ha_object_id("host", "gpu", 0, "power")
    assert valid_host(oid) and oid == "gpuheal_site_a-b_host_gpu_0_power"
