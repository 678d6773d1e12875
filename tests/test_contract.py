"""The shared contract: models round-trip, topics, config strictness, the MQTT wrapper."""

from __future__ import annotations

import json

import pytest

from gpuheal.config import ConfigError, load_config
from gpuheal.models import (
    Action,
    ActiveCondition,
    Event,
    HealerSet,
    HealerState,
    Sample,
    SimCommand,
    State,
    iso_utc,
    make_event_id,
)
from gpuheal.mqtt import BrokerURL, BrokerURLError
from gpuheal.topics import Topics
from gpuheal.wire import PayloadError, decode

SAMPLE = {
    "v": 1, "host": "orin-1", "index": 0, "uuid": "GPU-1", "name": "NVIDIA Jetson AGX Orin",
    "source": "jetson", "ts": 1700000000.5, "seq": 7, "temperature_c": 45.5,
    "utilization_pct": 25.0, "memory_used_mb": 12288.0, "memory_total_mb": 62841.0,
    "power_draw_w": 35.5, "power_limit_w": 60.0, "sm_clock_mhz": 1300.0,
    "mem_clock_mhz": 3199.0, "fan_pct": None, "throttle_reasons": ["sw_power_cap"],
    "xids": [13], "ecc_uncorrected": 0, "remapped_rows_pending": False,
    "processes": [{"pid": 42, "name": "ollama", "used_mb": 9000.0}],
}


def test_every_message_round_trips_through_json() -> None:
    sample = Sample.model_validate(SAMPLE)
    state = State(host="h", index=0, health="warning", error="out_of_memory",
                  timestamp=iso_utc(1.5), ts=1.5,
                  active=[ActiveCondition(event_id="e", kind="out_of_memory",
                                          severity="warning", started_ts=1.0)])
    event = Event(event_id="e", host="h", index=0, kind="gpu_hang", severity="critical",
                  phase="raised", started_ts=1.0, ts=2.0, message="m",
                  evidence={"util": 100}, recommended_action="reset_gpu")
    action = Action(action_id="a", event_id="e", host="h", index=0, action="reset_gpu",
                    status="verified", ts=3.0, duration_s=1.25, detail={"x": 1})
    hstate = HealerState(host="h", enabled=True, dry_run=False, breaker_open=False,
                         budget_left=3, budget_per_hour=12, ts=1.0)
    for msg in (sample, state, event, action, hstate,
                SimCommand(command="reset", action_id="a")):
        again = decode(type(msg), msg.to_json())
        assert again == msg
        assert json.loads(msg.to_json())["v"] == 1


def test_unknown_keys_are_ignored_and_missing_readings_are_none() -> None:
    data = dict(SAMPLE, future_field="x", temperature_c=None)
    sample = decode(Sample, json.dumps(data).encode())
    assert sample.temperature_c is None
    assert not hasattr(sample, "future_field")


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"\xff\xfe", "not UTF-8"),
        (b"{", "not JSON"),
        (b"[1,2]", "not a JSON object"),
        (json.dumps(dict(SAMPLE, ts="yesterday")).encode(), "invalid Sample: ts"),
        (json.dumps(SAMPLE).replace("45.5", "NaN").encode(), "not JSON"),
        (json.dumps(SAMPLE).replace("45.5", "Infinity").encode(), "not JSON"),
        (json.dumps(dict(SAMPLE, host="bad/host")).encode(), "invalid Sample: host"),
        (json.dumps(dict(SAMPLE, host="a+b")).encode(), "invalid Sample: host"),
        (json.dumps(dict(SAMPLE, index=-1)).encode(), "invalid Sample: index"),
        (json.dumps(dict(SAMPLE, v=2)).encode(), "invalid Sample: v"),
        (json.dumps(dict(SAMPLE, source="gpu")).encode(), "invalid Sample: source"),
        (b" " * (300 * 1024), "payload too large"),
    ],
)
def test_bad_payloads_give_a_clear_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(PayloadError) as info:
        decode(Sample, payload)
    assert info.value.reason.startswith(reason)


