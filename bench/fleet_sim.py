"""A fleet of simulated GPU hosts in one process, cheap enough not to eat the machine.

Run: ``.venv/bin/python bench/fleet_sim.py --broker mqtt://127.0.0.1:PORT [--hosts 250]
[--gpus 8] [--interval 1] [--seconds 600] [--incident-hosts 8] [--incident-every 15]
[--report FILE]``.

Each simulated host is what a real publisher would be on the wire:

* its own MQTT v5 connection (a raw socket: CONNECT, PUBLISH, PUBACK, PINGREQ, DISCONNECT
  written by hand, because paho's per-message cost would be the simulator's whole budget),
  whose Last Will is the retained ``offline`` (user property ``gpuheal-reason: lost``) on
  ``P/H/publisher/status``; it publishes the retained ``online`` there first (QoS 1: the
  analyzer's ``--shard`` discovers hosts from it) and says a clean goodbye (``offline``,
  ``stopped``) when the run ends;
* one Sample per GPU per interval (QoS 0, like the publisher's default) on pre-built topics,
  each a valid :class:`gpuheal.models.Sample` (strict JSON types) with H100-like readings that
  drift (utilization, power following it, temperature following power, memory) and a per-GPU
  ``seq`` starting at 0; a host's GPUs go out together in one ``send()``, and the hosts are
  spread evenly over the interval, as independent machines would be;
* injected incidents: every ``--incident-every`` seconds one GPU of one of the first
  ``--incident-hosts`` hosts (in turn) heats up towards ``--incident-temp-c`` until a healer
  throttles it (a ``set_power_limit`` below the default on ``P/H/gpu/I/sim``), restarts or
  resets it, or ``--incident-s`` passes; then it cools down. The simulator listens on those
  hosts' ``sim`` topics (one paho client: a handful of commands, not the sample stream).

The report (``--report FILE``, JSON) holds what was published (per GPU: the count and the
last ``seq``), for every incident GPU the wall time each sample was sent (to measure the time
from the sample that crosses a threshold to its Event), the commands received and the
simulator's own CPU time. The last line on stdout is the same summary as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import queue
import random
import resource
import select
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from gpuheal.mqtt import BrokerURL  # noqa: E402
from gpuheal.options import shard_of  # noqa: E402
from gpuheal.topics import Topics  # noqa: E402
from gpuheal.wire import STATUS_REASON_PROPERTY  # noqa: E402

GPU_NAME = "NVIDIA H100 80GB HBM3"
MEMORY_TOTAL_MB = 81559.0
POWER_LIMIT_W = 700.0
IDLE_POWER_W = 70.0
MEM_CLOCK_MHZ = 2619.0
MAX_SM_CLOCK_MHZ = 1980.0
IDLE_SM_CLOCK_MHZ = 345.0
TEMP_TAU_S = 20.0
"""Time constant (seconds) of the temperature's approach to its target."""
HOT_TAU_S = 12.0
"""Time constant while an incident heats the GPU up (faster: a failed fan, a blocked inlet)."""
MAX_MEMORY_PCT = 80.0
"""Healthy GPUs stay below this share of their memory (the percent profile warns at 90)."""
MAX_UTIL_PCT = 97.0
"""Healthy GPUs stay below the hang detector's 99 % (no suspected hang from noise)."""
KEEPALIVE_S = 60


# --- a minimal MQTT v5 client: just what a publisher sends ------------------------------------
def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | 0x80 if n else byte)
        if not n:
            return bytes(out)


def _str(data: bytes) -> bytes:
    return len(data).to_bytes(2, "big") + data


def _user_properties(pairs: list[tuple[str, str]]) -> bytes:
    body = b"".join(b"\x26" + _str(k.encode()) + _str(v.encode()) for k, v in pairs)
    return _varint(len(body)) + body


def publish_packet(topic: bytes, payload: bytes, *, qos: int = 0, retain: bool = False,
                   packet_id: int = 0, properties: bytes = b"\x00") -> bytes:
    """One MQTT v5 PUBLISH packet (``properties``: the encoded property block)."""
    header = 0x30 | (qos << 1) | int(retain)
    body = _str(topic) + (packet_id.to_bytes(2, "big") if qos else b"") + properties + payload
    return bytes([header]) + _varint(len(body)) + body


