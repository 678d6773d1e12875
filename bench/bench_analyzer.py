"""Benchmark of the analyzer: throughput against a bare paho subscriber in the same run, CPU per
sample, memory per GPU, the engine alone.

Run: ``.venv/bin/python bench/bench_analyzer.py [--quick] [--gpus 1000] [--rounds 30]
[--repeat 3] [--every-state]``. Prints markdown tables, then one JSON line of results.

1. **Throughput at saturation.** A private Mosquitto (the project's local config) on a free
   port; the analyzer service as a real subprocess (``python -m gpuheal analyzer``, default
   settings; only the silence timeout is raised so that the pause before the stream raises no
   ``unavailable``); a bare subscriber, a process with **stock** paho-mqtt that only counts, on
   the same sample topics at the same QoS as the analyzer. After a warm-up round (every GPU
   seen once), a publisher process sends ``gpus x rounds`` pre-encoded Samples (QoS 0, the
   publisher's default) through a raw socket as fast as the broker takes them, so that the
   publisher itself costs little CPU. Each consumer's rate is the sample count over the wall
   time from the first publish to its last sample handled: the bare subscriber's last
   message, the analyzer's State for the last sample (which raises a condition, so its State
   is published at once; samples are handled in arrival order). Ratio = analyzer rate / bare
   rate (goal >= 0.8). CPU per sample: the bare subscriber's own ``process_time`` from its
   first to its last message, the analyzer's from ``/proc`` over the stream; the CPU ratio is
   bare / analyzer. ``--repeat`` runs, medians reported; ``--every-state`` adds runs with
   ``state_min_interval_s = 0`` (a State for every sample).
2. **Memory per GPU.** tracemalloc of an ``Analyzer`` engine fed N GPUs (two samples each,
   10 % of them holding an active condition), divided by the GPU count.
3. **Engine alone.** CPU per sample of ``Analyzer.ingest`` plus the State's JSON, in process.

``--code DIR`` runs the analyzer subprocess from another checkout (e.g. ``git archive HEAD``
unpacked) to compare a change against its baseline with the same bench.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from analyzer.engine import Analyzer  # noqa: E402
from gpuheal.broker import start_local_broker  # noqa: E402
from gpuheal.config import AnalyzerConfig  # noqa: E402
from gpuheal.models import Process, Sample  # noqa: E402
from gpuheal.topics import Topics  # noqa: E402

T0 = 1_700_000_000.0
HOST = "benchhost"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def make_sample(index: int, rnd: int, host: str = HOST, ts: float | None = None,
                temperature_c: float | None = None) -> Sample:
    """A realistic reading (~620 bytes of JSON); every 100th GPU runs hot (a condition)."""
    hot = index % 100 == 0
    if temperature_c is None:
        temperature_c = 86.0 if hot else 55.0 + (index + rnd) % 7
    return Sample(
        host=host, index=index, uuid=f"GPU-{index:08d}-8a2b-4c1d-9e7f-0a1b2c3d4e5f",
        name="NVIDIA H100 80GB HBM3", source="nvml", ts=T0 + rnd if ts is None else ts,
        seq=rnd, temperature_c=temperature_c,
        utilization_pct=float((index * 7 + rnd * 13) % 100),
        memory_used_mb=20000.0 + (index * 31 + rnd * 97) % 5000, memory_total_mb=81559.0,
        power_draw_w=250.0 + (index + rnd * 3) % 150, power_limit_w=700.0,
        sm_clock_mhz=1980.0, mem_clock_mhz=2619.0, fan_pct=None,
        throttle_reasons=["sw_power_cap"], xids=[], ecc_uncorrected=0,
        remapped_rows_pending=False, host_boot_ts=T0 - 86400.0,
        processes=[Process(pid=41231, name="python3", used_mb=20112.0),
                   Process(pid=41290, name="nccl-proxy", used_mb=512.0)],
    )


# --- raw MQTT v5 (a publisher that costs little CPU) -------------------------------------------
def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n % 128, n // 128
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def str16(s: bytes) -> bytes:
    return len(s).to_bytes(2, "big") + s


def mqtt_packet(header: int, body: bytes) -> bytes:
    return bytes([header]) + varint(len(body)) + body


def publish_packet(topic: str, payload: bytes, retain: bool = False) -> bytes:
    """A QoS 0 PUBLISH (MQTT v5, no properties)."""
    return mqtt_packet(0x30 | int(retain), str16(topic.encode()) + b"\x00" + payload)


def raw_connect(port: int, client_id: str) -> socket.socket:
    """An MQTT v5 connection (clean start, keepalive 60 s), CONNACK checked."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(mqtt_packet(0x10, str16(b"MQTT") + bytes([5, 0x02]) + (60).to_bytes(2, "big")
                             + b"\x00" + str16(client_id.encode())))
    head = sock.recv(2)
    body = b""
    while len(body) < head[1]:
        body += sock.recv(head[1] - len(body))
    if head[0] != 0x20 or body[1] != 0:
        raise SystemExit(f"raw publisher: the broker refused the connection ({body!r})")
    return sock


