"""Latency: from publishing the sample that crosses a threshold to receiving its Event (goal
p99 <= 50 ms), and from that Event to the healer's first Action for it (goal p99 <= 100 ms).

Run: ``.venv/bin/python bench/bench_latency.py [--quick] [--seconds 60] [--fleet-gpus 2000]``.
Prints a markdown table, then one JSON line.

Real processes on a private Mosquitto (the project's local config): ``gpuheal analyzer`` (default
settings, every host) and ``gpuheal healer --source sim`` for host ``h000`` (its guards opened
up: no cooldown, no hourly budget, no breaker, so that every incident gets a decision; the
simulated actuator publishes its commands to the simulated GPU). The bench process publishes
the samples of ``h000``'s 8 GPUs, one per GPU per second (``ts`` = the wall clock), and listens
to ``h000``'s Events and Actions; every timestamp is taken in the bench process
(``time.monotonic``). After a warm-up, each second one GPU runs hot (84 °C: a thermal warning
is raised, the healer throttles) and the one hot the second before cools down (the condition
clears). Two loads:

* **8 GPUs**: only ``h000``, 8 samples/s;
* **fleet**: the same, while a raw-socket publisher (its own process) adds the samples of
  ``--fleet-gpus`` - 8 more GPUs (249 hosts x 8 at the default 2,000), one per GPU per second,
  spread evenly over each second: the analyzer serves them all.

``--code DIR`` runs the analyzer and the healer from another checkout (a baseline);
``--broker-nodelay`` runs Mosquitto with ``set_tcp_nodelay true`` (an experiment: the project's
broker config leaves Nagle's algorithm on for the broker's side of each connection).

Percentiles are nearest-rank over the incidents of a run (``n`` is given: with fewer than 100,
p99 is the largest). CPU is user + system from ``/proc`` over the measured stretch, as percent
of one core.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

REPO = Path(__file__).resolve().parent.parent
for p in (REPO, REPO / "bench"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from bench_analyzer import proc_cpu_s, publish_packet, raw_connect, raw_disconnect  # noqa: E402

from gpuheal.broker import render_local_config, start_broker  # noqa: E402
from gpuheal.models import Process, Sample  # noqa: E402
from gpuheal.mqtt_client import GpuhealClient  # noqa: E402
from gpuheal.net import free_port  # noqa: E402
from gpuheal.topics import Topics  # noqa: E402

PROBE_HOST = "h000"
PROBE_GPUS = 8
GPUS_PER_HOST = 8
HOT_C = 84.0
"""Above the thermal warning (83 °C), below critical (85 °C): a warning, the healer throttles."""
TS_MARK = 1234567890.5
SEQ_MARK = 987654321


def sample(host: str, index: int, ts: float, seq: int, temperature_c: float = 60.0) -> Sample:
    return Sample(
        host=host, index=index, uuid=f"GPU-{host}-{index}", name="NVIDIA H100 80GB HBM3",
        source="nvml", ts=ts, seq=seq, temperature_c=temperature_c,
        utilization_pct=float(40 + index), memory_used_mb=30000.0 + 100 * index,
        memory_total_mb=81559.0, power_draw_w=350.0 + index, power_limit_w=700.0,
        sm_clock_mhz=1980.0, mem_clock_mhz=2619.0, fan_pct=None,
        throttle_reasons=[], xids=[], ecc_uncorrected=0, remapped_rows_pending=False,
        processes=[Process(pid=4242, name="ollama", used_mb=29000.0)])


# --- the fleet's other GPUs (own process) ------------------------------------------------------
def role_load(port: int, prefix: str, gpus: int, seconds: float) -> None:
    """Publish ``gpus`` GPUs of hosts h001... at 1 Hz each, evenly over every second, for
    ``seconds``; print READY once connected, start on GO."""
    topics = Topics(prefix)
    templates = []
    for k in range(gpus):
        host, index = f"h{1 + k // GPUS_PER_HOST:03d}", k % GPUS_PER_HOST
        templates.append((topics.sample(host, index),
                          sample(host, index, TS_MARK, SEQ_MARK).to_json()))
    sock = raw_connect(port, f"bench-load-{os.getpid()}")
    print("READY", flush=True)
    sys.stdin.readline()
    slices = 50
    per_slice = math.ceil(gpus / slices)
    start = time.monotonic()
    seq = 0
    while time.monotonic() - start < seconds:
        round_start = start + seq
        ts = repr(time.time()).encode()
        for s in range(slices):
            due = round_start + s / slices
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)  # pacing: a fleet publishes evenly, not in bursts
            chunk = templates[s * per_slice:(s + 1) * per_slice]
            if chunk:
                sock.sendall(b"".join(
                    publish_packet(topic, payload.replace(b'"ts":1234567890.5', b'"ts":' + ts)
                                   .replace(b'"seq":987654321', b'"seq":%d' % seq))
                    for topic, payload in chunk))
        seq += 1
    raw_disconnect(sock)
    print(json.dumps({"rounds": seq}), flush=True)


# --- the bench's own clients -------------------------------------------------------------------
@dataclass
class Incident:
    index: int
    ts: float
    published: float
    event_id: str | None = None
    event_at: float | None = None
    action_at: float | None = None
    action: str | None = None


@dataclass
class Listener:
    """h000's Events and Actions as they arrive (monotonic times)."""

    port: int
    topics: Topics
    incidents: dict[tuple[int, float], Incident] = field(default_factory=dict)
    by_event: dict[str, Incident] = field(default_factory=dict)
    statuses: dict[str, bytes] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        t = self.topics
        self.client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                                  protocol=paho.MQTTv5)
        self.client.on_message = self._on_message
        subs = [(t.gpu_pattern("event", PROBE_HOST), 1), (t.gpu_pattern("action", PROBE_HOST), 1),
                (t.status("site", "analyzer"), 1), (t.status(PROBE_HOST, "healer"), 1)]
        self.client.on_connect = lambda c, *a: c.subscribe(subs)
        self.client.connect("127.0.0.1", self.port)
        self.client.loop_start()

    def _on_message(self, _c: object, _u: object, m: paho.MQTTMessage) -> None:
        now = time.monotonic()
        if m.topic.endswith("/status"):
            self.statuses[m.topic] = m.payload
            return
        data = json.loads(m.payload)
        with self.lock:
            if m.topic.endswith("/event"):
                inc = self.incidents.get((data["index"], data["ts"]))
                if data["phase"] == "raised" and inc is not None and inc.event_at is None:
                    inc.event_at, inc.event_id = now, data["event_id"]
                    self.by_event[data["event_id"]] = inc
            else:
                inc = self.by_event.get(data.get("event_id") or "")
                if inc is not None and inc.action_at is None:
                    inc.action_at, inc.action = now, f"{data['action']} {data['status']}"

    def online(self, topic: str) -> bool:
        return self.statuses.get(topic) == b"online"

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def start_component(argv: list[str], log: Path, code: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-m", "gpuheal", *argv], cwd=code,
                                env=os.environ | {"PYTHONPATH": str(code)}, stdout=out,
                                stderr=subprocess.STDOUT)


