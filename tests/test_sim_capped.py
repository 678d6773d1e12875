"""Realistic healthy traces of the simulator and a 15-minute event-time soak (issue 10).

No broker: the SimSource is driven directly, its readings stamped by the publisher's Stamper and
fed to the analyzer's engine, one sample per simulated second. A healthy GPU pinned at any power
cap (700 W, 400 W, 72 W, the Orin's 60 W, or a cap the healer lowered) is never confirmed hung;
the frozen ``hang`` scenario still is, within the window.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from analyzer.engine import Analyzer
from gpuheal.config import AnalyzerConfig
from gpuheal.models import Event, Sample, SimCommand
from publisher.sampling import Stamper, read_boot_ts, sample_round
from publisher.scenarios import A100, H100, L4, GpuProfile, Scenario, builtin, load_scenario
from publisher.sources.sim import CAP_BAND, SimSource

T0 = 1_750_000_000.0
SOAK_S = 900
WINDOW = int(AnalyzerConfig().hang.window_s)

Healer = Callable[[Event, SimSource], SimCommand | None]


def capped(profile: GpuProfile) -> Scenario:
    """``healthy-capped`` on another card."""
    return builtin("healthy-capped").model_copy(update={"gpu": profile})


def soak(scenario: Scenario | str, seconds: int, healer: Healer | None = None, seed: int = 3,
         ) -> tuple[list[Event], list[Sample], SimSource]:
    """Play ``seconds`` of the scenario through the analyzer; a healer may answer events."""
    source = SimSource(scenario, seed=seed, interval_s=1.0, start_ts=T0)
    stamper = Stamper("soak", boot_path=None)
    engine = Analyzer(AnalyzerConfig(), started_ts=T0, clock=lambda: 0.0)
    events: list[Event] = []
    samples: list[Sample] = []
    for _ in range(seconds):
        for sample in sample_round(source, stamper, 0.0):
            samples.append(sample)
            for out in engine.process(sample):
                if isinstance(out, Event):
                    events.append(out)
                    command = healer(out, source) if healer else None
                    if command is not None:
                        source.command(sample.index, command)
    return events, samples, source


def hangs(events: list[Event], severity: str | None = None) -> list[Event]:
    return [e for e in events if e.kind == "gpu_hang" and e.phase != "cleared"
            and (severity is None or e.severity == severity)]


# --- the shape of the capped traces ---------------------------------------------------------
@pytest.mark.parametrize("profile", [H100, A100, L4, GpuProfile()], ids=lambda p: p.name)
def test_a_capped_gpu_looks_like_a_power_controller_at_work(profile: GpuProfile) -> None:
    _, samples, _ = soak(capped(profile), 180)
    limit = profile.power_limit_w
    assert {s.name for s in samples} == {profile.name}
    assert {s.power_limit_w for s in samples} == {limit}
    assert all(s.utilization_pct == 100.0 for s in samples)
    assert all(limit * (1 - CAP_BAND) - 0.01 <= (s.power_draw_w or 0) <= limit for s in samples)
    assert len({s.memory_used_mb for s in samples}) == 1, "preallocated: exactly constant"
    assert all(s.throttle_reasons == ["sw_power_cap"] for s in samples)
    assert all((s.temperature_c or 0) < 80.0 for s in samples)
    clocks = [s.sm_clock_mhz or 0.0 for s in samples]
    assert all(c % 15 == clocks[0] % 15 for c in clocks), "15 MHz bins"
    for i in range(len(clocks) - WINDOW):
        window = clocks[i:i + WINDOW + 1]
        assert max(window) - min(window) > 15.0, "the clock moves in every window"
    assert max(clocks) <= profile.max_sm_clock_mhz


def test_the_sim_stamps_a_fixed_boot_time() -> None:
    _, samples, source = soak("healthy-capped", 5)
    assert {s.host_boot_ts for s in samples} == {T0} == {source.host_boot_ts}
    other = SimSource("healthy", start_ts=T0, host_boot_ts=T0 - 3600).read(0.0)
    assert other[0]["host_boot_ts"] == T0 - 3600


def test_other_gpus_of_a_source_are_the_same_card() -> None:
    readings = SimSource("healthy-capped", gpus=3, start_ts=T0).read(0.0)
    assert {r["name"] for r in readings} == {H100.name}
    assert readings[1]["utilization_pct"] < 50, "they run the healthy scenario"


# --- the soak ---------------------------------------------------------------------------------
@pytest.mark.parametrize("profile", [H100, A100, L4, GpuProfile()], ids=lambda p: p.name)
def test_fifteen_minutes_at_the_cap_are_never_a_confirmed_hang(profile: GpuProfile) -> None:
    events, samples, _ = soak(capped(profile), SOAK_S)
    assert samples[-1].ts - samples[0].ts == SOAK_S - 1
    assert not hangs(events, "critical"), hangs(events)
    suspected = hangs(events)
    assert [e.phase for e in suspected] == ["raised"], "suspected once, held, never flapping"
    assert "limit" in suspected[0].message or "power cap" in suspected[0].message
    assert all(e.recommended_action != "reset_gpu" for e in events)


def throttling_healer(cut_pct: float = 80.0) -> Healer:
    """What the healer's first thermal rung does: a thermal warning lowers the power limit."""
    def heal(event: Event, source: SimSource) -> SimCommand | None:
        if event.kind == "thermal_throttling" and event.phase == "raised":
            default = source.gpus[0].profile.power_limit_w
            return SimCommand(command="set_power_limit", action_id="throttle",
                              power_limit_w=default * cut_pct / 100)
        return None
    return heal


