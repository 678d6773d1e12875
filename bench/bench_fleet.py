"""The fleet on this machine: 2,000 simulated GPUs at 1 Hz through one Mosquitto.

Run: ``.venv/bin/python bench/bench_fleet.py [--minutes 10] [--topology all|central|sharded|
edge] [--quick]``; ``--quick`` is one minute per topology. Prints a markdown table per
topology and, last, one JSON line with every figure (``--json FILE`` writes it too).

The fleet is ``bench/fleet_sim.py``: 250 hosts x 8 GPUs in one process, each host its own MQTT
connection with its retained publisher status, 1 sample per GPU per second, and incidents
injected on a few hosts (a GPU heats up until its healer throttles it). Every topology runs
on a fresh private Mosquitto with real component processes:

* **central**: one ``gpuheal analyzer`` and one recorder for everything;
* **sharded**: ``--shards`` analyzers with ``--shard K/N`` (hosts by a stable hash of their
  name, found from the publishers' retained status) and one recorder;
* **edge**: an analyzer per host (``--only-host H``, host name H: its own connection, status
  and States) plus the central recorder and a dashboard scraped every ``--scrape-every``
  seconds (``/metrics``, ``/api/gpu``). One real analyzer process is measured first; when 250
  of them would need more than a quarter of the machine's memory, the other hosts' analyzers
  run as several :class:`analyzer.service.AnalyzerService` instances per process
  (``--edge-per-process``), each with its own bus (:class:`gpuheal.runtime.Component`): the
  same connections, subscriptions and messages as separate processes, less interpreter
  memory. The report says which was done.

In every topology each incident host runs a real healer (``gpuheal healer --source sim``),
whose simulator commands the fleet obeys, and a bare paho subscriber in this process (the
*observer*) sees samples, Events, Actions and statuses. Figures:

* CPU per component: user+sys seconds from ``/proc/<pid>/stat`` between the start of the
  stream and the end of the drain, and that as % of one core over the stream's duration; the
  peak RSS (``VmHWM``) of each process;
* lost: samples published (the simulator's count per GPU) vs processed by the analyzers (their
  own count) vs stored in the recorder's SQLite vs seen by the observer; Events and Actions
  seen by the observer vs stored (goal: 0 lost everywhere);
* latency: from publishing the sample that crosses the thermal threshold to the Event's
  arrival at the observer, and from the Event to the healer's first Action (p50/p90/p99/max);
* GPUs one core serves: 2,000 / (the component's CPU fraction of one core).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import paho.mqtt.client as paho  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

from gpuheal.broker import PrivateBroker, free_port, start_local_broker  # noqa: E402
from gpuheal.topics import Topics  # noqa: E402

PREFIX = "fleet"
SITE = "site"
"""Host name of the central components (recorder, central analyzer, dashboard)."""
CLK_TCK = os.sysconf("SC_CLK_TCK")
PY = sys.executable
TOPOLOGIES = ("central", "sharded", "edge")
FLEET_SIM = REPO / "bench" / "fleet_sim.py"


# --- processes and their cost ------------------------------------------------------------------
def cpu_seconds(pid: int) -> float | None:
    """user + sys CPU seconds of a process (all its threads), from /proc/<pid>/stat."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14, 15)


def machine_busy_s() -> float:
    """CPU seconds the whole machine has been busy (every core, every process, the kernel),
    from the first line of /proc/stat."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    ticks = [int(x) for x in fields]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    return (sum(ticks[:8]) - idle) / CLK_TCK


def memory_kb(pid: int, key: str = "VmHWM") -> int | None:
    """``VmHWM`` (peak RSS) or ``VmRSS`` of a process, in KiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


@dataclass
class Proc:
    """One measured process."""

    role: str
    """What it is in the table (``analyzer``, ``recorder``, ``broker``…)."""
    name: str
    pid: int
    popen: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    cpu0: float = 0.0
    cpu1: float = 0.0
    hwm_kb: int = 0
    instances: int = 1
    """Components it holds (an edge group holds several analyzers)."""

    def mark_start(self) -> None:
        self.cpu0 = cpu_seconds(self.pid) or 0.0

    def mark_end(self) -> None:
        self.cpu1 = cpu_seconds(self.pid) or self.cpu1
        self.hwm_kb = max(self.hwm_kb, memory_kb(self.pid) or 0)

    @property
    def cpu(self) -> float:
        return max(0.0, self.cpu1 - self.cpu0)


def spawn(role: str, name: str, argv: list[str], workdir: Path,
          stdout: int | None = None) -> Proc:
    log = workdir / f"{name}.log"
    with log.open("ab") as out:
        popen = subprocess.Popen(argv, cwd=REPO, stdout=stdout if stdout is not None else out,
                                 stderr=out, stdin=subprocess.DEVNULL,
                                 env=os.environ | {"PYTHONPATH": str(REPO)})
    return Proc(role, name, popen.pid, popen, log)


