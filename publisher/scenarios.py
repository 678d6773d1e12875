"""Simulator scenarios: the built-ins and scenario files.

A scenario is a list of *phases* played one after the other on the simulated GPU. A phase sets
targets (utilization, memory, temperature, power) that the GPU moves towards, lasts
``duration_s`` simulated seconds (omitted: until a reaction ends it; the last phase lasts
forever), and says how the GPU *reacts* to each simulator command (``SimCommand``) while it
runs: ``end`` the phase (the incident is healed; the next phase starts), change the memory at
once (``memory_step_mb``), or ``set`` new targets for the rest of the phase.

A scenario may simulate another card than the default Jetson AGX Orin-like one: its ``gpu``
table (:class:`GpuProfile`) gives the name, total memory, default power limit and top SM clock.

A scenario file is TOML (``.toml``) or JSON (``.json``) with the same keys::

    name = "leak"
    description = "memory leaks until the service is restarted"

    [gpu]                        # optional: the simulated card (default: Jetson AGX Orin-like)
    name = "NVIDIA L4 (simulated)"
    memory_total_mb = 23034      # MiB
    power_limit_w = 72           # default (and highest) power limit, W
    min_power_limit_w = 40       # lowest limit a set_power_limit may set (default: a sixth)
    max_sm_clock_mhz = 2040

    [[phases]]
    name = "warm-up"
    duration_s = 60              # simulated seconds
    util_pct = 30                # mean utilization, % (util_jitter_pct: uniform noise, ±%)
    memory_mb = 8192             # memory used (MiB) to approach at memory_rate_mb_s

    [[phases]]
    name = "leak"
    memory_mb = 37888
    memory_rate_mb_s = 300
    [phases.on.unload_models]    # a command: unload_models, restart_service, stop_service,
    memory_step_mb = -512        #   set_power_limit, reset, fan_max
    set = { memory_mb = 39424, memory_rate_mb_s = 25 }
    [phases.on.restart_service]
    end = true

    [[phases]]
    name = "recovered"
    memory_mb = 8192
    memory_rate_mb_s = 4000

Phase keys (units in the names): ``util_pct``, ``util_jitter_pct``, ``memory_mb``,
``memory_rate_mb_s``, ``memory_jitter_mb``, ``temperature_c`` (omitted: follows the power
draw), ``temperature_tau_s`` (time constant of the approach), ``power_w`` (omitted: follows
utilization and the power limit), ``power_jitter_w``, ``flat`` (a hang: utilization exactly
100 %, power and memory exactly constant), ``lost`` (the GPU answers nothing: unavailable
samples; XIDs of the phase come with its first lost sample), ``xids`` (XID codes reported
once, when the phase starts), ``capped`` (a busy GPU held at its power cap by the power
controller: power within 0.5 % under the current limit, throttle reason ``sw_power_cap``, the
SM clock stepping up and down by 15 MHz bins as the controller does; with
``memory_jitter_mb = 0`` the memory is exactly constant, as preallocated by an inference
server). A reaction may carry ``max_power_limit_pct``: it then applies only to a
``set_power_limit`` at or below that percent of the default limit.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gpuheal.models import SimCommandName

TargetName = Literal[
    "util_pct", "util_jitter_pct", "memory_mb", "memory_rate_mb_s", "memory_jitter_mb",
    "temperature_c", "temperature_tau_s", "power_w", "power_jitter_w",
]

GIB = 1024.0


class ScenarioError(ValueError):
    """A scenario that does not exist or cannot be read; the message says why."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)


class Reaction(_Strict):
    """What one command does during a phase."""

    end: bool = False
    """End the phase now: the next phase starts."""
    memory_step_mb: float = 0.0
    """Change memory used at once by this much (MiB; negative frees)."""
    set: dict[TargetName, float] = Field(default_factory=dict)
    """New targets for the rest of the phase."""
    max_power_limit_pct: float | None = None
    """For ``set_power_limit``: react only when the new limit is at most this % of the default."""


class GpuProfile(_Strict):
    """The simulated card. Units: MiB, W, MHz."""

    name: str = "NVIDIA Jetson AGX Orin (simulated)"
    memory_total_mb: float = Field(default=62841.0, gt=0)
    power_limit_w: float = Field(default=60.0, gt=0)
    """The default power limit, also the highest one a ``set_power_limit`` may set."""
    min_power_limit_w: float | None = Field(default=None, gt=0)
    """The lowest settable power limit (omitted: a sixth of ``power_limit_w``)."""
    idle_power_w: float | None = Field(default=None, ge=0)
    """Power draw at 0 % utilization (omitted: a twelfth of ``power_limit_w``)."""
    max_sm_clock_mhz: float = Field(default=1300.0, gt=0)
    mem_clock_mhz: float = Field(default=3199.0, gt=0)

    @property
    def min_limit_w(self) -> float:
        return self.min_power_limit_w if self.min_power_limit_w is not None else (
            self.power_limit_w / 6.0)

    @property
    def idle_w(self) -> float:
        return self.idle_power_w if self.idle_power_w is not None else self.power_limit_w / 12.0


