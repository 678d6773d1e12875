"""nvidia-smi source: every real ``--query-gpu`` capture, parsed by name; placeholders; the
field-retry; a hung nvidia-smi; ``gpuheal probe --source nvidia-smi`` as a real subprocess.

The stand-in ``tests/fixtures/bin/nvidia-smi`` answers ``--query-gpu`` from a real capture the
way nvidia-smi does (only the asked columns, units in the header, ``Field "x" is not a valid
field to query.`` + exit 2 for a field the capture's driver did not have).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from gpuheal.config import GpuhealConfig, PublisherConfig
from gpuheal.models import Sample
from gpuheal.options import CommonOptions, PublisherOptions
from publisher.probe import probe
from publisher.sources import smi
from publisher.sources.base import SourceError, SourceUnavailable
from tests.support import FIXTURES

REAL = FIXTURES / "real"
BIN = FIXTURES / "bin"
FAKE_SMI = BIN / "nvidia-smi"
HUNG_SMI = BIN / "nvidia-smi-hang"

# Values read from each capture by hand (name, temperature.gpu, utilization.gpu, memory.used,
# memory.total, power.draw, power.limit/enforced, fan.speed, clocks.current.sm/.memory,
# active clocks-event reasons, ecc.errors.uncorrected.volatile.total, remapped_rows.pending).
H100_NAME = "NVIDIA H100 80GB HBM3"
RTX2080 = "NVIDIA GeForce RTX 2080 SUPER"
EXPECTED = {
    "smi-csv_h100-80gb-hbm3_utkuozdemir.csv": dict(
        name=H100_NAME, temperature_c=59, utilization_pct=100, memory_used_mb=19818,
        memory_total_mb=81559, power_draw_w=631.95, power_limit_w=700, fan_pct=None,
        sm_clock_mhz=1980, mem_clock_mhz=2619, throttle_reasons=[], ecc_uncorrected=0,
        remapped_rows_pending=False),
    "smi-csv_h100-80gb-hbm3-mig_utkuozdemir.csv": dict(
        name=H100_NAME, temperature_c=53, utilization_pct=None, memory_used_mb=11125,
        memory_total_mb=81559, power_draw_w=433.78, power_limit_w=700, fan_pct=None,
        sm_clock_mhz=1980, mem_clock_mhz=2619, throttle_reasons=[], ecc_uncorrected=0,
        remapped_rows_pending=None),
    "smi-csv_h200_utkuozdemir.csv": dict(
        name="NVIDIA H200", temperature_c=52, utilization_pct=100, memory_used_mb=32362,
        memory_total_mb=143771, power_draw_w=627.40, power_limit_w=700, fan_pct=None,
        sm_clock_mhz=1980, mem_clock_mhz=3201, throttle_reasons=[], ecc_uncorrected=0,
        remapped_rows_pending=False),
    "smi-csv_l40s_utkuozdemir.csv": dict(
        name="NVIDIA L40S", temperature_c=54, utilization_pct=9, memory_used_mb=1235,
        memory_total_mb=46068, power_draw_w=110.23, power_limit_w=350, fan_pct=None,
        sm_clock_mhz=2520, mem_clock_mhz=9001, throttle_reasons=[], ecc_uncorrected=0,
        remapped_rows_pending=False),
    "smi-csv_rtx-4080-super_utkuozdemir.csv": dict(
        name="NVIDIA GeForce RTX 4080 SUPER", temperature_c=46, utilization_pct=7,
        memory_used_mb=1474, memory_total_mb=16376, power_draw_w=84.24, power_limit_w=320,
        fan_pct=0, sm_clock_mhz=2805, mem_clock_mhz=11251, throttle_reasons=[],
        ecc_uncorrected=None, remapped_rows_pending=None),
    "smi-csv_rtx-2080-super-linux-drv610_utkuozdemir.csv": dict(
        name=RTX2080, temperature_c=38, utilization_pct=8, memory_used_mb=815,
        memory_total_mb=8192, power_draw_w=98.14, power_limit_w=250, fan_pct=38,
        sm_clock_mhz=2070, mem_clock_mhz=7500, throttle_reasons=[], ecc_uncorrected=None,
        remapped_rows_pending=None),
    "smi-csv_rtx-2080-super-windows-wddm_utkuozdemir.csv": dict(
        name=RTX2080, temperature_c=45, utilization_pct=7, memory_used_mb=1296,
        memory_total_mb=8192, power_draw_w=97.43, power_limit_w=250, fan_pct=38,
        sm_clock_mhz=2055, mem_clock_mhz=7500, throttle_reasons=["gpu_idle"],
        ecc_uncorrected=None, remapped_rows_pending=None),
    "smi-csv_rtx-2080-super-windows-drv610_utkuozdemir.csv": dict(
        name=RTX2080, temperature_c=44, utilization_pct=7, memory_used_mb=1366,
        memory_total_mb=8192, power_draw_w=97.99, power_limit_w=250, fan_pct=38,
        sm_clock_mhz=2040, mem_clock_mhz=7500, throttle_reasons=[], ecc_uncorrected=None,
        remapped_rows_pending=None),
    "smi-csv_rtx-2080-super-windows-drv471-2021_utkuozdemir.csv": dict(
        name=RTX2080, uuid="GPU-df6e7a7c-7314-46f8-abc4-b88b36dcf3aa", temperature_c=36,
        utilization_pct=2, memory_used_mb=876, memory_total_mb=8192, power_draw_w=32.70,
        power_limit_w=250, fan_pct=38, sm_clock_mhz=111, mem_clock_mhz=267,
        throttle_reasons=["gpu_idle"], ecc_uncorrected=None, remapped_rows_pending=None),
}
CAPTURES = sorted(p.name for p in REAL.glob("smi-csv_*.csv"))


def test_every_csv_capture_has_expectations() -> None:
    assert sorted(EXPECTED) == CAPTURES, "a new capture needs its expected values here"


def check(reading: dict, expected: dict) -> None:
    for key, want in expected.items():
        assert reading[key] == want, f"{key}: {reading[key]!r} != {want!r}"
    assert reading["uuid"].startswith("GPU-")
    # nvidia-smi --query-gpu cannot see XIDs or processes: None, never a made-up empty list
    assert reading.get("xids") is None and reading.get("processes") is None


@pytest.mark.parametrize("capture", CAPTURES)
def test_whole_capture_parses_by_header_name(capture: str) -> None:
    readings = smi.parse_output((REAL / capture).read_text())
    assert len(readings) == 1
    check(readings[0], EXPECTED[capture])
    Sample(host="h", source="nvidia-smi", ts=1.0, seq=0, **readings[0])


@pytest.fixture
def capture_env(monkeypatch: pytest.MonkeyPatch):
    def use(*names: str) -> None:
        monkeypatch.setenv("FAKE_SMI_CAPTURE", os.pathsep.join(str(REAL / n) for n in names))
    return use


@pytest.mark.parametrize("capture", [
    "smi-csv_h100-80gb-hbm3_utkuozdemir.csv",
    "smi-csv_rtx-2080-super-windows-drv471-2021_utkuozdemir.csv",
])
def test_source_queries_the_stand_in_and_drops_unknown_fields(capture: str, capture_env) -> None:
    capture_env(capture)
    source = smi.SmiSource(str(FAKE_SMI), timeout_s=30)
    readings = source.read(time.time())
    check(readings[0], EXPECTED[capture])
    header = {smi.field_name(h) for h in (REAL / capture).read_text().splitlines()[0].split(",")}
    assert set(source.dropped) == set(smi.QUERY_FIELDS) - header
    assert set(source.fields) <= header
    assert source.calls == 1 + len(source.dropped)
    source.read(time.time())
    assert source.calls == 2 + len(source.dropped), "one call per interval once fields are known"


def test_several_gpus_are_one_row_each(capture_env) -> None:
    capture_env("smi-csv_h100-80gb-hbm3_utkuozdemir.csv", "smi-csv_l40s_utkuozdemir.csv")
    readings = smi.SmiSource(str(FAKE_SMI), timeout_s=30).open().read(0.0)
    assert [(r["index"], r["name"]) for r in readings] == [(0, H100_NAME), (1, "NVIDIA L40S")]


@pytest.mark.parametrize("raw", [
    "[N/A]", "N/A", "[Not Supported]", "[Function Not Found]", "Not Supported",
    "[Requested functionality has been deprecated]", "[Unknown Error]", "", "  [N/A] ",
    "[Insufficient Permissions]", "[GPU requires reset]",
])
def test_every_placeholder_is_none(raw: str) -> None:
    assert smi.clean(raw) is None
    assert smi.number(raw) is None
    assert smi.integer(raw) is None
    assert smi.yes_no(raw) is None


@pytest.mark.parametrize(("raw", "value"), [
    ("631.95 W", 631.95), ("80 %", 80.0), ("143771 MiB", 143771.0), ("1980 MHz", 1980.0),
    ("53", 53.0), ("0 us", 0.0), ("-5", -5.0), ("1.5", 1.5), ("Enabled", None),
])
def test_numbers_lose_their_units(raw: str, value: float | None) -> None:
    assert smi.number(raw) == value


def test_headers_lose_their_units() -> None:
    assert smi.field_name("memory.used [MiB]") == "memory.used"
    assert smi.field_name(" clocks_event_reasons_counters.sw_power_cap [us]") == \
        "clocks_event_reasons_counters.sw_power_cap"
    assert smi.field_name("temperature.gpu") == "temperature.gpu"


def test_reasons_from_mask_and_from_named_columns() -> None:
    row = {"clocks_event_reasons.active": "0x0000000000000064",
           "clocks_event_reasons.gpu_idle": "Active",
           "clocks_event_reasons.supported": "0x00000000000001FF",
           "clocks_event_reasons_counters.sw_power_cap": "5 us"}
    assert smi.throttle_reasons(row) == [
        "gpu_idle", "hw_thermal_slowdown", "sw_power_cap", "sw_thermal_slowdown"]
    assert smi.throttle_reasons({"clocks_throttle_reasons.hw_slowdown": "Active"}) == \
        ["hw_slowdown"]
    assert smi.throttle_reasons({"clocks_event_reasons.active": "[N/A]"}) is None
    assert smi.throttle_reasons({"name": "x"}) is None


def test_a_row_of_a_lost_gpu_is_unavailable() -> None:
    out = ("index, name, uuid, temperature.gpu\n"
           "0, NVIDIA A100, GPU-1, [GPU is lost]\n1, NVIDIA A100, GPU-2, 40\n")
    lost, fine = smi.parse_output(out)
    assert lost == {"index": 0, "available": False, "error": "GPU is lost",
                    "uuid": "GPU-1", "name": "NVIDIA A100"}
    assert fine["temperature_c"] == 40.0 and "available" not in fine


def test_ragged_output_is_a_clear_error() -> None:
    with pytest.raises(SourceError, match="2 values for 3 columns"):
        smi.parse_output("a, b, c\n1, 2\n")


def test_the_invalid_field_message_is_recognised() -> None:
    assert smi.invalid_field('Field "foo.bar" is not a valid field to query.\n\n') == "foo.bar"
    assert smi.invalid_field("NVIDIA-SMI has failed because it couldn't communicate") is None


def test_a_driver_that_fails_says_why(tmp_path: Path, capture_env) -> None:
    capture_env()  # no capture: the stand-in says "No devices were found", exit 6
    with pytest.raises(SourceUnavailable, match="No devices were found"):
        smi.SmiSource(str(FAKE_SMI), timeout_s=30).open()


def test_missing_executable_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(SourceUnavailable, match="--nvidia-smi PATH"):
        smi.SmiSource(str(tmp_path / "nvidia-smi"))
    with pytest.raises(SourceUnavailable, match="not found"):
        smi.SmiSource("no-such-nvidia-smi-here")


def processes_running(executable: Path) -> list[int]:
    """Live processes whose command line names ``executable`` (from /proc)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
            state = (cmdline.parent / "stat").read_text().split(") ")[-1][:1]
        except OSError:
            continue
        if str(executable).encode() in args and state != "Z":
            pids.append(int(cmdline.parent.name))
    return pids


