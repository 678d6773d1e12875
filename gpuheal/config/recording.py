"""Recorder options (``[recorder]`` in the TOML config)."""

from __future__ import annotations

from gpuheal.config.base import ConfigModel


class RecorderConfig(ConfigModel):
    retention_days: float = 7.0
    """Raw samples older than this become 1-minute aggregates."""
    batch_size: int = 500
    """Rows per transaction at most."""
    flush_interval_s: float = 0.2
    buffer_max: int = 50_000
    """Messages held in memory while the disk is slow or locked; beyond it nothing is acked."""