def stop_procs(procs: list[Proc], timeout_s: float = 30.0) -> None:
    for p in procs:
        if p.popen is not None and p.popen.poll() is None:
            p.popen.send_signal(signal.SIGTERM)
    for p in procs:
        if p.popen is None:
            continue
        try:
            p.popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            p.popen.kill()
            p.popen.wait(10)


# --- the observer: a bare paho subscriber ---------------------------------------------------
class Observer:
    """Counts samples per GPU, keeps Events, Actions and statuses with their arrival time."""

    def __init__(self, port: int, topics: Topics) -> None:
        self.topics = topics
        self.samples: Counter[str] = Counter()
        self.events: list[tuple[float, dict[str, Any]]] = []
        self.actions: list[tuple[float, dict[str, Any]]] = []
        self.status: dict[str, bytes] = {}
        self.lock = threading.Lock()
        self._subscribed = threading.Event()
        head = len(topics.prefix) + 1
        self.client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                                  protocol=paho.MQTTv5)

        def on_sample(_c: Any, _u: Any, m: Any) -> None:
            self.samples[m.topic[head:-7]] += 1  # "H/gpu/I"

        def on_event(_c: Any, _u: Any, m: Any) -> None:
            self.events.append((time.time(), json.loads(m.payload)))

        def on_action(_c: Any, _u: Any, m: Any) -> None:
            self.actions.append((time.time(), json.loads(m.payload)))

        def on_status(_c: Any, _u: Any, m: Any) -> None:
            with self.lock:
                self.status[m.topic[head:]] = bytes(m.payload)

        self.sys: dict[str, list[tuple[float, float]]] = {}
        """Mosquitto's own counters ($SYS, every 10 s): name -> [(time, value)]."""

        def on_sys(_c: Any, _u: Any, m: Any) -> None:
            try:
                value = float(m.payload.split()[0])
            except (ValueError, IndexError):
                return
            self.sys.setdefault(m.topic.removeprefix("$SYS/broker/"), []).append(
                (time.time(), value))

        subs = [(topics.gpu_pattern("sample"), 0), (topics.gpu_pattern("event"), 1),
                (topics.gpu_pattern("action"), 1), (topics.status_pattern(), 1),
                ("$SYS/broker/messages/+", 0), ("$SYS/broker/bytes/+", 0),
                ("$SYS/broker/clients/connected", 0)]
        for pattern, _qos in subs[4:]:
            self.client.message_callback_add(pattern, on_sys)
        self.client.message_callback_add(subs[0][0], on_sample)
        self.client.message_callback_add(subs[1][0], on_event)
        self.client.message_callback_add(subs[2][0], on_action)
        self.client.message_callback_add(subs[3][0], on_status)
        self.client.on_connect = lambda c, *_a: c.subscribe(subs)
        self.client.on_subscribe = lambda *_a: self._subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise SystemExit("observer: no SUBACK")

    def rate(self, name: str, t0: float, t1: float) -> float | None:
        """Per second growth of a $SYS counter between ``t0`` and ``t1`` (its updates in that
        window), or None."""
        points = [(t, v) for t, v in self.sys.get(name, []) if t0 <= t <= t1]
        if len(points) < 2 or points[-1][0] <= points[0][0]:
            return None
        return (points[-1][1] - points[0][1]) / (points[-1][0] - points[0][0])

    def online(self, names: list[str]) -> bool:
        """Whether every ``H/component`` in ``names`` says ``online``."""
        with self.lock:
            return all(self.status.get(f"{n}/status") == b"online" for n in names)

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def retained_states(port: int, topics: Topics, expected: int, timeout_s: float = 30.0) -> int:
    """How many GPUs have a retained State (a fresh subscriber counts what the broker holds)."""
    seen: set[str] = set()
    done = threading.Event()
    c = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)

    def on_message(_c: Any, _u: Any, m: Any) -> None:
        if m.retain and m.payload:
            seen.add(m.topic)
            if len(seen) >= expected:
                done.set()

    c.on_message = on_message
    c.on_connect = lambda cl, *_a: cl.subscribe(topics.gpu_pattern("state"), qos=0)
    c.connect("127.0.0.1", port)
    c.loop_start()
    done.wait(timeout_s)
    time.sleep(0.5)  # stragglers: not a condition we wait for, a count we report
    c.disconnect()
    c.loop_stop()
    return len(seen)


# --- the dashboard scraper ---------------------------------------------------------------------
@dataclass
class Scrapes:
    ok: int = 0
    failed: int = 0
    metrics_s: list[float] = field(default_factory=list)
    api_s: list[float] = field(default_factory=list)
    gpu_series: int = 0
    api_gpus: int = 0
    errors: list[str] = field(default_factory=list)


