"""The umbrella CLI: ``gpuheal <command>``. It parses options and calls the library.

This is the only module that composes the components; they never import each other. Every
command fails the same way: one line ``gpuheal <command>: <why>`` on stderr and an exit code
(:mod:`gpuheal.runtime`: 0 done, 1 failed, 2 could not start).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from gpuheal import __version__
from gpuheal.broker import BrokerError
from gpuheal.broker_init import BrokerInitError, read_env_file
from gpuheal.config import ConfigError
from gpuheal.mqtt import BrokerURLError
from gpuheal.options import (
    AnalyzerOptions,
    CommonOptions,
    DashboardOptions,
    HealerOptions,
    PublisherOptions,
    RecorderOptions,
    positive_float,
)
from gpuheal.runtime import EXIT_USAGE, UsageError, run_service, setup_logging, stop_on_signals


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpuheal",
        description="GPU health monitor and self-healer over MQTT.",
        epilog="Exit codes: 0 done, 1 failed (no GPU source, database, broker never reached), "
               "2 could not start (bad option, config or broker URL, rejected credentials).",
    )
    parser.add_argument("--version", action="version", version=f"gpuheal {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("up", help="run the whole pipeline on this machine")
    CommonOptions.add_arguments(p)
    PublisherOptions.add_arguments(p, with_count=False)
    HealerOptions.add_arguments(p, with_source=False)
    p.add_argument("--db", type=Path, default=Path("gpuheal.db"), help="SQLite file")
    p.add_argument("--state-dir", type=Path,
                   help="where the private broker lives (default ~/.local/state/gpuheal)")
    p.add_argument("--insecure-broker", action="store_true",
                   help="private broker without passwords (127.0.0.1 only)")
    p.add_argument("--dashboard-port", type=int, default=9100,
                   help="the dashboard's port (0: no dashboard)")

    p = sub.add_parser("publisher", help="sample GPUs and publish Samples")
    CommonOptions.add_arguments(p)
    PublisherOptions.add_arguments(p)

    p = sub.add_parser("analyzer", help="detect conditions: retained State + Events")
    CommonOptions.add_arguments(p, only_host=True)
    AnalyzerOptions.add_arguments(p)

    p = sub.add_parser("healer", help="act on Events with the guarded ladder")
    CommonOptions.add_arguments(p)
    HealerOptions.add_arguments(p)

    p = sub.add_parser("recorder", help="persist everything to SQLite")
    CommonOptions.add_arguments(p, only_host=True)
    RecorderOptions.add_arguments(p)

    p = sub.add_parser("dashboard", help="the web page, /api/gpu and /metrics")
    CommonOptions.add_arguments(p)
    DashboardOptions.add_arguments(p)

    p = sub.add_parser("probe", help="sample every GPU once, print Samples as JSON lines")
    CommonOptions.add_arguments(p)
    PublisherOptions.add_arguments(p, with_count=False)

    p = sub.add_parser("status", help="a table of every GPU's retained State")
    CommonOptions.add_arguments(p)
    p.add_argument("--timeout", type=positive_float, default=2.0,
                   help="seconds to wait for retained states")
    p.add_argument("--json", action="store_true", help="print the States as JSON lines")
    p.add_argument("--watch", nargs="?", type=positive_float, const=2.0, metavar="SECONDS",
                   help="redraw the table in place every SECONDS (default 2)")
    p.add_argument("--forget", metavar="HOST",
                   help="clear every retained topic of HOST (a machine gone for good)")

    p = sub.add_parser("tail", help="a readable live stream of events and actions")
    CommonOptions.add_arguments(p)
    p.add_argument("--host", help="only this host")
    p.add_argument("--gpu", type=int, help="only this GPU index")
    p.add_argument("--kind", help="only this condition kind (e.g. gpu_hang)")
    p.add_argument("--json", action="store_true", help="JSON lines instead of text")

    p = sub.add_parser("replay", help="republish recorded samples with their timing")
    CommonOptions.add_arguments(p)
    p.add_argument("--db", type=Path, required=True, help="SQLite file of the recorder")
    p.add_argument("--speed", type=positive_float, default=1.0)
    p.add_argument("--from-host", help="replay only this recorded host")
    p.add_argument("--gpu", type=int, help="replay only this GPU index")
    p.add_argument("--force", action="store_true",
                   help="replay into a host even while its publisher is online")

    p = sub.add_parser("history", help="recorded events and the actions taken for them")
    p.add_argument("--db", type=Path, default=Path("gpuheal.db"))
    p.add_argument("--host", help="only this host")
    p.add_argument("--gpu", type=int, help="only this GPU index")
    p.add_argument("--since", default="24h", help="e.g. 30m, 1h, 2d (default 24h)")
    p.add_argument("--kind", help="only this condition kind")
    p.add_argument("--events", action="store_true",
                   help="every event and action (default: one line per incident)")

    p = sub.add_parser("export", help="a recorded table as CSV or JSON lines")
    p.add_argument("--db", type=Path, default=Path("gpuheal.db"))
    p.add_argument("--table", default="events")
    p.add_argument("--format", choices=["csv", "jsonl"], default="csv")
    p.add_argument("--since", help="only rows newer than this (e.g. 1h)")
    p.add_argument("--output", "-o", type=Path, help="file to write (default stdout)")

    p = sub.add_parser("install", help="install systemd units for every component")
    p.add_argument("--systemd", action="store_true", required=True,
                   help="write systemd units (the only kind today)")
    p.add_argument("--dry-run", action="store_true", help="print what would be written")
    p.add_argument("--allow", action="append", default=[], metavar="ACTION",
                   help="opt the healer in to a destructive action (reset_gpu, "
                   "stop_llm_service); its unit gets the capabilities that needs")
    p.add_argument("--components", help="comma-separated subset (default: all of them and "
                   "the broker)")
    p.add_argument("--source", choices=["nvml", "nvidia-smi", "jetson"],
                   help="the publisher's GPU source (default: detected now)")
    p.add_argument("--unit-dir", type=Path, default=Path("/etc/systemd/system"))
    p.add_argument("--etc-dir", type=Path, default=Path("/etc/gpuheal"))
    p.add_argument("--dashboard-port", type=int, default=9100)
    p.add_argument("--dashboard-bind", default="127.0.0.1")

    p = sub.add_parser("uninstall", help="remove the systemd units `install` wrote")
    p.add_argument("--systemd", action="store_true", required=True)
    p.add_argument("--dry-run", action="store_true", help="print what would be removed")
    p.add_argument("--unit-dir", type=Path, default=Path("/etc/systemd/system"))
    p.add_argument("--etc-dir", type=Path, default=Path("/etc/gpuheal"))

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


# --- components ---------------------------------------------------------------------------
def _cmd_publisher(args: argparse.Namespace) -> int:
    from publisher.service import run

    return run(PublisherOptions.from_args(args, CommonOptions.from_args(args)))


def _cmd_analyzer(args: argparse.Namespace) -> int:
    from analyzer.service import run

    return run(AnalyzerOptions.from_args(args, CommonOptions.from_args(args)))


def _cmd_healer(args: argparse.Namespace) -> int:
    from healer.service import run

    return run(HealerOptions.from_args(args, CommonOptions.from_args(args)))


def _cmd_recorder(args: argparse.Namespace) -> int:
    from recorder.service import run

    return run(RecorderOptions.from_args(args, CommonOptions.from_args(args)))


def _cmd_dashboard(args: argparse.Namespace) -> int:
    from dashboard.service import DashboardService

    common = CommonOptions.from_args(args)
    opts = DashboardOptions.from_args(args, common)
    return run_service("dashboard", lambda: DashboardService(opts), common)


# --- one-shot commands ------------------------------------------------------------------------
def _cmd_probe(args: argparse.Namespace) -> int:
    from publisher.probe import probe

    return probe(PublisherOptions.from_args(args, CommonOptions.from_args(args)))


def _cmd_status(args: argparse.Namespace) -> int:
    import threading

    from gpuheal.status import ConnectError, forget_host, print_status

    common = CommonOptions.from_args(args)
    if args.forget:
        try:
            return forget_host(common, args.forget, timeout_s=args.timeout)
        except ConnectError as exc:
            raise UsageError(str(exc)) from None
    stop = threading.Event()
    stop_on_signals(stop)
    return print_status(common, timeout_s=args.timeout, as_json=args.json,
                        watch_s=args.watch, host=args.host_name, stop=stop)


def _cmd_tail(args: argparse.Namespace) -> int:
    import threading

    from gpuheal.tail import Filters, tail

    stop = threading.Event()
    stop_on_signals(stop)
    return tail(CommonOptions.from_args(args), Filters(args.host, args.gpu, args.kind),
                as_json=args.json, stop=stop)


def _cmd_replay(args: argparse.Namespace) -> int:
    from publisher.service import run
    from recorder.dbfile import RecordingError
    from recorder.progress import track
    from recorder.replay import count_samples, read_samples, recorded_hosts

    try:
        hosts = recorded_hosts(args.db, host=args.from_host)
        total = count_samples(args.db, host=args.from_host, gpu=args.gpu)
        samples = read_samples(args.db, host=args.from_host, gpu=args.gpu)
    except RecordingError as exc:
        raise UsageError(str(exc)) from None
    if total == 0:
        print(f"gpuheal replay: no recorded samples in {args.db}", file=sys.stderr)
        return 1
    if args.host_name and len(hosts) > 1:
        raise UsageError(f"the recording has {len(hosts)} hosts ({', '.join(hosts)}): --host-name "
                         "needs --from-host to say which one")
    targets = {h: args.host_name or f"{h}-replay"[:128] for h in hosts}
    common = CommonOptions.from_args(args)
    common.host_name = next(iter(targets.values())) if len(set(targets.values())) == 1 else \
        f"{common.host_name}-replay"
    if not args.force:
        _refuse_live_hosts(common, sorted(set(targets.values())))
    print(f"gpuheal replay: {total} samples of {', '.join(hosts)} as "
          f"{', '.join(sorted(set(targets.values())))}", file=sys.stderr)
    opts = PublisherOptions(common=common, source="replay", speed=args.speed,
                            replay_samples=track(samples, total, "replay"),
                            replay_hosts=targets)
    return run(opts)


def _refuse_live_hosts(common: CommonOptions, hosts: list[str]) -> None:
    """A replay never speaks for a host whose publisher is online (unless --force)."""
    from gpuheal.status import ConnectError, collect

    try:
        snapshot = collect(common, timeout_s=2.0)
    except ConnectError as exc:
        raise UsageError(str(exc)) from None
    live = [h for h in hosts if (s := snapshot.statuses.get((h, "publisher"))) is not None
            and s.value == "online"]
    if live:
        raise UsageError(f"host {', '.join(live)} is live (its publisher is online): a replay "
                         "into it would mix recorded and live samples; replay as another "
                         "--host-name, or pass --force")


def _cmd_history(args: argparse.Namespace) -> int:
    from recorder.history import run_history

    return run_history(args.db, host=args.host, gpu=args.gpu, since=args.since, kind=args.kind,
                       incidents=not args.events)


def _cmd_export(args: argparse.Namespace) -> int:
    from recorder.export import run_export

    if args.output is None:
        return run_export(args.db, args.table, args.format, sys.stdout, since=args.since)
    try:
        out = args.output.open("w", newline="")
    except OSError as exc:
        raise UsageError(f"cannot write {args.output}: {exc.strerror}") from None
    with out:
        return run_export(args.db, args.table, args.format, out, since=args.since)


def _cmd_broker(args: argparse.Namespace) -> int:
    from gpuheal.broker_init import TlsPaths, init_broker

    tls = None
    if args.tls_ca or args.tls_cert or args.tls_key:
        if not (args.tls_ca and args.tls_cert and args.tls_key):
            raise UsageError("--tls-ca, --tls-cert and --tls-key go together")
        tls = TlsPaths(ca=Path(args.tls_ca), cert=Path(args.tls_cert), key=Path(args.tls_key),
                       port=args.tls_port, public_host=args.tls_host)
    result = init_broker(args.dir, args.port, prefix=args.prefix, tls=tls, force=args.force)
    print(f"wrote {result.conf_path}")
    print(f"run it:  mosquitto -c {result.conf_path}")
    for identity, env in sorted(result.env_files.items()):
        print(f"  {identity:<10} {env}")
    return 0


def _cmd_install(args: argparse.Namespace) -> int:
    from gpuheal.install import SERVICES, install_systemd

    components = [c.strip() for c in args.components.split(",")] if args.components \
        else list(SERVICES)
    return install_systemd(unit_dir=args.unit_dir, etc_dir=args.etc_dir, allow=args.allow,
                           dry_run=args.dry_run, components=components,
                           publisher_source=args.source, dashboard_port=args.dashboard_port,
                           dashboard_bind=args.dashboard_bind)


def _cmd_uninstall(args: argparse.Namespace) -> int:
    from gpuheal.install import uninstall_systemd

    return uninstall_systemd(unit_dir=args.unit_dir, etc_dir=args.etc_dir, dry_run=args.dry_run)


def _cmd_up(args: argparse.Namespace) -> int:
    import threading

    from gpuheal.up import UpOptions, run_up

    common = CommonOptions.from_args(args)
    opts = UpOptions(
        common=common,
        broker_given=args.broker is not None,
        publisher=PublisherOptions.from_args(args, common),
        healer=HealerOptions(common=common, state_file=args.state_file, dry_run=args.dry_run,
                             allow=list(args.allow)),
        db=args.db,
        state_dir=args.state_dir,
        insecure_broker=args.insecure_broker,
        dashboard_port=args.dashboard_port,
    )
    stop = threading.Event()
    stop_on_signals(stop)
    return run_up(opts, stop)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "up": _cmd_up,
    "publisher": _cmd_publisher,
    "analyzer": _cmd_analyzer,
    "healer": _cmd_healer,
    "recorder": _cmd_recorder,
    "dashboard": _cmd_dashboard,
    "probe": _cmd_probe,
    "status": _cmd_status,
    "tail": _cmd_tail,
    "replay": _cmd_replay,
    "history": _cmd_history,
    "export": _cmd_export,
    "broker": _cmd_broker,
    "install": _cmd_install,
    "uninstall": _cmd_uninstall,
}


def load_env_file(path: Path) -> None:
    """Put the ``KEY=VALUE`` lines of ``path`` into the environment (a flag beats the
    environment, so the file's values win over variables already set)."""
    try:
        values = read_env_file(path)
    except OSError as exc:
        raise UsageError(f"cannot read --env-file {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise UsageError(f"--env-file: {exc}") from None
    os.environ.update(values)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(getattr(args, "log_level", None) or "WARNING")
    command = args.command
    try:
        if getattr(args, "env_file", None) is not None:
            load_env_file(args.env_file)
        return COMMANDS[command](args)
    except (ConfigError, BrokerURLError, BrokerError, BrokerInitError, UsageError) as exc:
        print(f"gpuheal {command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
