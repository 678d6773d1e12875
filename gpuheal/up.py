"""``gpuheal up``: a private broker when none answers, then every component, supervised.

Each component runs as its own process (``python -m gpuheal <component>``), exactly as it
would run alone, with the argv of its options class (``to_argv``); credentials travel in
``GPUHEAL_BROKER`` in the child's environment, never on its command line. What an operator can
lean on:

* everything is checked before anything starts (scenario, database and state paths, the
  broker URL), and a second ``up`` on the same state directory or database is refused, naming
  the PID that holds it;
* the private broker's credentials are kept in the state directory, so a later ``up`` that
  finds it still running (after a hang-up or a ``kill -9``) uses it instead of being refused;
  every child dies with ``up`` (``PR_SET_PDEATHSIG``), so none is left to fight the next one;
* the consumers (recorder, analyzer, healer, dashboard) are online before the publisher's
  first sample;
* a component or a broker that dies is reported and started again with backoff; one that
  cannot start at all (exit 2) stops the pipeline;
* Ctrl-C, SIGTERM and SIGHUP stop the publisher first (its goodbye is heard), then the
  others, then the broker.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO

from gpuheal.broker import BrokerError, PrivateBroker, start_broker, start_local_broker
from gpuheal.models import Status
from gpuheal.mqtt import BrokerURL, Bus, Received
from gpuheal.net import port_answers
from gpuheal.options import (
    AnalyzerOptions,
    CommonOptions,
    DashboardOptions,
    HealerOptions,
    PublisherOptions,
    RecorderOptions,
)
from gpuheal.paths import healer_state_file, state_dir
from gpuheal.procs import find_executable
from gpuheal.runtime import EXIT_FAILED, EXIT_OK, EXIT_USAGE, UsageError

log = logging.getLogger("gpuheal.up")

CONSUMERS = ("recorder", "analyzer", "healer", "dashboard")
"""Started first, and online before the publisher starts: nothing it says is missed."""
READY_WAIT_S = 20.0
"""Wall seconds to wait for the consumers to say ``online`` before starting the publisher."""
BACKOFF_MIN_S = 1.0
BACKOFF_MAX_S = 30.0
HEALTHY_RUN_S = 60.0
"""A child that ran this long starts its backoff from the beginning again."""
LOOPBACK = ("127.0.0.1", "localhost", "::1")
_PR_SET_PDEATHSIG = 1


@dataclass
class UpOptions:
    common: CommonOptions
    broker_given: bool
    publisher: PublisherOptions
    healer: HealerOptions
    db: Path
    state_dir: Path | None = None
    insecure_broker: bool = False
    dashboard_port: int = 9100
    """0: no dashboard."""


@dataclass
class Child:
    """One supervised process."""

    name: str
    argv: list[str]
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    started_mono: float = 0.0
    restarts: int = 0
    backoff_s: float = BACKOFF_MIN_S
    restart_at: float | None = None
    log_file: IO[bytes] | None = field(default=None, repr=False)


def resolve_source(source: str, nvidia_smi: str, tegrastats: str) -> str:
    """``auto`` becomes ``sim`` when this machine has no NVIDIA tool at all; the publisher
    itself picks among the real sources, and the healer needs to know whether to simulate."""
    if source != "auto":
        return source
    if _nvml_loads() or find_executable(nvidia_smi) or find_executable(tegrastats):
        return "auto"
    return "sim"


def _nvml_loads() -> bool:
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return False
    pynvml.nvmlShutdown()
    return True


# --- before anything starts ------------------------------------------------------------------
def preflight(opts: UpOptions, state: Path) -> None:
    """Everything that would make a component fail at once, as one clear UsageError."""
    if opts.publisher.source in ("sim", "auto"):
        from publisher.scenarios import ScenarioError, load_scenario

        try:
            load_scenario(opts.publisher.scenario)
        except ScenarioError as exc:
            raise UsageError(str(exc)) from None
    _writable_dir(state, "state directory (--state-dir)")
    _writable_dir(opts.db.parent if str(opts.db.parent) else Path("."), "database directory")
    if opts.db.exists() and not os.access(opts.db, os.W_OK):
        raise UsageError(f"database {opts.db} is read-only")
    if opts.db.is_dir():
        raise UsageError(f"database {opts.db} is a directory")


def _writable_dir(path: Path, what: str) -> None:
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"{what} {path}: {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        missing = "" if probe == path else f" (it does not exist and {probe} is read-only)"
        raise UsageError(f"{what} {path} is not writable{missing}")


class Lock:
    """An exclusive lock file holding the PID of the ``up`` that owns it."""

    def __init__(self, path: Path, what: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(self._fd)
            raise UsageError(f"another `gpuheal up` (pid {holder}) is using {what}; stop it "
                             "first, or give this one its own --state-dir and --db") from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)
            os.close(self._fd)


# --- the broker ------------------------------------------------------------------------------
@dataclass
class BrokerPlan:
    """Which broker the pipeline uses and the URL each identity connects with."""

    url: BrokerURL
    urls: dict[str, str]
    private: PrivateBroker | None = None
    env_dir: Path | None = None
    """Where the identities' env files are (a private locked-down broker)."""


