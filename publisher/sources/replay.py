"""Replay source: recorded Samples republished with their original spacing, ``speed`` times
faster. Each sample keeps its ``ts`` and ``seq`` (detectors work on event time, so a replay at
any speed yields the same events); ``source`` becomes ``replay`` and ``host`` is rewritten
by a map (``gpuheal replay`` sends ``H`` as ``H-replay`` unless told otherwise), so a replay
never speaks for a live host.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from gpuheal.models import Sample
from gpuheal.topics import valid_host


class ReplaySource:
    """One recorded Sample per round; :meth:`next_wait_s` is the recorded gap / speed."""

    name = "replay"

    def __init__(self, samples: Iterable[Sample], speed: float = 1.0,
                 hosts: dict[str, str] | None = None) -> None:
        """``hosts``: recorded host name → the name it is replayed as (others keep theirs)."""
        if speed <= 0:
            raise ValueError(f"speed must be positive, got {speed}")
        for host in (hosts or {}).values():
            if not valid_host(host):
                raise ValueError(f"invalid host name {host!r}: must match [A-Za-z0-9_-]+")
        self.speed = speed
        self.hosts = dict(hosts or {})
        self._samples: Iterator[Sample] = iter(samples)
        self._next: Sample | None = next(self._samples, None)
        self._current_ts = self._next.ts if self._next is not None else 0.0
        self.replayed = 0

    @property
    def exhausted(self) -> bool:
        return self._next is None

    def read(self, ts: float) -> list[Sample]:
        """The next recorded sample (none once every sample has been replayed)."""
        current = self._next
        if current is None:
            return []
        self._next = next(self._samples, None)
        self.replayed += 1
        update: dict[str, object] = {"source": "replay"}
        if current.host in self.hosts:
            update["host"] = self.hosts[current.host]
        self._current_ts = current.ts
        return [current.model_copy(update=update)]

    def next_wait_s(self) -> float | None:
        """Wall seconds until the next sample is due; None when the recording is over."""
        if self._next is None:
            return None
        return max(0.0, self._next.ts - self._current_ts) / self.speed

    def close(self) -> None:
        """Nothing to release."""
