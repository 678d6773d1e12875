"""The simulated GPU: a Jetson AGX Orin-like device (or the card of the scenario's ``gpu``
profile) that plays a scenario and reacts to the healer's simulator commands (``SimCommand``
on ``P/H/gpu/I/sim``).

Deterministic for a seed: every step draws the same random numbers in the same order, so the
same scenario, seed and commands at the same steps give the same samples. Time is simulated:
each :meth:`SimSource.read` after the first advances ``interval_s`` of simulated time, and the
sample ``ts`` is the wall time at the start plus the simulated time elapsed; the service waits
``interval_s / speed`` wall seconds between rounds.

Physics, kept simple (units in names):

* utilization: the phase's target plus uniform noise (a ``flat`` phase: exactly 100.0);
* memory: moves towards the target at ``memory_rate_mb_s``; readings add uniform noise;
* power: ``idle + (limit - idle) * utilization``, or the phase's ``power_w``, plus noise,
  never above the power limit; a ``capped`` phase holds it within ``CAP_BAND`` (0.5 %) under
  the current limit, like a power controller at its cap;
* SM clock: the top clock scaled by the limit and utilization; in a ``capped`` phase it steps
  up and down by ``CLOCK_BIN_MHZ`` bins around a set point that falls with the limit;
* temperature: approaches the phase's ``temperature_c`` or, without one,
  ``AMBIENT_C + FULL_POWER_RISE_C * power / default limit`` with time constant
  ``temperature_tau_s``; ``fan_max`` takes ``FAN_MAX_COOLING_C`` off.

Every sample carries the simulated host's boot time (``host_boot_ts``: the source's start),
which stays the same for the life of a :class:`SimSource`.

Commands always do their physical part (``set_power_limit`` sets the limit, ``fan_max`` runs the
fan at 100 %, ``reset`` returns the fan to automatic), then whatever the current phase says
(:class:`publisher.scenarios.Reaction`). A lost GPU ignores everything but its phase's reactions.
"""

from __future__ import annotations

import hashlib
import logging
import math
import queue
import random
import time
import uuid as uuidlib
from typing import Any

from gpuheal.models import SimCommand
from publisher.scenarios import GpuProfile, Phase, Scenario, builtin, load_scenario
from publisher.sources.base import unavailable_reading

log = logging.getLogger(__name__)

JETSON = GpuProfile()
"""The default simulated card."""
SIM_NAME = JETSON.name
MEMORY_TOTAL_MB = JETSON.memory_total_mb
DEFAULT_POWER_LIMIT_W = JETSON.power_limit_w
MIN_POWER_LIMIT_W = JETSON.min_limit_w
IDLE_POWER_W = JETSON.idle_w
AMBIENT_C = 30.0
FULL_POWER_RISE_C = 48.0
"""Degrees above ambient at the default power limit's draw (0.8 °C/W on the 60 W Jetson)."""
FAN_MAX_COOLING_C = 3.0
MAX_SM_CLOCK_MHZ = JETSON.max_sm_clock_mhz
EMC_CLOCK_MHZ = JETSON.mem_clock_mhz
TEMPERATURE_NOISE_C = 0.2
LOST_ERROR = "GPU is lost"
CAP_BAND = 0.005
"""A capped GPU draws between (1 - CAP_BAND) x limit and the limit."""
CLOCK_BIN_MHZ = 15.0
"""One boost bin: the step of a power controller's SM clock."""


def sim_uuid(index: int) -> str:
    """A stable, deterministic uuid for simulated GPU ``index``."""
    digest = hashlib.sha256(f"gpuheal-simulated-gpu-{index}".encode()).digest()
    return f"GPU-{uuidlib.UUID(bytes=digest[:16])}"


def _clamp(value: float, low: float, high: float) -> float:
    return max(low, min(high, value))