def raw_disconnect(sock: socket.socket) -> None:
    sock.sendall(b"\xe0\x00")
    sock.close()


def role_publish(port: int, prefix: str, gpus: int, first_round: int, rounds: int) -> None:
    """Helper process: pre-encode the stream, say READY, wait for GO, send it all at once;
    print the wall time of the first byte sent and of the last."""
    topics = Topics(prefix)
    packets = [publish_packet(topics.sample(HOST, i), make_sample(i, r).to_json())
               for r in range(first_round, first_round + rounds) for i in range(gpus)]
    # the last sample raises a condition: its State is published at once, the end marker
    last = make_sample(gpus - 1, first_round + rounds - 1, temperature_c=95.0)
    packets[-1] = publish_packet(topics.sample(HOST, gpus - 1), last.to_json())
    sock = raw_connect(port, "bench-publisher")
    print("READY", flush=True)
    sys.stdin.readline()
    t0 = time.time()
    for start in range(0, len(packets), 500):
        sock.sendall(b"".join(packets[start:start + 500]))
    t1 = time.time()
    raw_disconnect(sock)
    print(json.dumps({"t0": t0, "t1": t1, "n": len(packets)}), flush=True)


# --- the bare subscriber (stock paho, its own process) ------------------------------------------
def role_bare(port: int, pattern: str, expected: int, qos: int, idle_s: float) -> None:
    """Count messages; print READY once subscribed, then a JSON line with its times and CPU."""
    seen: dict[str, Any] = {"count": 0}
    done = threading.Event()
    ptime, now = time.process_time, time.time

    def on_message(_c: object, _u: object, _m: object) -> None:
        seen["count"] += 1
        if seen["count"] == 1:
            seen["first"], seen["cpu_first"] = now(), ptime()
        seen["last"], seen["cpu_last"] = now(), ptime()
        if seen["count"] >= expected:
            done.set()

    c = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    c.on_message = on_message
    c.on_subscribe = lambda *a: print("READY", flush=True)
    c.on_connect = lambda cl, *a: cl.subscribe(pattern, qos=qos)
    c.connect("127.0.0.1", port)
    c.loop_start()
    last = -1
    while not done.wait(idle_s):
        if seen["count"] == last:
            break  # nothing for idle_s: some were lost
        last = seen["count"]
    c.disconnect()
    c.loop_stop()
    print(json.dumps(seen), flush=True)


def helper(args: list[str], code: Path | None = None) -> subprocess.Popen[str]:
    env = os.environ | {"PYTHONPATH": str(code or REPO)}
    return subprocess.Popen([sys.executable, __file__, *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)


def expect_ready(p: subprocess.Popen[str], what: str) -> None:
    assert p.stdout is not None
    line = p.stdout.readline().strip()
    if line != "READY":
        raise SystemExit(f"{what} did not start: {line!r}")


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def client() -> paho.Client:
    return paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)


