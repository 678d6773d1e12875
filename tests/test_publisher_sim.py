"""The simulated GPU: determinism, every built-in scenario's shape, the reaction to each
simulator command, scenario files. Simulated time only: nothing here waits on the clock."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from analyzer.engine import Analyzer
from gpuheal.config import AnalyzerConfig
from gpuheal.models import Event, Sample, SimCommand
from publisher.scenarios import BUILTIN_NAMES, INCIDENT_MAX_S, ScenarioError, load_scenario
from publisher.sources.sim import (
    DEFAULT_POWER_LIMIT_W,
    MEMORY_TOTAL_MB,
    SIM_NAME,
    SimGpu,
    SimSource,
    sim_uuid,
)

GIB = 1024
ANALYZER = AnalyzerConfig()
ORIN = ANALYZER.memory_profile_for(SIM_NAME, "h")
MEM_WARNING = ORIN.warning * GIB      # 36 GiB
MEM_CRITICAL = ORIN.critical * GIB    # 38 GiB
MEM_CLEAR = (ORIN.warning - ORIN.hysteresis) * GIB  # 35 GiB
THERMAL = ANALYZER.thermal
TEMP_CLEAR = THERMAL.warning_c - THERMAL.hysteresis_c  # 80 °C

Healer = Callable[[dict[str, Any], SimGpu], SimCommand | None]


def cmd(name: str, power_limit_w: float | None = None) -> SimCommand:
    return SimCommand(command=name, action_id="test", power_limit_w=power_limit_w)


def play(scenario: str, seconds: float, seed: int = 0, healer: Healer | None = None,
         ) -> list[dict[str, Any]]:
    """Readings of GPU 0, one per simulated second, each with the phase it was read in."""
    source = SimSource(scenario, seed=seed, interval_s=1.0, start_ts=1000.0)
    gpu = source.gpus[0]
    out = []
    for _ in range(int(seconds)):
        reading = source.read(0.0)[0]
        reading["phase"] = gpu.phase.name
        reading["t"] = gpu.t
        out.append(reading)
        command = healer(reading, gpu) if healer else None
        if command is not None:
            source.command(0, command)
    return out


def looks_hung(readings: list[dict[str, Any]]) -> bool:
    """Whether the analyzer (default config) confirms a hang on these readings."""
    engine = Analyzer(ANALYZER, started_ts=0.0, clock=lambda: 0.0)
    for seq, r in enumerate(readings):
        sample = Sample(host="h", source="sim", seq=seq,
                        **{k: v for k, v in r.items() if k not in ("phase", "t")})
        for out in engine.process(sample):
            if isinstance(out, Event) and out.kind == "gpu_hang" and out.severity == "critical":
                return True
    return False


def in_phase(readings: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [r for r in readings if r["phase"] == name]


# --- determinism and identity ---------------------------------------------------------------
def test_same_seed_same_samples_other_seed_other_samples() -> None:
    a = play("demo", 400, seed=3)
    b = play("demo", 400, seed=3)
    c = play("demo", 400, seed=4)
    assert a == b
    assert a != c


def test_identity_time_and_validity() -> None:
    source = SimSource("healthy", gpus=3, interval_s=2.0, start_ts=5000.0)
    first = source.read(0.0)
    second = source.read(0.0)
    assert [r["ts"] for r in first + second] == [5000.0] * 3 + [5002.0] * 3
    assert [r["uuid"] for r in first] == [sim_uuid(0), sim_uuid(1), sim_uuid(2)]
    assert len({r["uuid"] for r in first}) == 3 and sim_uuid(1) == sim_uuid(1)
    for r in first:
        assert r["name"] == "NVIDIA Jetson AGX Orin (simulated)"
        assert r["memory_total_mb"] == MEMORY_TOTAL_MB == 62841
        assert r["power_limit_w"] == DEFAULT_POWER_LIMIT_W == 60
        Sample(host="h", source="sim", seq=0, **r)
    assert source.next_wait_s() == 2.0
    assert SimSource(interval_s=1.0, speed=20).next_wait_s() == 0.05


def test_other_gpus_run_healthy_seeded_from_seed_plus_index() -> None:
    source = SimSource("hang", seed=5, gpus=3, start_ts=0.0)
    twin = SimGpu(load_scenario("healthy"), seed=7, index=2)
    for _ in range(100):
        readings = source.read(0.0)
        if source.gpus[2].t > 0:
            twin.step(1.0)
        assert readings[2] == {**twin.reading(), "ts": readings[2]["ts"], "host_boot_ts": 0.0}
    assert source.gpus[0].phase.name == "hang" and source.gpus[1].phase.name == "idle"


def test_commands_for_a_missing_gpu_are_refused() -> None:
    source = SimSource("demo", gpus=2)
    with pytest.raises(ValueError, match="no simulated GPU 2"):
        source.command(2, cmd("reset"))
    assert source.has_gpu(1) and not source.has_gpu(-1)


# --- demo ------------------------------------------------------------------------------------
def demo_healer(sent: dict[str, float]) -> Healer:
    """What the healer's ladder would send, once each, when the analyzer would raise."""
    def heal(r: dict[str, Any], gpu: SimGpu) -> SimCommand | None:
        if r["memory_used_mb"] >= MEM_WARNING and "unload" not in sent:
            sent["unload"] = r["t"]
            return cmd("unload_models")
        if r["temperature_c"] >= THERMAL.warning_c and "throttle" not in sent:
            sent["throttle"] = r["t"]
            return cmd("set_power_limit", 0.8 * r["power_limit_w"])
        if r["phase"] == "hang" and gpu.phase_t >= 45 and "reset" not in sent:
            sent["reset"] = r["t"]
            return cmd("reset")
        return None
    return heal


