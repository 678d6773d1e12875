"""Recorder throughput: rows/s stored from a real Mosquitto against a bare paho subscriber
receiving the same stream in the same run (goal: ratio >= 0.8), CPU per row, and the raw
SQLite insert rate as the disk's limit. Prints markdown tables, then one JSON line.

    .venv/bin/python bench/bench_recorder.py [--quick] [--n 40000] [--repeat 3] [--dir DIR]

The recorder is a real process (``python -m gpuheal recorder``, default settings: WAL,
``synchronous=FULL``, every message acknowledged only after its row is committed); the bare
subscriber a process with **stock** paho-mqtt that only counts (QoS 1 subscription, like the
recorder's); the publisher a process that sends pre-encoded Samples through a raw socket (QoS 1
windowed on the broker's Receive Maximum), so that it costs little CPU. Scenarios:

* ``disk``: ``executemany`` of the recorder's own INSERT into a fresh recording, in
  transactions of ``batch_size`` rows, WAL, ``synchronous=FULL``: the ceiling.
* ``live QoS 0`` / ``live QoS 1``: the publisher sends N samples as fast as the broker takes
  them while both consumers are subscribed; each side's rate = N / (its last row committed, or
  message received, minus the first publish).
* ``backlog QoS 1``: N samples wait in both consumers' persistent sessions (the broker queued
  them while both were away); then each drains its backlog alone, the bare subscriber first:
  rate = N / (last - first message).

The recorder's progress is read from its file (``MAX(id)`` of ``samples``, polled every 20 ms by
a read connection: WAL readers never block the writer), its CPU from ``/proc``, the bare
subscriber's from its own ``process_time``. ``--code DIR`` runs the recorder from another
checkout (a baseline) with the same bench.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import select
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import closing
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

REPO = Path(__file__).resolve().parent.parent
for p in (REPO, REPO / "bench"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from bench_analyzer import (  # noqa: E402
    mqtt_packet,
    proc_cpu_s,
    raw_connect,
    raw_disconnect,
    str16,
)

from gpuheal.broker import start_local_broker  # noqa: E402
from gpuheal.config import GpuhealConfig  # noqa: E402
from gpuheal.models import Process, Sample  # noqa: E402
from gpuheal.topics import Topics  # noqa: E402
from recorder.rows import record_for  # noqa: E402
from recorder.schema import COLUMNS  # noqa: E402
from recorder.store import _SQL, Store  # noqa: E402

HOSTS = 4
GPUS = 8


def sample_payload(i: int, t0: float = 1_700_000_000.0) -> tuple[str, int, bytes]:
    """(host, index, payload) of the i-th sample of a fleet of HOSTS x GPUS GPUs."""
    host, index = f"node{i % HOSTS}", (i // HOSTS) % GPUS
    s = Sample(host=host, index=index, uuid=f"GPU-{host}-{index}", name="NVIDIA H100 80GB HBM3",
               source="nvml", ts=t0 + i * 0.01, seq=i, temperature_c=60.0 + i % 20,
               utilization_pct=float(i % 100), memory_used_mb=40_000.0 + i % 1000,
               memory_total_mb=81_559.0, power_draw_w=350.0, power_limit_w=700.0,
               sm_clock_mhz=1980.0, mem_clock_mhz=2619.0, fan_pct=None,
               throttle_reasons=["sw_power_cap"], xids=[], ecc_uncorrected=0,
               remapped_rows_pending=False, host_boot_ts=t0 - 86400.0,
               processes=[Process(pid=4242, name="ollama", used_mb=39_000.0)])
    return host, index, s.to_json()


# --- helper roles (own processes) ----------------------------------------------------------------
def role_bare(port: int, pattern: str, n: int, client_id: str, setup: bool,
              idle_s: float) -> None:
    """Stock paho, persistent session, auto-ack: counts messages, prints its timing and CPU as
    JSON. Ends at ``n`` messages, or ``idle_s`` seconds after the last one."""
    ready = threading.Event()
    seen: dict[str, Any] = {"n": 0}
    done = threading.Event()
    ptime, now = time.process_time, time.time

    def on_message(_c: object, _u: object, _m: paho.MQTTMessage) -> None:
        seen["n"] += 1
        if seen["n"] == 1:
            seen["first"], seen["cpu_first"] = now(), ptime()
        seen["last"], seen["cpu_last"] = now(), ptime()
        if seen["n"] >= n:
            done.set()

    c = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id,
                    protocol=paho.MQTTv5)
    c.on_message = on_message
    c.on_subscribe = lambda *_a: ready.set()
    c.on_connect = lambda cl, *_a: cl.subscribe(pattern, qos=1)
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600
    c.connect("127.0.0.1", port, clean_start=False, properties=props)
    c.loop_start()
    ready.wait(10)
    print("READY", flush=True)
    if not setup:
        last = -1
        while not done.wait(idle_s):
            if seen["n"] == last:
                break
            last = seen["n"]
    c.disconnect()
    c.loop_stop()
    print(json.dumps(seen), flush=True)


def role_publish(port: int, prefix: str, n: int, qos: int, offset: int) -> None:
    """Pre-encode n samples (seq from ``offset``), say READY, wait for GO, send them as fast as
    the broker takes them (QoS 1: windowed on its Receive Maximum); print the times."""
    topics = Topics(prefix)
    packets = []
    for k in range(offset, offset + n):
        host, index, payload = sample_payload(k)
        head = str16(topics.sample(host, index).encode())
        mid = (k % 65535 + 1).to_bytes(2, "big") if qos else b""
        packets.append(mqtt_packet(0x30 | (qos << 1), head + mid + b"\x00" + payload))
    sock = raw_connect(port, f"bench-pub-{os.getpid()}")
    print("READY", flush=True)
    sys.stdin.readline()
    t0 = time.time()
    if qos == 0:
        for start in range(0, n, 500):
            sock.sendall(b"".join(packets[start:start + 500]))
    else:
        window = 100  # the broker's max_inflight_messages (its Receive Maximum)
        sent = acked = 0
        buf = bytearray()
        while acked < n:
            k = min(window - (sent - acked), n - sent, 100)
            if k > 0:
                sock.sendall(b"".join(packets[sent:sent + k]))
                sent += k
            if k <= 0 or select.select([sock], [], [], 0)[0]:
                data = sock.recv(65536)
                if not data:
                    raise SystemExit("publisher: the broker closed the connection")
                buf += data
                i = 0
                while len(buf) - i >= 2 and len(buf) - i >= 2 + buf[i + 1]:
                    if buf[i] & 0xF0 == 0x40:
                        acked += 1
                    i += 2 + buf[i + 1]
                del buf[:i]
    t1 = time.time()
    raw_disconnect(sock)
    print(json.dumps({"t0": t0, "t1": t1}), flush=True)


def helper(args: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, __file__, *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, cwd=REPO,
                            env=os.environ | {"PYTHONPATH": str(REPO)})


def ready(p: subprocess.Popen[str], what: str) -> subprocess.Popen[str]:
    assert p.stdout is not None
    line = p.stdout.readline().strip()
    if line != "READY":
        raise RuntimeError(f"{what} did not start: {line!r}")
    return p


def start_bare(port: int, pattern: str, n: int, client_id: str,
               setup: bool = False) -> subprocess.Popen[str]:
    return ready(helper(["--role", "bare", "--port", str(port), "--pattern", pattern, "--n",
                         str(n), "--client-id", client_id, "--idle-s", "5"]
                        + (["--setup"] if setup else [])), "bare subscriber")


def bare_result(p: subprocess.Popen[str]) -> dict[str, Any]:
    out, _ = p.communicate(timeout=600)
    lines = out.strip().splitlines()
    if not lines:
        raise RuntimeError(f"the bare subscriber said nothing (exit code {p.returncode})")
    return json.loads(lines[-1])


def publish(port: int, prefix: str, n: int, qos: int, offset: int = 0) -> dict[str, float]:
    """Run a publisher to the end; its times."""
    pub = ready(helper(["--role", "publish", "--port", str(port), "--prefix", prefix,
                        "--n", str(n), "--qos", str(qos), "--offset", str(offset)]),
                "publisher")
    out, _ = pub.communicate("GO\n", timeout=600)
    return json.loads(out.strip().splitlines()[-1])


# --- the recorder, a real process ----------------------------------------------------------------
class RecorderProcess:
    """``python -m gpuheal recorder`` with default settings, watched through its file."""

    def __init__(self, port: int, prefix: str, db: Path, client_id: str, code: Path) -> None:
        self.db = db
        self.log = db.with_suffix(".log")
        env = os.environ | {"PYTHONPATH": str(code)}
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gpuheal", "recorder", "--broker",
                 f"mqtt://127.0.0.1:{port}", "--prefix", prefix, "--host-name", "bench",
                 "--db", str(db), "--client-id", client_id, "--log-level", "WARNING"],
                cwd=code, env=env, stdout=log, stderr=subprocess.STDOUT)

    def query(self, sql: str) -> Any:
        if not self.db.exists():
            return None
        with closing(sqlite3.connect(self.db, timeout=5)) as conn:
            try:
                return conn.execute(sql).fetchone()[0]
            except sqlite3.OperationalError:  # tables not made yet
                return None

    def rows(self) -> int:
        return int(self.query("SELECT MAX(id) FROM samples") or 0)

    def wait(self, pred: Any, timeout_s: float, what: str) -> float:
        deadline = time.monotonic() + timeout_s
        while not pred():
            if self.proc.poll() is not None:
                raise RuntimeError(f"the recorder exited; see {self.log}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting for {what}; see {self.log}")
            time.sleep(0.02)
        return time.time()

    def wait_rows(self, n: int, idle_s: float = 5.0) -> float:
        """Wall time the n-th row was seen, or the last row when they stopped coming for
        ``idle_s`` (QoS 0 samples dropped when the buffer was full)."""
        last, at = -1, time.time()
        while True:
            rows = self.rows()
            now = time.time()
            if rows != last:
                last, at = rows, now
            if rows >= n:
                return now
            if now - at > idle_s:
                return at
            if self.proc.poll() is not None:
                raise RuntimeError(f"the recorder exited; see {self.log}")
            time.sleep(0.02)

    def wait_online(self) -> None:
        self.wait(lambda: self.query("SELECT COUNT(*) FROM component_status WHERE "
                                     "component = 'recorder' AND status = 'online'"), 30,
                  "the recorder's own online row")

    def cpu_s(self) -> float:
        return proc_cpu_s(self.proc.pid)

    def peak_rss_mb(self) -> float:
        """The process's peak resident memory so far (VmHWM), MiB."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(60)


