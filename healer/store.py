"""The guard state file: JSON, written atomically (temp file + ``os.replace``)."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

from pydantic import ValidationError

from healer.guards import GuardState

log = logging.getLogger(__name__)


def load_guard_state(path: Path, host: str) -> GuardState:
    """The persisted guards, or fresh ones when there is no file yet.

    An unreadable or corrupt file is kept aside as ``<name>.corrupt`` (never silently
    overwritten) and the healer starts with fresh guards, logging why.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return GuardState(host=host)
    try:
        state = GuardState.model_validate(json.loads(text))
    except (ValueError, ValidationError) as exc:
        aside = path.with_name(path.name + ".corrupt")
        log.error("healer state file %s is not valid (%s); kept as %s, starting fresh",
                  path, str(exc).splitlines()[0], aside)
        os.replace(path, aside)
        return GuardState(host=host)
    state.version = 2  # a version 1 file reads as version 2 (new fields have defaults)
    if state.host != host:
        log.warning("healer state file %s belongs to host %r, not %r; starting fresh",
                    path, state.host, host)
        return GuardState(host=host)
    return state


def save_guard_state(path: Path, state: GuardState) -> None:
    """Write the state atomically: a crash leaves the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = state.model_dump_json(indent=1).encode()
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