class Watcher:
    """The bench's own view: the analyzer's status and the State of the last GPU."""

    def __init__(self, port: int, topics: Topics, marker_gpu: int) -> None:
        self.online = threading.Event()
        self.states: list[tuple[float, float]] = []
        """(State ts, wall time received)"""
        self.cond = threading.Condition()
        self.status_topic = topics.status("benchsite", "analyzer")
        self.c = client()
        self.c.on_message = self._on_message
        self.c.on_connect = lambda cl, *a: cl.subscribe(
            [(self.status_topic, 1), (topics.state(HOST, marker_gpu), 1)])
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()

    def _on_message(self, _c: object, _u: object, m: paho.MQTTMessage) -> None:
        if m.topic == self.status_topic:
            if m.payload == b"online":
                self.online.set()
            return
        if m.payload:
            with self.cond:
                self.states.append((json.loads(m.payload)["ts"], time.time()))
                self.cond.notify_all()

    def wait_state(self, ts: float, timeout_s: float) -> float:
        """Wall time the State with ``ts`` (or newer) arrived."""
        deadline = time.monotonic() + timeout_s
        with self.cond:
            while True:
                for state_ts, at in self.states:
                    if state_ts >= ts:
                        return at
                left = deadline - time.monotonic()
                if left <= 0:
                    raise SystemExit(f"no State with ts >= {ts} within {timeout_s} s")
                self.cond.wait(left)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def bench_throughput(port: int, workdir: Path, gpus: int, rounds: int, run: int,
                     state_min_interval_s: float | None, code: Path) -> dict[str, Any]:
    """One run: analyzer and bare subscriber on the same stream (see the module docstring)."""
    prefix = f"bench{run}"
    topics = Topics(prefix)
    cfg = workdir / f"analyzer-{prefix}.toml"
    interval = "" if state_min_interval_s is None else \
        f"state_min_interval_s = {state_min_interval_s}\n"
    cfg.write_text(f"[analyzer]\n{interval}[analyzer.unavailable]\nmin_timeout_s = 3600.0\n")
    log_path = workdir / f"analyzer-{prefix}.log"
    env = os.environ | {"PYTHONPATH": str(code)}
    watcher = Watcher(port, topics, gpus - 1)
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gpuheal", "analyzer", "--broker", f"mqtt://127.0.0.1:{port}",
             "--prefix", prefix, "--host-name", "benchsite", "--config", str(cfg),
             "--log-level", "INFO"], cwd=code, env=env, stdout=log, stderr=subprocess.STDOUT)
    bare = pub = None
    try:
        if not watcher.online.wait(60):
            raise SystemExit(f"the analyzer did not come online; see {log_path}")
        warm = helper(["--role", "publish", "--port", str(port), "--prefix", prefix,
                       "--gpus", str(gpus), "--first-round", "0", "--rounds", "1"])
        expect_ready(warm, "warm-up publisher")
        warm.communicate("GO\n", timeout=120)
        watcher.wait_state(T0, 120)
        total = gpus * rounds
        pub = helper(["--role", "publish", "--port", str(port), "--prefix", prefix,
                      "--gpus", str(gpus), "--first-round", "1", "--rounds", str(rounds)])
        bare = helper(["--role", "bare", "--port", str(port), "--pattern",
                       topics.gpu_pattern("sample"), "--n", str(total)])
        expect_ready(pub, "publisher")
        expect_ready(bare, "bare subscriber")
        load1 = float(Path("/proc/loadavg").read_text().split()[0])
        cpu0 = proc_cpu_s(proc.pid)
        assert pub.stdin is not None and pub.stdout is not None
        pub.stdin.write("GO\n")
        pub.stdin.flush()
        sent = json.loads(pub.stdout.readline())
        done_at = watcher.wait_state(T0 + rounds, 600)
        cpu1 = proc_cpu_s(proc.pid)
        out, _ = bare.communicate(timeout=120)
        bare_out = json.loads(out.strip().splitlines()[-1])
    finally:
        watcher.close()
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
        for p in (bare, pub):
            if p is not None and p.poll() is None:
                p.kill()
    log_text = log_path.read_text(errors="replace")
    m = re.search(r"(\d+) samples processed", log_text)
    processed = int(m.group(1)) - gpus if m else -1
    t0 = sent["t0"]
    bare_rate = bare_out["count"] / (bare_out["last"] - t0)
    analyzer_rate = total / (done_at - t0)
    bare_cpu_us = 1e6 * (bare_out["cpu_last"] - bare_out["cpu_first"]) / max(
        1, bare_out["count"] - 1)
    analyzer_cpu_us = 1e6 * (cpu1 - cpu0) / total
    return {
        "samples": total, "gpus": gpus, "load1": load1,
        "state_min_interval_s": state_min_interval_s,
        "publish_rate": total / max(1e-9, sent["t1"] - t0),
        "bare_rate": bare_rate, "bare_count": bare_out["count"], "bare_cpu_us": bare_cpu_us,
        "analyzer_rate": analyzer_rate, "analyzer_processed": processed,
        "analyzer_cpu_us": analyzer_cpu_us,
        "ratio": analyzer_rate / bare_rate, "cpu_ratio": bare_cpu_us / analyzer_cpu_us,
    }


