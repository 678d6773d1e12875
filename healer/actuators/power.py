"""``throttle_gpu`` / ``restore_power_limit``: the GPU power limit.

Through NVML (the ``pynvml`` module of nvidia-ml-py, injectable for tests) when it answers,
else ``nvidia-smi -i I -pl W``; on a Jetson ``jetson_clocks --fan`` (after ``--store`` so that
the restore can put the clocks back with ``--restore``). Argument building and clamping are
pure functions below.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from gpuheal.config.healing import ActuatorsConfig
from gpuheal.procs import run_command
from healer.actuators import InvalidIndexError, Result, validate_index
from healer.actuators.commands import outcome_result

JETSON_MARKER = Path("/etc/nv_tegra_release")


# --- pure: targets and clamping --------------------------------------------------------
def clamp(value: float, low: float, high: float) -> float:
    """``value`` within [low, high] (``low`` wins if the range is empty)."""
    return max(low, min(high, value))


def nvml_target_mw(default_mw: int, min_mw: int, max_mw: int, pct: float) -> int:
    """NVML power limit in milliwatts: ``pct`` % of the default, within NVML's constraints."""
    return int(clamp(round(default_mw * pct / 100.0), min_mw, max_mw))


@dataclass(frozen=True)
class PowerLimits:
    """A GPU's power limits in watts, as ``nvidia-smi`` reports them."""

    default_w: float
    min_w: float
    max_w: float
    current_w: float | None = None
    """The limit in force now (None when nvidia-smi does not say)."""


def smi_target_w(limits: PowerLimits, pct: float) -> int:
    """Whole watts for ``nvidia-smi -pl``: ``pct`` % of the default, within [min, max]."""
    low, high = math.ceil(limits.min_w), math.floor(limits.max_w)
    return int(clamp(round(limits.default_w * pct / 100.0), low, high))


def smi_query_limits_argv(smi: str, index: int) -> list[str]:
    return [smi, "-i", str(validate_index(index)),
            "--query-gpu=power.default_limit,power.min_limit,power.max_limit,power.limit",
            "--format=csv,noheader,nounits"]


def smi_set_limit_argv(smi: str, index: int, watts: int) -> list[str]:
    if isinstance(watts, bool) or not isinstance(watts, int) or watts <= 0:
        raise ValueError(f"power limit must be a positive whole number of watts: {watts!r}")
    return [smi, "-i", str(validate_index(index)), "-pl", str(watts)]


def parse_smi_limits(text: str) -> PowerLimits:
    """Parse ``300.00, 100.00, 350.00[, 250.00]`` (default, min, max and, when asked, the
    current limit; ``--format=csv,noheader,nounits``; units tolerated).

    Raises ValueError when default, min or max is missing (``[N/A]``, ``[Not Supported]``);
    a missing current limit is None.
    """
    line = next((ln for ln in text.splitlines() if ln.strip()), "")
    fields = [f.strip().removesuffix("W").strip() for f in line.split(",")]
    if len(fields) not in (3, 4):
        raise ValueError(f"expected 3 or 4 power limits, got {line!r}")
    try:
        default_w, min_w, max_w = (float(f) for f in fields[:3])
    except ValueError:
        raise ValueError(f"power limits not reported: {line.strip()!r}") from None
    if not all(math.isfinite(v) and v > 0 for v in (default_w, min_w, max_w)):
        raise ValueError(f"power limits not usable: {line.strip()!r}")
    current: float | None = None
    if len(fields) == 4:
        try:
            current = float(fields[3])
        except ValueError:
            current = None
        if current is not None and not (math.isfinite(current) and current > 0):
            current = None
    return PowerLimits(default_w, min_w, max_w, current)


def jetson_throttle_argvs(jetson_clocks: str, store_file: str) -> list[list[str]]:
    """Save the clocks, then run the fan at full speed."""
    return [[jetson_clocks, "--store", store_file], [jetson_clocks, "--fan"]]


def jetson_restore_argvs(jetson_clocks: str, store_file: str) -> list[list[str]]:
    return [[jetson_clocks, "--restore", store_file]]


def is_jetson() -> bool:
    return JETSON_MARKER.exists()


