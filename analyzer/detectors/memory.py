"""Memory pressure (``out_of_memory``): a threshold ladder with hysteresis, per memory profile.

The profile is chosen by GPU name and host (``AnalyzerConfig.memory_profile_for``): the Jetson
AGX Orin 64 GB profile counts GiB used (36 / 38 / 40 GiB, 1 GiB = 1024 MiB), the others a
percent of the total. Ladder: warning → ``clear_llm_cache``, critical and emergency →
``reset_gpu_session``.
"""

from __future__ import annotations

from typing import Any

from analyzer.detectors.base import KEEP, BandedLevel, Detector, Finding, Verdict
from gpuheal.config.detection import AnalyzerConfig, MemoryProfile
from gpuheal.models import ActionName, Sample, Severity

MIB_PER_GIB = 1024.0


def memory_action(severity: Severity) -> ActionName:
    """The recovery rung for a memory condition of this severity."""
    return "clear_llm_cache" if severity == "warning" else "reset_gpu_session"


class MemoryDetector(Detector):
    """Memory used against the GPU's profile; clears below ``warning - hysteresis``."""

    __slots__ = ("_band", "_config", "_host", "_name", "_profile")
    kind = "out_of_memory"

    def __init__(self, config: AnalyzerConfig, host: str) -> None:
        self._config = config
        self._host = host
        self._name: str | None = None
        self._profile: MemoryProfile | None = config.memory_profile_for(None, host)
        self._band = BandedLevel()

    def _profile_for(self, name: str | None) -> MemoryProfile | None:
        if name is not None and name != self._name:
            self._name = name
            self._profile = self._config.memory_profile_for(name, self._host)
        return self._profile

    def update(self, sample: Sample) -> Verdict:
        profile = self._profile_for(sample.name)
        used = sample.memory_used_mb
        if profile is None or used is None:
            return KEEP
        total = sample.memory_total_mb
        if profile.unit == "gb":
            scale = MIB_PER_GIB
        elif total:
            scale = total / 100.0
        else:
            return KEEP
        severity = self._band.step(
            used,
            profile.warning * scale,
            profile.critical * scale,
            profile.emergency * scale,
            profile.hysteresis * scale,
        )
        if severity is None:
            return None
        threshold = {"warning": profile.warning, "critical": profile.critical,
                     "emergency": profile.emergency}[severity]
        unit = "GiB" if profile.unit == "gb" else "%"
        shown = used / MIB_PER_GIB if profile.unit == "gb" else used / scale
        evidence: dict[str, object] = {
            "memory_used_mb": used,
            "memory_total_mb": total,
            "profile": profile.name,
            "threshold": threshold,
            "unit": unit,
        }
        if total:
            evidence["percent"] = round(used * 100.0 / total, 2)
        return Finding(
            severity=severity,
            message=(
                f"memory {shown:.1f} {unit} used "
                f"({severity} at {threshold:g} {unit}, profile {profile.name})"
            ),
            evidence=evidence,
            recommended_action=memory_action(severity),
        )

    def cleared(self, sample: Sample) -> tuple[str, dict[str, Any]]:
        profile = self._profile
        used, total = sample.memory_used_mb, sample.memory_total_mb
        if profile is None or used is None:
            return "cleared: memory below its thresholds", {"memory_used_mb": used}
        unit = "GiB" if profile.unit == "gb" else "%"
        if profile.unit == "gb":
            shown = used / MIB_PER_GIB
        else:
            shown = used * 100.0 / total if total else 0.0
        below = profile.warning - profile.hysteresis
        evidence: dict[str, Any] = {"memory_used_mb": used, "memory_total_mb": total,
                                    "profile": profile.name, "clears_below": below,
                                    "unit": unit}
        if total:
            evidence["percent"] = round(used * 100.0 / total, 2)
        return (f"cleared: memory {shown:.1f} {unit} used, below {below:g} {unit} (warning at "
                f"{profile.warning:g} {unit}, hysteresis {profile.hysteresis:g} {unit}, profile "
                f"{profile.name})", evidence)

    def restore(self, severity: Severity, started_ts: float, state_ts: float) -> None:
        self._band.active = True
