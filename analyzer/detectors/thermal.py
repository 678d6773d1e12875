"""Thermal trouble (``thermal_throttling``): 83 / 85 / 90 °C with a hysteresis band, or a
thermal slowdown reason reported by the GPU (a warning on its own).

The condition clears only when the temperature is below ``warning_c - hysteresis_c`` (the band
under the threshold that raised it) and no slowdown reason is reported. Ladder: warning →
``throttle_gpu``, critical → ``restart_llm_service``, emergency → ``stop_llm_service``.
"""

from __future__ import annotations

from typing import Any

from analyzer.detectors.base import KEEP, BandedLevel, Detector, Finding, Verdict, worse
from gpuheal.config.detection import ThermalConfig
from gpuheal.models import ActionName, Sample, Severity

THERMAL_ACTIONS: dict[str, ActionName] = {
    "warning": "throttle_gpu",
    "critical": "restart_llm_service",
    "emergency": "stop_llm_service",
}


class ThermalDetector(Detector):
    """Temperature ladder plus slowdown reasons."""

    __slots__ = ("_band", "_config", "_reasons", "_slowdown")
    kind = "thermal_throttling"

    def __init__(self, config: ThermalConfig) -> None:
        self._config = config
        self._reasons = frozenset(config.slowdown_reasons)
        self._band = BandedLevel()
        self._slowdown: tuple[str, ...] = ()
        """The slowdown reasons of the latest sample that reported reasons."""

    def update(self, sample: Sample) -> Verdict:
        c = self._config
        temp = sample.temperature_c
        reasons = sample.throttle_reasons
        if temp is None and reasons is None:
            return KEEP
        if reasons is not None:
            self._slowdown = tuple(sorted(r for r in reasons if r in self._reasons))
        by_temp: Severity | None
        if temp is not None:
            by_temp = self._band.step(temp, c.warning_c, c.critical_c, c.emergency_c,
                                      c.hysteresis_c)
        else:
            by_temp = "warning" if self._band.active else None
        slowdown = list(self._slowdown)
        severity = worse(by_temp, "warning" if slowdown else None)
        if severity is None:
            return None
        threshold = {"warning": c.warning_c, "critical": c.critical_c,
                     "emergency": c.emergency_c}[severity]
        if by_temp is None:
            message = f"thermal slowdown reported: {', '.join(slowdown)}"
        else:
            shown = "unknown" if temp is None else f"{temp:g} °C"
            message = f"temperature {shown} ({severity} at {threshold:g} °C)"
            if slowdown:
                message += f"; slowdown: {', '.join(slowdown)}"
        return Finding(
            severity=severity,
            message=message,
            evidence={
                "temperature_c": temp,
                "threshold_c": threshold,
                "clears_below_c": c.warning_c - c.hysteresis_c,
                "slowdown_reasons": slowdown,
            },
            recommended_action=THERMAL_ACTIONS[severity],
        )

    def cleared(self, sample: Sample) -> tuple[str, dict[str, Any]]:
        c = self._config
        temp = sample.temperature_c
        below = c.warning_c - c.hysteresis_c
        if temp is None:
            message = "cleared: no thermal slowdown reported (temperature not reported)"
        else:
            message = (f"cleared: temperature {temp:g} °C, below {below:g} °C (warning at "
                       f"{c.warning_c:g} °C, hysteresis {c.hysteresis_c:g} °C)")
            if sample.throttle_reasons is not None:
                message += ", no thermal slowdown reported"
        return message, {"temperature_c": temp, "clears_below_c": below,
                         "warning_c": c.warning_c, "slowdown_reasons": []}

    def restore(self, severity: Severity, started_ts: float, state_ts: float) -> None:
        self._band.active = True
