"""Where gpuheal keeps its state on this machine (XDG base directories)."""

from __future__ import annotations

import os
from pathlib import Path


def state_dir() -> Path:
    """``$XDG_STATE_HOME/gpuheal`` (default ``~/.local/state/gpuheal``): the private broker,
    the healer's guard file, the lock of ``gpuheal up``."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "gpuheal"


def healer_state_file(host: str, base: Path | None = None) -> Path:
    """The healer's guard file for ``host`` (in ``base``, default :func:`state_dir`)."""
    return (base or state_dir()) / f"healer-{host}.json"