# --- memory per GPU ----------------------------------------------------------------------------
def bench_memory(gpus: int) -> dict[str, float]:
    gc.collect()
    tracemalloc.start()
    engine = Analyzer(AnalyzerConfig(), started_ts=T0, clock=lambda: 0.0)
    base, _ = tracemalloc.get_traced_memory()
    for rnd in range(2):
        for i in range(gpus):
            engine.ingest(make_sample(i, rnd, temperature_c=84.0 if i % 10 == 0 else None))
    gc.collect()
    current, _peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    active = sum(1 for h, i in engine.gpus() if engine.track(h, i).active)  # type: ignore[union-attr]
    return {"gpus": len(engine), "bytes": current - base, "per_gpu": (current - base) / gpus,
            "active": active}


# --- the engine alone ----------------------------------------------------------------------
def bench_engine(gpus: int, rounds: int) -> dict[str, float]:
    """CPU per sample of what the service does for each: ingest, then the State's JSON."""
    samples = [make_sample(i, r) for r in range(rounds) for i in range(gpus)]
    engine = Analyzer(AnalyzerConfig(), started_ts=T0, clock=time.time)
    state_json = getattr(engine, "current_state_json", None)
    gc.collect()
    t = time.process_time()
    for s in samples:
        engine.ingest(s)
        if state_json is not None:
            state_json(s.host, s.index)
        else:
            engine.current_state(s.host, s.index).to_json()
    elapsed = time.process_time() - t
    return {"us_per_sample": elapsed / len(samples) * 1e6, "rate": len(samples) / elapsed}