def test_a_gpu_on_the_healers_lowered_cap_is_never_a_confirmed_hang() -> None:
    events, samples, source = soak("healthy-throttled", 120 + SOAK_S, throttling_healer())
    gpu = source.gpus[0]
    assert gpu.commands == ["set_power_limit"] and gpu.phase.name == "throttled"
    thermal = [(e.phase, e.severity, e.cleared_by) for e in events
               if e.kind == "thermal_throttling"]
    assert thermal == [("raised", "warning", None), ("cleared", "warning", "recovered")]
    lowered = [s for s in samples if s.power_limit_w == 320.0]
    assert len(lowered) > SOAK_S, "a quarter of an hour on the new cap"
    assert all(s.utilization_pct == 100.0 and 318.0 <= (s.power_draw_w or 0) <= 320.0
               for s in lowered)
    assert len({s.memory_used_mb for s in lowered}) == 1
    cool = [s.temperature_c or 0 for s in lowered[120:]]
    assert max(cool) < 80.0, "cooled below the threshold and stayed there"
    assert not hangs(events, "critical"), hangs(events)


def test_restoring_the_limit_returns_to_the_old_cap_and_stays_cool() -> None:
    source = SimSource("healthy-throttled", seed=5, start_ts=T0)
    engine = Analyzer(AnalyzerConfig(), started_ts=T0, clock=lambda: 0.0)
    stamper = Stamper("soak", boot_path=None)
    thermal: list[str] = []
    samples: list[Sample] = []
    for t in range(1500):
        if t == 600:
            source.command(0, SimCommand(command="set_power_limit", action_id="t",
                                         power_limit_w=320.0))
        if t == 900:
            source.command(0, SimCommand(command="set_power_limit", action_id="r",
                                         power_limit_w=None))
        for sample in sample_round(source, stamper, 0.0):
            samples.append(sample)
            thermal += [o.phase for o in engine.process(sample)
                        if isinstance(o, Event) and o.kind == "thermal_throttling"]
    after = samples[960:]
    assert {s.power_limit_w for s in after} == {400.0}
    assert all(398.0 <= (s.power_draw_w or 0) <= 400.0 for s in after)
    assert max(s.temperature_c or 0 for s in after) < 80.0
    assert thermal == ["raised", "cleared"]


