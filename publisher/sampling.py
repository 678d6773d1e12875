"""From a source's readings to Samples: host, source name, time and a per-GPU ``seq``.

Plain logic, no MQTT: the service and the probe both use it.
"""

from __future__ import annotations

import logging
from collections import defaultdict

from pydantic import ValidationError

from gpuheal.models import Sample
from publisher.sources.base import Reading, Source

log = logging.getLogger(__name__)


class Stamper:
    """Completes readings into Samples; ``seq`` counts per GPU index from 0, +1 per sample."""

    def __init__(self, host: str) -> None:
        self.host = host
        self._seq: defaultdict[int, int] = defaultdict(int)

    def stamp(self, reading: Reading, source_name: str, ts: float) -> Sample:
        """A finished Sample passes through; a dict gets host, source, ts (unless it has one)
        and the next seq of its GPU. Raises ValidationError for a reading that is not valid."""
        if isinstance(reading, Sample):
            return reading
        fields = {"host": self.host, "source": source_name, "ts": ts, **reading}
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
