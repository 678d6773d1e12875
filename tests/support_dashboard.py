"""Helpers shared by the dashboard tests (this module holds no tests).

:class:`Pipeline` runs the real pipeline around a dashboard: recorder (a real SQLite file),
analyzer and healer (``--source sim``) as real processes (``python -m gpuheal ...``), the
dashboard in this process (so a test sees its port and its live model), and, when a test is
ready for it, the simulated publisher. :func:`http` is a tiny HTTP client (urllib) that returns
the status, headers and decoded JSON (or text) of one request.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dashboard.service import DashboardService
from gpuheal.config import ActuatorsConfig, GpuhealConfig, HealerConfig
from gpuheal.options import CommonOptions, DashboardOptions
from gpuheal.runtime import Component
from tests.support import Collector

HOST = "simhost"
REPO = Path(__file__).resolve().parent.parent


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: Any

    @property
    def error(self) -> str:
        return self.body.get("error", "") if isinstance(self.body, dict) else ""


def http(url: str, method: str = "GET", body: Any = None,
         headers: dict[str, str] | None = None, timeout_s: float = 10.0) -> Reply:
    """One request; JSON bodies are decoded, others returned as text."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={
        **({"Content-Type": "application/json"} if data is not None else {}),
        **(headers or {})})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=timeout_s) as resp:
            status, raw, hdrs = resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        status, raw, hdrs = exc.code, exc.read(), dict(exc.headers)
    text = raw.decode()
    is_json = hdrs.get("content-type", hdrs.get("Content-Type", "")).startswith(
        "application/json")
    return Reply(status, {k.lower(): v for k, v in hdrs.items()},
                 json.loads(text) if is_json else text)


def common_options(url: str, prefix: str, ollama_url: str | None = None,
                   host: str = HOST) -> CommonOptions:
    config = GpuhealConfig() if ollama_url is None else GpuhealConfig(  # type: ignore[call-arg]
        healer=HealerConfig(actuators=ActuatorsConfig(ollama_url=ollama_url)))
    return CommonOptions(broker=url, prefix=prefix, host_name=host, log_level="WARNING",
                         config=config)


@dataclass
class Dashboard:
    """A dashboard running in this process."""

    service: DashboardService
    component: Component

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.service.port}"

    def get(self, path: str, **kw: Any) -> Reply:
        return http(self.url + path, **kw)

    def post(self, path: str, body: Any = None, **kw: Any) -> Reply:
        return http(self.url + path, method="POST", body={} if body is None else body, **kw)

    def stop(self) -> None:
        self.component.stop()


def start_dashboard(url: str, prefix: str, db: Path | None = None,
                    ollama_url: str | None = None, token: str | None = None,
                    bind: str = "127.0.0.1") -> Dashboard:
    """A dashboard on a free port of loopback, connected (it waits for the broker)."""
    common = common_options(url, prefix, ollama_url)
    service = DashboardService(DashboardOptions(common=common, port=0, bind=bind, db=db,
                                                token=token))
    component = Component(service, common)
    if not component.start(wait_s=10):
        component.stop()
        raise AssertionError("the dashboard did not reach the broker")
    return Dashboard(service, component)


def gpuheal_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for var in ("GPUHEAL_BROKER", "GPUHEAL_PREFIX", "GPUHEAL_HOST", "GPUHEAL_CONFIG",
                "GPUHEAL_DASHBOARD_TOKEN"):
        env.pop(var, None)
    return env


@dataclass
class Pipeline:
    """recorder + analyzer + healer (processes), a dashboard (in process), then the
    simulated publisher (:meth:`start_publisher`)."""

    url: str
    prefix: str
    tmp: Path
    scenario: str = "hang"
    gpus: int = 2
    speed: float = 50.0
    db: Path = field(init=False)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    dashboard: Dashboard | None = None
    watch: Collector | None = None

    def __post_init__(self) -> None:
        self.db = self.tmp / "gpuheal.db"

    def _spawn(self, *args: str) -> subprocess.Popen[bytes]:
        common = ["--broker", self.url, "--prefix", self.prefix, "--host-name", HOST,
                  "--log-level", "WARNING"]
        log = (self.tmp / f"{args[0]}.log").open("wb")
        proc = subprocess.Popen([sys.executable, "-m", "gpuheal", *args, *common],
                                env=gpuheal_env(), cwd=REPO, stdout=log,
                                stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def start(self) -> Pipeline:
        """The consumers and the dashboard, each online (subscribed) before this returns."""
        self.watch = Collector(self.url, [f"{self.prefix}/#"]).start()
        try:
            self._spawn("recorder", "--db", str(self.db))
            self._spawn("analyzer")
            self._spawn("healer", "--source", "sim", "--state-file", str(self.tmp / "h.json"))
            self.dashboard = start_dashboard(self.url, self.prefix, self.db)
            self.watch.wait(lambda ms: {m.topic.split("/")[2] for m in ms
                                        if m.payload == b"online"}
                            >= {"recorder", "analyzer", "healer", "dashboard"}, 30,
                            "recorder, analyzer, healer and dashboard online")
        except BaseException:
            self.stop()
            raise
        return self

    def start_publisher(self) -> None:
        self._spawn("publisher", "--source", "sim", "--scenario", self.scenario,
                    "--gpus", str(self.gpus), "--speed", repr(self.speed))

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}"
                         for p in sorted(self.tmp.glob("*.log")))

    def stop(self) -> None:
        for proc in reversed(self.procs):  # the publisher first
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if self.dashboard is not None:
            self.dashboard.stop()
        if self.watch is not None:
            self.watch.stop()