def scrape_loop(port: int, every_s: float, stop: threading.Event, out: Scrapes) -> None:
    base = f"http://127.0.0.1:{port}"
    while not stop.wait(every_s):
        try:
            t = time.monotonic()
            with urllib.request.urlopen(base + "/metrics", timeout=30) as r:
                text = r.read().decode()
            out.metrics_s.append(time.monotonic() - t)
            out.gpu_series = sum(1 for line in text.splitlines()
                                 if line.startswith("gpuheal_gpu_temperature_celsius{"))
            t = time.monotonic()
            with urllib.request.urlopen(base + "/api/gpu", timeout=30) as r:
                body = json.loads(r.read())
            out.api_s.append(time.monotonic() - t)
            out.api_gpus = len(body.get("gpus") or [])
            out.ok += 1
        except (OSError, ValueError) as exc:
            out.failed += 1
            out.errors.append(str(exc)[:200])


# --- edge analyzers in one process ---------------------------------------------------------
def run_edge_group(broker: str, prefix: str, hosts: list[str]) -> int:
    """Analyzers for ``hosts``, one AnalyzerService per host, each on its own Bus (what
    ``gpuheal analyzer --only-host H --host-name H`` runs), until SIGTERM; prints READY once
    all are connected and a JSON summary at the end."""
    from analyzer.service import AnalyzerService
    from gpuheal.options import AnalyzerOptions, CommonOptions
    from gpuheal.runtime import Component, setup_logging

    setup_logging("WARNING")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    running: list[tuple[AnalyzerService, Component]] = []
    for host in hosts:
        common = CommonOptions.resolve(broker=broker, prefix=prefix, host_name=host,
                                       only_host=host, log_level="WARNING")
        service = AnalyzerService(AnalyzerOptions(common=common))
        component = Component(service, common)
        component.start()
        running.append((service, component))
    for _, component in running:
        if not component.bus.wait_connected(60):
            print("edge group: an analyzer could not connect", file=sys.stderr)
            return 1
    print("READY", flush=True)
    stop.wait()
    for _, component in running:
        component.stop()
    stats = [s.engine.stats for s, _ in running]
    print(json.dumps({"processed": sum(s.processed for s in stats),
                      "events": sum(s.events for s in stats),
                      "duplicates": sum(s.duplicates for s in stats),
                      "dead_letters": sum(s.bus.deadletter_count for s, _ in running
                                          if s.bus)}), flush=True)
    return 0


ANALYZER_SUMMARY = re.compile(r"stopped; (\d+) samples processed, .*?(\d+) events")


def analyzer_counts(proc: Proc) -> dict[str, int]:
    """What an analyzer process says it did (its stop line, or an edge group's JSON)."""
    text = proc.log.read_text(errors="replace") if proc.log else ""
    if proc.role == "analyzer" and proc.instances > 1:
        for line in reversed(text.splitlines()):
            if line.startswith("{"):
                d = json.loads(line)
                return {"processed": d["processed"], "events": d["events"]}
        return {}
    m = ANALYZER_SUMMARY.search(text)
    if not m:
        return {}
    return {"processed": int(m.group(1)), "events": int(m.group(2))}


# --- helpers -------------------------------------------------------------------------------
def pct(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in 0..100); None without values."""
    if not values:
        return None
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, math.ceil(q / 100.0 * len(ordered)) - 1))
    return ordered[k]


def summary_ms(values: list[float]) -> dict[str, Any]:
    return {"n": len(values),
            **{f"p{q}_ms": None if pct(values, q) is None else round(pct(values, q) * 1000, 1)
               for q in (50, 90, 99)},
            "max_ms": round(max(values) * 1000, 1) if values else None}


def query(db: Path, sql: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as conn:
        return conn.execute(sql).fetchall()


def recorder_supports(flag: str) -> bool:
    out = subprocess.run([PY, "-m", "gpuheal", "recorder", "--help"], capture_output=True,
                         text=True, cwd=REPO).stdout
    return flag in out


def wait_until(pred: Any, timeout_s: float, what: str, every_s: float = 0.2) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            raise SystemExit(f"bench_fleet: timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(every_s)


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kb = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kb = int(line.split()[1])
    return {"cores": os.cpu_count(), "cpu": model, "memory_gib": round(mem_kb / 2**20, 1),
            "python": platform.python_version(), "load_before": os.getloadavg()}


# --- one topology ----------------------------------------------------------------------------
@dataclass
class Plan:
    topology: str
    minutes: float
    hosts: int
    gpus: int
    shards: int
    incident_hosts: int
    incident_every_s: float
    ramp_s: float
    edge_per_process: int | None
    """None: decide from one analyzer's measured RSS."""
    sample_every: str | None
    scrape_every_s: float
    dashboard: bool