# --- scenarios ----------------------------------------------------------------
def bench_disk(workdir: Path, n: int, batch: int) -> float:
    """Raw ``executemany`` insert rate (rows/s) of sample rows into a fresh recording."""
    store = Store(workdir / "disk.db")
    topics = Topics("bench")
    rows = []
    for k in range(n):
        host, index, payload = sample_payload(k)
        rec = record_for(topics, topics.sample(host, index), payload, time.time())
        assert rec is not None
        rows.append(tuple(rec.row.get(c) for c in COLUMNS["samples"]))
    conn = store.db.conn
    t0 = time.perf_counter()
    for start in range(0, n, batch):
        with store.db.atomic():
            conn.executemany(_SQL["samples"], rows[start:start + batch])
    elapsed = time.perf_counter() - t0
    store.close()
    return n / elapsed


def bench_live(port: int, workdir: Path, n: int, qos: int, run: int,
               code: Path) -> dict[str, Any]:
    prefix = f"live{qos}r{run}"
    pattern = Topics(prefix).gpu_pattern("sample")
    bare = start_bare(port, pattern, n, f"bench-bare-{prefix}")
    rec = RecorderProcess(port, prefix, workdir / f"{prefix}.db", f"bench-rec-{prefix}", code)
    try:
        rec.wait_online()
        cpu0 = rec.cpu_s()
        sent = publish(port, prefix, n, qos)
        done = rec.wait_rows(n)
        stored = rec.rows()
        cpu1 = rec.cpu_s()
        rss = rec.peak_rss_mb()
        got = bare_result(bare)
    finally:
        rec.stop()
        if bare.poll() is None:
            bare.kill()
    t0 = sent["t0"]
    bare_rate = got["n"] / max(1e-9, got["last"] - t0) if got["n"] else 0.0
    rec_rate = stored / (done - t0)
    bare_cpu = 1e6 * (got["cpu_last"] - got["cpu_first"]) / max(1, got["n"] - 1)
    rec_cpu = 1e6 * (cpu1 - cpu0) / max(1, stored)
    return {"scenario": f"live QoS {qos}", "n": n, "bare_rate": bare_rate,
            "bare_received": got["n"], "recorder_rate": rec_rate, "stored": stored,
            "ratio": rec_rate / bare_rate if bare_rate else 0.0,
            "bare_cpu_us": bare_cpu, "recorder_cpu_us": rec_cpu,
            "cpu_ratio": bare_cpu / rec_cpu, "publish_rate": n / (sent["t1"] - t0),
            "recorder_peak_rss_mb": rss}


