"""Running other programs: argv lists (never a shell), a timeout, the whole group killed.

One helper for every component that runs a command (nvidia-smi, tegrastats, systemctl,
jetson_clocks, mosquitto): :func:`run_command` and :func:`find_executable`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

OUTPUT_TAIL_CHARS = 2000
"""How much of a command's stdout/stderr an outcome's detail keeps."""


@dataclass(frozen=True)
class CommandOutcome:
    """What one command did: exit status (None when it did not finish), its output."""

    argv: list[str]
    returncode: int | None
    stdout: str
    stderr: str
    duration_s: float
    """Wall seconds."""
    error: str | None = None
    """``timeout``, ``not_found`` or ``error`` when the command did not run to an exit status."""

    @property
    def ok(self) -> bool:
        return self.error is None and self.returncode == 0

    def as_detail(self) -> dict[str, Any]:
        """argv, exit status and output tails, for an Action's ``detail``."""
        return {"argv": self.argv, "returncode": self.returncode,
                "stdout": self.stdout[-OUTPUT_TAIL_CHARS:],
                "stderr": self.stderr[-OUTPUT_TAIL_CHARS:]}

    def summary(self) -> str:
        """One line saying how it went."""
        name = Path(self.argv[0]).name if self.argv else "command"
        if self.error == "timeout":
            return f"{name} did not finish within its timeout and was killed"
        if self.error is not None:
            return self.stderr.strip() or f"{name} could not run"
        if self.returncode != 0:
            tail = self.stderr.strip().splitlines()[-1:] or self.stdout.strip().splitlines()[-1:]
            return f"{name} exited with status {self.returncode}" + (
                f": {tail[0][:200]}" if tail else "")
        return f"{name} succeeded"


def run_command(argv: Sequence[str], timeout_s: float) -> CommandOutcome:
    """Run ``argv`` (no shell) for at most ``timeout_s`` wall seconds.

    The command runs in its own process group; on timeout the whole group is killed, so a
    helper it spawned cannot keep the caller waiting.
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
        kill_group(proc)
        out, err = proc.communicate()
        return CommandOutcome(args, None, out or "",
                              (err or "") + f"\ncommand timed out after {timeout_s:g} s and was "
                              "killed", time.monotonic() - t0, error="timeout")
    return CommandOutcome(args, proc.returncode, out or "", err or "", time.monotonic() - t0)


def kill_group(proc: subprocess.Popen[Any], sig: int = signal.SIGKILL) -> None:
    """Signal the process group a child leads (it was started with ``start_new_session``)."""
    with contextlib.suppress(ProcessLookupError):  # it ended on its own meanwhile
        os.killpg(proc.pid, sig)


def find_executable(name: str, fallbacks: Iterable[str] = ()) -> str | None:
    """``name`` from PATH (or as given, when it is a path), else the first existing fallback
    (e.g. ``/usr/sbin/mosquitto``, outside an ordinary user's PATH); None when none exists."""
    found = shutil.which(name)
    if found:
        return found
    for path in fallbacks:
        if Path(path).is_file() and os.access(path, os.X_OK):
            return path
    return None