def run_topology(plan: Plan, workdir: Path) -> dict[str, Any]:
    workdir.mkdir(parents=True, exist_ok=True)
    topics = Topics(PREFIX)
    broker: PrivateBroker = start_local_broker(workdir / "mosquitto")
    url = broker.url
    common = ["--broker", url, "--prefix", PREFIX, "--log-level", "INFO"]
    hosts = [f"fleet{h:03d}" for h in range(plan.hosts)]
    incident_hosts = hosts[:plan.incident_hosts]
    db = workdir / "fleet.db"
    procs: list[Proc] = []
    sim: Proc | None = None
    observer: Observer | None = None
    notes: list[str] = []
    result: dict[str, Any] = {"topology": plan.topology, "hosts": plan.hosts,
                              "gpus": plan.hosts * plan.gpus, "minutes": plan.minutes}
    try:
        observer = Observer(broker.port, topics)
        bproc = Proc("broker", "mosquitto", broker.process.pid)
        procs.append(bproc)
        rec_argv = [PY, "-m", "gpuheal", "recorder", *common, "--host-name", SITE,
                    "--db", str(db)]
        if plan.sample_every:
            rec_argv += ["--sample-every", plan.sample_every]
        procs.append(spawn("recorder", "recorder", rec_argv, workdir))
        expected_online = [f"{SITE}/recorder"]
        if plan.topology == "central":
            procs.append(spawn("analyzer", "analyzer", [
                PY, "-m", "gpuheal", "analyzer", *common, "--host-name", SITE], workdir))
            expected_online.append(f"{SITE}/analyzer")
        elif plan.topology == "sharded":
            for k in range(1, plan.shards + 1):
                procs.append(spawn("analyzer", f"analyzer-shard{k}", [
                    PY, "-m", "gpuheal", "analyzer", *common, "--host-name", SITE,
                    "--shard", f"{k}/{plan.shards}"], workdir))
                expected_online.append(f"{SITE}-shard{k}of{plan.shards}/analyzer")
        else:
            first = spawn("analyzer", f"analyzer-{hosts[0]}", [
                PY, "-m", "gpuheal", "analyzer", *common, "--host-name", hosts[0],
                "--only-host", hosts[0]], workdir)
            procs.append(first)
            wait_until(lambda: observer.online([f"{hosts[0]}/analyzer"]), 60,
                       "the first edge analyzer")
            time.sleep(3.0)  # settled: imports done, threads started
            one_rss_kb = memory_kb(first.pid, "VmRSS") or 0
            mem_total_kb = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 1024
            need_kb = one_rss_kb * plan.hosts
            per_process = plan.edge_per_process
            if per_process is None:
                per_process = 1 if need_kb <= mem_total_kb / 4 else 25
            result["edge"] = {"one_analyzer_rss_mb": round(one_rss_kb / 1024, 1),
                              "processes_would_need_gb": round(need_kb / 2**20, 1),
                              "memory_gb": round(mem_total_kb / 2**20, 1),
                              "analyzers_per_process": per_process}
            if per_process > 1:
                notes.append(
                    f"edge: one analyzer process holds {one_rss_kb / 1024:.0f} MB RSS; "
                    f"{plan.hosts} of them would need {need_kb / 2**20:.1f} GB of this "
                    f"machine's {mem_total_kb / 2**20:.1f} GB, so {hosts[0]}'s analyzer runs "
                    f"as its own process and the other {plan.hosts - 1} as AnalyzerService "
                    f"instances, {per_process} per process, each with its own bus")
            rest = hosts[1:]
            for g in range(0, len(rest), per_process):
                group = rest[g:g + per_process]
                if per_process == 1:
                    p = spawn("analyzer", f"analyzer-{group[0]}", [
                        PY, "-m", "gpuheal", "analyzer", *common, "--host-name", group[0],
                        "--only-host", group[0]], workdir)
                else:
                    p = spawn("analyzer", f"analyzer-group{g // per_process:02d}", [
                        PY, str(Path(__file__).resolve()), "--edge-group", ",".join(group),
                        "--broker", url, "--prefix", PREFIX], workdir)
                    p.instances = len(group)
                procs.append(p)
            expected_online += [f"{h}/analyzer" for h in hosts]
        for h in incident_hosts:
            procs.append(spawn("healer", f"healer-{h}", [
                PY, "-m", "gpuheal", "healer", *common, "--host-name", h, "--source", "sim",
                "--state-file", str(workdir / f"healer-{h}.json")], workdir))
            expected_online.append(f"{h}/healer")
        dash_port = None
        if plan.dashboard:
            dash_port = free_port()
            procs.append(spawn("dashboard", "dashboard", [
                PY, "-m", "gpuheal", "dashboard", *common, "--host-name", SITE,
                "--db", str(db), "--port", str(dash_port)], workdir))
            expected_online.append(f"{SITE}/dashboard")
        wait_until(lambda: observer.online(expected_online), 180,
                   f"{len(expected_online)} components online")
        for p in procs:
            if p.popen is not None and p.popen.poll() is not None:
                raise SystemExit(f"bench_fleet: {p.name} exited: "
                                 f"{p.log.read_text()[-2000:] if p.log else ''}")

        # --- the stream ---------------------------------------------------------------------
        report_path = workdir / "fleet_sim.json"
        sim = spawn("fleet_sim", "fleet_sim", [
            PY, str(FLEET_SIM), "--broker", url, "--prefix", PREFIX, "--hosts",
            str(plan.hosts), "--gpus", str(plan.gpus), "--seconds", str(plan.minutes * 60),
            "--incident-hosts", str(plan.incident_hosts), "--incident-every",
            str(plan.incident_every_s), "--ramp", str(plan.ramp_s),
            "--report", str(report_path)], workdir,
            stdout=subprocess.PIPE)
        assert sim.popen is not None and sim.popen.stdout is not None
        line = sim.popen.stdout.readline().decode()
        if not line.startswith("READY"):
            raise SystemExit(f"bench_fleet: the fleet simulator did not start: "
                             f"{sim.log.read_text()[-2000:] if sim.log else line}")
        t_start = time.time()
        load0 = os.getloadavg()
        for p in procs:
            p.mark_start()
        obs_cpu0 = time.process_time()
        busy0 = machine_busy_s()
        scrapes = Scrapes()
        stop_scrape = threading.Event()
        scraper = None
        if dash_port is not None:
            scraper = threading.Thread(target=scrape_loop, daemon=True,
                                       args=(dash_port, plan.scrape_every_s, stop_scrape,
                                             scrapes))
            scraper.start()
        peak_rss: dict[int, int] = {}
        loads: list[float] = []
        while sim.popen.poll() is None:
            time.sleep(5.0)
            loads.append(os.getloadavg()[0])
            for p in procs:
                peak_rss[p.pid] = max(peak_rss.get(p.pid, 0), memory_kb(p.pid, "VmHWM") or 0)
        t_stream_end = time.time()
        stop_scrape.set()
        if sim.popen.returncode != 0:
            raise SystemExit(f"bench_fleet: the fleet simulator failed: "
                             f"{sim.log.read_text()[-2000:] if sim.log else ''}")
        fleet = json.loads(report_path.read_text())
        published = fleet["published"]

        # --- drain: the recorder stores what is on its way ----------------------------------
        def recorded_samples() -> int:
            try:
                return int(query(db, "SELECT COUNT(*) FROM samples")[0][0])
            except sqlite3.Error:
                return -1

        last, still_since = -1, time.monotonic()
        drain_deadline = time.monotonic() + 180
        while time.monotonic() < drain_deadline:
            n = recorded_samples()
            if n >= published and not plan.sample_every:
                break
            if n != last:
                last, still_since = n, time.monotonic()
            elif time.monotonic() - still_since > 10:
                break
            time.sleep(1.0)
        time.sleep(2.0)  # the last Events and Actions of the goodbye
        t_drained = time.time()
        for p in procs:
            p.mark_end()
            p.hwm_kb = max(p.hwm_kb, peak_rss.get(p.pid, 0))
        obs_cpu = time.process_time() - obs_cpu0
        busy = machine_busy_s() - busy0
        states_retained = retained_states(broker.port, topics, plan.hosts * plan.gpus)
        load1 = os.getloadavg()
    finally:
        if sim is not None:
            stop_procs([sim])
        stop_procs([p for p in procs if p.role not in ("broker", "recorder")])
        stop_procs([p for p in procs if p.role == "recorder"])
        if observer is not None:
            observer.stop()
        broker.stop()

    # --- figures --------------------------------------------------------------------------
    stream_s = t_stream_end - t_start
    per_gpu_pub: dict[str, int] = fleet["per_gpu"]
    rec_rows = {f"{h}/{g}": n for h, g, n in query(
        db, "SELECT host, gpu, COUNT(*) FROM samples GROUP BY host, gpu")}
    obs_samples = {k.replace("/gpu/", "/"): n for k, n in observer.samples.items()}
    lost_rec = sum(max(0, n - rec_rows.get(k, 0)) for k, n in per_gpu_pub.items())
    lost_obs = sum(max(0, n - obs_samples.get(k, 0)) for k, n in per_gpu_pub.items())
    rec_events = set(query(db, "SELECT event_id, phase, severity FROM events"))
    rec_actions = set(query(db, "SELECT action_id, status FROM actions"))
    obs_events = {(e["event_id"], e["phase"], e["severity"]) for _, e in observer.events}
    obs_actions = {(a["action_id"], a["status"]) for _, a in observer.actions}
    rec_states = int(query(db, "SELECT COUNT(*) FROM states")[0][0])
    by_kind = Counter(e["kind"] for _, e in observer.events if e["phase"] == "raised")
    deadletters = int(query(db, "SELECT COUNT(*) FROM deadletter")[0][0])
    counts = [analyzer_counts(p) for p in procs if p.role == "analyzer"]
    processed = sum(c.get("processed", 0) for c in counts)
    analyzer_events = sum(c.get("events", 0) for c in counts)

    # latency: crossing sample -> Event (observer), Event -> first Action (observer)
    sent_at: dict[str, dict[str, float]] = fleet["sent_at"]
    first_event: dict[tuple[str, int], tuple[float, dict[str, Any]]] = {}
    to_event: list[float] = []
    unmatched = 0
    for at, e in observer.events:
        if e["phase"] != "raised" or e["kind"] != "thermal_throttling":
            continue
        sent = sent_at.get(f"{e['host']}/{e['index']}", {}).get(f"{e['started_ts']:.3f}")
        if sent is None:
            unmatched += 1
            continue
        to_event.append(at - sent)
        first_event[(e["event_id"], e["host"])] = (at, e)
    first_action: dict[str, float] = {}
    verified = Counter()
    for at, a in observer.actions:
        if a.get("event_id") and a["event_id"] not in first_action:
            first_action[a["event_id"]] = at
        verified[(a["action"], a["status"])] += 1
    to_action = [first_action[eid] - at for (eid, _h), (at, _e) in first_event.items()
                 if eid in first_action]
    without_action = sum(1 for (eid, _h) in first_event if eid not in first_action)

    components: dict[str, dict[str, Any]] = {}
    for p in procs:
        c = components.setdefault(p.role, {"processes": 0, "instances": 0, "cpu_s": 0.0,
                                           "rss_peak_mb": 0.0, "rss_sum_mb": 0.0})
        c["processes"] += 1
        c["instances"] += p.instances
        c["cpu_s"] += p.cpu
        c["rss_peak_mb"] = max(c["rss_peak_mb"], p.hwm_kb / 1024)
        c["rss_sum_mb"] += p.hwm_kb / 1024
    components["fleet_sim"] = {"processes": 1, "instances": 1, "cpu_s": fleet["cpu_s"],
                               "rss_peak_mb": fleet["max_rss_mb"],
                               "rss_sum_mb": fleet["max_rss_mb"]}
    components["observer"] = {"processes": 1, "instances": 1, "cpu_s": obs_cpu,
                              "rss_peak_mb": (memory_kb(os.getpid()) or 0) / 1024,
                              "rss_sum_mb": (memory_kb(os.getpid()) or 0) / 1024}
    gpus = plan.hosts * plan.gpus
    for c in components.values():
        frac = c["cpu_s"] / stream_s
        c["cpu_pct"] = round(100.0 * frac, 1)
        c["gpus_per_core"] = round(gpus / frac) if frac > 0 else None
        c["cpu_s"] = round(c["cpu_s"], 1)
        c["rss_peak_mb"] = round(c["rss_peak_mb"], 1)
        c["rss_sum_mb"] = round(c["rss_sum_mb"], 1)
    rates = {k: observer.rate(k, t_start, t_stream_end) for k in
             ("messages/received", "messages/sent", "bytes/received", "bytes/sent")}
    clients = max((v for _t, v in observer.sys.get("clients/connected", [])), default=None)
    msgs = (rates["messages/received"] or 0) + (rates["messages/sent"] or 0)
    broker_cpu = components.get("broker", {}).get("cpu_s", 0.0)
    result["broker"] = {
        "messages_in_per_s": round(rates["messages/received"] or 0),
        "messages_out_per_s": round(rates["messages/sent"] or 0),
        "mb_in_per_s": round((rates["bytes/received"] or 0) / 1e6, 2),
        "mb_out_per_s": round((rates["bytes/sent"] or 0) / 1e6, 2),
        "clients": int(clients) if clients is not None else None,
        "cpu_us_per_message": round(broker_cpu / (msgs * stream_s) * 1e6, 2) if msgs else None,
    }
    pipeline = [r for r in ("analyzer", "recorder", "healer", "dashboard", "broker")
                if r in components]
    pipe_frac = sum(components[r]["cpu_s"] for r in pipeline) / stream_s
    ours = sum(c["cpu_s"] for c in components.values())
    result["machine"] = {"busy_cores": round(busy / (t_drained - t_start), 2),
                         "others_cores": round(max(0.0, busy - ours) / (t_drained - t_start),
                                               2)}
    result.update({
        "stream_s": round(stream_s, 1),
        "drain_s": round(t_drained - t_stream_end, 1),
        "published": published,
        "analyzers": len(counts),
        "analyzer_instances": sum(p.instances for p in procs if p.role == "analyzer"),
        "processed_by_analyzers": processed,
        "samples_lost_analyzers": published - processed if counts and all(counts) else None,
        "recorded_samples": sum(rec_rows.values()),
        "samples_lost_recorder": lost_rec if not plan.sample_every else None,
        "sample_every": plan.sample_every,
        "seen_samples_observer": sum(obs_samples.values()),
        "samples_lost_observer": lost_obs,
        "events_seen": len(obs_events),
        "events_published_by_analyzers": analyzer_events,
        "events_recorded": len(rec_events),
        "raised_by_kind": dict(by_kind),
        "false_alarms": sum(n for k, n in by_kind.items() if k != "thermal_throttling"),
        "events_lost_recorder": len(obs_events - rec_events),
        "events_lost_observer": len(rec_events - obs_events),
        "actions_seen": len(obs_actions),
        "actions_recorded": len(rec_actions),
        "actions_lost_recorder": len(obs_actions - rec_actions),
        "actions_lost_observer": len(rec_actions - obs_actions),
        "actions_by_status": {f"{a}:{s}": n for (a, s), n in sorted(verified.items())},
        "states_recorded": rec_states,
        "states_retained": states_retained,
        "deadletters": deadletters,
        "incidents": len(fleet["incidents"]),
        "incidents_healed": sum(1 for i in fleet["incidents"] if i["ended_by"] == "throttled"),
        "sample_to_event": summary_ms(to_event),
        "events_unmatched": unmatched,
        "event_to_action": summary_ms(to_action),
        "events_without_action": without_action,
        "components": components,
        "pipeline_cpu_pct": round(100.0 * pipe_frac, 1),
        "pipeline_gpus_per_core": round(gpus / pipe_frac) if pipe_frac > 0 else None,
        "fleet_sim_late_sends": fleet["late_sends"],
        "load_avg_start": load0,
        "load_avg_end": load1,
        "load_avg_1m_max": max(loads) if loads else None,
        "notes": notes,
    })
    if dash_port is not None:
        result["dashboard"] = {"scrapes_ok": scrapes.ok, "scrapes_failed": scrapes.failed,
                               "metrics": summary_ms(scrapes.metrics_s),
                               "api_gpu": summary_ms(scrapes.api_s),
                               "gpu_series": scrapes.gpu_series, "api_gpus": scrapes.api_gpus,
                               "errors": scrapes.errors[:3]}
    return result