def bench_backlog(port: int, workdir: Path, n: int, run: int, code: Path) -> dict[str, Any]:
    prefix = f"backlog{run}"
    pattern = Topics(prefix).gpu_pattern("sample")
    db = workdir / f"{prefix}.db"
    # 1. both persistent sessions exist, then both leave
    setup = start_bare(port, pattern, n, f"bench-bare-{prefix}", setup=True)
    setup.communicate(timeout=60)
    rec = RecorderProcess(port, prefix, db, f"bench-rec-{prefix}", code)
    rec.wait_online()
    startup_cpu = rec.cpu_s()  # what a start costs before any message
    rec.stop()
    # 2. the stream arrives while both are away: the broker queues it for both
    publish(port, prefix, n, 1)
    # 3. each drains its backlog alone
    got = bare_result(start_bare(port, pattern, n, f"bench-bare-{prefix}"))
    rec = RecorderProcess(port, prefix, db, f"bench-rec-{prefix}", code)
    try:
        done = rec.wait(lambda: rec.rows() >= n, 600, f"{n} rows")
        cpu = rec.cpu_s() - startup_cpu
        rss = rec.peak_rss_mb()
        first = float(rec.query("SELECT MIN(received_ts) FROM samples"))
    finally:
        rec.stop()
    bare_rate = got["n"] / max(1e-9, got["last"] - got["first"])
    rec_rate = n / (done - first)
    bare_cpu = 1e6 * (got["cpu_last"] - got["cpu_first"]) / max(1, got["n"] - 1)
    rec_cpu = 1e6 * cpu / n  # less the CPU of a start without messages
    return {"scenario": "backlog QoS 1", "n": n, "bare_rate": bare_rate,
            "bare_received": got["n"], "recorder_rate": rec_rate, "stored": n,
            "ratio": rec_rate / bare_rate, "bare_cpu_us": bare_cpu, "recorder_cpu_us": rec_cpu,
            "cpu_ratio": bare_cpu / rec_cpu, "recorder_peak_rss_mb": rss}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a short run (10,000 samples, once)")
    ap.add_argument("--n", type=int, default=None, help="samples per scenario (default 40,000)")
    ap.add_argument("--repeat", type=int, default=None, help="runs per scenario (default 3)")
    ap.add_argument("--dir", type=Path, default=None, help="where the SQLite files go")
    ap.add_argument("--code", type=Path, default=REPO,
                    help="checkout whose recorder runs (default: this one)")
    ap.add_argument("--role", choices=["bare", "publish"], help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--pattern", help=argparse.SUPPRESS)
    ap.add_argument("--prefix", help=argparse.SUPPRESS)
    ap.add_argument("--client-id", help=argparse.SUPPRESS)
    ap.add_argument("--qos", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--setup", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--idle-s", type=float, default=5.0, help=argparse.SUPPRESS)
    ap.add_argument("--offset", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.role == "bare":
        role_bare(args.port, args.pattern, args.n, args.client_id, args.setup, args.idle_s)
        return
    if args.role == "publish":
        role_publish(args.port, args.prefix, args.n, args.qos, args.offset)
        return

    n = min(args.n or (10_000 if args.quick else 40_000), 90_000)  # the broker queues 100,000
    repeat = args.repeat or (1 if args.quick else 3)
    code = args.code.resolve()
    workdir = Path(tempfile.mkdtemp(prefix="bench-recorder-", dir=args.dir))
    batch = GpuhealConfig().recorder.batch_size
    disk = bench_disk(workdir, n, batch)
    broker = start_local_broker(workdir / "mosquitto")
    runs: dict[str, list[dict[str, Any]]] = {}
    try:
        for k in range(repeat):
            for r in (bench_live(broker.port, workdir, n, 0, k, code),
                      bench_live(broker.port, workdir, n, 1, k, code),
                      bench_backlog(broker.port, workdir, n, k, code)):
                runs.setdefault(r["scenario"], []).append(r)
                print(f"run {k}: {json.dumps(r)}", file=sys.stderr, flush=True)
    finally:
        broker.stop()

    def med(rs: list[dict[str, Any]], key: str) -> float:
        return float(statistics.median(r[key] for r in rs))

    print(f"\n### Recorder ({platform.machine()}, {os.cpu_count()} CPUs, Python "
          f"{platform.python_version()}, SQLite {sqlite3.sqlite_version}; {n:,} samples per "
          f"scenario, default settings: batch {batch}, synchronous=FULL; median of {repeat})\n")
    print("| scenario | bare paho subscriber | recorder | ratio (goal >= 0.8) | CPU per "
          "message: bare / recorder | CPU ratio | recorder peak RSS |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    print(f"| disk: raw executemany | | {disk:,.0f} rows/s | | | SQLite's limit here | |")
    summary: dict[str, Any] = {}
    for name, rs in runs.items():
        ratios = ", ".join(f"{r['ratio']:.2f}" for r in rs)
        lost = [f"{n - r['stored']} not stored" for r in rs if r["stored"] < n]
        lost += [f"{n - r['bare_received']} not received by the bare subscriber" for r in rs
                 if r["bare_received"] < n]
        if lost:
            name = f"{name} ({'; '.join(lost)})"
        print(f"| {name} | {med(rs, 'bare_rate'):,.0f} msg/s | "
              f"{med(rs, 'recorder_rate'):,.0f} rows/s | **{med(rs, 'ratio'):.2f}** ({ratios}) "
              f"| {med(rs, 'bare_cpu_us'):.0f} µs / {med(rs, 'recorder_cpu_us'):.0f} µs "
              f"| {med(rs, 'cpu_ratio'):.2f} | {med(rs, 'recorder_peak_rss_mb'):.0f} MiB |")
        summary[rs[0]["scenario"].replace(" ", "_").lower()] = {
            k: med(rs, k) for k in ("ratio", "cpu_ratio", "bare_rate", "recorder_rate",
                                    "bare_cpu_us", "recorder_cpu_us", "recorder_peak_rss_mb")
        } | {"ratios": [r["ratio"] for r in rs], "stored": [r["stored"] for r in rs],
             "bare_received": [r["bare_received"] for r in rs]}
    print(json.dumps({"bench": "recorder", "quick": args.quick, "code": str(code),
                      "command": " ".join(["bench/bench_recorder.py", *sys.argv[1:]]),
                      "n": n, "repeat": repeat, "batch_size": batch,
                      "disk_rows_per_s": disk, **summary}))


if __name__ == "__main__":
    main()
