"""Analyzer thresholds (``[analyzer]`` in the TOML config).

Every window is in seconds of EVENT time (the samples' ``ts``), the silence timeout of
``[analyzer.unavailable]`` included: a silent GPU sends no ``ts``, so the analyzer converts it
to wall seconds with the GPU's observed event/wall rate (a replay at 10x: a tenth; never less
than ``min_wall_timeout_s``, for delivery jitter), and a gap in the samples' own clock is
judged in event time when the next sample arrives: the same recording gives the same verdicts
at any replay speed. :meth:`AnalyzerConfig.blind_spots` says when a sample interval makes a
detector blind. The one setting in wall seconds is ``state_min_interval_s``, a publication
rate, not a detector window.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

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


XidCode = Annotated[int, Field(ge=0)]


class ThermalConfig(ConfigModel):
    """Temperatures in °C."""

    warning_c: float = Field(default=83.0, gt=0, le=150)
    critical_c: float = Field(default=85.0, gt=0, le=150)
    emergency_c: float = Field(default=90.0, gt=0, le=150)
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


NOT_HANG_XIDS: dict[int, str] = {
    13: "a graphics engine exception: an application fault, the GPU stays healthy",
    31: "a GPU memory page fault: an application fault, the GPU stays healthy",
    43: "the GPU stopped an application's channel: an application fault, the GPU stays "
        "healthy",
    45: "preemptive clean-up after a killed process or an earlier error (a service restart "
        "causes it)",
}
"""XIDs of NVIDIA's catalog that say nothing about a hung GPU (refused in ``hang_xids``)."""


class HangConfig(ConfigModel):
    """A hang is suspected after ``window_s`` at ``>= util_pct``, confirmed only with evidence
    that a healthy GPU cannot produce (see :mod:`analyzer.detectors.hang`)."""

    util_pct: float = Field(default=99.0, gt=0, le=100)
    """Utilization (percent) at or above which a GPU counts as saturated."""
    window_s: float = Field(default=30.0, gt=0)
    """Event-time seconds of sustained utilization before a hang is suspected; also how long
    power, memory and clock must stay flat to confirm it."""
    clear_after_s: float = Field(default=15.0, ge=0)
    """Event-time seconds below ``util_pct`` before a run ends (and its condition clears): a
    short dip restarts the flatness evidence but does not end the run."""
    power_tolerance_w: float = Field(default=5.0, ge=0)
    power_tolerance_pct: float = Field(default=3.0, ge=0)
    """Power is flat while within max(tolerance_w, tolerance_pct % of the reference) (W)."""
    flat_power_max_pct: float = Field(default=85.0, gt=0, le=100)
    """Flat power counts as evidence only while the draw is at most this percent of the
    power limit: a GPU pinned at its cap draws flat power while healthy."""
    limit_margin_w: float = Field(default=10.0, ge=0)
    limit_margin_pct: float = Field(default=5.0, ge=0, lt=100)
    """Flat power never counts within max(limit_margin_w, limit_margin_pct % of the limit) (W)
    of the current power limit, whoever set it (the healer's own throttle included)."""
    assumed_power_limit_w: float | None = Field(default=None, gt=0)
    """The power limit (W) of a GPU whose source reports none (a Jetson: its nvpmodel budget);
    None: without a limit in the sample, flat power is no evidence."""
    power_cap_reasons: list[str] = Field(
        default_factory=lambda: ["sw_power_cap", "hw_power_brake_slowdown"])
    """Throttle reasons that say the GPU sits at its power cap (healthy): no power evidence."""
    memory_tolerance_mb: float = Field(default=0.0, ge=0)
    """Memory (MiB) is flat while within this of the reference (0: exactly constant)."""
    clock_tolerance_mhz: float = Field(default=15.0, ge=0)
    """The SM clock (MHz, where the source reports it) is flat while within this of the
    reference (one boost bin): a healthy power-capped GPU moves its clock."""
    min_flat_samples: int = Field(default=5, ge=2)
    """Flatness needs at least this many samples, none more than window_s / 3 apart."""
    hang_xids: list[Annotated[int, Field(ge=0)]] = Field(default_factory=lambda: [8, 109, 119])
    """XIDs that mean the GPU itself is stuck (8: GPU stopped processing, 109: context switch
    timeout, 119: GSP RPC timeout); they confirm a hang seen during the high-utilization run."""

    @field_validator("hang_xids")
    @classmethod
    def _stuck_gpu_only(cls, value: list[int]) -> list[int]:
        wrong = [code for code in value if code in NOT_HANG_XIDS]
        if wrong:
            why = "; ".join(f"XID {code} is {NOT_HANG_XIDS[code]}" for code in wrong)
            raise ValueError(f"hang_xids must mean the GPU itself is stuck: {why}")
        return value

    def blind_spots(self, interval_s: float, where: str = "analyzer.hang") -> list[str]:
        """Why samples every ``interval_s`` (event seconds) make this config blind to hangs."""
        out = []
        if interval_s > self.window_s / 3:
            out.append(
                f"{where}: a sample every {interval_s:g} s is more than window_s / 3 = "
                f"{self.window_s / 3:g} s apart, so power/memory flatness restarts at every "
                "sample and a hang can never be confirmed (sample faster or raise window_s)")
        return out