# --- output -----------------------------------------------------------------------------------
def markdown(r: dict[str, Any]) -> str:
    def ms(d: dict[str, Any]) -> str:
        if not d["n"]:
            return "none measured"
        return (f"p50 {d['p50_ms']} ms, p90 {d['p90_ms']} ms, p99 {d['p99_ms']} ms, "
                f"max {d['max_ms']} ms (n={d['n']})")

    out = [f"\n### {r['topology']}: {r['gpus']:,} GPUs ({r['hosts']} hosts), "
           f"{r['stream_s'] / 60:.1f} min, {r['published']:,} samples\n",
           "| component | processes | CPU s | % of one core | GPUs one core serves "
           "| RSS peak (MB, per process) | RSS total (MB) |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    for role, c in r["components"].items():
        inst = f" ({c['instances']} analyzers)" if c["instances"] != c["processes"] else ""
        per_core = f"{c['gpus_per_core']:,}" if c["gpus_per_core"] else "-"
        out.append(f"| {role} | {c['processes']}{inst} | {c['cpu_s']} | {c['cpu_pct']} % "
                   f"| {per_core} | {c['rss_peak_mb']} | {c['rss_sum_mb']} |")
    out.append(f"| **pipeline** (broker, analyzers, recorder, healers, dashboard) | | | "
               f"**{r['pipeline_cpu_pct']} %** | **{r['pipeline_gpus_per_core']:,}** | | |")
    rec_lost = ("downsampled" if r["samples_lost_recorder"] is None
                else r["samples_lost_recorder"])
    out += ["", "| lost (goal 0) | |", "|---|---|",
            f"| samples: published → analyzers processed | {r['published']:,} → "
            f"{r['processed_by_analyzers']:,} (lost {r['samples_lost_analyzers']}) |",
            f"| samples: published → recorded | {r['recorded_samples']:,} (lost {rec_lost}) |",
            f"| samples: published → bare subscriber | {r['seen_samples_observer']:,} "
            f"(lost {r['samples_lost_observer']}) |",
            f"| Events: seen → recorded | {r['events_seen']} → {r['events_recorded']} "
            f"(lost {r['events_lost_recorder']}; analyzers published "
            f"{r['events_published_by_analyzers']}) |",
            f"| false alarms: conditions raised other than the injected thermal ones | "
            f"{r['false_alarms']} {r['raised_by_kind']} |",
            f"| Actions: seen → recorded | {r['actions_seen']} → {r['actions_recorded']} "
            f"(lost {r['actions_lost_recorder']}) |",
            f"| States: recorded / GPUs with a retained State | {r['states_recorded']:,} / "
            f"{r['states_retained']:,} |",
            "", f"- sample that crosses 83 °C → its Event: {ms(r['sample_to_event'])}",
            f"- Event → the healer's first Action: {ms(r['event_to_action'])}",
            f"- broker: {r['broker']['messages_in_per_s']:,} messages/s in, "
            f"{r['broker']['messages_out_per_s']:,} out ({r['broker']['mb_in_per_s']} / "
            f"{r['broker']['mb_out_per_s']} MB/s), {r['broker']['clients']} clients, "
            f"{r['broker']['cpu_us_per_message']} µs of broker CPU per message in or out",
            f"- incidents: {r['incidents']}, healed by a throttle: {r['incidents_healed']}; "
            f"actions: {r['actions_by_status']}",
            f"- the machine was busy {r['machine']['busy_cores']} cores on average (of "
            f"{os.cpu_count()}), of which {r['machine']['others_cores']} by everything but "
            f"this benchmark (other work, the kernel); load average (1 min) at start "
            f"{r['load_avg_start'][0]:.2f}, max during {r['load_avg_1m_max']:.2f}, at end "
            f"{r['load_avg_end'][0]:.2f}"]
    if "dashboard" in r:
        d = r["dashboard"]
        out.append(f"- dashboard: {d['scrapes_ok']} scrapes ok, {d['scrapes_failed']} failed; "
                   f"/metrics {ms(d['metrics'])} with {d['gpu_series']} GPU series; /api/gpu "
                   f"{ms(d['api_gpu'])} with {d['api_gpus']} GPUs")
    out += [f"- {n}" for n in r["notes"]]
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="stream length per topology")
    ap.add_argument("--quick", action="store_true", help="one minute per topology")
    ap.add_argument("--topology", choices=(*TOPOLOGIES, "all"), default="all")
    ap.add_argument("--hosts", type=int, default=250)
    ap.add_argument("--gpus", type=int, default=8, help="GPUs per host")
    ap.add_argument("--shards", type=int, default=2, help="analyzers of the sharded topology")
    ap.add_argument("--incident-hosts", type=int, default=8,
                    help="hosts with injected incidents (each runs a real healer)")
    ap.add_argument("--incident-every", type=float, default=15.0, help="seconds")
    ap.add_argument("--ramp", type=float, default=20.0,
                    help="the simulated hosts join one after the other over this many seconds")
    ap.add_argument("--edge-per-process", type=int,
                    help="edge analyzers per process (default: from one analyzer's RSS)")
    ap.add_argument("--sample-every", help="the recorder's --sample-every (if it has one)")
    ap.add_argument("--dashboard", default="edge",
                    help="topologies that run the dashboard: comma-separated, all or none")
    ap.add_argument("--scrape-every", type=float, default=15.0, help="dashboard scrape, s")
    ap.add_argument("--workdir", type=Path,
                    help="keep logs and databases here (default: a temporary directory, "
                    "removed at the end)")
    ap.add_argument("--json", type=Path, help="write the results here too")
    ap.add_argument("--edge-group", help=argparse.SUPPRESS)
    ap.add_argument("--broker", help=argparse.SUPPRESS)
    ap.add_argument("--prefix", default=PREFIX, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.edge_group:
        return run_edge_group(args.broker, args.prefix, args.edge_group.split(","))
    minutes = 1.0 if args.quick else args.minutes
    sample_every = args.sample_every
    if sample_every and not recorder_supports("--sample-every"):
        print("bench_fleet: the recorder has no --sample-every; recording every sample",
              file=sys.stderr)
        sample_every = None
    wanted = TOPOLOGIES if args.topology == "all" else (args.topology,)
    dash = set(TOPOLOGIES) if args.dashboard == "all" else (
        set() if args.dashboard == "none" else set(args.dashboard.split(",")))
    info = machine()
    # logs and databases (~300 MB per topology) stay only in a --workdir that was asked for
    base = args.workdir or Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    try:
        results = run_all_topologies(args, wanted, dash, minutes, sample_every, base)
    finally:
        if args.workdir is None:
            shutil.rmtree(base, ignore_errors=True)
    out = {"bench": "fleet", "date": time.strftime("%Y-%m-%d"), "machine": info,
           "minutes": minutes, "results": results}
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    print(json.dumps(out), flush=True)
    return 0


def run_all_topologies(args: argparse.Namespace, wanted: tuple[str, ...], dash: set[str],
                       minutes: float, sample_every: str | None,
                       base: Path) -> list[dict[str, Any]]:
    results = []
    for topology in wanted:
        plan = Plan(topology, minutes, args.hosts, args.gpus, args.shards, args.incident_hosts,
                    args.incident_every, args.ramp, args.edge_per_process, sample_every,
                    args.scrape_every, topology in dash)
        print(f"bench_fleet: {topology}: {args.hosts * args.gpus} GPUs for {minutes:g} min "
              f"(work dir {base / topology})", file=sys.stderr, flush=True)
        r = run_topology(plan, base / topology)
        results.append(r)
        print(markdown(r), flush=True)
    return results


if __name__ == "__main__":
    raise SystemExit(main())