def wait_until(pred: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.05)


def percentiles(values: list[float]) -> dict[str, Any]:
    """Nearest-rank p50 / p99 / max in milliseconds."""
    if not values:
        return {"n": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}
    v = sorted(values)

    def rank(p: float) -> float:
        return v[max(0, math.ceil(p * len(v)) - 1)] * 1000.0

    return {"n": len(v), "p50_ms": round(rank(0.50), 2), "p99_ms": round(rank(0.99), 2),
            "max_ms": round(v[-1] * 1000.0, 2)}


def run_level(port: int, workdir: Path, level: str, fleet_gpus: int, seconds: float,
              warmup_s: float, code: Path) -> dict[str, Any]:
    prefix = f"lat{level}"
    topics = Topics(prefix)
    cfg = workdir / f"{prefix}.toml"
    cfg.write_text("[healer.guards]\ncooldown_s = 0.0\nbudget_per_hour = 1000000\n"
                   "breaker_threshold = 0\n")
    analyzer = start_component(
        ["analyzer", "--broker", f"mqtt://127.0.0.1:{port}", "--prefix", prefix, "--host-name",
         "site", "--log-level", "WARNING"], workdir / f"{prefix}-analyzer.log", code)
    healer = start_component(
        ["healer", "--broker", f"mqtt://127.0.0.1:{port}", "--prefix", prefix, "--host-name",
         PROBE_HOST, "--source", "sim", "--config", str(cfg), "--state-file",
         str(workdir / f"{prefix}-healer.json"), "--log-level", "WARNING"],
        workdir / f"{prefix}-healer.log", code)
    listener = Listener(port, topics)
    listener.start()
    load = None
    # the probe samples through gpuheal's own client, as the publisher's Bus sends them
    pub = GpuhealClient(callback_api_version=CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    try:
        wait_until(lambda: listener.online(topics.status("site", "analyzer"))
                   and listener.online(topics.status(PROBE_HOST, "healer")), 60,
                   "the analyzer and the healer online")
        pub.connect("127.0.0.1", port)
        pub.loop_start()
        total_s = warmup_s + seconds
        if fleet_gpus > PROBE_GPUS:
            load = subprocess.Popen(
                [sys.executable, __file__, "--role", "load", "--port", str(port), "--prefix",
                 prefix, "--gpus", str(fleet_gpus - PROBE_GPUS), "--seconds",
                 str(total_s + 2)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                env=os.environ | {"PYTHONPATH": str(REPO)})
            assert load.stdin is not None and load.stdout is not None
            if load.stdout.readline().strip() != "READY":
                raise SystemExit("the load publisher did not start")
            load.stdin.write("GO\n")
            load.stdin.flush()
        rounds = int(total_s)
        warm_rounds = int(warmup_s)
        start = time.monotonic()
        hot: int | None = None
        cpu0: dict[str, float] = {}
        for r in range(rounds):
            wait = start + r - time.monotonic()
            if wait > 0:
                time.sleep(wait)  # pacing: one round per second
            if r == warm_rounds:
                cpu0 = {"analyzer": proc_cpu_s(analyzer.pid), "healer": proc_cpu_s(healer.pid)}
            ts = time.time()
            next_hot = (r % PROBE_GPUS) if r >= warm_rounds else None
            for i in range(PROBE_GPUS):
                crossing = i == next_hot and hot != i
                s = sample(PROBE_HOST, i, ts, r, HOT_C if i == next_hot else 60.0)
                payload = s.to_json()
                if crossing:
                    inc = Incident(i, ts, 0.0)
                    with listener.lock:
                        listener.incidents[(i, ts)] = inc
                    inc.published = time.monotonic()
                pub.publish(topics.sample(PROBE_HOST, i), payload, qos=0)
            hot = next_hot
        cpu1 = {"analyzer": proc_cpu_s(analyzer.pid), "healer": proc_cpu_s(healer.pid)}
        measured_s = time.monotonic() - (start + warm_rounds)
        settle = time.monotonic() + 5.0  # the last incident's Event and Action
        while time.monotonic() < settle and any(
                i.action_at is None for i in list(listener.incidents.values())):
            time.sleep(0.05)
    finally:
        pub.disconnect()
        pub.loop_stop()
        for proc in (analyzer, healer):
            proc.send_signal(signal.SIGINT)
        for proc in (analyzer, healer):
            proc.wait(30)
        listener.stop()
        if load is not None:
            load.kill()
            load.wait(10)
    incs = list(listener.incidents.values())
    to_event = [i.event_at - i.published for i in incs if i.event_at is not None]
    to_action = [i.action_at - i.event_at for i in incs
                 if i.action_at is not None and i.event_at is not None]
    actions: dict[str, int] = {}
    for i in incs:
        if i.action:
            actions[i.action] = actions.get(i.action, 0) + 1
    return {
        "level": level, "gpus": fleet_gpus, "incidents": len(incs),
        "events_missing": len(incs) - len(to_event),
        "actions_missing": len(to_event) - len(to_action),
        "sample_to_event": percentiles(to_event), "event_to_action": percentiles(to_action),
        "first_actions": actions,
        "analyzer_cpu_pct": 100.0 * (cpu1["analyzer"] - cpu0["analyzer"]) / measured_s,
        "healer_cpu_pct": 100.0 * (cpu1["healer"] - cpu0["healer"]) / measured_s,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="20 s per load instead of 60")
    ap.add_argument("--seconds", type=float, default=None,
                    help="measured seconds per load (default 60; --quick 20)")
    ap.add_argument("--warmup", type=float, default=None,
                    help="seconds before the first incident (default 10; --quick 5)")
    ap.add_argument("--fleet-gpus", type=int, default=2000)
    ap.add_argument("--broker-nodelay", action="store_true",
                    help="an experiment: Mosquitto with set_tcp_nodelay true (the project's "
                    "broker config leaves it off)")
    ap.add_argument("--code", type=Path, default=REPO,
                    help="checkout whose analyzer and healer run (default: this one)")
    ap.add_argument("--role", choices=["load"], help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--prefix", help=argparse.SUPPRESS)
    ap.add_argument("--gpus", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.role == "load":
        role_load(args.port, args.prefix, args.gpus, args.seconds)
        return 0
    seconds = args.seconds or (20.0 if args.quick else 60.0)
    warmup = args.warmup or (5.0 if args.quick else 10.0)
    levels = [("8_gpus", PROBE_GPUS), (f"{args.fleet_gpus}_gpus", args.fleet_gpus)]
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-latency-") as tmp:
        bdir = Path(tmp) / "mosquitto"
        (bdir / "data").mkdir(parents=True)
        port = free_port()
        conf = render_local_config(port, bdir / "data")
        if args.broker_nodelay:
            conf += "set_tcp_nodelay true\n"
        (bdir / "mosquitto.conf").write_text(conf)
        broker = start_broker(bdir / "mosquitto.conf", port, bdir / "mosquitto.log")
        try:
            for level, gpus in levels:
                r = run_level(broker.port, Path(tmp), level, gpus, seconds, warmup,
                              args.code.resolve())
                results.append(r)
                print(f"{level}: {json.dumps(r)}", file=sys.stderr, flush=True)
        finally:
            broker.stop()
    print(f"\n### Latency ({os.cpu_count()} CPU cores, Python {platform.python_version()}; "
          f"{seconds:g} s measured per load after {warmup:g} s of warm-up; one incident per "
          "second)\n")
    print("| load | sample → Event p50 / p99 (n) | Event → first Action p50 / p99 (n) | "
          "first actions | analyzer CPU | healer CPU |")
    print("|---|---|---|---|---|---|")
    summary: dict[str, Any] = {}
    for r in results:
        e, a = r["sample_to_event"], r["event_to_action"]
        acts = ", ".join(f"{k}: {v}" for k, v in sorted(r["first_actions"].items()))
        missing = ""
        if r["events_missing"] or r["actions_missing"]:
            missing = f" ({r['events_missing']} Events, {r['actions_missing']} Actions missing)"
        print(f"| {r['gpus']:,} GPUs at 1 Hz{missing} | {e['p50_ms']} / **{e['p99_ms']} ms** "
              f"({e['n']}) | {a['p50_ms']} / **{a['p99_ms']} ms** ({a['n']}) | {acts} | "
              f"{r['analyzer_cpu_pct']:.1f} % | {r['healer_cpu_pct']:.1f} % |")
        summary[f"sample_to_event_{r['level']}"] = e
        summary[f"event_to_action_{r['level']}"] = a
    print("\nGoals: sample → Event p99 <= 50 ms; Event → Action p99 <= 100 ms.")
    if args.broker_nodelay:
        print("Mosquitto ran with `set_tcp_nodelay true` (not the project's config).")
    print(json.dumps({"bench": "latency", "quick": args.quick, "code": str(args.code),
                      "broker_nodelay": args.broker_nodelay,
                      "command": " ".join(["bench/bench_latency.py", *sys.argv[1:]]),
                      "seconds": seconds, "warmup_s": warmup, **summary, "levels": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