H100 = GpuProfile(name="NVIDIA H100 80GB HBM3 (simulated)", memory_total_mb=81559.0,
                  power_limit_w=700.0, min_power_limit_w=200.0, idle_power_w=70.0,
                  max_sm_clock_mhz=1980.0, mem_clock_mhz=2619.0)
A100 = GpuProfile(name="NVIDIA A100-SXM4-80GB (simulated)", memory_total_mb=81920.0,
                  power_limit_w=400.0, min_power_limit_w=100.0, idle_power_w=55.0,
                  max_sm_clock_mhz=1410.0, mem_clock_mhz=1593.0)
L4 = GpuProfile(name="NVIDIA L4 (simulated)", memory_total_mb=23034.0, power_limit_w=72.0,
                min_power_limit_w=40.0, idle_power_w=16.0, max_sm_clock_mhz=2040.0,
                mem_clock_mhz=6251.0)
PROFILES: dict[str, GpuProfile] = {"jetson-agx-orin": GpuProfile(), "h100": H100, "a100": A100,
                                   "l4": L4}
"""Built-in card profiles (a scenario file gives its own ``[gpu]`` table)."""


class Phase(_Strict):
    """One stretch of a scenario. Units: %, MiB, MiB/s, °C, s, W."""

    name: str
    duration_s: float | None = Field(default=None, gt=0)
    util_pct: float = Field(default=25.0, ge=0, le=100)
    util_jitter_pct: float = Field(default=5.0, ge=0)
    memory_mb: float = Field(default=8192.0, ge=0)
    memory_rate_mb_s: float = Field(default=500.0, gt=0)
    memory_jitter_mb: float = Field(default=16.0, ge=0)
    temperature_c: float | None = None
    temperature_tau_s: float = Field(default=20.0, gt=0)
    power_w: float | None = Field(default=None, ge=0)
    power_jitter_w: float = Field(default=1.0, ge=0)
    flat: bool = False
    lost: bool = False
    capped: bool = False
    xids: list[int] = Field(default_factory=list)
    on: dict[SimCommandName, Reaction] = Field(default_factory=dict)


class Scenario(_Strict):
    name: str
    description: str = ""
    gpu: GpuProfile = Field(default_factory=GpuProfile)
    """The simulated card (default: Jetson AGX Orin-like, 60 W)."""
    phases: list[Phase] = Field(min_length=1)


# --- built-ins --------------------------------------------------------------------------------
INCIDENT_MAX_S = 900.0
"""A demo incident ends by itself after this many simulated seconds, so a dry run progresses."""

_HEALTHY: dict[str, Any] = {"util_pct": 30.0, "util_jitter_pct": 8.0, "memory_mb": 10 * GIB,
                            "memory_rate_mb_s": 4000.0}
_END = {"end": True}
_CAPPED_BUSY: dict[str, Any] = {"util_pct": 100.0, "util_jitter_pct": 0.0,
                                "memory_mb": 60 * GIB, "memory_jitter_mb": 0.0, "capped": True}


def _phase(name: str, duration_s: float | None = None, **fields: Any) -> dict[str, Any]:
    return {"name": name, "duration_s": duration_s, **fields}


def _healthy(name: str, duration_s: float | None = None, **fields: Any) -> dict[str, Any]:
    return _phase(name, duration_s, **{**_HEALTHY, **fields})


