"""Which actuator carries out which action: the real set, or the simulated one."""

from __future__ import annotations

import logging
from types import ModuleType
from typing import Any

from gpuheal.config.healing import ActuatorsConfig, ProbeConfig
from healer.actuators import Actuator, Result
from healer.actuators.commands import CommandActuator
from healer.actuators.ollama import OllamaActuator
from healer.actuators.power import PowerActuator
from healer.actuators.probe import NoProbe, WorkloadProbe
from healer.actuators.reset import ResetActuator
from healer.actuators.sim import Publish, SimActuator

log = logging.getLogger(__name__)


class Dispatcher:
    """Routes each action to its actuator; turns an actuator's bug into a failed Result."""

    def __init__(self, routes: dict[str, Actuator]) -> None:
        self.routes = routes

    def run(self, action: str, index: int, params: dict[str, Any]) -> Result:
        actuator = self.routes.get(action)
        if actuator is None:
            return Result(False, {"message": f"no actuator for {action}"}, 0.0, "unsupported")
        try:
            return actuator.run(action, index, params)
        except Exception as exc:  # an actuator bug must fail the action, not the healer
            log.exception("actuator for %s on GPU %s crashed", action, index)
            return Result(False, {"message": f"actuator crashed: {type(exc).__name__}: {exc}"},
                          0.0, "error")


def real_actuators(config: ActuatorsConfig, nvml: ModuleType | None = None,
                   jetson: bool | None = None, probe: ProbeConfig | None = None) -> Dispatcher:
    """Ollama, configured commands, power limit (NVML / nvidia-smi / jetson_clocks), reset,
    and the workload probe before a reset."""
    commands = CommandActuator(config)
    power = PowerActuator(config, nvml=nvml, jetson=jetson)
    probe = probe or ProbeConfig()
    return Dispatcher({
        "probe_workload": WorkloadProbe(probe.url or config.ollama_url, probe.deadline_s,
                                        probe.model),
        "clear_llm_cache": OllamaActuator(config.ollama_url, config.http_timeout_s),
        "reset_gpu_session": commands,
        "restart_llm_service": commands,
        "stop_llm_service": commands,
        "throttle_gpu": power,
        "restore_power_limit": power,
        "reset_gpu": ResetActuator(config, nvml=nvml),
    })


def sim_actuators(publish: Publish, config: ActuatorsConfig) -> Dispatcher:
    """Every action as a command to the simulated GPU."""
    sim = SimActuator(publish, config.throttle_pct)
    routes: dict[str, Actuator] = {action: sim for action in (
        "clear_llm_cache", "reset_gpu_session", "restart_llm_service", "stop_llm_service",
        "throttle_gpu", "restore_power_limit", "reset_gpu")}
    routes["probe_workload"] = NoProbe()
    return Dispatcher(routes)


def watchdog_s(config: ActuatorsConfig) -> float:
    """Wall seconds after which an action that has not answered counts as timed out."""
    return max(config.command_timeout_s * (len(config.stop_gpu_users)
                                           + len(config.start_gpu_users) + 3),
               config.http_timeout_s * 10) + 5.0
