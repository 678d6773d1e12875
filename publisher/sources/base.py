"""What every GPU source is: the :class:`Source` protocol, its errors, and small helpers.

A source returns *readings*: either dicts of :class:`gpuheal.models.Sample` fields (at least
``index``; ``host``, ``source``, ``seq`` and, unless given, ``ts`` are filled in by the caller)
or complete :class:`Sample` objects (the replay source), which are published as they are.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from gpuheal.models import Sample

Reading = dict[str, Any] | Sample
"""One GPU's reading: Sample fields (``index`` required) or a finished Sample."""

CLOCKS_EVENT_REASONS: dict[int, str] = {
    0x001: "gpu_idle",
    0x002: "applications_clocks_setting",
    0x004: "sw_power_cap",
    0x008: "hw_slowdown",
    0x010: "sync_boost",
    0x020: "sw_thermal_slowdown",
    0x040: "hw_thermal_slowdown",
    0x080: "hw_power_brake_slowdown",
    0x100: "display_clock_setting",
}
"""Clocks-event (formerly "throttle") reason bits, the same in NVML and
nvidia-smi's ``.active`` mask, named as nvidia-smi's per-reason fields (``sw_power_cap``...)."""


def reason_names(mask: int) -> list[str]:
    """The names of the clocks-event reason bits set in ``mask``."""
    return [name for bit, name in CLOCKS_EVENT_REASONS.items() if mask & bit]


class SourceError(RuntimeError):
    """One sampling round failed; the service logs it and samples again next interval."""


class SourceUnavailable(RuntimeError):
    """This source cannot work on this machine (no driver, no executable, no GPU)."""


class NoSourceError(RuntimeError):
    """No source could be opened; the message lists why each one failed."""


@runtime_checkable
class Source(Protocol):
    """A GPU source.

    ``name`` is the Sample ``source`` value (``nvml``, ``nvidia-smi``, ``jetson``, ``sim``,
    ``replay``). ``read(ts)`` takes one reading of every GPU; ``ts`` is the wall time (UNIX
    seconds) of the round, used unless a reading carries its own ``ts``. ``read`` raises
    :class:`SourceError` when the whole round failed. ``close()`` releases processes, threads
    and libraries.

    A source that keeps its own time (simulator, replay) also has ``next_wait_s() -> float |
    None``: wall seconds until its next round, None when it has nothing more. Without it the
    service samples every interval.
    """

    name: str

    def read(self, ts: float) -> list[Reading]: ...

    def close(self) -> None: ...


def unavailable_reading(index: int, error: str, **identity: Any) -> dict[str, Any]:
    """A reading that says the GPU cannot be read: ``available=False``, readings None."""
    reading: dict[str, Any] = {"index": index, "available": False, "error": error}
    reading.update({k: v for k, v in identity.items() if k in ("uuid", "name", "ts")})
    return reading
