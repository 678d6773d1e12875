"""``gpuheal probe``: sample every GPU once and print the Samples as JSON lines (no broker).

The health check a person runs first. ``auto`` tries the real sources only (NVML, nvidia-smi,
Jetson): a health check that fell back to a simulated GPU would mislead; ``--source sim`` asks
for the simulator explicitly. Exit status: 0 every GPU answered; 1 no source works (the reason
on stderr); 2 a GPU is unavailable (its Sample says why).
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from gpuheal.options import PublisherOptions
from publisher.sampling import Stamper, sample_round
from publisher.sources import NoSourceError, SourceError, interval_of, open_source


def probe(opts: PublisherOptions, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Print one Sample per GPU to ``out`` (stdout); problems to ``err`` (stderr)."""
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        source = open_source(opts, interval_of(opts), include_sim=opts.source == "sim")
    except NoSourceError as exc:
        print(f"gpuheal probe: {exc}", file=err)
        return 1
    try:
        samples = sample_round(source, Stamper(opts.common.host_name), time.time())
    except SourceError as exc:
        print(f"gpuheal probe: {source.name}: {exc}", file=err)
        return 1
    finally:
        source.close()
    if not samples:
        print(f"gpuheal probe: {source.name} returned no GPU", file=err)
        return 1
    for sample in samples:
        print(sample.to_json().decode(), file=out)
    lost = [s for s in samples if not s.available]
    for sample in lost:
        print(f"gpuheal probe: GPU {sample.index} is unavailable: {sample.error}", file=err)
    return 2 if lost else 0
