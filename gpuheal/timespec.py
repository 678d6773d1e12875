"""``--since 30s|15m|1h|2d|1w``: a duration back from now."""

from __future__ import annotations

import re
import time

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86_400.0, "w": 604_800.0}
_SPEC = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")


def parse_duration(spec: str) -> float:
    """Seconds in ``spec`` (``30s``, ``15m``, ``1h``, ``2d``, ``1w``, ``1.5h``)."""
    m = _SPEC.match(spec or "")
    if not m:
        raise ValueError(f"invalid duration {spec!r}: use a number and s, m, h, d or w "
                         "(30s, 15m, 1h, 2d)")
    return float(m.group(1)) * _UNITS[m.group(2)]


def since_ts(spec: str | None, now: float | None = None) -> float | None:
    """UNIX seconds ``spec`` ago (None: no lower bound)."""
    if spec is None:
        return None
    return (time.time() if now is None else now) - parse_duration(spec)