def load_nvml() -> ModuleType | None:
    """The ``pynvml`` module when NVML initialises on this machine, else None."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
    except pynvml.NVMLError:
        return None
    return pynvml


# --- the actuator ------------------------------------------------------------------------
class PowerActuator:
    """Lowers the power limit to ``throttle_pct`` % of the default, and restores it."""

    ACTIONS = ("throttle_gpu", "restore_power_limit")

    def __init__(self, config: ActuatorsConfig, nvml: ModuleType | None = None,
                 jetson: bool | None = None) -> None:
        self.config = config
        self.nvml = nvml
        self.jetson = is_jetson() if jetson is None else jetson
        self._before_throttle: dict[int, float] = {}
        """The limit (W) each GPU had before this healer throttled it: what a restore puts
        back (an operator's own limit, not the default); the default when not known."""

    def run(self, action: str, index: int, params: dict[str, Any]) -> Result:
        t0 = time.monotonic()
        if action not in self.ACTIONS:
            return Result(False, {"message": f"power actuator cannot {action}"}, 0.0,
                          "unsupported")
        try:
            index = validate_index(index)
        except InvalidIndexError as exc:
            return Result(False, {"message": str(exc)}, 0.0, "invalid_index")
        restore = action == "restore_power_limit"
        given = params.get("restore_limit_w") if restore else None
        if isinstance(given, int | float) and given > 0:
            # the healer persisted the limit from before its throttle: that one, after a
            # restart too (this actuator's memory is only a fallback)
            self._before_throttle[index] = float(given)
        if self.jetson:
            result = self._jetson(restore)
        elif self.nvml is not None:
            result = self._nvml(index, restore)
        else:
            result = self._smi(index, restore)
        return Result(result.ok, result.detail, time.monotonic() - t0, result.reason)

    def _jetson(self, restore: bool) -> Result:
        store = str(Path(self.config.jetson_clocks_store).expanduser())
        if not restore:
            Path(store).parent.mkdir(parents=True, exist_ok=True)
        argvs = (jetson_restore_argvs if restore else jetson_throttle_argvs)(
            self.config.jetson_clocks, store)
        steps: list[dict[str, Any]] = []
        for argv in argvs:
            outcome = run_command(argv, self.config.command_timeout_s)
            steps.append(outcome.as_detail())
            if not outcome.ok:
                failed = outcome_result(outcome)
                return Result(False, {"method": "jetson_clocks", "steps": steps,
                                      "message": failed.detail.get("message")},
                              0.0, failed.reason)
        return Result(True, {"method": "jetson_clocks", "steps": steps})

    def _nvml(self, index: int, restore: bool) -> Result:
        nv = self.nvml
        assert nv is not None
        try:
            nv.nvmlInit()
        except nv.NVMLError as exc:
            return Result(False, {"method": "nvml", "message": f"NVML init failed: {exc}"},
                          0.0, "nvml_error")
        try:
            handle = nv.nvmlDeviceGetHandleByIndex(index)
            default_mw = int(nv.nvmlDeviceGetPowerManagementDefaultLimit(handle))
            min_mw, max_mw = (int(v) for v in
                              nv.nvmlDeviceGetPowerManagementLimitConstraints(handle))
            previous_mw = int(nv.nvmlDeviceGetPowerManagementLimit(handle))
            if restore:
                before_w = self._before_throttle.get(index)
                target_mw = (int(clamp(round(before_w * 1000), min_mw, max_mw))
                             if before_w is not None
                             else nvml_target_mw(default_mw, min_mw, max_mw, 100.0))
            else:  # a throttle never raises a limit already set lower
                target_mw = min(nvml_target_mw(default_mw, min_mw, max_mw,
                                               self.config.throttle_pct), previous_mw)
            nv.nvmlDeviceSetPowerManagementLimit(handle, target_mw)
            self._remember(index, restore, previous_mw / 1000.0)
        except nv.NVMLError as exc:
            reason = ("permission_denied" if isinstance(exc, nv.NVMLError_NoPermission)
                      else "nvml_error")
            return Result(False, {"method": "nvml", "message": f"NVML: {exc}"}, 0.0, reason)
        finally:
            with contextlib.suppress(nv.NVMLError):  # shutting down is best effort
                nv.nvmlShutdown()
        return Result(True, {"method": "nvml", "default_mw": default_mw, "min_mw": min_mw,
                             "max_mw": max_mw, "previous_mw": previous_mw,
                             "limit_mw": target_mw, "limit_w": target_mw / 1000.0})

    def _remember(self, index: int, restore: bool, previous_w: float | None) -> None:
        """Keep the pre-throttle limit until the restore (a second throttle keeps the first)."""
        if restore:
            self._before_throttle.pop(index, None)
        elif previous_w is not None:
            self._before_throttle.setdefault(index, previous_w)

    def _smi(self, index: int, restore: bool) -> Result:
        smi = self.config.nvidia_smi
        query = run_command(smi_query_limits_argv(smi, index), self.config.command_timeout_s)
        if not query.ok:
            failed = outcome_result(query)
            return Result(False, {"method": "nvidia-smi", **failed.detail}, 0.0, failed.reason)
        try:
            limits = parse_smi_limits(query.stdout)
        except ValueError as exc:
            return Result(False, {"method": "nvidia-smi", "message": str(exc)}, 0.0,
                          "not_supported")
        before_w = self._before_throttle.get(index)
        if restore and before_w is not None:
            watts = int(clamp(round(before_w), math.ceil(limits.min_w),
                              math.floor(limits.max_w)))
        else:
            watts = smi_target_w(limits, 100.0 if restore else self.config.throttle_pct)
        if not restore and limits.current_w is not None:  # never raise a lower limit
            watts = min(watts, max(math.ceil(limits.min_w), math.floor(limits.current_w)))
        outcome = run_command(smi_set_limit_argv(smi, index, watts),
                              self.config.command_timeout_s)
        result = outcome_result(outcome)
        if result.ok:
            self._remember(index, restore, limits.current_w)
        detail = {"method": "nvidia-smi", "default_w": limits.default_w, "min_w": limits.min_w,
                  "max_w": limits.max_w, "limit_w": watts, **result.detail}
        return Result(result.ok, detail, 0.0, result.reason)
