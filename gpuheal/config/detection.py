"""Analyzer thresholds (``[analyzer]`` in the TOML config)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from gpuheal.config.base import ConfigModel


class MemoryProfile(ConfigModel):
    """Memory thresholds for GPUs whose name matches ``match`` (and host in ``hosts``)."""

    name: str
    match: str = ""
    """Case-insensitive regular expression searched in the GPU name; empty matches every GPU."""
    hosts: list[str] = Field(default_factory=list)
    """Hosts this profile applies to; empty means every host."""
    unit: Literal["gb", "percent"]
    """``gb``: GiB used (1 GB = 1024 MiB, as the origin); ``percent``: of the total."""
    warning: float
    critical: float
    emergency: float
    hysteresis: float = 1.0
    """A level clears only this far (same unit) below the threshold that raised it."""

    @field_validator("match")
    @classmethod
    def _valid_regex(cls, value: str) -> str:
        re.compile(value)
        return value

    @model_validator(mode="after")
    def _ordered(self) -> MemoryProfile:
        if not (0 < self.warning <= self.critical <= self.emergency):
            raise ValueError("memory thresholds need 0 < warning <= critical <= emergency")
        return self


def _default_memory_profiles() -> list[MemoryProfile]:
    return [
        MemoryProfile(name="jetson-agx-orin-64gb", match=r"orin", unit="gb",
                      warning=36, critical=38, emergency=40, hysteresis=1.0),
        MemoryProfile(name="percent", match="", unit="percent",
                      warning=90, critical=95, emergency=98, hysteresis=2.0),
    ]


class ThermalConfig(ConfigModel):
    """Temperatures in °C."""

    warning_c: float = 83.0
    critical_c: float = 85.0
    emergency_c: float = 90.0
    hysteresis_c: float = 3.0
    """Clears only below (raising threshold - hysteresis_c)."""
    slowdown_reasons: list[str] = Field(
        default_factory=lambda: ["hw_thermal_slowdown", "sw_thermal_slowdown"]
    )
    """Throttle reasons that raise a warning on their own."""


class HangConfig(ConfigModel):
    util_pct: float = 99.0
    window_s: float = 30.0
    """Event-time seconds of sustained utilization before a hang is suspected."""
    power_tolerance_w: float = 5.0
    power_tolerance_pct: float = 3.0
    """Power is flat while within max(tolerance_w, tolerance_pct % of the reference)."""
    memory_tolerance_mb: float = 64.0
    hang_xids: list[int] = Field(default_factory=lambda: [8, 43, 45, 109])


class XidConfig(ConfigModel):
    restart_app: list[int] = Field(default_factory=lambda: [13, 31, 43, 94])
    reset_gpu: list[int] = Field(default_factory=lambda: [46, 62, 64, 95, 109, 119, 120])
    reboot: list[int] = Field(default_factory=lambda: [79])
    clear_after_s: float = 120.0
    """An XID condition clears after this many event-time seconds without a new XID."""


class UnavailableConfig(ConfigModel):
    missed_intervals: float = 3.0
    min_timeout_s: float = 2.0
    """Wall seconds; never declare a GPU silent sooner than this."""


class AnalyzerConfig(ConfigModel):
    memory_profiles: list[MemoryProfile] = Field(default_factory=_default_memory_profiles)
    thermal: ThermalConfig = Field(default_factory=ThermalConfig)
    hang: HangConfig = Field(default_factory=HangConfig)
    xid: XidConfig = Field(default_factory=XidConfig)
    unavailable: UnavailableConfig = Field(default_factory=UnavailableConfig)
    state_min_interval_s: float = 0.0
    """Coalesce retained State: publish at most once per this many event-time seconds per GPU
    (a change of health or of the active conditions is always published at once)."""
    ha_discovery: bool = True

    def memory_profile_for(self, name: str | None, host: str) -> MemoryProfile | None:
        """The first profile matching this GPU's name and host."""
        for profile in self.memory_profiles:
            if profile.hosts and host not in profile.hosts:
                continue
            if re.search(profile.match, name or "", re.IGNORECASE):
                return profile
        return None