def median(runs: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(r[key] for r in runs))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a short run (1 repetition, 10 rounds)")
    ap.add_argument("--gpus", type=int, default=1000, help="GPUs in the throughput stream")
    ap.add_argument("--rounds", type=int, default=None, help="samples per GPU (default 30)")
    ap.add_argument("--repeat", type=int, default=None, help="runs per setting (default 3)")
    ap.add_argument("--every-state", action="store_true",
                    help="also run with state_min_interval_s = 0 (a State for every sample)")
    ap.add_argument("--memory-gpus", type=int, default=None)
    ap.add_argument("--code", type=Path, default=REPO,
                    help="checkout whose analyzer runs (default: this one)")
    ap.add_argument("--role", choices=["publish", "bare"], help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--prefix", help=argparse.SUPPRESS)
    ap.add_argument("--pattern", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--first-round", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.role == "publish":
        role_publish(args.port, args.prefix, args.gpus, args.first_round, args.rounds)
        return 0
    if args.role == "bare":
        role_bare(args.port, args.pattern, args.n, qos=1, idle_s=20.0)
        return 0
    rounds = args.rounds or (10 if args.quick else 30)
    repeat = args.repeat or (1 if args.quick else 3)
    memory_gpus = args.memory_gpus or (2000 if args.quick else 10_000)
    code = args.code.resolve()
    settings: list[float | None] = [None] + ([0.0] if args.every_state else [])
    runs: dict[float | None, list[dict[str, Any]]] = {s: [] for s in settings}
    with tempfile.TemporaryDirectory(prefix="bench-analyzer-") as tmp:
        broker = start_local_broker(Path(tmp) / "mosquitto")
        try:
            k = 0
            for _ in range(repeat):
                for setting in settings:
                    r = bench_throughput(broker.port, Path(tmp), args.gpus, rounds, k, setting,
                                         code)
                    k += 1
                    runs[setting].append(r)
                    print(f"run {k}: {json.dumps(r)}", file=sys.stderr, flush=True)
        finally:
            broker.stop()
    mem = bench_memory(memory_gpus)
    eng = bench_engine(1000, 5 if args.quick else 20)
    print(f"\n### Analyzer ({os.cpu_count()} CPU cores, Python {platform.python_version()}; "
          f"{args.gpus:,} GPUs x {rounds} rounds = {args.gpus * rounds:,} samples, QoS 0, "
          f"a raw-socket publisher; median of {repeat})\n")
    print("| State published | bare paho subscriber | analyzer | ratio (goal >= 0.8) | CPU per "
          "sample: bare / analyzer | CPU ratio |")
    print("|---|---|---|---|---|---|")
    summary: dict[str, Any] = {}
    for setting, rs in runs.items():
        label = ("default (state_min_interval_s, wall clock)" if setting is None
                 else "every sample (state_min_interval_s = 0)")
        ratios = ", ".join(f"{r['ratio']:.2f}" for r in rs)
        print(f"| {label} | {median(rs, 'bare_rate'):,.0f} /s | "
              f"{median(rs, 'analyzer_rate'):,.0f} /s | **{median(rs, 'ratio'):.2f}** "
              f"({ratios}) | {median(rs, 'bare_cpu_us'):.0f} µs / "
              f"{median(rs, 'analyzer_cpu_us'):.0f} µs | {median(rs, 'cpu_ratio'):.2f} |")
        name = "default" if setting is None else "every_state"
        summary[name] = {
            "ratio": median(rs, "ratio"), "cpu_ratio": median(rs, "cpu_ratio"),
            "bare_rate": median(rs, "bare_rate"), "analyzer_rate": median(rs, "analyzer_rate"),
            "bare_cpu_us": median(rs, "bare_cpu_us"),
            "analyzer_cpu_us": median(rs, "analyzer_cpu_us"),
            "ratios": [r["ratio"] for r in rs],
            "processed": [r["analyzer_processed"] for r in rs],
            "bare_counts": [r["bare_count"] for r in rs],
        }
    print()
    if code != REPO:
        print(f"(the analyzer process ran from {code}; the engine and memory figures below are "
              "this checkout's)\n")
    print("| engine alone (ingest + State JSON), CPU | memory per tracked GPU |")
    print("|---|---|")
    print(f"| {eng['us_per_sample']:.1f} µs/sample ({eng['rate']:,.0f} samples/s) "
          f"| {mem['per_gpu'] / 1024:.2f} KiB ({mem['bytes'] / 1e6:.1f} MB for "
          f"{mem['gpus']:,} GPUs, {mem['active']:,} with an active condition) |")
    print(json.dumps({
        "bench": "analyzer", "quick": args.quick, "code": str(code),
        "command": " ".join(["bench/bench_analyzer.py", *sys.argv[1:]]),
        "cpus": os.cpu_count(), "python": platform.python_version(), "gpus": args.gpus,
        "rounds": rounds, "repeat": repeat, **summary,
        "engine_us_per_sample": eng["us_per_sample"],
        "memory_kib_per_gpu": mem["per_gpu"] / 1024,
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
