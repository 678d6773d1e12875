"""From a source's readings to Samples: host, source name, time and a per-GPU ``seq``.

Plain logic, no MQTT: the service and the probe both use it.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

from pydantic import ValidationError

from gpuheal.models import Sample
from publisher.sources.base import Reading, Source

log = logging.getLogger(__name__)


PROC_STAT = Path("/proc/stat")


def read_boot_ts(path: Path = PROC_STAT) -> float | None:
    """When this host booted (UNIX seconds): Linux's ``btime`` line of ``/proc/stat``; None
    when it cannot be read (not Linux, no /proc)."""
    try:
        with path.open(encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("btime "):
                    value = float(line.split()[1])
                    return value if value > 0 else None
    except (OSError, ValueError, IndexError) as exc:
        log.debug("cannot read the boot time from %s: %s", path, exc)
    return None


class Stamper:
    """Completes readings into Samples; ``seq`` counts per GPU index from 0, +1 per sample.

    Every sample gets the host's boot time (``host_boot_ts``, read once at start; a reading
    that carries its own, the simulator's, keeps it): a new value tells the analyzer that
    the host rebooted."""

    def __init__(self, host: str, boot_ts: float | None = None,
                 boot_path: Path | None = PROC_STAT) -> None:
        """``boot_ts``: the host's boot time; None: read from ``boot_path`` (None: unknown)."""
        self.host = host
        if boot_ts is None and boot_path is not None:
            boot_ts = read_boot_ts(boot_path)
        self.boot_ts = boot_ts
        self._seq: defaultdict[int, int] = defaultdict(int)

    def stamp(self, reading: Reading, source_name: str, ts: float) -> Sample:
        """A finished Sample passes through; a dict gets host, source, ts (unless it has one),
        the host's boot time (unless it has one) and the next seq of its GPU. Raises
        ValidationError for a reading that is not valid."""
        if isinstance(reading, Sample):
            return reading
        fields = {"host": self.host, "source": source_name, "ts": ts,
                  "host_boot_ts": self.boot_ts, **reading}
        index = fields.get("index")
        fields["seq"] = self._seq[index] if isinstance(index, int) else 0
        sample = Sample.model_validate(fields)
        self._seq[sample.index] += 1
        return sample


def sample_round(source: Source, stamper: Stamper, ts: float) -> list[Sample]:
    """One reading of every GPU as Samples. A reading that does not validate is logged and
    left out (the other GPUs still count); SourceError from the source propagates."""
    samples = []
    for reading in source.read(ts):
        try:
            samples.append(stamper.stamp(reading, source.name, ts))
        except ValidationError as exc:
            index = reading.get("index") if isinstance(reading, dict) else None
            log.error("%s: dropping an invalid reading of GPU %s: %s", source.name, index,
                      exc.errors()[0].get("msg"))
    return samples