def test_a_hung_nvidia_smi_is_killed_and_reported(capture_env, tmp_path: Path) -> None:
    capture_env("smi-csv_l40s_utkuozdemir.csv")
    source = smi.SmiSource(str(FAKE_SMI), timeout_s=30).open()  # a loaded machine is slow
    source.read(0.0)
    hung = tmp_path / "nvidia-smi-hang"  # a path of this test's own, to find its process
    shutil.copy2(HUNG_SMI, hung)
    source.executable, source.timeout_s = str(hung), 0.5  # the driver hangs from now on
    started = time.monotonic()
    readings = source.read(0.0)
    assert time.monotonic() - started < 5
    assert readings == [{"index": 0, "available": False, "uuid": readings[0]["uuid"],
                         "name": "NVIDIA L40S",
                         "error": "nvidia-smi-hang did not answer within 0.5 s and was killed"}]
    assert not processes_running(hung), "the hung process must be killed"
    source.executable, source.timeout_s = str(FAKE_SMI), 30
    assert source.read(0.0)[0]["temperature_c"] == 54.0, "sampling goes on"


def test_a_hung_nvidia_smi_before_any_answer_fails_the_round() -> None:
    source = smi.SmiSource(str(HUNG_SMI), timeout_s=0.3)
    with pytest.raises(SourceError, match=r"did not answer within 0\.3 s"):
        source.read(0.0)
    with pytest.raises(SourceUnavailable):
        source.open()


