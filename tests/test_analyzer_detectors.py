"""Table-driven tests of each detector, through the engine's condition lifecycle.

Each case is a list of per-sample reading overrides (one sample every ``interval_s`` of event
time) and the expected events as ``(sample number, phase, severity, recommended_action)``.
"""

from __future__ import annotations

from typing import Any

import pytest

from analyzer.detectors.base import level_of
from analyzer.detectors.xid import MAX_CODES, classify_xid
from analyzer.engine import Analyzer
from gpuheal.config import AnalyzerConfig, MemoryProfile
from gpuheal.config.detection import XidConfig
from tests.factories import GIB, H100, ORIN, ORIN_TOTAL_MB, T0, busy, mk

Expected = list[tuple[int, str, str, str | None]]


def run_steps(kind: str, steps: list[dict[str, Any]], interval_s: float = 1.0,
              config: AnalyzerConfig | None = None, name: str | None = H100,
              host: str = "node1") -> Expected:
    a = Analyzer(config or AnalyzerConfig(), started_ts=T0, clock=lambda: 0.0)
    got: Expected = []
    for k, readings in enumerate(steps):
        readings = dict(readings)
        sample_name = readings.pop("name", name)
        for out in a.process(mk(T0 + k * interval_s, k, host=host, name=sample_name,
                                **readings)):
            if getattr(out, "kind", None) == kind and hasattr(out, "phase"):
                got.append((k, out.phase, out.severity, out.recommended_action))
    return got


def temps(*values: float | None, **extra: Any) -> list[dict[str, Any]]:
    return [{"temperature_c": v, **extra} for v in values]


# --- thermal -----------------------------------------------------------------------------
THERMAL: list[tuple[str, list[dict[str, Any]], Expected]] = [
    ("below warning", temps(70, 82, 82.9, 82), []),
    ("warning, band, clear below 80", temps(70, 83, 81, 80, 79.9),
     [(1, "raised", "warning", "throttle_gpu"), (4, "cleared", "warning", None)]),
    ("ladder up, one clear", temps(83, 85, 90, 86, 70),
     [(0, "raised", "warning", "throttle_gpu"),
      (1, "escalated", "critical", "restart_llm_service"),
      (2, "escalated", "emergency", "stop_llm_service"),
      (4, "cleared", "emergency", None)]),
    ("straight to emergency", temps(60, 91, 84, 81, 79),
     [(1, "raised", "emergency", "stop_llm_service"), (4, "cleared", "emergency", None)]),
    ("never de-escalates", temps(90, 84, 86, 83, 88),
     [(0, "raised", "emergency", "stop_llm_service")]),
    ("missing readings change nothing", temps(86, None, None, 79),
     [(0, "raised", "critical", "restart_llm_service"), (3, "cleared", "critical", None)]),
    ("re-raised after a real cool-down", temps(84, 75, 84),
     [(0, "raised", "warning", "throttle_gpu"), (1, "cleared", "warning", None),
      (2, "raised", "warning", "throttle_gpu")]),
    ("thermal slowdown reason alone",
     [{"temperature_c": 70, "throttle_reasons": ["hw_thermal_slowdown"]},
      {"temperature_c": 70, "throttle_reasons": ["sw_thermal_slowdown", "sw_power_cap"]},
      {"temperature_c": 70, "throttle_reasons": []}],
     [(0, "raised", "warning", "throttle_gpu"), (2, "cleared", "warning", None)]),
    ("other throttle reasons do not count",
     temps(70, 70, throttle_reasons=["sw_power_cap", "gpu_idle"]), []),
    ("reason holds the condition in the band", [
        {"temperature_c": 84}, {"temperature_c": 75, "throttle_reasons": ["hw_thermal_slowdown"]},
        {"temperature_c": 75, "throttle_reasons": []}],
     [(0, "raised", "warning", "throttle_gpu"), (2, "cleared", "warning", None)]),
]


@pytest.mark.parametrize(("steps", "expected"), [c[1:] for c in THERMAL],
                         ids=[c[0] for c in THERMAL])
def test_thermal(steps: list[dict[str, Any]], expected: Expected) -> None:
    assert run_steps("thermal_throttling", steps) == expected


# --- memory --------------------------------------------------------------------------------
def orin(*gib: float | None) -> list[dict[str, Any]]:
    return [{"name": ORIN, "memory_total_mb": ORIN_TOTAL_MB,
             "memory_used_mb": None if g is None else g * GIB} for g in gib]