def test_healer_set_only_resets_with_true() -> None:
    assert decode(HealerSet, b'{"reset_breaker": true}').reset_breaker is True
    with pytest.raises(PayloadError):
        decode(HealerSet, b'{"reset_breaker": false}')
    with pytest.raises(PayloadError):
        decode(HealerSet, b'{"enabled": "yes please"}')


def test_event_id_is_deterministic() -> None:
    a = make_event_id("h", 0, "gpu_hang", 1700000000.25)
    assert a == make_event_id("h", 0, "gpu_hang", 1700000000.25)
    assert a != make_event_id("h", 1, "gpu_hang", 1700000000.25)
    assert a != make_event_id("h", 0, "gpu_hang", 1700000001.25)


def test_iso_timestamp_is_utc_with_z() -> None:
    assert iso_utc(0.5) == "1970-01-01T00:00:00.500Z"


def test_topics_build_and_parse() -> None:
    t = Topics("gpuheal")
    assert t.sample("orin-1", 0) == "gpuheal/orin-1/gpu/0/sample"
    assert t.status("h", "healer") == "gpuheal/h/healer/status"
    assert t.gpu_pattern("event") == "gpuheal/+/gpu/+/event"
    assert t.gpu_pattern("state", "h") == "gpuheal/h/gpu/+/state"
    parts = t.parse("gpuheal/h/gpu/3/action")
    assert parts is not None and (parts.host, parts.index, parts.kind) == ("h", 3, "action")
    assert t.parse("gpuheal/h/healer/set").kind == "healer_set"
    assert t.parse("gpuheal/deadletter/analyzer").component == "analyzer"
    assert t.parse("gpuheal/h/gpu/x/sample") is None
    assert t.parse("other/h/gpu/0/sample") is None
    for bad in ("a/b", "a+b", "", "a#"):
        with pytest.raises(ValueError):
            t.sample(bad, 0)
    with pytest.raises(ValueError):
        Topics("bad/+")


def test_config_rejects_typos(tmp_path) -> None:
    good = tmp_path / "good.toml"
    good.write_text("[analyzer.thermal]\nwarning_c = 80.0\n[healer.guards]\ncooldown_s = 5\n")
    cfg = load_config(good)
    assert cfg.analyzer.thermal.warning_c == 80.0
    assert cfg.healer.guards.cooldown_s == 5
    typo = tmp_path / "typo.toml"
    typo.write_text("[analyzer.thermal]\nwarnig_c = 80.0\n")
    with pytest.raises(ConfigError, match="warnig_c"):
        load_config(typo)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")


def test_memory_profile_chosen_by_name() -> None:
    cfg = load_config(None).analyzer
    assert cfg.memory_profile_for("NVIDIA Jetson AGX Orin", "h").unit == "gb"
    assert cfg.memory_profile_for("NVIDIA H100 80GB HBM3", "h").unit == "percent"


def test_broker_urls() -> None:
    u = BrokerURL.parse("mqtts://user:p%40ss@broker.example:8884?ca=/etc/ca.crt")
    assert (u.host, u.port, u.username, u.password, u.tls, u.ca_certs) == (
        "broker.example", 8884, "user", "p@ss", True, "/etc/ca.crt")
    assert BrokerURL.parse("mqtt://127.0.0.1").port == 1883
    assert "p@ss" not in u.redacted()
    for bad in ("http://x", "mqtt://", "mqtt://h:notaport"):
        with pytest.raises(BrokerURLError):
            BrokerURL.parse(bad)


def test_example_config_documents_the_defaults() -> None:
    """gpuheal.example.toml loads to the defaults and is what the generator writes now."""
    from pathlib import Path

    from gpuheal.config import GpuhealConfig
    from gpuheal.config.example import render

    repo = Path(__file__).resolve().parent.parent
    example = repo / "gpuheal.example.toml"
    assert load_config(example) == GpuhealConfig()
    assert example.read_text() == render(), "run scripts/example_config.py"
