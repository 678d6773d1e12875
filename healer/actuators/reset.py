"""``reset_gpu``: stop the GPU's users, make sure nothing still computes on it, then
``nvidia-smi --gpu-reset -i I``. Refused (``processes_remain``) while a process remains.
Whatever the outcome, the ``start_gpu_users`` commands then bring back what was stopped (the
host's LLM service serves the other GPUs too)."""

from __future__ import annotations

import time
from types import ModuleType
from typing import Any

from gpuheal.config.healing import ActuatorsConfig
from gpuheal.procs import run_command
from healer.actuators import InvalidIndexError, Result, validate_index
from healer.actuators.commands import outcome_result


def smi_compute_apps_argv(smi: str, index: int) -> list[str]:
    return [smi, "--query-compute-apps=pid", "--format=csv,noheader",
            "-i", str(validate_index(index))]


def smi_reset_argv(smi: str, index: int) -> list[str]:
    return [smi, "--gpu-reset", "-i", str(validate_index(index))]


def parse_compute_pids(text: str) -> list[int]:
    """PIDs from ``--query-compute-apps=pid --format=csv,noheader`` (one per line).

    Raises ValueError on anything else, so that an unreadable answer is never taken for
    "no processes".
    """
    pids: list[int] = []
    for line in text.splitlines():
        item = line.strip()
        if not item or item.lower().startswith("no running processes"):
            continue
        if not item.isdigit():
            raise ValueError(f"unexpected line in the process list: {item[:80]!r}")
        pids.append(int(item))
    return pids


class ResetActuator:
    """Resets one GPU, after its users are stopped and only if none remains."""

    def __init__(self, config: ActuatorsConfig, nvml: ModuleType | None = None) -> None:
        self.config = config
        self.nvml = nvml

    def run(self, action: str, index: int, params: dict[str, Any]) -> Result:
        t0 = time.monotonic()
        if action != "reset_gpu":
            return Result(False, {"message": f"reset actuator cannot {action}"}, 0.0,
                          "unsupported")
        try:
            index = validate_index(index)
        except InvalidIndexError as exc:
            return Result(False, {"message": str(exc)}, 0.0, "invalid_index")
        steps: list[dict[str, Any]] = []
        for argv in self.config.stop_gpu_users:
            steps.append(run_command(argv, self.config.command_timeout_s).as_detail())
        try:
            result = self._reset(index, steps)
        finally:
            # the services serve the other GPUs too: back they come, whatever happened here
            started = [run_command(argv, self.config.command_timeout_s)
                       for argv in self.config.start_gpu_users]
        detail = {**result.detail, "start_gpu_users": [o.as_detail() for o in started]}
        failed_start = [o for o in started if not o.ok]
        if failed_start:
            detail["services_not_started"] = [o.summary() for o in failed_start]
        return Result(result.ok, detail, time.monotonic() - t0, result.reason)

    def _reset(self, index: int, steps: list[dict[str, Any]]) -> Result:
        """Refuse while a process remains, else reset (services already stopped)."""
        try:
            pids = self.compute_pids(index)
        except (RuntimeError, ValueError) as exc:
            return Result(False, {"stop_gpu_users": steps,
                                  "message": f"cannot tell whether GPU {index} is idle: {exc}; "
                                             "not resetting"}, 0.0, "process_check_failed")
        if pids:
            return Result(False, {"stop_gpu_users": steps, "pids": pids,
                                  "message": f"refusing to reset GPU {index}: "
                                             f"{len(pids)} compute process(es) remain "
                                             f"(pids {', '.join(map(str, pids))})"},
                          0.0, "processes_remain")
        outcome = run_command(smi_reset_argv(self.config.nvidia_smi, index),
                              self.config.command_timeout_s)
        result = outcome_result(outcome)
        return Result(result.ok, {"stop_gpu_users": steps, **result.detail}, 0.0,
                      result.reason)

    def compute_pids(self, index: int) -> list[int]:
        """PIDs still computing on the GPU (NVML when given, else nvidia-smi)."""
        if self.nvml is not None:
            nv = self.nvml
            try:
                nv.nvmlInit()
                try:
                    handle = nv.nvmlDeviceGetHandleByIndex(index)
                    return sorted({int(p.pid) for p in
                                   nv.nvmlDeviceGetComputeRunningProcesses(handle)})
                finally:
                    nv.nvmlShutdown()
            except nv.NVMLError as exc:
                raise RuntimeError(f"NVML: {exc}") from None
        outcome = run_command(smi_compute_apps_argv(self.config.nvidia_smi, index),
                              self.config.command_timeout_s)
        if not outcome.ok:
            raise RuntimeError(outcome_result(outcome).detail.get("message") or "query failed")
        return parse_compute_pids(outcome.stdout)