def pct(*percent: float, total: float = 80000.0) -> list[dict[str, Any]]:
    return [{"memory_total_mb": total, "memory_used_mb": p * total / 100} for p in percent]


MEMORY: list[tuple[str, list[dict[str, Any]], Expected]] = [
    ("orin below warning", orin(30, 35.9, 35.99), []),
    ("orin 36 GiB is a warning, clears below 35", orin(30, 36, 37, 35.5, 35, 34.9),
     [(1, "raised", "warning", "clear_llm_cache"), (5, "cleared", "warning", None)]),
    ("orin ladder", orin(36, 38, 40, 39, 30),
     [(0, "raised", "warning", "clear_llm_cache"),
      (1, "escalated", "critical", "reset_gpu_session"),
      (2, "escalated", "emergency", "reset_gpu_session"),
      (4, "cleared", "emergency", None)]),
    ("orin missing reading keeps", orin(37, None, 34),
     [(0, "raised", "warning", "clear_llm_cache"), (2, "cleared", "warning", None)]),
    ("percent profile for an H100", pct(50, 90, 95, 98, 88.5, 87.9),
     [(1, "raised", "warning", "clear_llm_cache"),
      (2, "escalated", "critical", "reset_gpu_session"),
      (3, "escalated", "emergency", "reset_gpu_session"),
      (5, "cleared", "emergency", None)]),
    ("38 GB on an 80 GB card is fine", [{"memory_used_mb": 40 * GIB}], []),
    ("percent profile without total says nothing",
     [{"memory_used_mb": 79000.0, "memory_total_mb": None}], []),
]


@pytest.mark.parametrize(("steps", "expected"), [c[1:] for c in MEMORY],
                         ids=[c[0] for c in MEMORY])
def test_memory(steps: list[dict[str, Any]], expected: Expected) -> None:
    assert run_steps("out_of_memory", steps) == expected


def test_memory_profile_by_host_and_name_is_configurable() -> None:
    config = AnalyzerConfig(memory_profiles=[
        MemoryProfile(name="lab-a100", match="A100", hosts=["lab"], unit="gb",
                      warning=20, critical=30, emergency=35),
        MemoryProfile(name="percent", unit="percent", warning=90, critical=95, emergency=98),
    ])
    steps = [{"name": "NVIDIA A100-SXM4-80GB", "memory_used_mb": 21 * GIB,
              "memory_total_mb": 81920.0}]
    assert run_steps("out_of_memory", steps, config=config, host="lab") == [
        (0, "raised", "warning", "clear_llm_cache")]
    assert run_steps("out_of_memory", steps, config=config, host="other") == []
    assert config.memory_profile_for("Orin (nvgpu)", "x") is not None
    assert config.memory_profile_for("Orin (nvgpu)", "x").name == "percent"


# --- hang ----------------------------------------------------------------------------------
def flat(util: float = 100.0, power: float = 250.0, mem: float = 20000.0) -> dict[str, Any]:
    return {"utilization_pct": util, "power_draw_w": power, "memory_used_mb": mem}


