"""Jetson source: every real tegrastats capture (Orin, Xavier, Nano, TX1, TX2), the sysfs
fallback, a streaming stand-in tegrastats, and ``gpuheal probe --source jetson`` for real.

jetsontools wrote each line as ``<unix epoch>::<tegrastats line>``; that prefix is a log
artefact and is stripped here (the stand-in tegrastats strips it too).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
from pathlib import Path

import pytest

from gpuheal.models import Sample
from gpuheal.options import CommonOptions, PublisherOptions
from publisher.probe import probe
from publisher.sources import jetson
from publisher.sources.base import SourceError, SourceUnavailable
from tests.support import FIXTURES, wait_for

REAL = FIXTURES / "real"
FAKE_TEGRASTATS = FIXTURES / "bin" / "tegrastats"

# The first line of each capture, read by hand: RAM used/total MB, the gpu@ (else tj@) sensor,
# the GPU rail's current mW / 1000, GR3D_FREQ load and MHz, EMC_FREQ MHz.
FIRST_LINE = {
    "tegrastats_agx-orin-32gb_justincdavis.txt": dict(
        memory_used_mb=6589, memory_total_mb=30587, temperature_c=48.281, power_draw_w=4.368,
        utilization_pct=0, sm_clock_mhz=1300, mem_clock_mhz=3199),
    "tegrastats_agx-orin-64gb_justincdavis.txt": dict(
        memory_used_mb=25620, memory_total_mb=62841, temperature_c=39.718, power_draw_w=5.191,
        utilization_pct=0, sm_clock_mhz=1300, mem_clock_mhz=3199),
    "tegrastats_agx-orin-64gb-nonroot_justincdavis.txt": dict(
        memory_used_mb=25620, memory_total_mb=62841, temperature_c=39.656, power_draw_w=5.193,
        utilization_pct=0, sm_clock_mhz=None, mem_clock_mhz=None),
    "tegrastats_agx-orin_datadog.txt": dict(
        memory_used_mb=29114, memory_total_mb=30697, temperature_c=47.812, power_draw_w=3.205,
        utilization_pct=0, sm_clock_mhz=305, mem_clock_mhz=2133),
    "tegrastats_orin-nx-16gb_justincdavis.txt": dict(
        memory_used_mb=3408, memory_total_mb=15657, temperature_c=51.343, power_draw_w=None,
        utilization_pct=0, sm_clock_mhz=305, mem_clock_mhz=2133),
    "tegrastats_xavier-agx-16gb_justincdavis.txt": dict(
        memory_used_mb=2086, memory_total_mb=15825, temperature_c=31, power_draw_w=0.463,
        utilization_pct=0, sm_clock_mhz=905, mem_clock_mhz=2133),
    "tegrastats_xavier-nx-8gb_justincdavis.txt": dict(
        memory_used_mb=2170, memory_total_mb=6855, temperature_c=40, power_draw_w=None,
        utilization_pct=0, sm_clock_mhz=1109, mem_clock_mhz=1866),
    "tegrastats_nano_datadog.txt": dict(
        memory_used_mb=534, memory_total_mb=3964, temperature_c=36, power_draw_w=0.0,
        utilization_pct=0, sm_clock_mhz=76, mem_clock_mhz=204),
    "tegrastats_tx1_datadog.txt": dict(
        memory_used_mb=1179, memory_total_mb=3983, temperature_c=39, power_draw_w=0.019,
        utilization_pct=0, sm_clock_mhz=76, mem_clock_mhz=408),
    "tegrastats_tx2_datadog.txt": dict(
        memory_used_mb=2344, memory_total_mb=7852, temperature_c=35, power_draw_w=0.152,
        utilization_pct=0, sm_clock_mhz=624, mem_clock_mhz=1600),
}
CAPTURES = sorted(p.name for p in REAL.glob("tegrastats_*.txt"))


def lines_of(capture: str) -> list[str]:
    return [jetson.strip_capture_prefix(line.rstrip("\n"))
            for line in (REAL / capture).read_text().splitlines() if line.strip()]


def test_every_capture_has_expectations() -> None:
    assert sorted(FIRST_LINE) == CAPTURES


@pytest.mark.parametrize("capture", CAPTURES)
def test_first_line_of_every_capture(capture: str) -> None:
    reading = jetson.parse_line(lines_of(capture)[0])
    assert reading is not None
    for key, want in FIRST_LINE[capture].items():
        assert reading[key] == want, f"{key}: {reading[key]!r} != {want!r}"
    assert reading["fan_pct"] is None and reading["power_limit_w"] is None
    Sample(host="h", index=0, source="jetson", ts=1.0, seq=0, **reading)


@pytest.mark.parametrize("capture", CAPTURES)
def test_every_line_of_every_capture_parses(capture: str) -> None:
    totals = {FIRST_LINE[capture]["memory_total_mb"]}
    if capture == "tegrastats_agx-orin_datadog.txt":
        totals.add(62840)  # its second line is another board (AGX Orin 64GB)
    for line in lines_of(capture):
        reading = jetson.parse_line(line)
        assert reading is not None, line
        assert reading["memory_total_mb"] in totals
        assert reading["temperature_c"] is not None and reading["utilization_pct"] == 0
        assert 20 < reading["temperature_c"] < 60


def test_second_datadog_orin_line_is_non_root() -> None:
    reading = jetson.parse_line(lines_of("tegrastats_agx-orin_datadog.txt")[1])
    assert reading == {
        "temperature_c": 37.75, "utilization_pct": 0.0, "memory_used_mb": 2448.0,
        "memory_total_mb": 62840.0, "power_draw_w": 4.94, "power_limit_w": None,
        "sm_clock_mhz": None, "mem_clock_mhz": None, "fan_pct": None,
    }


ORIN32 = lines_of("tegrastats_agx-orin-32gb_justincdavis.txt")[0]


def test_absent_gpu_sensor_falls_back_to_tj() -> None:
    line = ORIN32.replace("GPU@48.281C", "GPU@-256C")
    assert jetson.parse_line(line)["temperature_c"] == 52.625
    no_sensor = line.replace("tj@52.625C", "tj@-256C")
    assert jetson.parse_line(no_sensor)["temperature_c"] is None


def test_two_gpcs_count_the_busier_one() -> None:
    line = ORIN32.replace("GR3D2_FREQ 0%@1300", "GR3D2_FREQ 45%@1300")
    assert jetson.parse_line(line)["utilization_pct"] == 45.0


def test_loaded_gpu_and_other_rails() -> None:
    line = lines_of("tegrastats_agx-orin-64gb_justincdavis.txt")[0].replace(
        "GR3D_FREQ 0%@[1300,1300]", "GR3D_FREQ 99%@[1300,1275]")
    reading = jetson.parse_line(line)
    assert reading["utilization_pct"] == 99.0 and reading["sm_clock_mhz"] == 1300.0


def test_lines_that_are_not_stats_are_ignored() -> None:
    assert jetson.parse_line("") is None
    assert jetson.parse_line("tegrastats: permission denied") is None


# --- sysfs fallback ---------------------------------------------------------------------------
def make_sysfs(root: Path, *, gpu_zone: bool = True, load: str = "523") -> Path:
    zones = [("CPU-therm", "45500"), ("tj-thermal", "51250")]
    if gpu_zone:
        zones.insert(1, ("gpu-thermal", "-256000"))
        zones.insert(2, ("GPU-therm", "47750"))
    for i, (kind, temp) in enumerate(zones):
        zone = root / f"sys/class/thermal/thermal_zone{i}"
        zone.mkdir(parents=True)
        (zone / "type").write_text(kind + "\n")
        (zone / "temp").write_text(temp + "\n")
    gpu = root / "sys/devices/platform/gpu.0"
    (gpu / "devfreq/17000000.gpu").mkdir(parents=True)
    (gpu / "load").write_text(load + "\n")
    (gpu / "devfreq/17000000.gpu/cur_freq").write_text("1300500000\n")
    (root / "proc/device-tree").mkdir(parents=True)
    (root / "proc/device-tree/model").write_bytes(b"NVIDIA Jetson AGX Orin Developer Kit\x00")
    (root / "proc/meminfo").write_text(
        "MemTotal:       64349696 kB\nMemFree:        30000000 kB\n"
        "MemAvailable:   38135808 kB\nBuffers:          100000 kB\n")
    return root


def test_sysfs_reads_load_temperature_memory_and_clock(tmp_path: Path) -> None:
    root = make_sysfs(tmp_path)
    source = jetson.JetsonSource(str(tmp_path / "no-tegrastats"), root=root).open()
    assert source.mode == "sysfs"
    [reading] = source.read(0.0)
    assert reading == {
        "index": 0, "name": "NVIDIA Jetson AGX Orin Developer Kit", "temperature_c": 47.75,
        "utilization_pct": 52.3, "memory_used_mb": 25599.5, "memory_total_mb": 62841.5,
        "power_draw_w": None, "power_limit_w": None, "sm_clock_mhz": 1300.5,
        "mem_clock_mhz": None, "fan_pct": None,
    }


def test_sysfs_without_gpu_zone_uses_tj(tmp_path: Path) -> None:
    root = make_sysfs(tmp_path, gpu_zone=False)
    assert jetson.SysfsReader(root).read()["temperature_c"] == 51.25


def test_no_tegrastats_and_no_sysfs_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(SourceUnavailable, match=r"--tegrastats PATH.*sysfs"):
        jetson.JetsonSource("no-such-tegrastats", root=tmp_path).open()


# --- streaming tegrastats ------------------------------------------------------------------------
@pytest.fixture
def tegrastats_capture(monkeypatch: pytest.MonkeyPatch):
    def use(capture: str) -> None:
        monkeypatch.setenv("FAKE_TEGRASTATS_CAPTURE", str(REAL / capture))
    return use


def test_stream_reads_lines_as_they_come(tegrastats_capture, tmp_path: Path) -> None:
    tegrastats_capture("tegrastats_tx2_datadog.txt")
    source = jetson.JetsonSource(str(FAKE_TEGRASTATS), interval_s=0.05,
                                 root=make_sysfs(tmp_path)).open()
    try:
        assert source.mode == "tegrastats"
        [reading] = source.read(0.0)
        assert reading["name"] == "NVIDIA Jetson AGX Orin Developer Kit"
        assert reading["memory_used_mb"] == 2344 and reading["temperature_c"] == 35
        wait_for(lambda: source.lines_read >= 5, 10, "more tegrastats lines")
        assert source.bad_lines == 0
    finally:
        source.close()
    assert source._proc is None


def test_stream_that_dies_is_reported_and_restarted(tegrastats_capture, tmp_path) -> None:
    tegrastats_capture("tegrastats_nano_datadog.txt")
    source = jetson.JetsonSource(str(FAKE_TEGRASTATS), interval_s=0.05, root=tmp_path).open()
    try:
        proc = source._proc
        assert proc is not None
        proc.kill()
        proc.wait()
        with pytest.raises(SourceError, match="tegrastats exited"):
            source.read(0.0)
        [reading] = source.read(0.0)  # restarted
        assert reading["memory_total_mb"] == 3964
    finally:
        source.close()


def test_silent_tegrastats_is_unavailable(tmp_path: Path) -> None:
    silent = FIXTURES / "bin" / "nvidia-smi-hang"  # prints nothing, ever
    source = jetson.JetsonSource(str(silent), interval_s=0.05, root=tmp_path,
                                 first_line_timeout_s=0.3)
    with pytest.raises(SourceUnavailable, match="no stats line"):
        source.open()
    assert source._proc is None


def test_probe_through_the_stand_in(tegrastats_capture) -> None:
    tegrastats_capture("tegrastats_agx-orin_datadog.txt")
    opts = PublisherOptions(common=CommonOptions(host_name="orin"), source="jetson",
                            tegrastats=str(FAKE_TEGRASTATS), interval_s=0.2)
    out, err = io.StringIO(), io.StringIO()
    assert probe(opts, out, err) == 0, err.getvalue()
    sample = Sample.model_validate_json(out.getvalue())
    first = FIRST_LINE["tegrastats_agx-orin_datadog.txt"]
    assert sample.source == "jetson" and sample.index == 0
    assert sample.memory_used_mb == first["memory_used_mb"]
    assert sample.temperature_c == first["temperature_c"]


def test_gpuheal_probe_subprocess(gpuheal_cmd: list[str]) -> None:
    capture = "tegrastats_xavier-agx-16gb_justincdavis.txt"
    env = dict(os.environ, FAKE_TEGRASTATS_CAPTURE=str(REAL / capture))
    result = subprocess.run(
        [*gpuheal_cmd, "probe", "--source", "jetson", "--tegrastats", str(FAKE_TEGRASTATS),
         "--host-name", "xavier"], capture_output=True, text=True, env=env, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    [line] = result.stdout.splitlines()
    sample = Sample.model_validate(json.loads(line))
    assert sample.host == "xavier" and sample.source == "jetson"
    assert sample.name == jetson.board_name()
    for key, want in FIRST_LINE[capture].items():
        assert getattr(sample, key) == want, key
    assert sample.fan_pct is None and sample.power_limit_w is None and sample.uuid is None