class XidConfig(ConfigModel):
    """NVIDIA's XID catalog: which recovery each code needs."""

    restart_app: list[XidCode] = Field(default_factory=lambda: [13, 31, 43, 94])
    reset_gpu: list[XidCode] = Field(default_factory=lambda: [46, 62, 64, 95, 109, 119, 120])
    reboot: list[XidCode] = Field(default_factory=lambda: [79])
    clear_after_s: float = Field(default=120.0, gt=0)
    """Event-time seconds of AVAILABLE samples without a new XID before an XID condition
    clears (an unavailable sample starts the count again). A ``reset_gpu`` code first needs
    a GPU reset (or a reboot) to be seen, a ``reboot`` code a reboot (or a reset); until then
    the condition stays open however quiet it is (or a person acknowledges it)."""


class UnavailableConfig(ConfigModel):
    missed_intervals: float = Field(default=3.0, gt=0)
    """A GPU is silent after this many of its observed (event-time) sample intervals."""
    min_timeout_s: float = Field(default=2.0, gt=0)
    """Event seconds; never declare a GPU silent sooner than this (converted to wall seconds
    with the observed event/wall rate, like the whole timeout)."""
    min_wall_timeout_s: float = Field(default=1.0, ge=0)
    """Wall seconds: a GPU silent now is never declared unavailable sooner (message delivery
    jitter is wall time, whatever the replay speed). A gap that the samples' own clock shows
    is still judged in event time when the next sample arrives, so verdicts do not depend on
    the speed."""
    step_min_s: float = Field(default=60.0, gt=0)
    """A source clock step forward: ``ts`` jumps more than max(step_min_s, 10 observed
    intervals) from one ``seq`` to the next while the wall clock says the sample came on time;
    the analyzer re-anchors instead of letting every window elapse at once (event seconds)."""


class DetectorOverride(ConfigModel):
    """Thresholds for the GPUs whose name matches ``match`` on the hosts in ``hosts``.

    Each section given replaces the global one whole for those GPUs (e.g. a passively cooled
    card with its own ``[analyzer.overrides.thermal]``); the first matching override wins.
    """

    match: str = ""
    """Case-insensitive regular expression searched in the GPU name; empty matches every GPU."""
    hosts: list[str] = Field(default_factory=list)
    """Hosts this override applies to; empty means every host."""
    name: str = ""
    """What the override is for (shown in messages)."""
    assumed_power_limit_w: float | None = Field(default=None, gt=0)
    """The power limit (W) of these GPUs when their source reports none (a Jetson's nvpmodel
    budget): sets ``hang.assumed_power_limit_w`` of the hang section in force for them (this
    override's, else the global one) where that section gives none."""
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

    def hang_for(self, default: HangConfig) -> HangConfig:
        """The hang section in force for the GPUs of this override."""
        hang = self.hang or default
        if self.assumed_power_limit_w is not None and hang.assumed_power_limit_w is None:
            hang = hang.model_copy(update={"assumed_power_limit_w": self.assumed_power_limit_w})
        return hang


ORIN_POWER_BUDGET_W = 60.0
"""Jetson AGX Orin 64 GB: the MAXN nvpmodel budget (W); tegrastats reports no power limit."""


def _default_overrides() -> list[DetectorOverride]:
    return [DetectorOverride(name="jetson-agx-orin", match=r"orin",
                             assumed_power_limit_w=ORIN_POWER_BUDGET_W)]


class AnalyzerConfig(ConfigModel):
    memory_profiles: list[MemoryProfile] = Field(default_factory=_default_memory_profiles)
    overrides: list[DetectorOverride] = Field(default_factory=_default_overrides)
    """Per host / GPU model thresholds for thermal, hang, XID and silence; the first matching
    one wins. The default holds the Jetson AGX Orin's power budget (60 W, so that a frozen
    Orin is still confirmed); a config that gives its own list should keep such an entry."""
    thermal: ThermalConfig = Field(default_factory=ThermalConfig)
    hang: HangConfig = Field(default_factory=HangConfig)
    xid: XidConfig = Field(default_factory=XidConfig)
    unavailable: UnavailableConfig = Field(default_factory=UnavailableConfig)
    state_min_interval_s: float = Field(default=1.0, ge=0)
    """A GPU's retained State is published at most once per this many WALL seconds (the newest
    sample's State when the interval ends; 0: one for every sample; a simulation that
    ``gpuheal up --speed X`` runs X times faster: a X-th of it). A State that comes with an
    Event (a change of health or of the active conditions) is published at once. Wall time,
    unlike the windows above: it bounds the work per second of the machine however fast samples
    come (a replay, a backlog), and it ends for a GPU that falls silent too."""
    ha_discovery: bool = True

    def for_gpu(self, name: str | None, host: str) -> AnalyzerConfig:
        """This config with the first matching override's sections put in place."""
        for override in self.overrides:
            if override.applies(name, host):
                sections = {k: getattr(override, k) for k in ("thermal", "xid", "unavailable")}
                update = {k: v for k, v in sections.items() if v is not None}
                update["hang"] = override.hang_for(self.hang)
                return self.model_copy(update=update)
        return self

    def blind_spots(self, interval_s: float) -> list[str]:
        """Clear messages, one per reason, when samples every ``interval_s`` event seconds make
        a detector blind, for the global config and every override; empty when none does."""
        out = self.hang.blind_spots(interval_s)
        for i, override in enumerate(self.overrides):
            if override.hang is None:
                continue
            label = f" ({override.name or override.match!r})" if (
                override.name or override.match) else ""
            out += override.hang.blind_spots(interval_s, f"analyzer.overrides[{i}]{label}.hang")
        return out

    def memory_profile_for(self, name: str | None, host: str) -> MemoryProfile | None:
        """The first profile matching this GPU's name and host."""
        for profile in self.memory_profiles:
            if profile.hosts and host not in profile.hosts:
                continue
            if re.search(profile.match, name or "", re.IGNORECASE):
                return profile
        return None
