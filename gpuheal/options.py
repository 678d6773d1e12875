"""Options of every command: their flags, their environment fallbacks, and back to argv.

Each options class holds, side by side, the flags it parses (``add_arguments``), how parsed
flags become options (``from_args``) and how options become flags again (``to_argv``: what
``gpuheal up`` runs its children with). Precedence: flag, then environment variable
(``GPUHEAL_*``), then default. Broker credentials never travel on a command line: children
get ``GPUHEAL_BROKER`` in their environment.
"""

from __future__ import annotations

import argparse
import hashlib
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
SOURCES = ("auto", "nvml", "nvidia-smi", "jetson", "sim")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class EnvSettings(BaseSettings):
    """The shared options as environment variables."""

    model_config = SettingsConfigDict(env_prefix="GPUHEAL_", extra="ignore")

    broker: str = DEFAULT_BROKER
    prefix: str = "gpuheal"
    host: str | None = None
    config: str | None = None
    discovery_prefix: str = "homeassistant"
    dashboard_token: str | None = None


def default_host_name() -> str:
    """This machine's short host name, reduced to ``[A-Za-z0-9_-]``."""
    name = socket.gethostname().split(".")[0]
    name = re.sub(r"[^A-Za-z0-9_-]", "-", name).strip("-")
    return name or "localhost"


def positive_float(text: str) -> float:
    """An argparse type: a finite number above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number: {text}")
    return value


def positive_int(text: str) -> int:
    """An argparse type: a whole number above 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text}")
    return value


@dataclass
class CommonOptions:
    """What every component shares: broker, prefix, host name, config, log level."""

    broker: str = DEFAULT_BROKER
    prefix: str = "gpuheal"
    host_name: str = field(default_factory=default_host_name)
    config_path: str | None = None
    discovery_prefix: str = "homeassistant"
    only_host: str | None = None
    log_level: str = "INFO"
    config: GpuhealConfig = field(default_factory=GpuhealConfig)

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser, *, only_host: bool = False) -> None:
        g = p.add_argument_group("shared options (also GPUHEAL_* environment variables)")
        g.add_argument("--broker", help="mqtt://[user:pass@]host:port or mqtts://… "
                       "(GPUHEAL_BROKER; default mqtt://127.0.0.1:1883)")
        g.add_argument("--env-file", type=Path, metavar="FILE",
                       help="read GPUHEAL_* settings from FILE (an env file of `gpuheal broker "
                       "init`) before the environment")
        g.add_argument("--prefix", help="topic prefix (GPUHEAL_PREFIX; default gpuheal)")
        g.add_argument("--host-name", help="this host's name in topics (GPUHEAL_HOST; "
                       "default: the machine's host name)")
        g.add_argument("--config", help="TOML config file with thresholds, ladder and guards "
                       "(GPUHEAL_CONFIG)")
        g.add_argument("--log-level", default="INFO", choices=LOG_LEVELS)
        if only_host:
            g.add_argument("--only-host", help="serve only this host (default: every host)")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> CommonOptions:
        return cls.resolve(broker=args.broker, prefix=args.prefix,
                           host_name=getattr(args, "host_name", None), config_path=args.config,
                           only_host=getattr(args, "only_host", None),
                           log_level=getattr(args, "log_level", "INFO"))

    @classmethod
    def resolve(
        cls,
        broker: str | None = None,
        prefix: str | None = None,
        host_name: str | None = None,
        config_path: str | None = None,
        only_host: str | None = None,
        log_level: str = "INFO",
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
            log_level=log_level,
            config=load_config(path),
        )

    def to_argv(self) -> list[str]:
        argv = ["--prefix", self.prefix, "--host-name", self.host_name,
                "--log-level", self.log_level]
        if self.config_path:
            argv += ["--config", str(self.config_path)]
        if self.only_host:
            argv += ["--only-host", self.only_host]
        return argv

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
    count: int | None = None
    """Stop after this many sampling rounds (None: run until stopped)."""
    replay_samples: Iterable[Sample] | None = None
    """Recorded samples in time order (replay source); the CLI reads them from --db."""
    replay_hosts: dict[str, str] | None = None
    """Recorded host → the host it is replayed as (``gpuheal replay``)."""

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser, *, with_count: bool = True) -> None:
        g = p.add_argument_group("GPU source")
        g.add_argument("--source", choices=SOURCES, default="auto",
                       help="auto: NVML, else nvidia-smi, else Jetson, else the simulator")
        g.add_argument("--scenario", default="demo",
                       help="simulator scenario: demo, oom, thermal, hang, xid, lost, "
                       "healthy-busy, healthy-capped, healthy-throttled, healthy, or a file")
        g.add_argument("--speed", type=positive_float, default=1.0,
                       help="simulated time runs this many times faster")
        g.add_argument("--interval", type=positive_float, help="seconds between samples")
        g.add_argument("--nvidia-smi", default="nvidia-smi", help="the nvidia-smi executable")
        g.add_argument("--tegrastats", default="tegrastats", help="the tegrastats executable")
        g.add_argument("--seed", type=int, default=0, help="simulator seed")
        g.add_argument("--gpus", type=positive_int, default=1,
                       help="number of simulated GPUs")
        if with_count:
            g.add_argument("--count", type=positive_int,
                           help="stop after this many sampling rounds")

    @classmethod
    def from_args(cls, args: argparse.Namespace, common: CommonOptions) -> PublisherOptions:
        return cls(common=common, source=args.source, scenario=args.scenario, speed=args.speed,
                   interval_s=args.interval, nvidia_smi=args.nvidia_smi,
                   tegrastats=args.tegrastats, seed=args.seed, gpus=args.gpus,
                   count=getattr(args, "count", None))

    def to_argv(self) -> list[str]:
        argv = ["publisher", *self.common.to_argv(), "--source", self.source,
                "--scenario", self.scenario, "--speed", repr(self.speed),
                "--nvidia-smi", self.nvidia_smi, "--tegrastats", self.tegrastats,
                "--seed", str(self.seed), "--gpus", str(self.gpus)]
        if self.interval_s:
            argv += ["--interval", repr(self.interval_s)]
        if self.count is not None:
            argv += ["--count", str(self.count)]
        return argv


