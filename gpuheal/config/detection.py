"""Analyzer thresholds (``[analyzer]`` in the TOML config).

Every window is in seconds of EVENT time (the samples' ``ts``), except the silence timeout of
``[analyzer.unavailable]``, which is wall-clock time by nature (a silent GPU sends no ``ts``).
"""

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
    hysteresis: float = Field(default=1.0, ge=0)
    """The condition clears only below ``warning - hysteresis`` (same unit)."""

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
    hysteresis_c: float = Field(default=3.0, ge=0)
    """Clears only below ``warning_c - hysteresis_c``: a condition is entered through the
    warning threshold (even when the first hot sample is already critical), and severity never
    goes down within a condition, so the band under warning is the one that matters."""
    slowdown_reasons: list[str] = Field(
        default_factory=lambda: ["hw_thermal_slowdown", "sw_thermal_slowdown"]
    )
    """Throttle reasons that raise a warning on their own."""

    @model_validator(mode="after")
    def _ordered(self) -> ThermalConfig:
        if not (self.warning_c <= self.critical_c <= self.emergency_c):
            raise ValueError("thermal thresholds need warning_c <= critical_c <= emergency_c")
        return self


class HangConfig(ConfigModel):
    """A hang is suspected after ``window_s`` at ``>= util_pct``, confirmed with corroboration."""

    util_pct: float = Field(default=99.0, gt=0, le=100)
    """Utilization (percent) at or above which a GPU counts as saturated."""
    window_s: float = Field(default=30.0, gt=0)
    """Event-time seconds of sustained utilization before a hang is suspected; also how long
    power and memory must stay flat to confirm it."""
    power_tolerance_w: float = Field(default=5.0, ge=0)
    power_tolerance_pct: float = Field(default=3.0, ge=0)
    """Power is flat while within max(tolerance_w, tolerance_pct % of the reference)."""
    memory_tolerance_mb: float = Field(default=64.0, ge=0)
    """Memory (MiB) is flat while within this of the reference."""
    min_flat_samples: int = Field(default=5, ge=2)
    """Flatness needs at least this many samples, none more than window_s / 3 apart."""
    hang_xids: list[int] = Field(default_factory=lambda: [8, 43, 45, 109])
    """XIDs that confirm a hang when seen during the high-utilization run."""


class XidConfig(ConfigModel):
    restart_app: list[int] = Field(default_factory=lambda: [13, 31, 43, 94])
    reset_gpu: list[int] = Field(default_factory=lambda: [46, 62, 64, 95, 109, 119, 120])
    reboot: list[int] = Field(default_factory=lambda: [79])
    clear_after_s: float = Field(default=120.0, gt=0)
    """An XID condition clears after this many event-time seconds without a new XID."""


class UnavailableConfig(ConfigModel):
    missed_intervals: float = Field(default=3.0, gt=0)
    """A GPU is silent after this many of its observed (wall-clock) sample intervals."""
    min_timeout_s: float = Field(default=2.0, gt=0)
    """Wall seconds; never declare a GPU silent sooner than this."""


class DetectorOverride(ConfigModel):
    """Thresholds for the GPUs whose name matches ``match`` on the hosts in ``hosts``.

    Each section given replaces the global one whole for those GPUs (e.g. a passively cooled
    card with its own ``[analyzer.overrides.thermal]``); the first matching override wins.
    """

    match: str = ""
    """Case-insensitive regular expression searched in the GPU name; empty matches every GPU."""
    hosts: list[str] = Field(default_factory=list)
    """Hosts this override applies to; empty means every host."""
    thermal: ThermalConfig | None = None
    hang: HangConfig | None = None
    xid: XidConfig | None = None
    unavailable: UnavailableConfig | None = None

    @field_validator("match")
    @classmethod
    def _valid_regex(cls, value: str) -> str:
        re.compile(value)
        return value

    def applies(self, name: str | None, host: str) -> bool:
        if self.hosts and host not in self.hosts:
            return False
        return re.search(self.match, name or "", re.IGNORECASE) is not None


class AnalyzerConfig(ConfigModel):
    memory_profiles: list[MemoryProfile] = Field(default_factory=_default_memory_profiles)
    overrides: list[DetectorOverride] = Field(default_factory=list)
    """Per host / GPU model thresholds for thermal, hang, XID and silence."""
    thermal: ThermalConfig = Field(default_factory=ThermalConfig)
    hang: HangConfig = Field(default_factory=HangConfig)
    xid: XidConfig = Field(default_factory=XidConfig)
    unavailable: UnavailableConfig = Field(default_factory=UnavailableConfig)
    state_min_interval_s: float = Field(default=0.0, ge=0)
    """Coalesce retained State: publish at most once per this many event-time seconds per GPU
    (a change of health or of the active conditions is always published at once)."""
    ha_discovery: bool = True

    def for_gpu(self, name: str | None, host: str) -> AnalyzerConfig:
        """This config with the first matching override's sections put in place."""
        for override in self.overrides:
            if override.applies(name, host):
                sections = {k: getattr(override, k) for k in ("thermal", "hang", "xid",
                                                             "unavailable")}
                return self.model_copy(update={k: v for k, v in sections.items()
                                               if v is not None})
        return self

    def memory_profile_for(self, name: str | None, host: str) -> MemoryProfile | None:
        """The first profile matching this GPU's name and host."""
        for profile in self.memory_profiles:
            if profile.hosts and host not in profile.hosts:
                continue
            if re.search(profile.match, name or "", re.IGNORECASE):
                return profile
        return None
