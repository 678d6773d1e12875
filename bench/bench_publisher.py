"""Publisher CPU cost (a benchmark, not a test): prints a markdown table.

1. One nvidia-smi sample: spawning ``nvidia-smi --query-gpu=... --format=csv`` and parsing its
   output, with the stand-in executable ``tests/fixtures/bin/nvidia-smi`` answering from a real
   H100 capture. The publisher's own CPU (spawn, wait, parse) is what this measures; the
   stand-in's CPU (a Python interpreter start) is shown apart and says nothing about the real
   nvidia-smi, whose cost depends on the driver.
2. One NVML sample of one GPU through the query helper, with a pure-Python stand-in for
   pynvml (no GPU here): the helper's own overhead only, not the driver's time in NVML.
3. The publisher service with 8 simulated GPUs at a 1 s interval, run ``--speed`` times faster
   for ``--seconds`` of wall time against a private Mosquitto; CPU per round and per sample,
   and the CPU share that makes at 1 Hz (one round per second).
4. The MQTT publish path alone: CPU per QoS 0 publication of a Sample through the Bus
   (gpuheal's client) and through stock paho with an ``on_publish`` callback set, as the Bus
   sets one (paho then builds a ReasonCode and Properties for every message it sends).

Run: ``.venv/bin/python bench/bench_publisher.py [--quick] [--seconds 20] [--speed 20]``.
Prints a markdown table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import paho.mqtt.client as paho  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

from gpuheal.broker import start_local_broker  # noqa: E402
from gpuheal.config import GpuhealConfig  # noqa: E402
from gpuheal.mqtt import Bus  # noqa: E402
from gpuheal.options import CommonOptions, PublisherOptions  # noqa: E402
from gpuheal.runtime import Component  # noqa: E402
from gpuheal.topics import Topics  # noqa: E402
from publisher.service import PublisherService  # noqa: E402
from publisher.sources.nvml import NvmlQuery  # noqa: E402
from publisher.sources.smi import SmiSource  # noqa: E402
from tests.test_publisher_nvml import FakeNvml  # noqa: E402

FIXTURES = REPO / "tests" / "fixtures"
CAPTURE = FIXTURES / "real" / "smi-csv_h100-80gb-hbm3_utkuozdemir.csv"


def children_cpu() -> float:
    t = os.times()
    return t.children_user + t.children_system


def bench_smi(rounds: int) -> tuple[float, float, float]:
    """(own CPU ms, stand-in CPU ms, wall ms) per nvidia-smi sample."""
    os.environ["FAKE_SMI_CAPTURE"] = str(CAPTURE)
    source = SmiSource(str(FIXTURES / "bin" / "nvidia-smi"), timeout_s=10).open()
    cpu0, child0, wall0 = time.process_time(), children_cpu(), time.perf_counter()
    for _ in range(rounds):
        source.read(time.time())
    own = (time.process_time() - cpu0) / rounds * 1000
    child = (children_cpu() - child0) / rounds * 1000
    return own, child, (time.perf_counter() - wall0) / rounds * 1000


def bench_nvml(rounds: int) -> float:
    """Own CPU µs per NVML sample of one GPU (stand-in pynvml)."""
    query = NvmlQuery(FakeNvml(gpus=1))
    query.init()
    query.sample(0)
    cpu0 = time.process_time()
    for _ in range(rounds):
        query.sample(0)
    return (time.process_time() - cpu0) / rounds * 1e6


def bench_service(seconds: float, speed: float, gpus: int) -> dict[str, float]:
    """The sampling thread and paho's network thread of a publisher, measured together (the
    bench's own process: nothing else runs in it meanwhile)."""
    with tempfile.TemporaryDirectory() as tmp:
        broker = start_local_broker(Path(tmp) / "broker")
        try:
            common = CommonOptions(broker=broker.url, prefix="bench", host_name="bench",
                                   config=GpuhealConfig())
            opts = PublisherOptions(common=common, source="sim", scenario="healthy-busy",
                                    speed=speed, interval_s=1.0, gpus=gpus)
            svc = PublisherService(opts)
            component = Component(svc, common)
            component.bus.start()
            if not component.bus.wait_connected(10):
                raise SystemExit("the private broker did not answer")
            cpu0, wall0 = time.process_time(), time.perf_counter()
            svc.start()
            svc.finished.wait(seconds)  # a fixed stretch of wall time (it never finishes)
            svc.stop()
            cpu = time.process_time() - cpu0
            wall = time.perf_counter() - wall0
            component.bus.stop()
        finally:
            broker.stop()
    return {"rounds": svc.rounds, "samples": svc.published, "cpu_s": cpu, "wall_s": wall}


