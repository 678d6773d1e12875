"""Recorder options (``[recorder]`` in the TOML config)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from gpuheal.config.base import ConfigModel


class RecorderConfig(ConfigModel):
    retention_days: Annotated[float, Field(gt=0)] = 7.0
    """Raw samples older than this (days) become 1-minute aggregates; events, actions,
    states, statuses and dead letters are kept."""
    retention_interval_s: Annotated[float, Field(gt=0)] = 3600.0
    """Seconds between retention passes (one also runs at start)."""
    batch_size: Annotated[int, Field(ge=1, le=100_000)] = 500
    """Rows per transaction at most."""
    flush_interval_s: Annotated[float, Field(ge=0)] = 0.05
    """Longest a received message waits in memory before its batch is committed (seconds):
    after the first message the writer lingers up to this long for the batch to fill (fewer,
    bigger transactions) while messages keep coming; a full batch, or a pause of 5 ms in the
    stream, is committed at once."""
    buffer_max: Annotated[int, Field(ge=1)] = 50_000
    """Messages held in memory while the disk is slow or locked. Beyond it QoS 0 samples are
    dropped (counted); QoS 1 messages are never dropped: they stay unacknowledged, and the
    recorder's MQTT Receive Maximum (``min(buffer_max, 65535)``) stops the broker from
    sending more of them than that until some are stored."""
    session_expiry_s: Annotated[int, Field(ge=0)] = 86_400
    """How long (seconds) the broker keeps the recorder's session and queues its messages
    while it is away."""
    busy_timeout_s: Annotated[float, Field(gt=0)] = 1.0
    """How long (seconds) one write waits for another process's lock before it is retried."""
    retry_max_s: Annotated[float, Field(gt=0)] = 10.0
    """Longest pause (seconds) between retries of a write the disk refused (backoff cap)."""
    warn_interval_s: Annotated[float, Field(gt=0)] = 30.0
    """While storage fails, a warning is published at most this often (seconds)."""
    drain_timeout_s: Annotated[float, Field(ge=0)] = 5.0
    """On a clean stop, how long (seconds) to keep committing what is buffered."""
    synchronous: Literal["NORMAL", "FULL"] = "FULL"
    """SQLite ``synchronous``: FULL survives power loss of acknowledged rows; NORMAL survives
    only a process crash (faster on slow disks)."""