_BUILTINS: dict[str, dict[str, Any]] = {
    "demo": {
        "description": "every incident in turn: out-of-memory, thermal, hang, then healthy",
        "phases": [
            _healthy("healthy", 60),
            _phase("oom", INCIDENT_MAX_S, util_pct=55.0, util_jitter_pct=8.0,
                   memory_mb=37 * GIB, memory_rate_mb_s=300.0,
                   on={c: _END for c in ("unload_models", "restart_service", "stop_service",
                                         "reset")}),
            _healthy("after-oom", 120),
            _phase("thermal", INCIDENT_MAX_S, util_pct=85.0, util_jitter_pct=5.0,
                   memory_mb=10 * GIB, temperature_c=84.0, power_jitter_w=0.5,
                   on={"set_power_limit": {"end": True, "max_power_limit_pct": 80.0},
                       **{c: _END for c in ("restart_service", "stop_service", "reset")}}),
            _healthy("after-thermal", 120, util_pct=60.0, temperature_c=72.0),
            # 30 W: well under the 48 W cap a dry run's throttle may have left in place.
            _phase("hang", INCIDENT_MAX_S, memory_mb=10 * GIB, flat=True, power_w=30.0,
                   on={"reset": _END}),
            _healthy("healthy"),
        ],
    },
    "oom": {
        "description": "memory climbs to ~37 GiB; unloading models frees only ~0.5 GiB and a "
                       "leak creeps on to ~38.5 GiB; restarting the service frees it",
        "phases": [
            _healthy("healthy", 60, memory_mb=8 * GIB),
            _phase("leak", util_pct=55.0, memory_mb=37 * GIB, memory_rate_mb_s=300.0,
                   on={"unload_models": {"memory_step_mb": -512.0,
                                         "set": {"memory_mb": 38.5 * GIB,
                                                 "memory_rate_mb_s": 25.0}},
                       **{c: _END for c in ("restart_service", "stop_service", "reset")}}),
            _healthy("recovered", memory_mb=8 * GIB),
        ],
    },
    "thermal": {
        "description": "temperature climbs to ~84 °C; a power limit does not stop it (~86 °C); "
                       "restarting the service drops the load and it cools to ~70 °C",
        "phases": [
            _healthy("healthy", 60),
            _phase("hot", util_pct=90.0, memory_mb=10 * GIB, temperature_c=84.0,
                   power_jitter_w=0.5,
                   on={"set_power_limit": {"set": {"temperature_c": 86.0,
                                                   "temperature_tau_s": 40.0}},
                       **{c: _END for c in ("restart_service", "stop_service", "reset")}}),
            _healthy("cooled", util_pct=20.0, util_jitter_pct=5.0, temperature_c=70.0),
        ],
    },
    "hang": {
        "description": "healthy for 60 s, then frozen at 100 % with flat power and memory "
                       "until a GPU reset",
        "phases": [
            _healthy("healthy", 60),
            _phase("hang", memory_mb=10 * GIB, flat=True, power_w=45.0, on={"reset": _END}),
            _healthy("recovered"),
        ],
    },
    "healthy-busy": {
        "description": "saturated by healthy work: 99-100 % forever, power and memory moving, "
                       "cool; must never be taken for a hang",
        "phases": [
            _phase("busy", util_pct=99.5, util_jitter_pct=0.5, memory_mb=20 * GIB,
                   memory_jitter_mb=300.0, power_w=49.0, power_jitter_w=9.0),
        ],
    },
    "healthy-capped": {
        "description": "an H100-class inference server pinned at its 700 W power cap: 100 % "
                       "busy, power within 0.5 % under the limit, memory exactly constant "
                       "(preallocated), SM clock moving as the power controller does; must "
                       "never be taken for a hang",
        "gpu": H100.model_dump(),
        "phases": [
            _phase("capped", util_pct=100.0, util_jitter_pct=0.0, memory_mb=68 * GIB,
                   memory_jitter_mb=0.0, capped=True),
        ],
    },
    "healthy-throttled": {
        "description": "an A100-class GPU saturated at its 400 W cap gets hot (~84 °C, a "
                       "blocked inlet); a power limit at or below 90 % ends the heat, and it "
                       "then sits on the lowered cap, still saturated with constant memory, "
                       "and cools; restoring the limit returns it to the old cap, still cool; "
                       "must never be taken for a hang",
        "gpu": A100.model_dump(),
        "phases": [
            _phase("capped", 60, **_CAPPED_BUSY),
            _phase("hot", INCIDENT_MAX_S, **_CAPPED_BUSY, temperature_c=84.0,
                   temperature_tau_s=15.0,
                   on={"set_power_limit": {"end": True, "max_power_limit_pct": 90.0}}),
            _phase("throttled", **_CAPPED_BUSY, temperature_tau_s=30.0),
        ],
    },
    "xid": {
        "description": "healthy, then XID 13 in one sample, later XID 79 in one sample",
        "phases": [
            _healthy("healthy", 60),
            _healthy("xid-13", 120, xids=[13]),
            _healthy("xid-79", xids=[79]),
        ],
    },
    "lost": {
        "description": "healthy for 60 s, then the GPU is lost (XID 79 in its first lost "
                       "sample) until a GPU reset",
        "phases": [
            _healthy("healthy", 60),
            _phase("lost", lost=True, xids=[79], on={"reset": _END}),
            _healthy("recovered"),
        ],
    },
    "healthy": {
        "description": "idle-ish forever",
        "phases": [_phase("idle", util_pct=20.0, util_jitter_pct=5.0, memory_mb=4 * GIB)],
    },
}

BUILTIN_NAMES: tuple[str, ...] = tuple(_BUILTINS)


def builtin(name: str) -> Scenario:
    """A built-in scenario by name."""
    try:
        spec = _BUILTINS[name]
    except KeyError:
        raise ScenarioError(
            f"unknown scenario {name!r}: built-ins are {', '.join(BUILTIN_NAMES)}; "
            "or give a .toml/.json scenario file"
        ) from None
    return Scenario.model_validate({"name": name, **spec})


def load_scenario(name_or_path: str) -> Scenario:
    """A built-in name, or a TOML/JSON scenario file (format in this module's docstring)."""
    if name_or_path in _BUILTINS:
        return builtin(name_or_path)
    path = Path(name_or_path)
    if not path.is_file():
        return builtin(name_or_path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ScenarioError(f"cannot read scenario {path}: {exc.strerror}") from None
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        kind = "JSON" if path.suffix.lower() == ".json" else "TOML"
        raise ScenarioError(f"scenario {path} is not valid {kind}: {exc}") from None
    if isinstance(data, dict):
        data.setdefault("name", path.stem)
    try:
        return Scenario.model_validate(data)
    except ValidationError as exc:
        lines = [f"  {'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors()]
        raise ScenarioError(f"scenario {path} is invalid:\n" + "\n".join(lines)) from None