def bench_publish_path(n: int) -> dict[str, float]:
    """CPU µs per QoS 0 Sample publication: the Bus (gpuheal's client) and stock paho with an
    on_publish callback, each until every message is written to the socket."""
    payload = b"x" * 620
    topic = Topics("bench").sample("bench", 0)
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        broker = start_local_broker(Path(tmp) / "broker")
        try:
            bus = Bus(broker.url, "publisher", "bench", Topics("bench"), announce_status=False)
            if not bus.start(wait_s=10):
                raise SystemExit("the private broker did not answer")
            stock = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                                protocol=paho.MQTTv5)
            stock.on_publish = lambda *_a: None
            stock.connect("127.0.0.1", broker.port)
            stock.loop_start()
            for name, send in (("bus", lambda: bus.publish(topic, payload, qos=0)),
                               ("stock", lambda: stock.publish(topic, payload, qos=0))):
                cpu0 = time.process_time()
                infos = [send() for _ in range(n)]
                last = infos[-1]
                (last.wait if name == "bus" else last.wait_for_publish)(30)
                out[name] = (time.process_time() - cpu0) / n * 1e6
            stock.disconnect()
            stock.loop_stop()
            bus.stop()
        finally:
            broker.stop()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run")
    parser.add_argument("--seconds", type=float, default=None,
                        help="wall seconds of service run (default 20)")
    parser.add_argument("--speed", type=float, default=20.0, help="simulated time speed-up")
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--smi-rounds", type=int, default=None, help="default 30")
    parser.add_argument("--nvml-rounds", type=int, default=None, help="default 20000")
    parser.add_argument("--publish-n", type=int, default=None, help="default 20000")
    args = parser.parse_args()
    seconds = args.seconds or (5.0 if args.quick else 20.0)
    smi_rounds = args.smi_rounds or (5 if args.quick else 30)
    nvml_rounds = args.nvml_rounds or (2000 if args.quick else 20000)
    publish_n = args.publish_n or (5000 if args.quick else 20000)

    smi_own, smi_child, smi_wall = bench_smi(smi_rounds)
    nvml_us = bench_nvml(nvml_rounds)
    svc = bench_service(seconds, args.speed, args.gpus)
    path = bench_publish_path(publish_n)
    per_round_ms = svc["cpu_s"] / svc["rounds"] * 1000
    per_sample_us = svc["cpu_s"] / max(1, svc["samples"]) * 1e6

    print(f"CPU: {os.cpu_count()} cores; Python {sys.version.split()[0]}\n")
    print("| measurement | figure | note |")
    print("|---|---|---|")
    print(f"| nvidia-smi sample (spawn + wait + parse), publisher CPU | {smi_own:.2f} ms | "
          f"stand-in answering from the H100 capture, {smi_rounds} calls |")
    print(f"| nvidia-smi stand-in's own CPU per call | {smi_child:.1f} ms | a Python start-up, "
          "not the real nvidia-smi |")
    print(f"| nvidia-smi sample, wall | {smi_wall:.1f} ms | dominated by the stand-in |")
    print(f"| NVML sample of one GPU through the query helper | {nvml_us:.1f} µs | pure-Python "
          "pynvml stand-in: helper overhead only, no driver time |")
    print(f"| publisher, {args.gpus} simulated GPUs: CPU per round | {per_round_ms:.2f} ms | "
          f"{svc['rounds']} rounds in {svc['wall_s']:.1f} s wall at speed {args.speed:g}, "
          "sampling + JSON + MQTT publish (QoS 0) |")
    print(f"| publisher: CPU per sample | {per_sample_us:.0f} µs | {svc['samples']} samples |")
    print(f"| publisher at 1 Hz, {args.gpus} GPUs: CPU share | "
          f"{per_round_ms / 10:.3f} % of one core | CPU per round / 1 s |")
    print(f"| QoS 0 publication through the Bus, CPU | {path['bus']:.1f} µs | {publish_n} "
          "messages of 620 bytes, until written |")
    print(f"| the same through stock paho with on_publish set | {path['stock']:.1f} µs | "
          "paho builds a ReasonCode and Properties per message |")
    print(json.dumps({"bench": "publisher", "quick": args.quick,
                      "command": " ".join(["bench/bench_publisher.py", *sys.argv[1:]]),
                      "smi_own_ms": smi_own, "nvml_us": nvml_us,
                      "cpu_per_round_ms": per_round_ms, "cpu_per_sample_us": per_sample_us,
                      "cpu_share_1hz_pct": per_round_ms / 10, "rounds": svc["rounds"],
                      "publish_bus_us": path["bus"], "publish_stock_us": path["stock"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
