"""GPU sources and how one is chosen.

``auto`` tries NVML, then nvidia-smi, then Jetson (tegrastats or sysfs), then the simulator;
``--source NAME`` forces one. :func:`open_source` returns a working source or raises
:class:`NoSourceError` saying why each candidate failed.
"""

from __future__ import annotations

import logging

from gpuheal.options import PublisherOptions
from publisher.scenarios import ScenarioError
from publisher.sources.base import (
    NoSourceError,
    Reading,
    Source,
    SourceError,
    SourceUnavailable,
)

log = logging.getLogger(__name__)

SOURCE_NAMES = ("nvml", "nvidia-smi", "jetson", "sim", "replay")
AUTO_ORDER = ("nvml", "nvidia-smi", "jetson", "sim")

__all__ = [
    "AUTO_ORDER", "SOURCE_NAMES", "NoSourceError", "Reading", "Source", "SourceError",
    "SourceUnavailable", "interval_of", "open_one", "open_source",
]


def interval_of(opts: PublisherOptions) -> float:
    """Seconds between samples: ``--interval``, else the config's ``[publisher] interval_s``."""
    interval = opts.interval_s or opts.common.config.publisher.interval_s
    if interval <= 0:
        raise NoSourceError(f"the interval must be positive, got {interval}")
    return interval


def open_one(name: str, opts: PublisherOptions, interval_s: float) -> Source:
    """Open one source by name; SourceUnavailable when it cannot work here."""
    config = opts.common.config.publisher
    if name == "nvml":
        from publisher.sources.nvml import NvmlSource

        return NvmlSource().open()
    if name == "nvidia-smi":
        from publisher.sources.smi import SmiSource

        return SmiSource(opts.nvidia_smi, timeout_s=config.smi_timeout_s).open()
    if name == "jetson":
        from publisher.sources.jetson import JetsonSource

        return JetsonSource(opts.tegrastats, interval_s=interval_s).open()
    if name == "sim":
        from publisher.sources.sim import SimSource

        try:
            return SimSource(opts.scenario, seed=opts.seed, gpus=opts.gpus,
                             interval_s=interval_s, speed=opts.speed)
        except (ScenarioError, ValueError) as exc:
            raise SourceUnavailable(str(exc)) from None
    if name == "replay":
        from publisher.sources.replay import ReplaySource

        if opts.replay_samples is None:
            raise SourceUnavailable("replay needs recorded samples (gpuheal replay --db FILE)")
        try:
            return ReplaySource(opts.replay_samples, speed=opts.speed, hosts=opts.replay_hosts)
        except ValueError as exc:
            raise SourceUnavailable(str(exc)) from None
    raise SourceUnavailable(f"unknown source {name!r}: choose auto or one of "
                            f"{', '.join(SOURCE_NAMES)}")


def open_source(opts: PublisherOptions, interval_s: float | None = None, *,
                include_sim: bool = True) -> Source:
    """The source ``opts.source`` names, or the first that works in ``auto`` order
    (the simulator only when ``include_sim``)."""
    interval = interval_s if interval_s is not None else interval_of(opts)
    if opts.source != "auto":
        try:
            return open_one(opts.source, opts, interval)
        except SourceUnavailable as exc:
            raise NoSourceError(f"source {opts.source} does not work here: {exc}") from None
    reasons = []
    for name in AUTO_ORDER:
        if name == "sim" and not include_sim:
            continue
        try:
            source = open_one(name, opts, interval)
        except SourceUnavailable as exc:
            reasons.append(f"{name}: {exc}")
            continue
        if name == "sim":
            log.warning("no GPU found (%s); using the simulated GPU", "; ".join(reasons))
        else:
            log.info("GPU source: %s", name)
        return source
    hint = "" if include_sim else " (--source sim runs the simulated GPU)"
    raise NoSourceError("no GPU source works here: " + "; ".join(reasons) + hint)