# --- probe -------------------------------------------------------------------------------------
def smi_options(**kw) -> PublisherOptions:
    common = CommonOptions(host_name="probe-host",
                           config=GpuhealConfig(publisher=PublisherConfig(smi_timeout_s=30)))
    return PublisherOptions(common=common, source="nvidia-smi", nvidia_smi=str(FAKE_SMI), **kw)


@pytest.mark.parametrize("capture", CAPTURES)
def test_probe_through_the_stand_in_prints_one_sample_per_gpu(capture: str, capture_env) -> None:
    capture_env(capture)
    out, err = io.StringIO(), io.StringIO()
    assert probe(smi_options(), out, err) == 0, err.getvalue()
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    sample = Sample.model_validate_json(lines[0])
    assert sample.host == "probe-host" and sample.source == "nvidia-smi" and sample.seq == 0
    check(sample.model_dump(), EXPECTED[capture])


def test_probe_without_a_working_source_fails_clearly(tmp_path: Path) -> None:
    out, err = io.StringIO(), io.StringIO()
    opts = smi_options()
    opts.nvidia_smi = str(tmp_path / "none")
    assert probe(opts, out, err) == 1
    assert out.getvalue() == ""
    assert "source nvidia-smi does not work here" in err.getvalue()


def test_gpuheal_probe_subprocess(gpuheal_cmd: list[str], tmp_path: Path) -> None:
    capture = "smi-csv_h100-80gb-hbm3-mig_utkuozdemir.csv"
    env = dict(os.environ, FAKE_SMI_CAPTURE=str(REAL / capture))
    config = tmp_path / "gpuheal.toml"
    config.write_text("[publisher]\nsmi_timeout_s = 30\n")  # the stand-in is slow to start
    result = subprocess.run(
        [*gpuheal_cmd, "probe", "--source", "nvidia-smi", "--nvidia-smi", str(FAKE_SMI),
         "--host-name", "probe-host", "--config", str(config)],
        capture_output=True, text=True, env=env, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    samples = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(samples) == 1
    check(Sample.model_validate(samples[0]).model_dump(), EXPECTED[capture])


def test_gpuheal_probe_subprocess_without_nvidia_smi(gpuheal_cmd: list[str],
                                                     tmp_path: Path) -> None:
    result = subprocess.run(
        [*gpuheal_cmd, "probe", "--source", "nvidia-smi", "--nvidia-smi",
         str(tmp_path / "nvidia-smi")], capture_output=True, text=True, timeout=60,
    )
    assert result.returncode != 0
    assert result.stdout == ""
    assert "nvidia-smi" in result.stderr and "not" in result.stderr