def _reuse_private(secure_dir: Path, roles: tuple[str, ...]) -> dict[str, str] | None:
    """The URLs of a private broker an earlier ``up`` left in ``secure_dir`` (None when it
    left none); a role without its own env file (an older broker dir) borrows the viewer's or
    operator's."""
    from gpuheal.broker_init import read_env_file

    found: dict[str, str] = {}
    for name in (*roles, "operator"):
        path = secure_dir / f"{name}.env"
        if path.is_file():
            with contextlib.suppress(OSError, ValueError, KeyError):
                found[name] = read_env_file(path)["GPUHEAL_BROKER"]
    if "viewer" not in found:
        return None
    fallback = {"dashboard": found.get("operator", found["viewer"])}
    return {r: found.get(r) or fallback.get(r) or found["viewer"] for r in roles}


def plan_broker(opts: UpOptions, state: Path) -> BrokerPlan:
    """The broker to use: the one at ``--broker`` when it answers (our own private one from an
    earlier ``up`` included, with its credentials), else a private one started here."""
    url = BrokerURL.parse(opts.common.broker)
    secure_dir = state / "broker"
    roles = (*CONSUMERS, "publisher", "viewer")
    if port_answers(url.host, url.port):
        if url.host in LOOPBACK and url.username is None and not opts.insecure_broker:
            urls = _reuse_private(secure_dir, roles)
            if urls is not None:
                log.warning("a broker already answers at %s: using it with the private "
                            "broker's credentials of %s", url.address, secure_dir)
                return BrokerPlan(url, urls, env_dir=secure_dir)
        return BrokerPlan(url, {r: opts.common.broker for r in roles})
    if url.host not in LOOPBACK:
        raise UsageError(f"no broker answers at {url.redacted()} (connection refused); start "
                         "it, or leave --broker on 127.0.0.1 for a private one")
    if opts.insecure_broker:
        broker = start_local_broker(state / "broker-open", port=url.port)
        return BrokerPlan(url, {r: broker.url for r in roles}, private=broker)
    from gpuheal.broker_init import ensure_broker_dir

    init = ensure_broker_dir(secure_dir, url.port, prefix=opts.common.prefix)
    broker = start_broker(init.conf_path, url.port, init.dir / "mosquitto.log",
                          preexec_fn=die_with_parent)
    return BrokerPlan(url, {r: init.urls[r] for r in roles}, private=broker, env_dir=init.dir)