class SimGpu:
    """One simulated GPU playing one scenario."""

    def __init__(self, scenario: Scenario, seed: int = 0, index: int = 0) -> None:
        self.scenario = scenario
        self.index = index
        self.seed = seed
        self.uuid = sim_uuid(index)
        self.rng = random.Random(seed)
        self.t = 0.0
        """Simulated seconds since the start."""
        self.phase_index = 0
        self.phase_t = 0.0
        self.overrides: dict[str, float] = {}
        self.profile = scenario.gpu
        self.power_limit_w = self.profile.power_limit_w
        self.fan_max = False
        self.commands: list[str] = []
        """Every command received, in order (for tests and logs)."""
        self.phase_log: list[tuple[float, str]] = [(0.0, self.phase.name)]
        """(simulated second, phase name) of every phase entered."""
        self._pending_xids: list[int] = list(self.phase.xids)
        self._frozen: tuple[float, float] | None = None
        self.memory_mb = self._target("memory_mb")
        self.util_pct = self._target("util_pct")
        self.power_w = self._power_for(self.util_pct)
        self.temperature_c = self._temperature_target()
        self.sm_clock_mhz = self._clock_for(self.util_pct)
        self._noise = (0.0, 0.0)

    # --- phase ----------------------------------------------------------------------------
    @property
    def phase(self) -> Phase:
        return self.scenario.phases[self.phase_index]

    def _target(self, name: str) -> Any:
        return self.overrides.get(name, getattr(self.phase, name))

    def _enter_next(self) -> None:
        if self.phase_index + 1 >= len(self.scenario.phases):
            return
        self.phase_index += 1
        self.phase_t = 0.0
        self.overrides = {}
        phase = self.phase
        self.phase_log.append((self.t, phase.name))
        self._pending_xids.extend(phase.xids)
        self._frozen = None
        if phase.flat:
            power = phase.power_w if phase.power_w is not None else self.power_w
            self._frozen = (round(min(power, self.power_limit_w), 2), float(round(self.memory_mb)))
        log.info("sim GPU %d: phase %r at %.0f s", self.index, phase.name, self.t)

    # --- physics ----------------------------------------------------------------------------
    def _power_for(self, util_pct: float) -> float:
        explicit = self._target("power_w")
        if explicit is not None:
            return float(explicit)
        idle = self.profile.idle_w
        return idle + (self.power_limit_w - idle) * util_pct / 100.0

    def _clock_for(self, util_pct: float) -> float:
        share = self.power_limit_w / self.profile.power_limit_w
        return self.profile.max_sm_clock_mhz * share * (0.4 + 0.6 * util_pct / 100.0)

    def _capped_clock(self, u: float) -> float:
        """One step of a power controller at its cap: up or down by 0-2 bins, pulled back
        towards a set point that falls with the limit."""
        top = self.profile.max_sm_clock_mhz
        share = self.power_limit_w / self.profile.power_limit_w
        setpoint = top * (0.45 + 0.4 * share)
        bins = round(2.0 * u)
        if self.sm_clock_mhz > setpoint + 3 * CLOCK_BIN_MHZ:
            bins -= 1
        elif self.sm_clock_mhz < setpoint - 3 * CLOCK_BIN_MHZ:
            bins += 1
        return _clamp(self.sm_clock_mhz + bins * CLOCK_BIN_MHZ, 0.3 * top, top)

    def _temperature_target(self) -> float:
        explicit = self._target("temperature_c")
        target = explicit if explicit is not None else (
            AMBIENT_C + FULL_POWER_RISE_C * self.power_w / self.profile.power_limit_w)
        return target - (FAN_MAX_COOLING_C if self.fan_max else 0.0)

    def step(self, dt: float) -> None:
        """Advance ``dt`` simulated seconds."""
        self.t += dt
        self.phase_t += dt
        duration = self.phase.duration_s
        if duration is not None and self.phase_t >= duration - 1e-9:
            self._enter_next()
        u_util, u_power, u_mem, u_temp, u_clock = (
            self.rng.uniform(-1.0, 1.0) for _ in range(5))
        phase = self.phase
        if phase.lost:
            return
        if self._frozen is not None:
            self.util_pct = 100.0
            self.power_w = self._frozen[0]
            self.sm_clock_mhz = self._clock_for(self.util_pct)
        else:
            self.util_pct = _clamp(self._target("util_pct")
                                   + u_util * self._target("util_jitter_pct"), 0.0, 100.0)
            rate = self._target("memory_rate_mb_s") * dt
            self.memory_mb += _clamp(self._target("memory_mb") - self.memory_mb, -rate, rate)
            if phase.capped:
                self.power_w = self.power_limit_w * (1.0 - CAP_BAND * (1.0 + u_power) / 2.0)
                self.sm_clock_mhz = self._capped_clock(u_clock)
            else:
                power = self._power_for(self.util_pct) + u_power * self._target("power_jitter_w")
                self.power_w = _clamp(power, self.profile.idle_w / 2, self.power_limit_w)
                self.sm_clock_mhz = self._clock_for(self.util_pct)
        tau = self._target("temperature_tau_s")
        target = self._temperature_target()
        self.temperature_c += (target - self.temperature_c) * (1.0 - math.exp(-dt / tau))
        self._noise = (u_mem * self._target("memory_jitter_mb"), u_temp * TEMPERATURE_NOISE_C)

    # --- commands ---------------------------------------------------------------------------
    def apply(self, command: SimCommand) -> None:
        """React to a simulator command (physical effect, then the phase's reaction)."""
        name = command.command
        self.commands.append(name)
        phase = self.phase
        if not phase.lost:
            if name == "set_power_limit":
                limit = command.power_limit_w
                default = self.profile.power_limit_w
                self.power_limit_w = _clamp(default if limit is None else limit,
                                            self.profile.min_limit_w, default)
            elif name == "fan_max":
                self.fan_max = True
            elif name == "reset":
                self.fan_max = False
        reaction = phase.on.get(name)
        log.info("sim GPU %d: %s in phase %r%s", self.index, name, phase.name,
                 "" if reaction else " (no reaction)")
        if reaction is None:
            return
        if reaction.max_power_limit_pct is not None and (
            name != "set_power_limit"
            or self.power_limit_w > self.profile.power_limit_w * reaction.max_power_limit_pct
            / 100 + 1e-9
        ):
            return
        self.memory_mb = _clamp(self.memory_mb + reaction.memory_step_mb, 0.0,
                                self.profile.memory_total_mb)
        self.overrides.update(reaction.set)
        if reaction.end:
            self._enter_next()

    # --- output -----------------------------------------------------------------------------
    def reading(self) -> dict[str, Any]:
        """Sample fields of the GPU now (XIDs are reported once)."""
        profile = self.profile
        xids, self._pending_xids = self._pending_xids, []
        if self.phase.lost:
            reading = unavailable_reading(self.index, LOST_ERROR, uuid=self.uuid,
                                          name=profile.name)
            if xids:
                reading["xids"] = xids  # XID 79 comes with the lost GPU
            return reading
        mem_noise, temp_noise = self._noise
        if self._frozen is not None:
            memory = self._frozen[1]
        else:
            memory = float(round(_clamp(self.memory_mb + mem_noise, 0.0,
                                        profile.memory_total_mb)))
        fan = 100.0 if self.fan_max else _clamp(20.0 + (self.temperature_c - 40.0) * 2.0, 20, 100)
        return {
            "index": self.index,
            "uuid": self.uuid,
            "name": profile.name,
            "temperature_c": round(self.temperature_c + temp_noise, 2),
            "utilization_pct": round(self.util_pct, 1),
            "memory_used_mb": memory,
            "memory_total_mb": profile.memory_total_mb,
            "power_draw_w": round(self.power_w, 2),
            "power_limit_w": self.power_limit_w,
            "sm_clock_mhz": float(round(self.sm_clock_mhz)),
            "mem_clock_mhz": profile.mem_clock_mhz,
            "fan_pct": round(fan, 1),
            "throttle_reasons": (["sw_power_cap"]
                                 if self.power_w >= 0.98 * self.power_limit_w else []),
            "xids": xids,
        }


