"""``gpuheal up``: a private broker when none answers, then the four components.

Each component runs as its own process (``python -m gpuheal <component>``), exactly as it
would run alone; credentials travel in ``GPUHEAL_BROKER`` in the child's environment, never
on its command line. A stop (Ctrl-C, SIGTERM) stops the components, then the broker.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from gpuheal.broker import BrokerError, PrivateBroker, start_broker, start_local_broker
from gpuheal.mqtt import BrokerURL, broker_answers
from gpuheal.options import CommonOptions, HealerOptions, PublisherOptions

log = logging.getLogger("gpuheal.up")

COMPONENTS = ("recorder", "analyzer", "healer", "publisher")
"""Start order: the consumers first, so that nothing the publisher says is missed."""


@dataclass
class UpOptions:
    common: CommonOptions
    broker_given: bool
    publisher: PublisherOptions
    healer: HealerOptions
    db: Path
    state_dir: Path | None = None
    insecure_broker: bool = False
    log_level: str = "INFO"


def default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "gpuheal"


def resolve_source(source: str, nvidia_smi: str, tegrastats: str) -> str:
    """``auto`` becomes ``sim`` when this machine has no NVIDIA tool at all; the publisher
    itself picks among the real sources, and the healer needs to know whether to simulate."""
    if source != "auto":
        return source
    if _nvml_loads() or shutil.which(nvidia_smi) or shutil.which(tegrastats):
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


def _start_private_broker(opts: UpOptions, url: BrokerURL) -> tuple[PrivateBroker,
                                                                     dict[str, str]]:
    """A private Mosquitto on the port of ``--broker``; locked down unless asked otherwise."""
    state = opts.state_dir or default_state_dir()
    if opts.insecure_broker:
        broker = start_local_broker(state / "broker-open", port=url.port)
        return broker, {c: broker.url for c in COMPONENTS}
    from gpuheal.broker_init import ensure_broker_dir

    init = ensure_broker_dir(state / "broker", url.port, prefix=opts.common.prefix)
    broker = start_broker(init.conf_path, url.port, init.dir / "mosquitto.log")
    return broker, {c: init.urls[c] for c in COMPONENTS} | {"viewer": init.urls["viewer"]}


def _argv(component: str, opts: UpOptions, source: str) -> list[str]:
    c = opts.common
    argv = [sys.executable, "-m", "gpuheal", component, "--prefix", c.prefix,
            "--host-name", c.host_name, "--log-level", opts.log_level]
    if c.config_path:
        argv += ["--config", c.config_path]
    p = opts.publisher
    if component == "publisher":
        argv += ["--source", source, "--scenario", p.scenario, "--speed", str(p.speed),
                 "--nvidia-smi", p.nvidia_smi, "--tegrastats", p.tegrastats,
                 "--seed", str(p.seed), "--gpus", str(p.gpus)]
        if p.interval_s:
            argv += ["--interval", str(p.interval_s)]
    elif component == "healer":
        h = opts.healer
        argv += ["--source", source]
        state_file = h.state_file or (
            (opts.state_dir or default_state_dir()) / f"healer-{c.host_name}.json")
        argv += ["--state-file", str(state_file)]
        if h.dry_run:
            argv.append("--dry-run")
        for action in h.allow:
            argv += ["--allow", action]
    elif component == "recorder":
        argv += ["--db", str(opts.db)]
    elif component == "analyzer":
        argv += ["--speed", str(p.speed)]
    return argv


def run_up(opts: UpOptions, stop: threading.Event) -> int:
    """Run until ``stop`` is set or a component dies; returns an exit code."""
    url = BrokerURL.parse(opts.common.broker)
    broker: PrivateBroker | None = None
    urls = {c: opts.common.broker for c in COMPONENTS}
    if not broker_answers(url):
        if url.host not in ("127.0.0.1", "localhost", "::1"):
            print(f"gpuheal up: no broker answers at {url.redacted()}", file=sys.stderr)
            return 2
        try:
            broker, urls = _start_private_broker(opts, url)
        except BrokerError as exc:
            print(f"gpuheal up: {exc}", file=sys.stderr)
            return 2
        log.info("started a private Mosquitto on 127.0.0.1:%d", url.port)
    source = resolve_source(opts.publisher.source, opts.publisher.nvidia_smi,
                            opts.publisher.tegrastats)
    _print_banner(opts, url, source, broker is not None)

    children: dict[str, subprocess.Popen[bytes]] = {}
    code = 0
    try:
        for component in COMPONENTS:
            env = dict(os.environ, GPUHEAL_BROKER=urls[component])
            children[component] = subprocess.Popen(_argv(component, opts, source), env=env,
                                                   stdin=subprocess.DEVNULL)
        while not stop.wait(0.3):
            dead = {n: p.returncode for n, p in children.items() if p.poll() is not None}
            if dead:
                log.error("component(s) exited: %s; stopping the pipeline", dead)
                code = 1
                break
    finally:
        _stop_children(children)
        if broker is not None:
            broker.stop()
    return code


def _stop_children(children: dict[str, subprocess.Popen[bytes]], timeout_s: float = 10.0) -> None:
    for proc in children.values():
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + timeout_s
    for name, proc in children.items():
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in %.0f s; killing it", name, timeout_s)
            proc.kill()
            proc.wait()


def _print_banner(opts: UpOptions, url: BrokerURL, source: str, private: bool) -> None:
    p = opts.common.prefix
    lines = [f"gpuheal up: host {opts.common.host_name}, source {source}, db {opts.db}"]
    if private and not opts.insecure_broker:
        env_file = (opts.state_dir or default_state_dir()) / "broker" / "viewer.env"
        lines.append(
            "watch it:   mosquitto_sub -v -L "
            f"\"$(sed -n 's/^GPUHEAL_BROKER=//p' {env_file})/{p}/#\""
        )
    else:
        lines.append(f"watch it:   mosquitto_sub -h {url.host} -p {url.port} -v -t '{p}/#'")
    lines.append("stop it:    Ctrl-C")
    print("\n".join(lines), file=sys.stderr, flush=True)