HANG: list[tuple[str, list[dict[str, Any]], Expected]] = [
    ("frozen from the first sample: critical at 30 s", [flat()] * 40,
     [(30, "raised", "critical", "reset_gpu")]),
    ("29 s is not sustained", [flat()] * 30 + [flat(util=40)], []),
    ("util 98.9 is not a hang", [flat(util=98.9)] * 60, []),
    # A 1 s dip restarts the flatness evidence but not the run (it used to end the run, so
    # a GPU dipping now and then raised and cleared a suspected hang every time: issue 10 #11).
    ("a dip restarts the flatness, not the run",
     [flat()] * 20 + [flat(util=60)] + [flat()] * 35,
     [(30, "raised", "warning", None), (51, "escalated", "critical", "reset_gpu")]),
    ("busy then frozen: suspected, then escalated",
     [{**busy(k), "utilization_pct": 100.0} for k in range(40)] + [flat()] * 40,
     [(30, "raised", "warning", None), (70, "escalated", "critical", "reset_gpu")]),
    ("confirmed hang clears after clear_after_s below the threshold",
     [flat()] * 32 + [flat(util=10)] * 16,
     [(30, "raised", "critical", "reset_gpu"), (47, "cleared", "critical", None)]),
    ("power drift within tolerance is flat",
     [flat(power=250 + (k % 3)) for k in range(35)], [(30, "raised", "critical", "reset_gpu")]),
    ("memory moving prevents confirmation",
     [flat(mem=20000 + 100 * (k % 2)) for k in range(60)], [(30, "raised", "warning", None)]),
    ("power moving prevents confirmation",
     [flat(power=250 + 20 * (k % 2)) for k in range(60)], [(30, "raised", "warning", None)]),
    ("hang XID corroborates a busy GPU",
     [{**busy(k), "xids": [109] if k == 10 else None} for k in range(35)],
     [(30, "raised", "critical", "reset_gpu")]),
    # XID 43 (application fault) and 45 (clean-up after a killed process) used to confirm a
    # hang (issue 10 #2): the GPU is healthy.
    ("XID 43 and 45 do not corroborate",
     [{**busy(k), "xids": [43, 45] if k == 10 else None} for k in range(35)],
     [(30, "raised", "warning", None)]),
    ("hang XID before the run does not count",
     [{**busy(k), "utilization_pct": 50.0, "xids": [8]} for k in range(2)]
     + [busy(k) for k in range(2, 40)],
     [(32, "raised", "warning", None)]),
    ("non-hang XID does not corroborate",
     [{**busy(k), "xids": [31] if k == 10 else None} for k in range(35)],
     [(30, "raised", "warning", None)]),
    ("MIG: no utilization, no hang detection", [flat(util=None)] * 60, []),  # type: ignore[arg-type]
    ("missing power: suspected only", [{**flat(), "power_draw_w": None}] * 60,
     [(30, "raised", "warning", None)]),
]


@pytest.mark.parametrize(("steps", "expected"), [c[1:] for c in HANG],
                         ids=[c[0] for c in HANG])
def test_hang(steps: list[dict[str, Any]], expected: Expected) -> None:
    assert run_steps("gpu_hang", steps) == expected


def test_hang_windows_are_event_time_not_sample_count() -> None:
    # 5 s apart: confirmed at the first sample 30 s after the start (sample 6), not sample 30.
    assert run_steps("gpu_hang", [flat()] * 10, interval_s=5.0) == [
        (6, "raised", "critical", "reset_gpu")]


# --- xid -------------------------------------------------------------------------------------
def xids(*codes: list[int] | None) -> list[dict[str, Any]]:
    return [{"xids": c} for c in codes]


XID: list[tuple[str, list[dict[str, Any]], Expected]] = [
    ("restart-app code", xids([13]), [(0, "raised", "warning", "restart_llm_service")]),
    ("reset code", xids([62]), [(0, "raised", "critical", "reset_gpu")]),
    ("reboot code", xids([79]), [(0, "raised", "emergency", "notify")]),
    ("unknown code", xids([48]), [(0, "raised", "warning", "notify")]),
    ("escalates on a worse code, not on a milder one", xids([31], None, [119], [13], [79]),
     [(0, "raised", "warning", "restart_llm_service"), (2, "escalated", "critical", "reset_gpu"),
      (4, "escalated", "emergency", "notify")]),
    ("empty list is no XID", xids([], None, []), []),
]


@pytest.mark.parametrize(("steps", "expected"), [c[1:] for c in XID], ids=[c[0] for c in XID])
def test_xid(steps: list[dict[str, Any]], expected: Expected) -> None:
    assert run_steps("xid_error", steps) == expected


def test_xid_clears_after_quiet_period_in_event_time() -> None:
    # one sample every 30 s; clear_after_s = 120: the XID at 0 and again at 60 → clears at 180.
    steps = xids([13], None, [94], None, None, None, None, None)
    assert run_steps("xid_error", steps, interval_s=30.0) == [
        (0, "raised", "warning", "restart_llm_service"), (6, "cleared", "warning", None)]


def test_xid_evidence_lists_codes_and_stays_bounded() -> None:
    a = Analyzer(AnalyzerConfig(), started_ts=T0, clock=lambda: 0.0)
    events = []
    for k in range(200):
        events += [o for o in a.process(mk(T0 + k, k, xids=[1000 + k, 13])) if hasattr(o, "phase")]
    raised = events[0]
    assert raised.evidence["xids"] == [1000, 13]
    det = next(d for d in a.track("node1", 0).detectors if d.kind == "xid_error")
    assert len(det._codes) == MAX_CODES


def test_xid_catalog_classification() -> None:
    cfg = XidConfig()
    assert classify_xid(43, cfg)[:2] == ("warning", "restart_llm_service")
    assert classify_xid(109, cfg)[:2] == ("critical", "reset_gpu")
    assert classify_xid(79, cfg)[:2] == ("emergency", "notify")


