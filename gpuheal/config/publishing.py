"""Publisher options (``[publisher]`` in the TOML config)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from gpuheal.config.base import ConfigModel


class PublisherConfig(ConfigModel):
    interval_s: Annotated[float, Field(gt=0)] = 1.0
    """Seconds between samples (of the source clock)."""
    sample_qos: Literal[0, 1] = 0
    smi_timeout_s: Annotated[float, Field(gt=0)] = 5.0
    """A hung nvidia-smi is killed after this many seconds."""