def test_demo_plays_every_incident_and_heals_on_the_commands() -> None:
    sent: dict[str, float] = {}
    readings = play("demo", 1300, healer=demo_healer(sent))
    order = list(dict.fromkeys(r["phase"] for r in readings))
    assert order == ["healthy", "oom", "after-oom", "thermal", "after-thermal", "hang"]
    assert set(sent) == {"unload", "throttle", "reset"}

    healthy = in_phase(readings, "healthy")
    assert len([r for r in healthy if r["t"] < 100]) == 60
    oom = in_phase(readings, "oom")
    assert max(r["memory_used_mb"] for r in oom) < MEM_CRITICAL, "warning level only"
    assert oom[-1]["memory_used_mb"] >= MEM_WARNING
    after_oom = in_phase(readings, "after-oom")
    # the command applies at the next read, at the simulated time of the sample that caused it
    assert [after_oom[0]["t"], after_oom[-1]["t"]] == [sent["unload"] + 1, sent["unload"] + 119]
    assert all(r["memory_used_mb"] < 11 * GIB for r in after_oom[10:]), "~10 GiB"

    thermal = in_phase(readings, "thermal")
    hot = [r for r in thermal if r["temperature_c"] >= THERMAL.warning_c]
    assert hot and max(r["temperature_c"] for r in thermal) < THERMAL.critical_c
    after_thermal = in_phase(readings, "after-thermal")
    assert all(r["power_limit_w"] == 48.0 for r in after_thermal)
    cooled = [r for r in after_thermal if r["temperature_c"] < TEMP_CLEAR]
    assert cooled and cooled[0]["t"] - after_thermal[0]["t"] < 60, "clears within a minute"
    assert 70 <= after_thermal[-1]["temperature_c"] <= 74, "decays to ~72 °C"

    hang = in_phase(readings, "hang")
    assert {r["utilization_pct"] for r in hang} == {100.0}
    assert len({r["power_draw_w"] for r in hang}) == 1
    assert len({r["memory_used_mb"] for r in hang}) == 1
    assert looks_hung(hang)
    final = [r for r in readings if r["t"] > sent["reset"]]
    assert final and all(r["phase"] == "healthy" for r in final)
    assert all(r["utilization_pct"] < 90 and r["temperature_c"] < 75 for r in final[30:])
    assert not looks_hung(final)


def test_demo_incidents_end_by_themselves_in_a_dry_run() -> None:
    readings = play("demo", 60 + 3 * INCIDENT_MAX_S + 2 * 120 + 100)
    starts = {name: next(r["t"] for r in readings if r["phase"] == name)
              for name in ("oom", "after-oom", "thermal", "after-thermal", "hang")}
    assert starts == {"oom": 60, "after-oom": 960, "thermal": 1080, "after-thermal": 1980,
                      "hang": 2100}
    assert readings[-1]["phase"] == "healthy"
    assert readings[-1]["utilization_pct"] < 90


def test_demo_thermal_needs_a_real_power_cut() -> None:
    def heal(r: dict[str, Any], gpu: SimGpu) -> SimCommand | None:
        if r["phase"] == "thermal" and gpu.phase_t == 100:
            return cmd("set_power_limit", 0.9 * DEFAULT_POWER_LIMIT_W)
        return None
    readings = play("demo", 1400, healer=heal)
    thermal = in_phase(readings, "thermal")
    assert len(thermal) > 200, "54 W is not <= 80 % of 60 W: the phase goes on"
    assert thermal[-1]["power_limit_w"] == 54.0


