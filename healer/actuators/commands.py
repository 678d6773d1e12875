"""Configured commands (argv lists, never a shell) with a timeout.

``reset_gpu_session``, ``restart_llm_service`` and ``stop_llm_service`` run the argv of the same
name from ``[healer.actuators]`` (e.g. ``["systemctl", "restart", "ollama"]``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gpuheal.config.healing import ActuatorsConfig
from healer.actuators import Result

OUTPUT_TAIL_CHARS = 2000


@dataclass(frozen=True)
class CommandOutcome:
    """What one command did: exit status (None when it did not finish), output tails."""

    argv: list[str]
    returncode: int | None
    stdout: str
    stderr: str
    duration_s: float
    error: str | None = None
    """``timeout``, ``not_found`` or ``error`` when the command did not run to an exit status."""

    @property
    def ok(self) -> bool:
        return self.error is None and self.returncode == 0

    def as_detail(self) -> dict[str, Any]:
        return {"argv": self.argv, "returncode": self.returncode,
                "stdout": self.stdout[-OUTPUT_TAIL_CHARS:],
                "stderr": self.stderr[-OUTPUT_TAIL_CHARS:]}


def run_command(argv: Sequence[str], timeout_s: float) -> CommandOutcome:
    """Run ``argv`` (no shell) for at most ``timeout_s`` wall seconds.

    The command runs in its own process group; on timeout the whole group is killed, so a
    helper it spawned cannot keep the healer waiting.
    """
    args = [str(a) for a in argv]
    t0 = time.monotonic()
    try:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
    except FileNotFoundError:
        return CommandOutcome(args, None, "", f"command not found: {args[0]}",
                              time.monotonic() - t0, error="not_found")
    except OSError as exc:
        return CommandOutcome(args, None, "", f"cannot run {args[0]}: {exc.strerror}",
                              time.monotonic() - t0, error="error")
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        out, err = proc.communicate()
        return CommandOutcome(args, None, out or "",
                              (err or "") + f"\ncommand timed out after {timeout_s:g} s and was "
                              "killed", time.monotonic() - t0, error="timeout")
    return CommandOutcome(args, proc.returncode, out or "", err or "", time.monotonic() - t0)


def _kill_group(proc: subprocess.Popen[str]) -> None:
    """Kill the process group this module started for ``proc``."""
    with contextlib.suppress(ProcessLookupError):  # it ended on its own meanwhile
        os.killpg(proc.pid, signal.SIGKILL)


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