class MqttError(RuntimeError):
    """The broker refused or closed a simulated host's connection."""


class RawLink:
    """One MQTT v5 connection that publishes (QoS 0 samples, QoS 1 retained statuses)."""

    def __init__(self, broker: BrokerURL, client_id: str,
                 will: tuple[str, bytes, list[tuple[str, str]]] | None = None) -> None:
        self.broker = broker
        self.client_id = client_id
        self.will = will
        self.sock: socket.socket | None = None
        self._inbox = bytearray()
        self._next_id = 0
        self.acked: set[int] = set()
        self.last_send_mono = 0.0

    def connect(self, timeout_s: float = 10.0) -> None:
        sock = socket.create_connection((self.broker.host, self.broker.port), timeout_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        flags = 0x02  # clean start
        payload = _str(self.client_id.encode())
        if self.will is not None:
            topic, message, pairs = self.will
            flags |= 0x04 | (1 << 3) | 0x20  # Will, QoS 1, retained
            payload += _user_properties(pairs) + _str(topic.encode()) + _str(message)
        if self.broker.username is not None:
            flags |= 0x80
            payload += _str(self.broker.username.encode())
            if self.broker.password is not None:
                flags |= 0x40
                payload += _str(self.broker.password.encode())
        body = (_str(b"MQTT") + b"\x05" + bytes([flags]) + KEEPALIVE_S.to_bytes(2, "big")
                + b"\x00" + payload)
        sock.sendall(b"\x10" + _varint(len(body)) + body)
        self.sock = sock
        kind, data = self._read_packet(timeout_s)
        if kind != 0x20 or len(data) < 2:
            raise MqttError(f"{self.client_id}: expected CONNACK, got packet type {kind:#x}")
        if data[1] != 0:
            raise MqttError(f"{self.client_id}: the broker refused the connection "
                            f"(reason code {data[1]:#x})")
        sock.setblocking(False)
        self.last_send_mono = time.monotonic()

    def _read_packet(self, timeout_s: float) -> tuple[int, bytes]:
        """Block until one whole packet is in; returns (type nibble << 4, body)."""
        deadline = time.monotonic() + timeout_s
        while True:
            packet = self._take_packet()
            if packet is not None:
                return packet
            left = deadline - time.monotonic()
            assert self.sock is not None
            if left <= 0 or not select.select([self.sock], [], [], left)[0]:
                raise MqttError(f"{self.client_id}: no answer from the broker in {timeout_s} s")
            chunk = self.sock.recv(65536)
            if not chunk:
                raise MqttError(f"{self.client_id}: the broker closed the connection")
            self._inbox += chunk

    def _take_packet(self) -> tuple[int, bytes] | None:
        buf = self._inbox
        if len(buf) < 2:
            return None
        length, shift, pos = 0, 0, 1
        while True:
            if pos >= len(buf):
                return None
            byte = buf[pos]
            length |= (byte & 0x7F) << shift
            pos += 1
            if not byte & 0x80:
                break
            shift += 7
        if len(buf) < pos + length:
            return None
        kind = buf[0] & 0xF0
        body = bytes(buf[pos:pos + length])
        del buf[:pos + length]
        return kind, body

    def poll(self) -> None:
        """Read what the broker sent (PUBACK, PINGRESP) without blocking; ping when due."""
        assert self.sock is not None
        while True:
            try:
                chunk = self.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                break
            if not chunk:
                raise MqttError(f"{self.client_id}: the broker closed the connection")
            self._inbox += chunk
        while (packet := self._take_packet()) is not None:
            kind, body = packet
            if kind == 0x40:  # PUBACK
                if len(body) > 2 and body[2] >= 0x80:
                    raise MqttError(f"{self.client_id}: the broker refused a publication "
                                    f"(reason code {body[2]:#x})")
                self.acked.add(int.from_bytes(body[:2], "big"))
            elif kind == 0xE0:  # DISCONNECT from the server
                reason = body[0] if body else 0
                raise MqttError(f"{self.client_id}: the broker disconnected us "
                                f"(reason code {reason:#x})")
        if time.monotonic() - self.last_send_mono > KEEPALIVE_S / 2:
            self.send(b"\xc0\x00")  # PINGREQ

    def send(self, data: bytes) -> None:
        assert self.sock is not None
        view = memoryview(data)
        while view:
            try:
                sent = self.sock.send(view)
            except (BlockingIOError, InterruptedError):
                select.select([], [self.sock], [], 1.0)
                continue
            view = view[sent:]
        self.last_send_mono = time.monotonic()

    def publish_confirmed(self, topic: str, payload: bytes, *, retain: bool,
                          pairs: list[tuple[str, str]] | None = None,
                          timeout_s: float = 10.0) -> None:
        """QoS 1: send and wait for the PUBACK."""
        self._next_id = self._next_id % 65535 + 1
        pid = self._next_id
        props = _user_properties(pairs) if pairs else b"\x00"
        self.send(publish_packet(topic.encode(), payload, qos=1, retain=retain, packet_id=pid,
                                 properties=props))
        deadline = time.monotonic() + timeout_s
        while pid not in self.acked:
            if time.monotonic() > deadline:
                raise MqttError(f"{self.client_id}: no PUBACK for {topic} in {timeout_s} s")
            assert self.sock is not None
            select.select([self.sock], [], [], 0.05)
            self.poll()
        self.acked.discard(pid)

    def disconnect(self) -> None:
        if self.sock is None:
            return
        try:
            self.sock.setblocking(True)
            self.sock.sendall(b"\xe0\x00")  # DISCONNECT, normal: no Will
        except OSError:
            pass
        self.sock.close()
        self.sock = None


# --- the simulated GPUs ------------------------------------------------------------------------
@dataclass
class SimGpu:
    """One GPU's readings and how they drift (units in the names)."""

    host: str
    index: int
    topic: bytes
    prefix: bytes
    """The sample JSON up to ``"ts":`` (the parts that never change)."""
    rng: random.Random
    util_target_pct: float
    temperature_c: float
    memory_used_mb: float
    temp_offset_c: float
    util_pct: float = 0.0
    power_draw_w: float = IDLE_POWER_W
    power_limit_w: float = POWER_LIMIT_W
    seq: int = 0
    hot_until_mono: float | None = None
    """While set: an incident heats this GPU up, until then at the latest."""
    hot_target_c: float = 88.0
    thermal_tau_s: float = TEMP_TAU_S
    hot_tau_s: float = HOT_TAU_S
    sent_at: dict[str, float] = field(default_factory=dict)
    """For incident GPUs: sample ``ts`` (as written, ``%.3f``) → wall time it was sent."""

    def step(self, dt_s: float, now_mono: float) -> None:
        rng = self.rng
        if rng.random() < 0.01:  # a new job: another typical load
            self.util_target_pct = rng.choice((8.0, 35.0, 60.0, 80.0, 92.0))
        self.util_pct += (self.util_target_pct - self.util_pct) * 0.3 + rng.uniform(-4.0, 4.0)
        self.util_pct = min(MAX_UTIL_PCT, max(0.0, self.util_pct))
        cap = min(self.power_limit_w, POWER_LIMIT_W) * 0.97
        power = IDLE_POWER_W + self.util_pct / 100.0 * (POWER_LIMIT_W * 0.92 - IDLE_POWER_W)
        self.power_draw_w = min(cap, max(IDLE_POWER_W * 0.8, power + rng.uniform(-8.0, 8.0)))
        if self.hot_until_mono is not None and now_mono >= self.hot_until_mono:
            self.hot_until_mono = None
        if self.hot_until_mono is not None:
            target, tau = self.hot_target_c, self.hot_tau_s
        else:
            # healthy: at most 78 °C, under the thermal detector's hysteresis band
            target = min(78.0, 28.0 + 0.068 * self.power_draw_w + self.temp_offset_c)
            tau = self.thermal_tau_s
        self.temperature_c += (target - self.temperature_c) * (1.0 - math.exp(-dt_s / tau))
        drift = rng.uniform(-40.0, 40.0) * (1.0 if self.util_pct > 5 else 0.2)
        self.memory_used_mb = min(MEMORY_TOTAL_MB * MAX_MEMORY_PCT / 100.0,
                                  max(2048.0, self.memory_used_mb + drift))

    def payload(self, ts_text: bytes) -> bytes:
        """The Sample's JSON; ``ts_text``: its ``ts``, already formatted."""
        sm = MAX_SM_CLOCK_MHZ if self.util_pct > 2 else IDLE_SM_CLOCK_MHZ
        body = (b'%s,"seq":%d,"temperature_c":%.1f,"utilization_pct":%.1f,'
                b'"memory_used_mb":%.1f,"memory_total_mb":%.1f,"power_draw_w":%.1f,'
                b'"power_limit_w":%.1f,"sm_clock_mhz":%.1f,"mem_clock_mhz":%.1f,'
                b'"fan_pct":null,"throttle_reasons":[],"xids":[],"ecc_uncorrected":0,'
                b'"remapped_rows_pending":false,"processes":null,"available":true,'
                b'"error":null}') % (
            ts_text, self.seq, self.temperature_c, self.util_pct, self.memory_used_mb,
            MEMORY_TOTAL_MB, self.power_draw_w, self.power_limit_w, sm, MEM_CLOCK_MHZ)
        return self.prefix + body


@dataclass
class SimHost:
    name: str
    gpus: list[SimGpu]
    status_topic: str
    boot_ts: float
    link: RawLink | None = None
    start_s: float = 0.0
    """Seconds after the start of the run when this host sends its first samples."""
    incidents: bool = False
    """Whether incidents are injected here (and its ``sim`` commands obeyed)."""


@dataclass
class Incident:
    host: str
    index: int
    started_wall: float
    ended_by: str | None = None
    ended_wall: float | None = None


class FleetSim:
    """Many simulated hosts, one thread, one raw MQTT connection per host."""

    def __init__(self, broker: str, prefix: str = "gpuheal", hosts: int = 250, gpus: int = 8,
                 interval_s: float = 1.0, host_prefix: str = "fleet", incident_hosts: int = 0,
                 incident_every_s: float = 15.0, incident_s: float = 90.0,
                 incident_temp_c: float = 88.0, first_incident_s: float | None = None,
                 seed: int = 1, thermal_tau_s: float = TEMP_TAU_S,
                 incident_tau_s: float = HOT_TAU_S, ramp_s: float = 0.0) -> None:
        """``ramp_s``: the hosts join one after the other over this many seconds (a fleet
        is not switched on at once), else all start in the first interval."""
        self.broker = BrokerURL.parse(broker)
        self.topics = Topics(prefix)
        self.interval_s = interval_s
        self.incident_every_s = incident_every_s
        self.incident_s = incident_s
        self.incident_temp_c = incident_temp_c
        self.first_incident_s = incident_every_s if first_incident_s is None \
            else first_incident_s
        rng = random.Random(seed)
        boot = time.time() - 86_400.0
        self.hosts: list[SimHost] = []
        for h in range(hosts):
            name = f"{host_prefix}{h:03d}"
            sim_gpus = []
            for i in range(gpus):
                uuid = "GPU-%08x-%04x-%04x-%04x-%012x" % (  # noqa: UP031
                    rng.getrandbits(32), rng.getrandbits(16), rng.getrandbits(16),
                    rng.getrandbits(16), rng.getrandbits(48))
                prefix_json = (f'{{"v":1,"host":"{name}","index":{i},"uuid":"{uuid}",'
                               f'"name":"{GPU_NAME}","source":"sim","host_boot_ts":'
                               f'{boot + h:.3f},"ts":').encode()
                util = rng.choice((8.0, 35.0, 60.0, 80.0, 92.0))
                sim_gpus.append(SimGpu(
                    host=name, index=i, topic=self.topics.sample(name, i).encode(),
                    prefix=prefix_json, rng=random.Random(rng.getrandbits(64)),
                    util_target_pct=util, util_pct=util,
                    temperature_c=35.0 + util * 0.3, temp_offset_c=rng.uniform(-4.0, 4.0),
                    memory_used_mb=rng.uniform(4096.0, 60000.0),
                    hot_target_c=incident_temp_c, thermal_tau_s=thermal_tau_s,
                    hot_tau_s=incident_tau_s))
            self.hosts.append(SimHost(name, sim_gpus, self.topics.status(name, "publisher"),
                                      boot + h, start_s=ramp_s * h / max(1, hosts),
                                      incidents=h < incident_hosts))
        self.incident_hosts = [h for h in self.hosts if h.incidents]
        self.incidents: list[Incident] = []
        self.commands: list[dict[str, Any]] = []
        self._commands: queue.SimpleQueue[tuple[str, int, dict[str, Any], float]] = \
            queue.SimpleQueue()
        self._listener: Any = None
        self.rounds = 0
        self.published = 0
        self.late_sends = 0
        self.max_lateness_s = 0.0
        self.started_wall: float | None = None
        self.stopped_wall: float | None = None
        self.started_cpu = self.stopped_cpu = 0.0
        """CPU seconds of the process (all threads) when the publishing started and ended."""
        self.stop_event = threading.Event()

    # --- connections -------------------------------------------------------------------
    def connect(self) -> None:
        """Connect every host and publish its retained ``online`` (QoS 1, acknowledged)."""
        for host in self.hosts:
            link = RawLink(self.broker, f"gpuheal-{self.topics.prefix}-publisher-{host.name}",
                           will=(host.status_topic, b"offline",
                                 [(STATUS_REASON_PROPERTY, "lost")]))
            link.connect()
            host.link = link
        for host in self.hosts:
            assert host.link is not None
            host.link.publish_confirmed(host.status_topic, b"online", retain=True)
        if self.incident_hosts:
            self._listen_for_commands()

    def _listen_for_commands(self) -> None:
        """The healers' simulator commands for the incident hosts (low rate: paho will do)."""
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        subscribed = threading.Event()
        client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                             protocol=paho.MQTTv5)
        if self.broker.username is not None:
            client.username_pw_set(self.broker.username, self.broker.password)
        patterns = [(self.topics.gpu_pattern("sim", h.name), 1) for h in self.incident_hosts]

        def on_connect(c: Any, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
            if not rc.is_failure:
                c.subscribe(patterns)

        def on_message(_c: Any, _u: Any, msg: Any) -> None:
            parts = self.topics.parse(msg.topic)
            if parts is None or parts.index is None:
                return
            try:
                command = json.loads(msg.payload)
            except ValueError:
                return
            self._commands.put((parts.host or "", parts.index, command, time.time()))

        client.on_connect = on_connect
        client.on_subscribe = lambda *_a: subscribed.set()
        client.on_message = on_message
        client.connect(self.broker.host, self.broker.port)
        client.loop_start()
        if not subscribed.wait(10):
            raise MqttError("the simulator could not subscribe to the sim commands")
        self._listener = client

    def close(self, clean: bool = True) -> None:
        """Say goodbye: a retained ``offline`` (reason ``stopped``) per host, then disconnect.
        ``clean=False`` just drops the sockets (the broker then publishes every Will)."""
        for host in self.hosts:
            link = host.link
            if link is None or link.sock is None:
                continue
            if clean:
                try:
                    link.publish_confirmed(host.status_topic, b"offline", retain=True,
                                           pairs=[(STATUS_REASON_PROPERTY, "stopped")])
                except (MqttError, OSError) as exc:
                    print(f"fleet_sim: {exc}", file=sys.stderr)
                link.disconnect()
            else:
                link.sock.close()
                link.sock = None
        if self._listener is not None:
            self._listener.disconnect()
            self._listener.loop_stop()
            self._listener = None

    # --- incidents and commands -------------------------------------------------------------
    def _start_incident(self, n: int, now_mono: float) -> None:
        host = self.incident_hosts[n % len(self.incident_hosts)]
        gpu = host.gpus[(n // len(self.incident_hosts)) % len(host.gpus)]
        gpu.hot_until_mono = now_mono + self.incident_s
        self.incidents.append(Incident(host.name, gpu.index, time.time()))

    def _apply_commands(self) -> None:
        while True:
            try:
                host_name, index, command, at = self._commands.get_nowait()
            except queue.Empty:
                return
            self.commands.append({"host": host_name, "index": index, "at": at, **command})
            host = next((h for h in self.incident_hosts if h.name == host_name), None)
            if host is None or index >= len(host.gpus):
                continue
            gpu = host.gpus[index]
            name = command.get("command")
            limit = command.get("power_limit_w")
            if name == "set_power_limit" and isinstance(limit, int | float) and limit > 0:
                gpu.power_limit_w = float(limit)
                if limit < POWER_LIMIT_W * 0.95:
                    self._cool(gpu, "throttled")
            elif name in ("restart_service", "reset", "stop_service"):
                self._cool(gpu, name)

    def _cool(self, gpu: SimGpu, why: str) -> None:
        if gpu.hot_until_mono is None:
            return
        gpu.hot_until_mono = None
        for inc in reversed(self.incidents):
            if inc.host == gpu.host and inc.index == gpu.index and inc.ended_by is None:
                inc.ended_by, inc.ended_wall = why, time.time()
                break

    # --- the loop ------------------------------------------------------------------------------
    def run(self, seconds: float) -> None:
        """Publish for ``seconds`` of wall time (or until :attr:`stop_event`), hosts spread
        evenly over each interval."""
        slots = max(1, min(len(self.hosts), int(self.interval_s / 0.02)))
        by_slot = [self.hosts[s::slots] for s in range(slots)]
        slot_s = self.interval_s / slots
        t0 = time.monotonic()
        self.started_wall = time.time()
        self.started_cpu = time.process_time()
        end = t0 + seconds
        next_incident = t0 + self.first_incident_s if self.incident_hosts else math.inf
        n_incident = 0
        tick = 0
        last_step = {id(h): t0 - self.interval_s for h in self.hosts}
        while not self.stop_event.is_set():
            due = t0 + tick * slot_s
            if due >= end:
                break
            now = time.monotonic()
            if due > now:
                if self.stop_event.wait(due - now):
                    break
                now = time.monotonic()
            else:
                late = now - due
                if late > slot_s:
                    self.late_sends += 1
                    self.max_lateness_s = max(self.max_lateness_s, late)
            while now >= next_incident:
                self._start_incident(n_incident, now)
                n_incident += 1
                next_incident += self.incident_every_s
            self._apply_commands()
            for host in by_slot[tick % slots]:
                if now - t0 < host.start_s:
                    continue
                dt = min(now - last_step[id(host)], self.interval_s * 2)
                last_step[id(host)] = now
                wall = time.time()
                ts_text = b"%.3f" % wall
                packets = []
                for gpu in host.gpus:
                    gpu.step(dt, now)
                    packets.append(publish_packet(gpu.topic, gpu.payload(ts_text)))
                    gpu.seq += 1
                assert host.link is not None
                host.link.send(b"".join(packets))
                if host.incidents:
                    sent = time.time()
                    key = ts_text.decode()
                    for gpu in host.gpus:
                        gpu.sent_at[key] = sent
                host.link.poll()
                self.published += len(packets)
            tick += 1
            if tick % slots == 0:
                self.rounds += 1
        self.stopped_wall = time.time()
        self.stopped_cpu = time.process_time()
        self._apply_commands()

    # --- what happened -------------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        wall = (self.stopped_wall or time.time()) - (self.started_wall or time.time())
        cpu = self.stopped_cpu - self.started_cpu
        return {
            "hosts": len(self.hosts),
            "gpus": sum(len(h.gpus) for h in self.hosts),
            "interval_s": self.interval_s,
            "rounds": self.rounds,
            "published": self.published,
            "wall_s": wall,
            "cpu_s": cpu,
            "cpu_pct": 100.0 * cpu / wall if wall > 0 else None,
            "cpu_total_s": ru.ru_utime + ru.ru_stime,
            "max_rss_mb": ru.ru_maxrss / 1024.0,
            "late_sends": self.late_sends,
            "max_lateness_s": self.max_lateness_s,
            "started_wall": self.started_wall,
            "stopped_wall": self.stopped_wall,
            "per_gpu": {f"{g.host}/{g.index}": g.seq for h in self.hosts for g in h.gpus},
            "incident_hosts": [h.name for h in self.incident_hosts],
            "incidents": [vars(i) for i in self.incidents],
            "sent_at": {f"{g.host}/{g.index}": g.sent_at for h in self.incident_hosts
                        for g in h.gpus if g.sent_at},
            "commands": self.commands,
        }


def shares_of(hosts: list[str], shares: int) -> dict[int, list[str]]:
    """Which hosts each of ``shares`` analyzers serves (as ``--shard K/N`` decides)."""
    out: dict[int, list[str]] = {k: [] for k in range(1, shares + 1)}
    for name in hosts:
        out[shard_of(name, shares)].append(name)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--broker", default=os.environ.get("GPUHEAL_BROKER",
                                                       "mqtt://127.0.0.1:1883"))
    ap.add_argument("--prefix", default="gpuheal")
    ap.add_argument("--hosts", type=int, default=250)
    ap.add_argument("--gpus", type=int, default=8, help="GPUs per host")
    ap.add_argument("--interval", type=float, default=1.0, help="seconds between samples")
    ap.add_argument("--seconds", type=float, default=600.0, help="how long to publish")
    ap.add_argument("--host-prefix", default="fleet", help="host names: PREFIX000, PREFIX001…")
    ap.add_argument("--incident-hosts", type=int, default=0,
                    help="the first N hosts get incidents (in turn)")
    ap.add_argument("--incident-every", type=float, default=15.0,
                    help="seconds between two incidents")
    ap.add_argument("--first-incident", type=float, help="seconds before the first incident "
                    "(default: --incident-every)")
    ap.add_argument("--incident-s", type=float, default=90.0,
                    help="longest an incident heats its GPU when nobody heals it (seconds)")
    ap.add_argument("--incident-temp-c", type=float, default=88.0)
    ap.add_argument("--thermal-tau", type=float, default=TEMP_TAU_S,
                    help="time constant of the temperature (seconds)")
    ap.add_argument("--incident-tau", type=float, default=HOT_TAU_S,
                    help="time constant of an incident's heating (seconds)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--ramp", type=float, default=0.0,
                    help="the hosts join one after the other over this many seconds")
    ap.add_argument("--start-delay", type=float, default=2.0,
                    help="seconds between the hosts' online status and their first samples")
    ap.add_argument("--report", type=Path, help="write the JSON report here")
    ap.add_argument("--vanish", action="store_true",
                    help="end by dropping the connections (the broker publishes the Wills)")
    args = ap.parse_args(argv)
    sim = FleetSim(args.broker, args.prefix, args.hosts, args.gpus, args.interval,
                   args.host_prefix, args.incident_hosts, args.incident_every,
                   args.incident_s, args.incident_temp_c, args.first_incident, args.seed,
                   args.thermal_tau, args.incident_tau, args.ramp)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: sim.stop_event.set())
    try:
        sim.connect()
    except (MqttError, OSError) as exc:
        print(f"fleet_sim: {exc}", file=sys.stderr)
        return 1
    # like a publisher's first sampling round, which comes after its "online": analyzers that
    # discover hosts from that status (--shard) have subscribed by then
    if sim.stop_event.wait(args.start_delay):
        sim.close()
        return 0
    print(f"READY {len(sim.hosts)} hosts", flush=True)
    try:
        sim.run(args.seconds)
    except (MqttError, OSError) as exc:
        print(f"fleet_sim: {exc}", file=sys.stderr)
        sim.close(clean=False)
        return 1
    sim.close(clean=not args.vanish)
    report = sim.report()
    if args.report:
        args.report.write_text(json.dumps(report))
    summary = {k: v for k, v in report.items()
               if k not in ("per_gpu", "sent_at", "commands", "incidents")}
    summary["incidents"] = len(report["incidents"])
    summary["commands"] = len(report["commands"])
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
