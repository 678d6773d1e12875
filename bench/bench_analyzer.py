"""Benchmark of the analyzer: throughput through a real Mosquitto, and memory per GPU.

Run: ``.venv/bin/python bench/bench_analyzer.py [--gpus 1000] [--rounds 30]``. Prints a markdown
table (copy the figures into BENCHMARKS.md).

1. **Throughput.** A private Mosquitto on a free port; the analyzer service as a real
   subprocess (``python -m gpuheal analyzer``); a bare paho subscriber (a subprocess that only
   counts messages) on the same sample topics. After a warm-up round (every GPU seen once, its
   discovery published), ``gpus x rounds`` pre-serialized Samples are published as fast as one
   paho client can (QoS 0, the publisher's default). Each consumer's rate is the sample count
   over the wall time from the first publish to its last sample handled: the bare subscriber's
   last message, the analyzer's State for the last sample (it handles samples in arrival
   order). Ratio = analyzer rate / bare rate (goal >= 0.8). The analyzer's own count at exit
   shows that it processed every sample.
2. **Memory per GPU.** tracemalloc of an ``Analyzer`` engine fed 10,000 GPUs (two samples
   each, 10 % of them holding an active condition), divided by the GPU count.
3. **Engine alone.** Microseconds per sample of ``Analyzer.process`` plus serializing its
   State, in process (no broker).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from analyzer.engine import Analyzer  # noqa: E402
from gpuheal.broker import start_local_broker  # noqa: E402
from gpuheal.config import AnalyzerConfig  # noqa: E402
from gpuheal.models import Sample  # noqa: E402
from gpuheal.topics import Topics  # noqa: E402

T0 = 1_700_000_000.0
HOST = "benchhost"
PREFIX = "bench"


def make_sample(index: int, rnd: int) -> Sample:
    """A realistic reading; every 100th GPU runs hot (a thermal condition)."""
    hot = index % 100 == 0
    return Sample(
        host=HOST, index=index, uuid=f"GPU-{index:08d}", name="NVIDIA H100 80GB HBM3",
        source="sim", ts=T0 + rnd, seq=rnd,
        temperature_c=86.0 if hot else 55.0 + (index + rnd) % 7,
        utilization_pct=float((index * 7 + rnd * 13) % 100),
        memory_used_mb=20000.0 + (index * 31 + rnd * 97) % 5000, memory_total_mb=81559.0,
        power_draw_w=250.0 + (index + rnd * 3) % 150, power_limit_w=700.0,
        sm_clock_mhz=1980.0, mem_clock_mhz=2619.0, fan_pct=None,
    )


def client() -> paho.Client:
    return paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)


# --- the bare subscriber (its own process) ---------------------------------------------------
def bare_subscriber(port: int, pattern: str, expected: int, timeout_s: float) -> None:
    """Count messages; print READY once subscribed, then a JSON line with the times."""
    seen = {"count": 0, "first": None, "last": None}
    done = threading.Event()

    def on_message(_c: object, _u: object, _m: object) -> None:
        now = time.time()
        if seen["first"] is None:
            seen["first"] = now
        seen["count"] += 1
        seen["last"] = now
        if seen["count"] >= expected:
            done.set()

    c = client()
    c.on_message = on_message
    c.on_subscribe = lambda *a: print("READY", flush=True)
    c.on_connect = lambda cl, *a: cl.subscribe(pattern, qos=1)
    c.connect("127.0.0.1", port)
    c.loop_start()
    done.wait(timeout_s)
    c.loop_stop()
    print(json.dumps(seen), flush=True)


# --- throughput through the broker -----------------------------------------------------------
def wait_retained(port: int, topic: str, want: bytes, timeout_s: float = 30.0) -> None:
    got = threading.Event()
    c = client()
    c.on_message = lambda _c, _u, m: got.set() if m.payload == want else None
    c.on_connect = lambda cl, *a: cl.subscribe(topic, qos=1)
    c.connect("127.0.0.1", port)
    c.loop_start()
    try:
        if not got.wait(timeout_s):
            raise SystemExit(f"timed out waiting for {want!r} on {topic}")
    finally:
        c.disconnect()
        c.loop_stop()


def bench_throughput(port: int, workdir: Path, gpus: int, rounds: int,
                     state_min_interval_s: float = 0.0) -> dict[str, float]:
    """One run: analyzer and bare subscriber on the same stream (see the module docstring)."""
    prefix = f"{PREFIX}{int(state_min_interval_s * 1000)}"
    topics = Topics(prefix)
    cfg = workdir / f"analyzer-{prefix}.toml"
    cfg.write_text(f"[analyzer]\nstate_min_interval_s = {state_min_interval_s}\n"
                   "[analyzer.unavailable]\nmin_timeout_s = 3600.0\n")
    url = f"mqtt://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    log_path = workdir / f"analyzer-{prefix}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gpuheal", "analyzer", "--broker", url, "--prefix", prefix,
             "--host-name", "benchsite", "--config", str(cfg), "--log-level", "INFO"],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    bare = None
    try:
        wait_retained(port, topics.status("benchsite", "analyzer"), b"online")
        warm = [make_sample(i, 0).to_json() for i in range(gpus)]
        payloads = [(topics.sample(HOST, i), make_sample(i, r).to_json())
                    for r in range(1, rounds + 1) for i in range(gpus)]
        # the last sample raises a condition, so its State is published even when coalescing
        last = make_sample(gpus - 1, rounds).model_copy(update={"temperature_c": 95.0})
        payloads[-1] = (topics.sample(HOST, gpus - 1), last.to_json())
        total = len(payloads)
        marker_topic = topics.state(HOST, gpus - 1)
        marker_ts = T0 + rounds
        warm_ts = T0

        marker = {"warm": threading.Event(), "done": threading.Event(), "at": 0.0}

        def on_state(_c: object, _u: object, m: paho.MQTTMessage) -> None:
            ts = json.loads(m.payload)["ts"]
            if ts >= warm_ts:
                marker["warm"].set()
            if ts >= marker_ts and not marker["done"].is_set():
                marker["at"] = time.time()
                marker["done"].set()

        watcher = client()
        watcher.on_message = on_state
        watcher.connect("127.0.0.1", port)
        watcher.subscribe(marker_topic, qos=1)
        watcher.loop_start()

        pub = client()
        pub.connect("127.0.0.1", port)
        pub.loop_start()
        for i, p in enumerate(warm):
            pub.publish(topics.sample(HOST, i), p, qos=0)
        if not marker["warm"].wait(120):
            raise SystemExit("analyzer did not finish the warm-up round")

        bare = subprocess.Popen(
            [sys.executable, __file__, "--bare-subscriber", str(port),
             topics.gpu_pattern("sample"), str(total)],
            stdout=subprocess.PIPE, text=True, env=env)
        assert bare.stdout is not None
        if bare.stdout.readline().strip() != "READY":
            raise SystemExit("bare subscriber did not start")

        t0 = time.time()
        for topic, p in payloads:
            pub.publish(topic, p, qos=0)
        t_published = time.time()
        if not marker["done"].wait(600):
            raise SystemExit("analyzer did not process the stream")
        bare_out = json.loads(bare.stdout.readline())
        pub.disconnect()
        pub.loop_stop()
        watcher.disconnect()
        watcher.loop_stop()
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
        if bare is not None and bare.poll() is None:
            bare.kill()
    log_text = log_path.read_text(errors="replace")
    m = re.search(r"(\d+) samples processed", log_text)
    processed = int(m.group(1)) if m else -1
    bare_rate = bare_out["count"] / (bare_out["last"] - t0)
    analyzer_rate = total / (marker["at"] - t0)
    return {
        "samples": total,
        "gpus": gpus,
        "publish_rate": total / (t_published - t0),
        "bare_rate": bare_rate,
        "bare_count": bare_out["count"],
        "analyzer_rate": analyzer_rate,
        "analyzer_processed": processed - gpus,
        "ratio": analyzer_rate / bare_rate,
        "state_min_interval_s": state_min_interval_s,
    }


# --- memory per GPU ----------------------------------------------------------------------------
def bench_memory(gpus: int) -> dict[str, float]:
    gc.collect()
    tracemalloc.start()
    engine = Analyzer(AnalyzerConfig(), started_ts=T0, clock=lambda: 0.0)
    base, _ = tracemalloc.get_traced_memory()
    for rnd in range(2):
        for i in range(gpus):
            s = make_sample(i, rnd)
            if i % 10 == 0:
                s = s.model_copy(update={"temperature_c": 84.0})
            engine.process(s)
    gc.collect()
    current, _peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    active = sum(1 for h, i in engine.gpus() if engine.track(h, i).active)
    return {"gpus": len(engine), "bytes": current - base, "per_gpu": (current - base) / gpus,
            "active": active}


# --- the engine alone ------------------------------------------------------------
def bench_engine(gpus: int, rounds: int) -> dict[str, float]:
    samples = [make_sample(i, r) for r in range(rounds) for i in range(gpus)]
    engine = Analyzer(AnalyzerConfig(), started_ts=T0, clock=time.time)
    t = time.perf_counter()
    for s in samples:
        for out in engine.process(s):
            out.to_json()
    elapsed = time.perf_counter() - t
    return {"us_per_sample": elapsed / len(samples) * 1e6, "rate": len(samples) / elapsed}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gpus", type=int, default=1000, help="GPUs in the throughput stream")
    ap.add_argument("--rounds", type=int, default=30, help="samples per GPU in the stream")
    ap.add_argument("--memory-gpus", type=int, default=10_000)
    ap.add_argument("--coalesced-interval", type=float, default=5.0,
                    help="state_min_interval_s of the second run (event-time seconds)")
    ap.add_argument("--bare-subscriber", nargs=3, metavar=("PORT", "PATTERN", "N"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.bare_subscriber:
        port, pattern, n = args.bare_subscriber
        bare_subscriber(int(port), pattern, int(n), timeout_s=600)
        return 0
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-analyzer-") as tmp:
        broker = start_local_broker(Path(tmp) / "mosquitto")
        try:
            for interval in (0.0, args.coalesced_interval):
                runs.append(bench_throughput(broker.port, Path(tmp), args.gpus, args.rounds,
                                             interval))
        finally:
            broker.stop()
    mem = bench_memory(args.memory_gpus)
    eng = bench_engine(1000, 20)
    cores = os.cpu_count()
    tp = runs[0]
    print(f"\n### Analyzer ({cores} CPU cores, Python {sys.version.split()[0]}; "
          f"{tp['samples']:,} samples of {tp['gpus']:,} GPUs, QoS 0, one publisher)\n")
    print("| State published | publisher | bare paho subscriber | analyzer service "
          "| ratio (goal >= 0.8) |")
    print("|---|---|---|---|---|")
    for tp in runs:
        every = ("every sample" if not tp["state_min_interval_s"]
                 else f"coalesced, at most every {tp['state_min_interval_s']:g} s per GPU")
        print(f"| {every} | {tp['publish_rate']:,.0f} /s | {tp['bare_rate']:,.0f} /s "
              f"({tp['bare_count']:,} received) | {tp['analyzer_rate']:,.0f} /s "
              f"({tp['analyzer_processed']:,} processed) | {tp['ratio']:.2f} |")
    print()
    print("| engine alone (process + State JSON) | memory per tracked GPU |")
    print("|---|---|")
    print(f"| {eng['us_per_sample']:.1f} µs/sample ({eng['rate']:,.0f} samples/s) "
          f"| {mem['per_gpu'] / 1024:.2f} KiB ({mem['bytes'] / 1e6:.1f} MB for "
          f"{mem['gpus']:,} GPUs, {mem['active']:,} with an active condition) |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