class SimSource:
    """``gpus`` simulated GPUs of the scenario's card: the scenario on GPU 0, ``healthy`` on
    the others (GPU i is seeded with ``seed + i``)."""

    name = "sim"

    def __init__(self, scenario: Scenario | str = "demo", seed: int = 0, gpus: int = 1,
                 interval_s: float = 1.0, speed: float = 1.0,
                 start_ts: float | None = None, host_boot_ts: float | None = None) -> None:
        """``host_boot_ts``: the simulated host's boot time (default: ``start_ts``)."""
        if gpus < 1:
            raise ValueError(f"--gpus must be at least 1, got {gpus}")
        if interval_s <= 0 or speed <= 0:
            raise ValueError("interval and speed must be positive")
        main = load_scenario(scenario) if isinstance(scenario, str) else scenario
        healthy = builtin("healthy").model_copy(update={"gpu": main.gpu})  # the same cards
        self.gpus = [SimGpu(main if i == 0 else healthy, seed + i, i) for i in range(gpus)]
        self.interval_s = interval_s
        self.speed = speed
        self.start_ts = time.time() if start_ts is None else start_ts
        self.host_boot_ts = self.start_ts if host_boot_ts is None else host_boot_ts
        self.elapsed_s = 0.0
        self._started = False
        self._commands: queue.SimpleQueue[tuple[int, SimCommand]] = queue.SimpleQueue()

    def has_gpu(self, index: int) -> bool:
        return 0 <= index < len(self.gpus)

    def command(self, index: int, command: SimCommand) -> None:
        """Queue a command for GPU ``index`` (thread-safe); it applies at the next read."""
        if not self.has_gpu(index):
            raise ValueError(f"no simulated GPU {index} (there are {len(self.gpus)})")
        self._commands.put((index, command))

    def read(self, ts: float) -> list[dict[str, Any]]:
        """Apply queued commands, advance one interval (not before the first read), read all."""
        while True:
            try:
                index, command = self._commands.get_nowait()
            except queue.Empty:
                break
            self.gpus[index].apply(command)
        if self._started:
            for gpu in self.gpus:
                gpu.step(self.interval_s)
            self.elapsed_s += self.interval_s
        self._started = True
        sample_ts = self.start_ts + self.elapsed_s
        return [{**gpu.reading(), "ts": sample_ts, "host_boot_ts": self.host_boot_ts}
                for gpu in self.gpus]

    def next_wait_s(self) -> float:
        """Wall seconds between rounds: the interval of simulated time, ``speed`` times faster."""
        return self.interval_s / self.speed

    def close(self) -> None:
        """Nothing to release."""
