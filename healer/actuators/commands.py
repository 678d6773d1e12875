"""Configured commands (argv lists, never a shell) with a timeout.

``reset_gpu_session``, ``restart_llm_service`` and ``stop_llm_service`` run the argv of the same
name from ``[healer.actuators]`` (e.g. ``["systemctl", "restart", "ollama"]``).
"""

from __future__ import annotations

from typing import Any

from gpuheal.config.healing import ActuatorsConfig
from gpuheal.procs import CommandOutcome, run_command
from healer.actuators import Result


def outcome_result(outcome: CommandOutcome) -> Result:
    """A Result from one command's outcome."""
    if outcome.ok:
        return Result(True, outcome.as_detail(), outcome.duration_s)
    reason = outcome.error or "command_failed"
    detail = outcome.as_detail()
    if outcome.error == "timeout":
        detail["message"] = f"{outcome.argv[0]} timed out and was killed"
    elif outcome.error is None:
        detail["message"] = f"{outcome.argv[0]} exited with status {outcome.returncode}"
    else:
        detail["message"] = outcome.stderr.strip()
    return Result(False, detail, outcome.duration_s, reason)


class CommandActuator:
    """Runs the configured argv of an action."""

    ACTIONS = ("reset_gpu_session", "restart_llm_service", "stop_llm_service")

    def __init__(self, config: ActuatorsConfig) -> None:
        self.config = config

    def run(self, action: str, index: int, params: dict[str, Any]) -> Result:
        if action not in self.ACTIONS:
            return Result(False, {"message": f"no command for {action}"}, 0.0, "unsupported")
        argv: list[str] = getattr(self.config, action)
        return outcome_result(run_command(argv, self.config.command_timeout_s))
