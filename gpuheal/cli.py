"""The umbrella CLI: ``gpuheal <command>``. It parses options and calls the library.

This is the only module that composes the four components; they never import each other.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gpuheal import __version__
from gpuheal.broker import BrokerError
from gpuheal.broker_init import BrokerInitError
from gpuheal.config import ConfigError
from gpuheal.mqtt import BrokerURLError
from gpuheal.options import (
    AnalyzerOptions,
    CommonOptions,
    HealerOptions,
    PublisherOptions,
    RecorderOptions,
)

log = logging.getLogger("gpuheal")

SOURCES = ["auto", "nvml", "nvidia-smi", "jetson", "sim"]


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number: {text}")
    return value


def _add_common(p: argparse.ArgumentParser, *, only_host: bool = False) -> None:
    g = p.add_argument_group("shared options (also GPUHEAL_* environment variables)")
    g.add_argument("--broker", help="mqtt://[user:pass@]host:port or mqtts://… "
                   "(GPUHEAL_BROKER; default mqtt://127.0.0.1:1883)")
    g.add_argument("--prefix", help="topic prefix (GPUHEAL_PREFIX; default gpuheal)")
    g.add_argument("--host-name", help="this host's name in topics (GPUHEAL_HOST; "
                   "default: the machine's host name)")
    g.add_argument("--config", help="TOML config file with thresholds, ladder and guards "
                   "(GPUHEAL_CONFIG)")
    g.add_argument("--log-level", default="INFO",
                   choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    if only_host:
        g.add_argument("--only-host", help="serve only this host (default: every host)")


def _add_source(p: argparse.ArgumentParser, *, with_count: bool = True) -> None:
    g = p.add_argument_group("GPU source")
    g.add_argument("--source", choices=SOURCES, default="auto",
                   help="auto: NVML, else nvidia-smi, else Jetson, else the simulator")
    g.add_argument("--scenario", default="demo",
                   help="simulator scenario: demo, oom, thermal, hang, xid, lost, "
                   "healthy-busy, healthy, or a scenario file")
    g.add_argument("--speed", type=_positive_float, default=1.0,
                   help="simulated time runs this many times faster")
    g.add_argument("--interval", type=_positive_float, help="seconds between samples")
    g.add_argument("--nvidia-smi", default="nvidia-smi", help="the nvidia-smi executable")
    g.add_argument("--tegrastats", default="tegrastats", help="the tegrastats executable")
    g.add_argument("--seed", type=int, default=0, help="simulator seed")
    g.add_argument("--gpus", type=int, default=1, help="number of simulated GPUs")
    if with_count:
        g.add_argument("--count", type=int, help="stop after this many sampling rounds")


def _add_healer(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("healer")
    g.add_argument("--state-file", type=Path, help="where the healer's guards persist")
    g.add_argument("--dry-run", action="store_true", help="decide, publish, never act")
    g.add_argument("--allow", action="append", default=[], metavar="ACTION",
                   help="opt in a destructive action (reset_gpu, stop_llm_service)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpuheal",
        description="GPU health monitor and self-healer over MQTT.",
    )
    parser.add_argument("--version", action="version", version=f"gpuheal {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("up", help="run the whole pipeline on this machine")
    _add_common(p)
    _add_source(p, with_count=False)
    _add_healer(p)
    p.add_argument("--db", type=Path, default=Path("gpuheal.db"), help="SQLite file")
    p.add_argument("--state-dir", type=Path,
                   help="where the private broker lives (default ~/.local/state/gpuheal)")
    p.add_argument("--insecure-broker", action="store_true",
                   help="private broker without passwords (127.0.0.1 only)")

    p = sub.add_parser("publisher", help="sample GPUs and publish Samples")
    _add_common(p)
    _add_source(p)

    p = sub.add_parser("analyzer", help="detect conditions: retained State + Events")
    _add_common(p, only_host=True)
    p.add_argument("--speed", type=_positive_float, default=1.0, help=argparse.SUPPRESS)

    p = sub.add_parser("healer", help="act on Events with the guarded ladder")
    _add_common(p)
    p.add_argument("--source", choices=SOURCES, default="auto",
                   help="sim: heal the simulated GPU with simulated actuators")
    _add_healer(p)

    p = sub.add_parser("recorder", help="persist everything to SQLite")
    _add_common(p, only_host=True)
    p.add_argument("--db", type=Path, default=Path("gpuheal.db"), help="SQLite file")
    p.add_argument("--client-id", help="MQTT client id of the persistent session")

    p = sub.add_parser("probe", help="sample every GPU once, print Samples as JSON lines")
    _add_common(p)
    _add_source(p, with_count=False)

    p = sub.add_parser("status", help="a table of every GPU's retained State")
    _add_common(p)
    p.add_argument("--timeout", type=_positive_float, default=2.0,
                   help="seconds to wait for retained states")
    p.add_argument("--json", action="store_true", help="print the States as JSON lines")

    p = sub.add_parser("replay", help="republish recorded samples with their timing")
    _add_common(p)
    p.add_argument("--db", type=Path, required=True, help="SQLite file of the recorder")
    p.add_argument("--speed", type=_positive_float, default=1.0)
    p.add_argument("--from-host", help="replay only this recorded host")
    p.add_argument("--gpu", type=int, help="replay only this GPU index")
    p.set_defaults(replay=True)

    p = sub.add_parser("history", help="recorded events and the actions taken for them")
    p.add_argument("--db", type=Path, default=Path("gpuheal.db"))
    p.add_argument("--host", help="only this host")
    p.add_argument("--gpu", type=int, help="only this GPU index")
    p.add_argument("--since", default="24h", help="e.g. 30m, 1h, 2d (default 24h)")
    p.add_argument("--kind", help="only this condition kind")

    p = sub.add_parser("export", help="a recorded table as CSV or JSON lines")
    p.add_argument("--db", type=Path, default=Path("gpuheal.db"))
    p.add_argument("--table", default="events")
    p.add_argument("--format", choices=["csv", "jsonl"], default="csv")
    p.add_argument("--since", help="only rows newer than this (e.g. 1h)")
    p.add_argument("--output", "-o", type=Path, help="file to write (default stdout)")

    p = sub.add_parser("broker", help="broker tools")
    bsub = p.add_subparsers(dest="broker_command", required=True, metavar="SUBCOMMAND")
    b = bsub.add_parser("init", help="write a locked-down Mosquitto config into DIR")
    b.add_argument("dir", type=Path)
    b.add_argument("--port", type=int, default=1883)
    b.add_argument("--prefix", default="gpuheal")
    b.add_argument("--force", action="store_true", help="overwrite an existing config")
    b.add_argument("--tls-ca", help="CA certificate: adds a TLS listener on --tls-port")
    b.add_argument("--tls-cert", help="server certificate")
    b.add_argument("--tls-key", help="server key")
    b.add_argument("--tls-port", type=int, default=8883)
    b.add_argument("--tls-host", help="host name remote clients use (in the certificate)")
    return parser


def _common(args: argparse.Namespace) -> CommonOptions:
    return CommonOptions.resolve(
        broker=args.broker,
        prefix=args.prefix,
        host_name=getattr(args, "host_name", None),
        config_path=args.config,
        only_host=getattr(args, "only_host", None),
    )


def _publisher_options(args: argparse.Namespace, common: CommonOptions) -> PublisherOptions:
    return PublisherOptions(
        common=common,
        source=args.source,
        scenario=args.scenario,
        speed=args.speed,
        interval_s=args.interval,
        nvidia_smi=args.nvidia_smi,
        tegrastats=args.tegrastats,
        seed=args.seed,
        gpus=args.gpus,
        count=getattr(args, "count", None),
    )


def run_until_signalled(fn: Callable[[Any, threading.Event], int], opts: Any) -> int:
    """Run a component with a stop Event that SIGINT and SIGTERM set."""
    stop = threading.Event()

    def handle(signum: int, _frame: object) -> None:
        log.info("signal %s: stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGINT, handle)
    signal.signal(signal.SIGTERM, handle)
    return fn(opts, stop)


def _cmd_publisher(args: argparse.Namespace) -> int:
    from publisher.service import run

    return run_until_signalled(run, _publisher_options(args, _common(args)))


def _cmd_analyzer(args: argparse.Namespace) -> int:
    from analyzer.service import run

    return run_until_signalled(run, AnalyzerOptions(common=_common(args), speed=args.speed))


def _healer_options(args: argparse.Namespace, common: CommonOptions) -> HealerOptions:
    return HealerOptions(
        common=common,
        source=args.source,
        state_file=args.state_file,
        dry_run=args.dry_run,
        allow=list(args.allow),
    )


def _cmd_healer(args: argparse.Namespace) -> int:
    from healer.service import run

    return run_until_signalled(run, _healer_options(args, _common(args)))


def _cmd_recorder(args: argparse.Namespace) -> int:
    from recorder.service import run

    opts = RecorderOptions(common=_common(args), db=args.db, client_id=args.client_id)
    return run_until_signalled(run, opts)


def _cmd_probe(args: argparse.Namespace) -> int:
    from publisher.probe import probe

    return probe(_publisher_options(args, _common(args)))


def _cmd_status(args: argparse.Namespace) -> int:
    from gpuheal.status import print_status

    return print_status(_common(args), timeout_s=args.timeout, as_json=args.json)


def _cmd_replay(args: argparse.Namespace) -> int:
    from publisher.service import run
    from recorder.dbfile import RecordingError
    from recorder.progress import track
    from recorder.replay import count_samples, read_samples

    try:
        total = count_samples(args.db, host=args.from_host, gpu=args.gpu)
        samples = read_samples(args.db, host=args.from_host, gpu=args.gpu)
    except RecordingError as exc:
        print(f"gpuheal replay: {exc}", file=sys.stderr)
        return 2
    if total == 0:
        print(f"gpuheal replay: no recorded samples in {args.db}", file=sys.stderr)
        return 1
    common = CommonOptions.resolve(broker=args.broker, prefix=args.prefix,
                                   config_path=args.config, host_name=args.host_name)
    opts = PublisherOptions(
        common=common,
        source="replay",
        speed=args.speed,
        replay_samples=track(samples, total, "replay"),
        replay_host=args.host_name,
    )
    return run_until_signalled(run, opts)


def _cmd_history(args: argparse.Namespace) -> int:
    from recorder.history import run_history

    return run_history(args.db, host=args.host, gpu=args.gpu, since=args.since, kind=args.kind)


def _cmd_export(args: argparse.Namespace) -> int:
    from recorder.export import run_export

    if args.output is None:
        return run_export(args.db, args.table, args.format, sys.stdout, since=args.since)
    with args.output.open("w", newline="") as out:
        return run_export(args.db, args.table, args.format, out, since=args.since)


def _cmd_broker(args: argparse.Namespace) -> int:
    from gpuheal.broker_init import TlsPaths, init_broker

    tls = None
    if args.tls_ca or args.tls_cert or args.tls_key:
        if not (args.tls_ca and args.tls_cert and args.tls_key):
            print("gpuheal broker init: --tls-ca, --tls-cert and --tls-key go together",
                  file=sys.stderr)
            return 2
        tls = TlsPaths(ca=Path(args.tls_ca), cert=Path(args.tls_cert), key=Path(args.tls_key),
                       port=args.tls_port, public_host=args.tls_host)
    result = init_broker(args.dir, args.port, prefix=args.prefix, tls=tls, force=args.force)
    print(f"wrote {result.conf_path}")
    print(f"run it:  mosquitto -c {result.conf_path}")
    for identity, env in sorted(result.env_files.items()):
        print(f"  {identity:<10} {env}")
    return 0


def _cmd_up(args: argparse.Namespace) -> int:
    from gpuheal.up import UpOptions, run_up

    common = _common(args)
    opts = UpOptions(
        common=common,
        broker_given=args.broker is not None,
        publisher=_publisher_options(args, common),
        healer=_healer_options(args, common),
        db=args.db,
        state_dir=args.state_dir,
        insecure_broker=args.insecure_broker,
        log_level=args.log_level,
    )
    return run_until_signalled(run_up, opts)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "up": _cmd_up,
    "publisher": _cmd_publisher,
    "analyzer": _cmd_analyzer,
    "healer": _cmd_healer,
    "recorder": _cmd_recorder,
    "probe": _cmd_probe,
    "status": _cmd_status,
    "replay": _cmd_replay,
    "history": _cmd_history,
    "export": _cmd_export,
    "broker": _cmd_broker,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(args, "log_level", "WARNING"),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    try:
        return COMMANDS[args.command](args)
    except (ConfigError, BrokerURLError, BrokerError, BrokerInitError) as exc:
        print(f"gpuheal: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