def die_with_parent() -> None:
    """In a child before exec: SIGTERM when ``up`` dies, even by ``kill -9`` (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


# --- the children ----------------------------------------------------------------------------
def child_argvs(opts: UpOptions, source: str, state: Path) -> dict[str, list[str]]:
    """The argv of every component, from their options (``to_argv``)."""
    common = opts.common
    exe = [sys.executable, "-m", "gpuheal"]
    healer = replace(opts.healer, common=common, source=source,
                     state_file=opts.healer.state_file or healer_state_file(common.host_name,
                                                                             state))
    argvs = {
        "recorder": RecorderOptions(common=common, db=opts.db).to_argv(),
        "analyzer": AnalyzerOptions(common=common, speed=opts.publisher.speed).to_argv(),
        "healer": healer.to_argv(),
        "publisher": replace(opts.publisher, common=common, source=source).to_argv(),
    }
    if opts.dashboard_port:
        argvs["dashboard"] = DashboardOptions(common=common, port=opts.dashboard_port,
                                              db=opts.db).to_argv()
    return {name: [*exe, *argv] for name, argv in argvs.items()}


def _spawn(child: Child) -> None:
    child.proc = subprocess.Popen(child.argv, env=child.env, stdin=subprocess.DEVNULL,
                                  preexec_fn=die_with_parent)
    child.started_mono = time.monotonic()
    child.restart_at = None


def _wait_ready(plan: BrokerPlan, opts: UpOptions, names: list[str], stop: threading.Event,
                timeout_s: float = READY_WAIT_S) -> set[str]:
    """Wait until the components ``names`` say ``online`` (their subscriptions are in place)."""
    online: set[str] = set()
    lock = threading.Lock()
    common = opts.common

    def on_status(received: Received[Status]) -> None:
        if received.message.value == "online" and received.parts.component:
            with lock:
                online.add(received.parts.component)

    watcher = Bus(plan.urls["viewer"], "dashboard", common.host_name, common.topics,
                  announce_status=False)
    watcher.subscribe(common.topics.status_pattern(common.host_name), Status, on_status)
    watcher.start()
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline and not stop.is_set():
            with lock:
                if set(names) <= online:
                    break
            time.sleep(0.05)
    finally:
        watcher.stop()
    return online


def run_up(opts: UpOptions, stop: threading.Event) -> int:
    """Run until ``stop`` is set or the pipeline cannot go on; returns an exit code."""
    state = opts.state_dir or state_dir()
    preflight(opts, state)
    locks = [Lock(state / "up.lock", f"state directory {state}")]
    try:
        locks.append(Lock(opts.db.parent / f".{opts.db.name}.up.lock", f"database {opts.db}"))
    except UsageError:
        locks[0].release()
        raise
    plan: BrokerPlan | None = None
    children: dict[str, Child] = {}
    try:
        try:
            plan = plan_broker(opts, state)
        except BrokerError as exc:
            raise UsageError(str(exc)) from None
        source = resolve_source(opts.publisher.source, opts.publisher.nvidia_smi,
                                opts.publisher.tegrastats)
        argvs = child_argvs(opts, source, state)
        token = os.environ.get("GPUHEAL_DASHBOARD_TOKEN")
        for name, argv in argvs.items():
            env = dict(os.environ, GPUHEAL_BROKER=plan.urls[name])
            env.pop("GPUHEAL_BROKER_TLS", None)
            if token and name == "dashboard":
                env["GPUHEAL_DASHBOARD_TOKEN"] = token
            children[name] = Child(name, argv, env)
        consumers = [n for n in CONSUMERS if n in children]
        for name in consumers:
            _spawn(children[name])
        online = _wait_ready(plan, opts, consumers, stop)
        missing = [n for n in consumers if n not in online]
        if missing and not stop.is_set():
            log.warning("not online after %.0f s: %s; starting the publisher anyway",
                        READY_WAIT_S, ", ".join(missing))
        if not stop.is_set():
            _spawn(children["publisher"])
            print_banner(opts, plan, source)
        return _supervise(children, plan, stop)
    finally:
        _stop_children(children)
        if plan is not None and plan.private is not None:
            plan.private.stop()
        for lock in locks:
            lock.release()


def _supervise(children: dict[str, Child], plan: BrokerPlan, stop: threading.Event) -> int:
    while not stop.wait(0.3):
        now = time.monotonic()
        if plan.private is not None and plan.private.process.poll() is not None:
            code = plan.private.process.returncode
            log.error("the private broker exited with %s; starting it again", code)
            try:
                plan.private = start_broker(plan.private.config_path, plan.private.port,
                                            plan.private.log_path, preexec_fn=die_with_parent)
            except BrokerError as exc:
                log.error("cannot start the broker again: %s", exc)
                return EXIT_FAILED
        for child in children.values():
            proc = child.proc
            if proc is None:
                if child.restart_at is not None and now >= child.restart_at:
                    log.warning("starting %s again (restart %d)", child.name, child.restarts)
                    _spawn(child)
                continue
            code = proc.poll()
            if code is None:
                continue
            if code == EXIT_USAGE:
                log.error("%s cannot start (exit %d); stopping the pipeline", child.name, code)
                return EXIT_FAILED
            if now - child.started_mono >= HEALTHY_RUN_S:
                child.backoff_s = BACKOFF_MIN_S
            child.proc = None
            child.restarts += 1
            child.restart_at = now + child.backoff_s
            log.error("%s exited with %s; starting it again in %.0f s", child.name, code,
                      child.backoff_s)
            child.backoff_s = min(child.backoff_s * 2, BACKOFF_MAX_S)
    return EXIT_OK


def _stop_children(children: dict[str, Child], timeout_s: float = 10.0) -> None:
    """The publisher first (its goodbye is heard by the others), then the rest."""
    order = [c for c in ("publisher", *reversed(CONSUMERS)) if c in children]
    for group in (order[:1], order[1:]):
        procs = [children[n] for n in group if children[n].proc is not None]
        for child in procs:
            if child.proc is not None and child.proc.poll() is None:
                child.proc.terminate()
        deadline = time.monotonic() + timeout_s
        for child in procs:
            assert child.proc is not None
            try:
                child.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0f s; killing it", child.name, timeout_s)
                child.proc.kill()
                child.proc.wait()


def print_banner(opts: UpOptions, plan: BrokerPlan, source: str) -> None:
    p = opts.common.prefix
    lines = [f"gpuheal up: host {opts.common.host_name}, source {source}, db {opts.db}"]
    lines.append(f"watch it:   {watch_command(plan, p)}")
    lines.append(f"live view:  {sys.executable} -m gpuheal tail"
                 + (f" --env-file {plan.env_dir / 'viewer.env'}" if plan.env_dir else
                    f" --broker {plan.url.redacted()}"))
    if opts.dashboard_port:
        lines.append(f"dashboard:  http://127.0.0.1:{opts.dashboard_port}/")
    lines.append("stop it:    Ctrl-C")
    print("\n".join(lines), file=sys.stderr, flush=True)


def watch_command(plan: BrokerPlan, prefix: str) -> str:
    """A ``mosquitto_sub`` line that works with the broker in use (no password printed)."""
    if plan.env_dir is not None:
        env_file = plan.env_dir / "viewer.env"
        return ("mosquitto_sub -v -L "
                f"\"$(sed -n 's/^GPUHEAL_BROKER=//p' {env_file})/{prefix}/#\"")
    url = plan.url
    args = f"-h {url.host} -p {url.port}"
    if url.username:
        args += f" -u {url.username} -P \"$PASSWORD\""
    if url.tls:
        args += f" --cafile {url.ca_certs}" if url.ca_certs else " --capath /etc/ssl/certs"
    return f"mosquitto_sub {args} -v -t '{prefix}/#'"