# --- single incidents --------------------------------------------------------------------------
def test_oom_ladder_needs_a_service_restart() -> None:
    events: dict[str, Any] = {}

    def heal(r: dict[str, Any], gpu: SimGpu) -> SimCommand | None:
        if r["memory_used_mb"] >= MEM_WARNING and r["phase"] == "leak" and "unload" not in events:
            events["unload"] = r
            return cmd("unload_models")
        if r["memory_used_mb"] >= MEM_CRITICAL and "restart" not in events:
            events["restart"] = r
            return cmd("restart_service")
        return None

    readings = play("oom", 600, healer=heal)
    leak = in_phase(readings, "leak")
    assert leak[0]["t"] == 60
    peak_before = max(r["memory_used_mb"] for r in leak if r["t"] <= events["unload"]["t"])
    assert peak_before < MEM_CRITICAL
    after_unload = next(r for r in leak if r["t"] == events["unload"]["t"] + 1)
    freed = events["unload"]["memory_used_mb"] - after_unload["memory_used_mb"]
    assert 400 <= freed <= 700, "unloading frees only ~0.5 GiB"
    assert after_unload["memory_used_mb"] > MEM_CLEAR, "the warning does not clear"
    assert "restart" in events, "the leak creeps on to critical"
    assert events["restart"]["t"] - events["unload"]["t"] < 150
    recovered = in_phase(readings, "recovered")
    assert recovered and recovered[20]["memory_used_mb"] < 8.1 * GIB


def test_thermal_power_limit_helps_only_partly_restart_cools() -> None:
    events: dict[str, float] = {}

    def heal(r: dict[str, Any], gpu: SimGpu) -> SimCommand | None:
        if r["temperature_c"] >= THERMAL.warning_c and "throttle" not in events:
            events["throttle"] = r["t"]
            return cmd("set_power_limit", 48.0)
        if "throttle" in events and r["t"] == events["throttle"] + 120:
            events["restart"] = r["t"]
            return cmd("restart_service")
        return None

    readings = play("thermal", 600, healer=heal)
    throttled = [r for r in readings if events["throttle"] < r["t"] <= events["restart"]]
    assert all(r["temperature_c"] > TEMP_CLEAR for r in throttled), "stays above 80 °C"
    assert max(r["temperature_c"] for r in throttled) >= THERMAL.critical_c, "~86 °C"
    cooled = in_phase(readings, "cooled")
    assert cooled[0]["t"] == events["restart"] + 1
    assert 68 <= cooled[-1]["temperature_c"] <= 72 and cooled[-1]["utilization_pct"] < 30


def test_hang_is_flat_until_reset() -> None:
    def heal(r: dict[str, Any], gpu: SimGpu) -> SimCommand | None:
        if r["t"] == 200:
            return cmd("unload_models")  # no help for a hang
        return cmd("reset") if r["t"] == 300 else None

    readings = play("hang", 400, healer=heal)
    assert not looks_hung([r for r in readings if r["t"] < 60])
    hang = in_phase(readings, "hang")
    assert [hang[0]["t"], hang[-1]["t"]] == [60, 300], "a command applies at once"
    assert {(r["utilization_pct"], r["power_draw_w"], r["memory_used_mb"]) for r in hang} \
        == {(100.0, 45.0, hang[0]["memory_used_mb"])}
    assert looks_hung(hang)
    after = in_phase(readings, "recovered")
    assert after and not looks_hung(after) and max(r["utilization_pct"] for r in after) < 90


def test_healthy_busy_never_looks_like_a_hang() -> None:
    readings = play("healthy-busy", 3600, seed=11)
    assert all(99 <= r["utilization_pct"] <= 100 for r in readings)
    assert all(40 <= r["power_draw_w"] <= 58 for r in readings)
    assert all(r["temperature_c"] < 80 for r in readings)
    memories = [r["memory_used_mb"] for r in readings]
    assert max(memories) - min(memories) > 300
    assert not looks_hung(readings)


def test_xid_codes_appear_once_each() -> None:
    readings = play("xid", 400)
    with_xids = [(r["t"], r["xids"]) for r in readings if r["xids"]]
    assert with_xids == [(60, [13]), (180, [79])]
    assert all(r["xids"] == [] for r in readings if r["t"] not in (60, 180))


def test_lost_gpu_answers_nothing_until_reset() -> None:
    def heal(r: dict[str, Any], gpu: SimGpu) -> SimCommand | None:
        if r["t"] == 100:
            return cmd("set_power_limit", 20.0)
        return cmd("reset") if r["t"] == 150 else None

    readings = play("lost", 200, healer=heal)
    lost = in_phase(readings, "lost")
    assert [lost[0]["t"], lost[-1]["t"]] == [60, 150]
    for r in lost:
        assert r["available"] is False and r["error"] == "GPU is lost"
        assert r["uuid"] == sim_uuid(0) and r["name"] == SIM_NAME
        sample = Sample(host="h", source="sim", seq=0, **{k: v for k, v in r.items()
                                                          if k not in ("phase", "t")})
        assert sample.temperature_c is None and sample.utilization_pct is None
    back = in_phase(readings, "recovered")
    assert back and back[0]["power_limit_w"] == 60.0, "a lost GPU took no power limit"
    assert "available" not in back[0]


