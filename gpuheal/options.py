"""Options of every command, with environment fallbacks (``GPUHEAL_*``).

The CLI parses argv into these; each component's ``run(opts, stop)`` takes its own.
Precedence: command-line flag, then environment variable, then default.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict

from gpuheal.config import GpuhealConfig, load_config
from gpuheal.models import Sample
from gpuheal.topics import Topics

DEFAULT_BROKER = "mqtt://127.0.0.1:1883"


class EnvSettings(BaseSettings):
    """The shared options as environment variables."""

    model_config = SettingsConfigDict(env_prefix="GPUHEAL_", extra="ignore")

    broker: str = DEFAULT_BROKER
    prefix: str = "gpuheal"
    host: str | None = None
    config: str | None = None
    discovery_prefix: str = "homeassistant"


def default_host_name() -> str:
    """This machine's short host name, reduced to ``[A-Za-z0-9_-]``."""
    name = socket.gethostname().split(".")[0]
    name = re.sub(r"[^A-Za-z0-9_-]", "-", name).strip("-")
    return name or "localhost"


@dataclass
class CommonOptions:
    broker: str = DEFAULT_BROKER
    prefix: str = "gpuheal"
    host_name: str = field(default_factory=default_host_name)
    config_path: str | None = None
    discovery_prefix: str = "homeassistant"
    only_host: str | None = None
    config: GpuhealConfig = field(default_factory=GpuhealConfig)

    @classmethod
    def resolve(
        cls,
        broker: str | None = None,
        prefix: str | None = None,
        host_name: str | None = None,
        config_path: str | None = None,
        only_host: str | None = None,
    ) -> CommonOptions:
        """Flags over environment over defaults; loads (and validates) the config file."""
        env = EnvSettings()
        path = config_path or env.config
        return cls(
            broker=broker or env.broker,
            prefix=prefix or env.prefix,
            host_name=host_name or env.host or default_host_name(),
            config_path=path,
            discovery_prefix=env.discovery_prefix,
            only_host=only_host,
            config=load_config(path),
        )

    @property
    def topics(self) -> Topics:
        return Topics(self.prefix, self.discovery_prefix)


@dataclass
class PublisherOptions:
    common: CommonOptions
    source: str = "auto"
    """auto | nvml | nvidia-smi | jetson | sim | replay"""
    scenario: str = "demo"
    """A built-in scenario name or a scenario file (sim source)."""
    speed: float = 1.0
    interval_s: float | None = None
    """Seconds between samples of the source clock; None: the config's."""
    nvidia_smi: str = "nvidia-smi"
    tegrastats: str = "tegrastats"
    seed: int = 0
    gpus: int = 1
    """Number of simulated GPUs (sim source)."""
    db: Path | None = None
    """Recorded samples to replay (replay source)."""
    count: int | None = None
    """Stop after this many sampling rounds (None: run until stopped)."""
    replay_samples: Iterable[Sample] | None = None
    """Recorded samples in time order (replay source); the CLI reads them from --db."""
    replay_host: str | None = None
    """Rewrite the host of replayed samples (``--host-name NEW`` of ``gpuheal replay``)."""


@dataclass
class AnalyzerOptions:
    common: CommonOptions
    speed: float = 1.0


@dataclass
class HealerOptions:
    common: CommonOptions
    source: str = "auto"
    """``sim`` selects the simulated actuators."""
    state_file: Path | None = None
    """Where guard state persists; None: ~/.local/state/gpuheal/healer-<host>.json."""
    dry_run: bool = False
    allow: list[str] = field(default_factory=list)
    """Destructive actions opted in on the command line (added to the config's)."""


@dataclass
class RecorderOptions:
    common: CommonOptions
    db: Path = Path("gpuheal.db")
    client_id: str | None = None
