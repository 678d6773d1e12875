"""Home Assistant discovery configs: topics, entities, the healer switch."""

from __future__ import annotations

import json

from analyzer.discovery import gpu_discovery, healer_discovery, object_id
from gpuheal.topics import Topics, valid_host

T = Topics("gpuheal", "homeassistant")
STATUS = T.status("site", "analyzer")


def test_gpu_entities_read_the_retained_state() -> None:
    configs = dict(gpu_discovery(T, "node1", 3, "NVIDIA H100 80GB HBM3", "GPU-abc", STATUS))
    platforms = sorted(topic.split("/")[1] for topic in configs)
    assert platforms == ["binary_sensor"] + ["sensor"] * 6
    payloads = {topic: json.loads(p) for topic, p in configs.items()}
    keys = {topic.split("/")[2].rsplit("_", 1)[-1] for topic in payloads}
    assert {"temperature", "utilization", "used", "percent", "power", "health",
            "problem"} == keys
    ids = set()
    for topic, p in payloads.items():
        assert topic.startswith("homeassistant/") and topic.endswith("/config")
        assert valid_host(topic.split("/")[2])
        assert p["state_topic"] == "gpuheal/node1/gpu/3/state"
        assert p["availability"][0]["topic"] == STATUS
        assert p["device"]["identifiers"] == ["gpuheal_gpuheal_node1_gpu_3"]
        assert p["device"]["model"] == "NVIDIA H100 80GB HBM3"
        assert "value_json" in p["value_template"]
        ids.add(p["unique_id"])
    assert len(ids) == 7
    problem = next(p for p in payloads.values() if p.get("device_class") == "problem")
    assert "health != 'healthy'" in problem["value_template"]


def test_healer_switch_commands_the_healer_set_topic() -> None:
    [(topic, raw)] = healer_discovery(T, "node1", STATUS)
    p = json.loads(raw)
    assert topic == "homeassistant/switch/gpuheal_gpuheal_node1_healing_enabled/config"
    assert p["command_topic"] == T.healer_set("node1")
    assert json.loads(p["payload_on"]) == {"enabled": True}
    assert json.loads(p["payload_off"]) == {"enabled": False}
    assert p["state_topic"] == T.healer_state("node1")
    assert "value_json.enabled" in p["value_template"]
    assert {a["topic"] for a in p["availability"]} == {STATUS, T.status("node1", "healer")}


def test_object_ids_are_topic_safe() -> None:
    oid = object_id("gpuheal", "site/a b", "host", "gpu", 0, "power")
    assert valid_host(oid) and oid == "gpuheal_site_a_b_host_gpu_0_power"
