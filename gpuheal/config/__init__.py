"""The TOML config: every threshold, ladder and guard. Unknown keys fail loudly."""

from __future__ import annotations

import tomllib
from pathlib import Path

from pydantic import Field, ValidationError, model_validator

from gpuheal.config.base import ConfigModel
from gpuheal.config.detection import AnalyzerConfig, MemoryProfile
from gpuheal.config.healing import ActuatorsConfig, GuardsConfig, HealerConfig, Rung
from gpuheal.config.publishing import PublisherConfig
from gpuheal.config.recording import RecorderConfig
from gpuheal.validation import error_lines

__all__ = [
    "ActuatorsConfig", "AnalyzerConfig", "ConfigError", "GpuhealConfig", "GuardsConfig",
    "HealerConfig", "MemoryProfile", "PublisherConfig", "RecorderConfig", "Rung", "load_config",
]


class ConfigError(ValueError):
    """A config file that cannot be used; the message says where and why."""


class GpuhealConfig(ConfigModel):
    publisher: PublisherConfig = Field(default_factory=PublisherConfig)
    analyzer: AnalyzerConfig = Field(default_factory=AnalyzerConfig)
    healer: HealerConfig = Field(default_factory=HealerConfig)
    recorder: RecorderConfig = Field(default_factory=RecorderConfig)

    @model_validator(mode="after")
    def _detectors_can_see(self) -> GpuhealConfig:
        """A sample interval that makes a detector blind is a config error, not a surprise."""
        blind = self.analyzer.blind_spots(self.publisher.interval_s)
        if blind:
            raise ValueError("publisher.interval_s: " + "; ".join(blind))
        return self


def load_config(path: str | Path | None) -> GpuhealConfig:
    """Read a TOML config; ``None`` gives the defaults."""
    if path is None or str(path) == "":
        return GpuhealConfig()
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read config {p}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config {p} is not valid TOML: {exc}") from None
    try:
        return GpuhealConfig.model_validate(data)
    except ValidationError as exc:
        lines = [f"  {line}" for line in error_lines(exc)]
        raise ConfigError(f"config {p} is invalid:\n" + "\n".join(lines)) from None