# --- commands -----------------------------------------------------------------------------------
def test_power_limit_is_clamped_and_fan_max_cools() -> None:
    gpu = SimGpu(load_scenario("healthy"))
    gpu.apply(cmd("set_power_limit", 500.0))
    assert gpu.power_limit_w == 60.0
    gpu.apply(cmd("set_power_limit", 1.0))
    assert gpu.power_limit_w == 10.0
    gpu.apply(cmd("set_power_limit", None))
    assert gpu.power_limit_w == 60.0
    for _ in range(200):
        gpu.step(1.0)
    warm = gpu.temperature_c
    gpu.apply(cmd("fan_max"))
    for _ in range(200):
        gpu.step(1.0)
    assert gpu.reading()["fan_pct"] == 100.0
    assert 2.0 < warm - gpu.temperature_c < 4.0
    gpu.apply(cmd("reset"))
    assert gpu.reading()["fan_pct"] < 100
    assert gpu.commands == ["set_power_limit"] * 3 + ["fan_max", "reset"]


def test_a_lower_power_limit_lowers_power_draw() -> None:
    gpu = SimGpu(load_scenario("healthy-busy"))
    gpu.apply(cmd("set_power_limit", 30.0))
    gpu.step(1.0)
    reading = gpu.reading()
    assert reading["power_draw_w"] == 30.0 and reading["throttle_reasons"] == ["sw_power_cap"]


# --- scenario files --------------------------------------------------------------------------
TOML_SCENARIO = """
name = "leak"
description = "leaks until restarted"

[[phases]]
name = "warm-up"
duration_s = 10
util_pct = 30

[[phases]]
name = "leak"
memory_mb = 37888
memory_rate_mb_s = 1000
xids = [31]
[phases.on.unload_models]
memory_step_mb = -512
set = { memory_mb = 39424, memory_rate_mb_s = 25 }
[phases.on.restart_service]
end = true

[[phases]]
name = "recovered"
memory_mb = 8192
memory_rate_mb_s = 4000
"""


def test_toml_scenario_file(tmp_path: Path) -> None:
    path = tmp_path / "leak.toml"
    path.write_text(TOML_SCENARIO)
    source = SimSource(str(path), start_ts=0.0)
    gpu = source.gpus[0]
    readings = [source.read(0.0)[0] for _ in range(50)]
    assert gpu.phase.name == "leak" and gpu.scenario.name == "leak"
    assert readings[10]["xids"] == [31]
    assert 37800 <= readings[-1]["memory_used_mb"] <= 37950
    source.command(0, cmd("unload_models"))
    assert source.read(0.0)[0]["memory_used_mb"] < 37888 - 400
    source.command(0, cmd("restart_service"))
    source.read(0.0)
    assert gpu.phase.name == "recovered"


def test_json_scenario_file(tmp_path: Path) -> None:
    path = tmp_path / "hot.json"
    path.write_text(json.dumps({"phases": [{"name": "hot", "temperature_c": 88,
                                            "temperature_tau_s": 5}]}))
    scenario = load_scenario(str(path))
    assert scenario.name == "hot"
    source = SimSource(scenario)
    for _ in range(60):
        reading = source.read(0.0)[0]
    assert 87 < reading["temperature_c"] < 89


@pytest.mark.parametrize(("text", "suffix", "message"), [
    ("phases = [", ".toml", "not valid TOML"),
    ("{", ".json", "not valid JSON"),
    ("[[phases]]\nname = 'x'\nutil_pct = 150\n", ".toml", "phases.0.util_pct"),
    ("[[phases]]\nname = 'x'\ncolour = 'red'\n", ".toml", "phases.0.colour"),
    ("[[phases]]\nname = 'x'\n[phases.on.explode]\nend = true\n", ".toml", "on.explode"),
    ("phases = []\n", ".toml", "phases"),
])
def test_bad_scenario_files_say_why(tmp_path: Path, text: str, suffix: str,
                                    message: str) -> None:
    path = tmp_path / f"bad{suffix}"
    path.write_text(text)
    with pytest.raises(ScenarioError, match=message):
        load_scenario(str(path))


def test_unknown_scenario_lists_the_built_ins() -> None:
    with pytest.raises(ScenarioError, match="built-ins are demo, oom"):
        load_scenario("nope")
    assert set(BUILTIN_NAMES) == {"demo", "oom", "thermal", "hang", "healthy-busy", "xid",
                                  "lost", "healthy", "healthy-capped", "healthy-throttled"}