def test_fifteen_minutes_of_noisy_healthy_work_are_never_a_confirmed_hang() -> None:
    events, _, _ = soak("healthy-busy", SOAK_S, seed=17)
    assert not hangs(events, "critical")


def test_the_frozen_gpu_is_still_confirmed_within_the_window() -> None:
    events, _, source = soak("hang", 150)
    freeze = source.gpus[0].phase_log[1]
    assert freeze[1] == "hang"
    confirmed = hangs(events, "critical")
    assert len(confirmed) == 1
    delay = confirmed[0].ts - (T0 + freeze[0])
    assert WINDOW <= delay <= WINDOW + 5, delay
    assert confirmed[0].recommended_action == "reset_gpu"


def test_a_lost_gpu_reports_xid_79_in_its_first_lost_sample() -> None:
    events, samples, _ = soak("lost", 70)
    first_lost = next(s for s in samples if not s.available)
    assert first_lost.xids == [79]
    assert all(not s.xids for s in samples if s is not first_lost)
    at_loss = {(e.kind, e.severity) for e in events if e.ts == first_lost.ts}
    assert at_loss == {("unavailable", "critical"), ("xid_error", "emergency")}


# --- scenario files with a card profile -------------------------------------------------------
def test_a_scenario_file_simulates_another_card(tmp_path: Path) -> None:
    path = tmp_path / "l40s.toml"
    path.write_text('name = "l40s-capped"\n'
                    '[gpu]\nname = "NVIDIA L40S (simulated)"\nmemory_total_mb = 46068\n'
                    'power_limit_w = 350\nmin_power_limit_w = 100\nmax_sm_clock_mhz = 2520\n'
                    '[[phases]]\nname = "capped"\nutil_pct = 100\nutil_jitter_pct = 0\n'
                    'memory_mb = 30000\nmemory_jitter_mb = 0\ncapped = true\n')
    scenario = load_scenario(str(path))
    source = SimSource(scenario, start_ts=T0)
    reading = [source.read(0.0) for _ in range(3)][-1][0]
    assert (reading["name"], reading["memory_total_mb"], reading["power_limit_w"]) == (
        "NVIDIA L40S (simulated)", 46068.0, 350.0)
    assert 348.25 <= reading["power_draw_w"] <= 350.0 and reading["memory_used_mb"] == 30000.0
    source.command(0, SimCommand(command="set_power_limit", action_id="x", power_limit_w=20.0))
    assert source.read(0.0)[0]["power_limit_w"] == 100.0, "clamped to the card's minimum"
    path.write_text('[gpu]\nname = "x"\nwatts = 3\n[[phases]]\nname = "p"\n')
    with pytest.raises(ValueError, match=r"gpu\.watts"):
        load_scenario(str(path))


# --- the host's boot time on real sources ---------------------------------------------------
def test_the_stamper_reads_the_boot_time_once(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    stat.write_text("cpu  1 2 3 4\nintr 5\nctxt 6\nbtime 1712345678\nprocesses 7\n")
    assert read_boot_ts(stat) == 1712345678.0
    stamper = Stamper("h", boot_path=stat)
    stat.write_text("btime 1800000000\n")  # read once: a later change is not seen
    sample = stamper.stamp({"index": 0}, "nvidia-smi", 100.0)
    assert sample.host_boot_ts == 1712345678.0
    assert stamper.stamp({"index": 0, "host_boot_ts": 5.0}, "sim", 101.0).host_boot_ts == 5.0
    assert read_boot_ts(tmp_path / "missing") is None
    stat.write_text("cpu 1\n")
    assert read_boot_ts(stat) is None
    assert Stamper("h", boot_path=None).stamp({"index": 1}, "nvml", 1.0).host_boot_ts is None
    if Path("/proc/stat").exists():
        assert (read_boot_ts() or 0) > 0
