"""The simulated actuator (``--source sim``): commands to the simulated GPU on
``P/H/gpu/I/sim``. The simulated GPU is harmless, so every destructive action is opted in."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from gpuheal.models import SimCommand
from healer.actuators import InvalidIndexError, Result, validate_index

SIM_COMMANDS: dict[str, str] = {
    "clear_llm_cache": "unload_models",
    "reset_gpu_session": "restart_service",
    "restart_llm_service": "restart_service",
    "stop_llm_service": "stop_service",
    "throttle_gpu": "set_power_limit",
    "restore_power_limit": "set_power_limit",
    "reset_gpu": "reset",
}

Publish = Callable[[int, SimCommand], bool]
"""Publishes a command for GPU ``index``; True once the broker has it."""


def sim_command(action: str, action_id: str, params: dict[str, Any],
                throttle_pct: float) -> SimCommand:
    """The simulator command for an action (pure). Raises ValueError when it has none.

    ``throttle_gpu`` sets ``throttle_pct`` % of the default limit (the first limit seen,
    ``params["default_power_limit_w"]``, else the last known ``power_limit_w``);
    ``restore_power_limit`` sets the default back.
    """
    command = SIM_COMMANDS.get(action)
    if command is None:
        raise ValueError(f"the simulated GPU has no command for {action}")
    limit_w: float | None = None
    if command == "set_power_limit":
        default_w = params.get("default_power_limit_w") or params.get("power_limit_w")
        if action == "restore_power_limit":
            default_w = params.get("restore_limit_w") or default_w
        if not isinstance(default_w, int | float) or default_w <= 0:
            raise ValueError("no power limit known for this GPU yet")
        limit_w = float(default_w) if action == "restore_power_limit" else round(
            float(default_w) * throttle_pct / 100.0, 2)
    return SimCommand(command=command, action_id=action_id, power_limit_w=limit_w)


class SimActuator:
    """Sends the simulator command; succeeds once it is published."""

    def __init__(self, publish: Publish, throttle_pct: float = 80.0) -> None:
        self.publish = publish
        self.throttle_pct = throttle_pct

    def run(self, action: str, index: int, params: dict[str, Any]) -> Result:
        t0 = time.monotonic()
        try:
            index = validate_index(index)
            cmd = sim_command(action, str(params.get("action_id", "")), params,
                              self.throttle_pct)
        except (InvalidIndexError, ValueError) as exc:
            return Result(False, {"message": str(exc)}, 0.0, "unsupported")
        detail: dict[str, Any] = {"sim_command": cmd.command, "power_limit_w": cmd.power_limit_w}
        if not self.publish(index, cmd):
            return Result(False, {**detail, "message": "the simulator command was not published"},
                          time.monotonic() - t0, "not_published")
        return Result(True, detail, time.monotonic() - t0)