# --- critical health ---------------------------------------------------------------------------
HEALTH: list[tuple[str, list[dict[str, Any]], Expected]] = [
    ("no ECC readings", [{}] * 3, []),
    ("ECC zero", [{"ecc_uncorrected": 0, "remapped_rows_pending": False}] * 3, []),
    ("uncorrectable ECC, then reset to 0",
     [{"ecc_uncorrected": 0}, {"ecc_uncorrected": 2}, {"ecc_uncorrected": 3},
      {"ecc_uncorrected": None}, {"ecc_uncorrected": 0}],
     [(1, "raised", "critical", "reset_gpu"), (4, "cleared", "critical", None)]),
    ("row remap pending",
     [{"remapped_rows_pending": True}, {"remapped_rows_pending": False}],
     [(0, "raised", "critical", "reset_gpu"), (1, "cleared", "critical", None)]),
]


@pytest.mark.parametrize(("steps", "expected"), [c[1:] for c in HEALTH],
                         ids=[c[0] for c in HEALTH])
def test_critical_health(steps: list[dict[str, Any]], expected: Expected) -> None:
    assert run_steps("critical_health", steps) == expected


# --- unavailable (source says lost) -------------------------------------------------------------
def test_unavailable_sample_raises_at_once_and_next_available_clears() -> None:
    lost = {k: None for k in ("temperature_c", "utilization_pct", "memory_used_mb",
                              "memory_total_mb", "power_draw_w", "power_limit_w",
                              "sm_clock_mhz", "mem_clock_mhz")}
    steps = [{}, {**lost, "available": False, "error": "GPU is lost"},
             {**lost, "available": False}, {}]
    assert run_steps("unavailable", steps) == [
        (1, "raised", "critical", "notify"), (3, "cleared", "critical", None)]


@pytest.mark.parametrize(("value", "level"), [
    (82.99, None), (83, "warning"), (84.9, "warning"), (85, "critical"), (90, "emergency")])
def test_level_of_thresholds_are_inclusive(value: float, level: str | None) -> None:
    assert level_of(value, 83, 85, 90) == level


# --- config --------------------------------------------------------------------------------------
def test_thresholds_come_from_the_toml_config(tmp_path: Any) -> None:
    from gpuheal.config import ConfigError, load_config

    path = tmp_path / "gpuheal.toml"
    path.write_text("[analyzer.thermal]\nwarning_c = 70.0\ncritical_c = 75.0\n"
                    "emergency_c = 80.0\nhysteresis_c = 5.0\n"
                    "[analyzer.hang]\nwindow_s = 10.0\n")
    config = load_config(path).analyzer
    assert run_steps("thermal_throttling", temps(69, 71, 66, 64.9), config=config) == [
        (1, "raised", "warning", "throttle_gpu"), (3, "cleared", "warning", None)]
    assert run_steps("gpu_hang", [flat()] * 12, config=config) == [
        (10, "raised", "critical", "reset_gpu")]
    path.write_text("[analyzer.thermal]\nwarning_c = 90.0\ncritical_c = 85.0\n")
    with pytest.raises(ConfigError, match="warning_c <= critical_c"):
        load_config(path)


def test_two_flat_samples_far_apart_do_not_confirm_a_hang() -> None:
    """Lost samples or a slow interval: the ends of a gap say nothing of what was between."""
    from analyzer.detectors.hang import HangDetector
    from gpuheal.config.detection import HangConfig
    from tests.factories import mk

    det = HangDetector(HangConfig())
    stream = [mk(1000.0 + t, n, utilization_pct=100.0, power_draw_w=300.0,
                 memory_used_mb=20000.0) for n, t in enumerate((0.0, 31.0, 62.0, 93.0))]
    verdicts = [det.update(s) for s in stream]
    assert all(v is None or v.severity == "warning" for v in verdicts), verdicts


def test_a_flat_gpu_sampled_every_second_is_confirmed_once_the_window_is_full() -> None:
    from analyzer.detectors.hang import HangDetector
    from gpuheal.config.detection import HangConfig
    from tests.factories import mk

    det = HangDetector(HangConfig())
    verdicts = [det.update(mk(1000.0 + t, t, utilization_pct=100.0, power_draw_w=300.0,
                              memory_used_mb=20000.0)) for t in range(32)]
    assert verdicts[29] is None
    assert verdicts[30] is not None and verdicts[30].severity == "critical"