def shard(text: str) -> tuple[int, int]:
    """An argparse type: ``K/N``, this analyzer's share K (1..N) of N."""
    k, sep, n = text.partition("/")
    try:
        share, shares = int(k), int(n)
    except ValueError:
        share = shares = 0
    if not sep or not 1 <= share <= shares:
        raise argparse.ArgumentTypeError(f"--shard takes K/N with 1 <= K <= N, got {text!r}")
    return share, shares


def shard_of(host: str, shares: int) -> int:
    """The share (1..``shares``) that analyzes ``host``: a stable hash of its name, the same
    on every machine and every run."""
    digest = hashlib.sha256(host.encode()).digest()
    return int.from_bytes(digest[:8], "big") % shares + 1


@dataclass
class AnalyzerOptions:
    common: CommonOptions
    speed: float = 1.0
    shard: tuple[int, int] | None = None
    """(K, N): analyze only the hosts whose :func:`shard_of` is K (of N analyzers)."""

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("--speed", type=positive_float, default=1.0, help=argparse.SUPPRESS)
        p.add_argument("--shard", type=shard, metavar="K/N",
                       help="analyze only share K of N: the hosts whose name hashes to K "
                       "(found from their publishers' status); run N analyzers, 1/N to N/N")

    @classmethod
    def from_args(cls, args: argparse.Namespace, common: CommonOptions) -> AnalyzerOptions:
        return cls(common=common, speed=args.speed, shard=args.shard)

    def to_argv(self) -> list[str]:
        argv = ["analyzer", *self.common.to_argv(), "--speed", repr(self.speed)]
        if self.shard is not None:
            argv += ["--shard", f"{self.shard[0]}/{self.shard[1]}"]
        return argv


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

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser, *, with_source: bool = True) -> None:
        g = p.add_argument_group("healer")
        if with_source:
            g.add_argument("--source", choices=SOURCES, default="auto",
                           help="sim: heal the simulated GPU with simulated actuators")
        g.add_argument("--state-file", type=Path, help="where the healer's guards persist")
        g.add_argument("--dry-run", action="store_true", help="decide, publish, never act")
        g.add_argument("--allow", action="append", default=[], metavar="ACTION",
                       help="opt in a destructive action (reset_gpu, stop_llm_service)")

    @classmethod
    def from_args(cls, args: argparse.Namespace, common: CommonOptions) -> HealerOptions:
        return cls(common=common, source=args.source, state_file=args.state_file,
                   dry_run=args.dry_run, allow=list(args.allow))

    def to_argv(self) -> list[str]:
        argv = ["healer", *self.common.to_argv(), "--source", self.source]
        if self.state_file is not None:
            argv += ["--state-file", str(self.state_file)]
        if self.dry_run:
            argv.append("--dry-run")
        for action in self.allow:
            argv += ["--allow", action]
        return argv


@dataclass
class RecorderOptions:
    common: CommonOptions
    db: Path = Path("gpuheal.db")
    client_id: str | None = None
    sample_every_s: float | None = None
    """Record at most one sample per GPU per this many event seconds (None: every sample);
    States, Events, Actions and every sample that is unavailable or carries XIDs are kept."""

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("--db", type=Path, default=Path("gpuheal.db"), help="SQLite file")
        p.add_argument("--client-id", help="MQTT client id of the persistent session")
        p.add_argument("--sample-every", type=positive_float, metavar="SECONDS",
                       help="record at most one sample per GPU per SECONDS of event time (a "
                       "fleet); States, Events, Actions are always kept")

    @classmethod
    def from_args(cls, args: argparse.Namespace, common: CommonOptions) -> RecorderOptions:
        return cls(common=common, db=args.db, client_id=args.client_id,
                   sample_every_s=args.sample_every)

    def to_argv(self) -> list[str]:
        argv = ["recorder", *self.common.to_argv(), "--db", str(self.db)]
        if self.client_id:
            argv += ["--client-id", self.client_id]
        if self.sample_every_s is not None:
            argv += ["--sample-every", repr(self.sample_every_s)]
        return argv


@dataclass
class DashboardOptions:
    common: CommonOptions
    port: int = 9100
    bind: str = "127.0.0.1"
    db: Path | None = None
    """The recorder's SQLite file, for history, events and actions (None: live data only)."""
    token: str | None = None
    """Required for every write when bound to anything but loopback (GPUHEAL_DASHBOARD_TOKEN;
    never on the command line, where other users could read it)."""

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("--port", type=int, default=9100, help="HTTP port (default 9100)")
        p.add_argument("--bind", default="127.0.0.1",
                       help="address to listen on (default 127.0.0.1; anything else requires "
                       "GPUHEAL_DASHBOARD_TOKEN for writes)")
        p.add_argument("--db", type=Path, help="the recorder's SQLite file (history charts, "
                       "events, actions)")

    @classmethod
    def from_args(cls, args: argparse.Namespace, common: CommonOptions) -> DashboardOptions:
        return cls(common=common, port=args.port, bind=args.bind, db=args.db,
                   token=EnvSettings().dashboard_token)

    def to_argv(self) -> list[str]:
        argv = ["dashboard", *self.common.to_argv(), "--port", str(self.port),
                "--bind", self.bind]
        if self.db is not None:
            argv += ["--db", str(self.db)]
        return argv
