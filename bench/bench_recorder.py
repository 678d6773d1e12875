"""Recorder throughput: rows/s stored from a real Mosquitto against a bare paho subscriber
receiving the same stream in the same run (goal: ratio >= 0.8), and the raw SQLite insert
rate as the disk's limit. Prints a markdown table.

    .venv/bin/python bench/bench_recorder.py [--n 20000] [--dir DIR]

Scenarios (all with Sample payloads as the publisher sends them):

* ``disk``: ``executemany`` of the recorder's own INSERT into a fresh recording, in
  transactions of ``batch_size`` rows, WAL, ``synchronous=FULL`` — the ceiling.
* ``backlog QoS 1``: N samples wait in both clients' persistent sessions (the broker queued
  them while both were away); each then drains its backlog alone: the bare subscriber
  (auto-ack), then the recorder (store, commit, then ack). Its capacity, with the broker's
  in-flight window (``max_inflight_messages 100``) as the only pacing.
* ``live QoS 1`` / ``live QoS 0``: a publisher process sends N samples as fast as it can while
  both subscribe (each in its own process); each side's rate = what it handled / (last - first).

Each side's rate counts from its first message to its last one handled (received, for the
bare subscriber; committed, for the recorder). Roles ``--role bare`` / ``--role publish`` run
this file as a helper process.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from gpuheal.broker import start_local_broker  # noqa: E402
from gpuheal.config import GpuhealConfig  # noqa: E402
from gpuheal.models import Sample  # noqa: E402
from gpuheal.mqtt import BrokerURL  # noqa: E402
from gpuheal.options import CommonOptions, RecorderOptions  # noqa: E402
from gpuheal.topics import Topics  # noqa: E402
from recorder.rows import record_for  # noqa: E402
from recorder.schema import COLUMNS  # noqa: E402
from recorder.service import Recorder  # noqa: E402
from recorder.store import _SQL, Store  # noqa: E402

HOSTS = 4
GPUS = 8


def sample_payload(i: int, t0: float = 1_700_000_000.0) -> tuple[str, int, bytes]:
    """(host, index, payload) of the i-th sample of a fleet of HOSTS x GPUS GPUs."""
    host, index = f"node{i % HOSTS}", (i // HOSTS) % GPUS
    s = Sample(host=host, index=index, uuid=f"GPU-{host}-{index}", name="NVIDIA H100",
               source="nvml", ts=t0 + i * 0.01, seq=i, temperature_c=60.0 + i % 20,
               utilization_pct=float(i % 100), memory_used_mb=40_000.0 + i % 1000,
               memory_total_mb=81_559.0, power_draw_w=350.0, power_limit_w=700.0,
               sm_clock_mhz=1980.0, mem_clock_mhz=2619.0, fan_pct=None,
               throttle_reasons=[], xids=[], ecc_uncorrected=0,
               processes=[{"pid": 4242, "name": "ollama", "used_mb": 39_000.0}])
    return host, index, s.to_json()


def _client(client_id: str = "", clean_start: bool = True) -> paho.Client:
    return paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id,
                       protocol=paho.MQTTv5)


def _connect(c: paho.Client, url: str, clean_start: bool = True) -> None:
    b = BrokerURL.parse(url)
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600
    c.connect(b.host, b.port, clean_start=clean_start, properties=props)


# --- helper roles (own processes) -------------------------------------------------------------
def role_bare(url: str, pattern: str, n: int, client_id: str, setup: bool,
              idle_s: float) -> None:
    """A bare paho subscriber: auto-ack, counts messages, prints its timing as JSON. Ends at
    ``n`` messages, or ``idle_s`` seconds after the last one (QoS 0 may drop some)."""
    ready = threading.Event()
    times: dict[str, float] = {}
    got = [0]

    def on_message(_c: object, _u: object, _m: paho.MQTTMessage) -> None:
        got[0] += 1
        now = time.monotonic()
        times.setdefault("first", now)
        times["last"] = now

    c = _client(client_id)
    c.on_message = on_message
    c.on_subscribe = lambda *_a: ready.set()
    c.on_connect = lambda cl, *_a: cl.subscribe(pattern, qos=1)
    _connect(c, url, clean_start=False)
    c.loop_start()
    ready.wait(10)
    print("ready", flush=True)
    deadline = time.monotonic() + 300
    while not setup and got[0] < n and time.monotonic() < deadline:
        last = times.get("last")
        if last is not None and time.monotonic() - last > idle_s:
            break
        time.sleep(0.01)
    c.disconnect()
    c.loop_stop()
    if not setup:
        print(json.dumps({"n": got[0], "first": times.get("first"), "last": times.get("last")}),
              flush=True)


def role_publish(url: str, prefix: str, n: int, qos: int, offset: int = 0) -> None:
    """Publish n samples (seq from ``offset``) as fast as the broker takes them."""
    topics = Topics(prefix)
    msgs = [(topics.sample(h, i), p)
            for h, i, p in (sample_payload(k) for k in range(offset, offset + n))]
    c = _client()
    c.max_inflight_messages_set(1000)
    _connect(c, url)
    c.loop_start()
    t0 = time.monotonic()
    infos = [c.publish(topic, payload, qos=qos) for topic, payload in msgs]
    for info in infos:
        info.wait_for_publish(60)
    print(json.dumps({"elapsed": time.monotonic() - t0}), flush=True)
    c.disconnect()
    c.loop_stop()


def _helper(args: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE,
                            text=True, cwd=REPO, env=os.environ | {"PYTHONPATH": str(REPO)})


def _start_bare(url: str, pattern: str, n: int, client_id: str,
                setup: bool = False) -> subprocess.Popen[str]:
    p = _helper(["--role", "bare", "--url", url, "--pattern", pattern, "--n", str(n),
                 "--client-id", client_id, "--idle-s", "2"] + (["--setup"] if setup else []))
    assert p.stdout is not None
    line = p.stdout.readline().strip()
    if line != "ready":
        raise RuntimeError(f"bare subscriber did not start: {line!r}")
    return p


def _bare_result(p: subprocess.Popen[str]) -> dict[str, float]:
    out, _ = p.communicate(timeout=300)
    result = json.loads(out.strip().splitlines()[-1])
    return result


# --- scenarios -------------------------------------------------------------------------------
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


def _recorder(url: str, prefix: str, db: Path, client_id: str) -> Recorder:
    common = CommonOptions(broker=url, prefix=prefix, host_name="bench", config=GpuhealConfig())
    return Recorder(RecorderOptions(common=common, db=db, client_id=client_id))


def _wait(pred, timeout_s: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.005)


def _recorder_rate(rec: Recorder, n: int, base: int = 0) -> tuple[float, int]:
    """Samples/s from the first message received to the last commit, once caught up."""
    _wait(lambda: rec.stats.committed - base >= n, 300, f"recorder to commit {n}")
    _caught_up(rec)
    s = rec.stats
    assert s.first_received_mono is not None and s.last_commit_mono is not None
    return n / max(1e-9, s.last_commit_mono - s.first_received_mono), s.committed - base


def _caught_up(rec: Recorder) -> None:
    _wait(lambda: len(rec.buffer) == 0 and rec.stats.committed == rec.stats.received, 120,
          "the recorder to store all it received")


def _online(rec: Recorder, timeout_s: float = 10) -> None:
    _wait(lambda: rec.stats.committed >= 1, timeout_s, "the recorder's own status row")


def bench_backlog(url: str, workdir: Path, n: int, reps: int) -> list[tuple[float, float]]:
    """(bare, recorder) drain rates, one pair per repetition."""
    prefix = "bl"
    topics = Topics(prefix)
    pattern = topics.gpu_pattern("sample")
    db = workdir / "backlog.db"
    # 1. create both persistent sessions, then leave
    _start_bare(url, pattern, n, "bench-bare-bl", setup=True).wait(30)
    rec = _recorder(url, prefix, db, "bench-rec-bl")
    rec.start()
    _online(rec)
    rec.stop()
    pairs = []
    for rep in range(reps):
        # 2. the stream arrives while both are away: the broker queues it for both
        pub = _helper(["--role", "publish", "--url", url, "--prefix", prefix, "--n", str(n),
                       "--qos", "1", "--offset", str(rep * n)])
        pub.communicate(timeout=300)
        # 3. each drains its backlog alone
        bare = _bare_result(_start_bare(url, pattern, n, "bench-bare-bl"))
        bare_rate = bare["n"] / (bare["last"] - bare["first"])
        rec = _recorder(url, prefix, db, "bench-rec-bl")
        rec.start()
        rec_rate, _ = _recorder_rate(rec, n)  # + its own status rows: within noise
        rec.stop()
        pairs.append((bare_rate, rec_rate))
    return pairs


def bench_live(url: str, workdir: Path, n: int, qos: int) -> tuple[float, float, int, int]:
    prefix = f"live{qos}"
    topics = Topics(prefix)
    bare = _start_bare(url, topics.gpu_pattern("sample"), n, f"bench-bare-live{qos}")
    rec = _recorder(url, prefix, workdir / f"live{qos}.db", f"bench-rec-live{qos}")
    rec.start()
    _online(rec)
    _caught_up(rec)
    base = rec.stats.committed
    rec.stats.first_received_mono = None
    pub = _helper(["--role", "publish", "--url", url, "--prefix", prefix, "--n", str(n),
                   "--qos", str(qos)])
    pub.communicate(timeout=300)
    got = _bare_result(bare)  # ends at n, or 2 s after its last message
    _caught_up(rec)
    s = rec.stats
    stored = s.committed - base
    rec_rate = stored / max(1e-9, (s.last_commit_mono or 0) - (s.first_received_mono or 0))
    rec.stop()
    bare_rate = got["n"] / max(1e-9, got["last"] - got["first"]) if got["n"] else 0.0
    return bare_rate, rec_rate, int(got["n"]), stored


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20_000, help="samples per scenario")
    ap.add_argument("--dir", type=Path, default=None, help="where the SQLite files go")
    ap.add_argument("--role", choices=["bare", "publish"])
    ap.add_argument("--url")
    ap.add_argument("--pattern")
    ap.add_argument("--prefix")
    ap.add_argument("--client-id")
    ap.add_argument("--qos", type=int, default=1)
    ap.add_argument("--setup", action="store_true")
    ap.add_argument("--idle-s", type=float, default=2.0)
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=3, help="backlog repetitions (median)")
    args = ap.parse_args()
    if args.role == "bare":
        role_bare(args.url, args.pattern, args.n, args.client_id, args.setup, args.idle_s)
        return
    if args.role == "publish":
        role_publish(args.url, args.prefix, args.n, args.qos, args.offset)
        return

    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("paho").setLevel(logging.CRITICAL)  # paho's loop noise at disconnect
    n = min(args.n, 90_000)  # the broker queues at most 100000 per client
    workdir = Path(tempfile.mkdtemp(prefix="bench-recorder-", dir=args.dir))
    batch = GpuhealConfig().recorder.batch_size
    disk = bench_disk(workdir, n, batch)
    broker = start_local_broker(workdir / "mosquitto")
    try:
        backlog = bench_backlog(broker.url, workdir, n, max(1, args.repeat))
        lv1 = bench_live(broker.url, workdir, n, qos=1)
        lv0 = bench_live(broker.url, workdir, n, qos=0)
    finally:
        broker.stop()

    print(f"Recorder throughput, {n} samples per scenario, {platform.machine()} "
          f"{os.cpu_count()} CPUs, Python {platform.python_version()}, SQLite "
          f"{sqlite3.sqlite_version}, synchronous=FULL, batch {batch}, files in {workdir}\n")
    bl_bare = statistics.median(b for b, _ in backlog)
    bl_rec = statistics.median(r for _, r in backlog)
    bl_ratio = statistics.median(r / b for b, r in backlog)
    print("| scenario | bare paho subscriber (msg/s) | recorder (rows/s) | ratio | note |")
    print("|---|---:|---:|---:|---|")
    print(f"| disk: raw executemany | | {disk:,.0f} | | SQLite limit on this disk |")
    print(f"| backlog QoS 1 (drain) | {bl_bare:,.0f} | {bl_rec:,.0f} | {bl_ratio:.2f} | "
          f"median of {len(backlog)} (ratios "
          f"{', '.join(f'{r / b:.2f}' for b, r in backlog)}); commit before ack |")
    for name, (b, r, got_b, got_r) in (("live QoS 1", lv1), ("live QoS 0", lv0)):
        ratio = f"{r / b:.2f}" if b else "n/a"
        print(f"| {name} | {b:,.0f} | {r:,.0f} | {ratio} | received {got_b}/{n}, "
              f"stored {got_r}/{n} |")


if __name__ == "__main__":
    main()
