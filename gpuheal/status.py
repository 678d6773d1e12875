"""``gpuheal status``: every GPU's retained State on the broker, as a table."""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO

import paho.mqtt.client as paho

from gpuheal.models import PayloadError, State, parse_payload
from gpuheal.mqtt import Bus
from gpuheal.options import CommonOptions

QUIET_S = 0.3
"""Retained messages arrive in one burst after subscribing; stop after this much quiet."""


def collect_states(common: CommonOptions, timeout_s: float = 2.0) -> list[State]:
    """Subscribe to every State and gather the retained ones (no status announced)."""
    states: dict[tuple[str, int], State] = {}
    last = [time.monotonic()]
    lock = threading.Lock()

    def on_state(msg: paho.MQTTMessage) -> None:
        if not msg.payload:
            return
        try:
            state = parse_payload(State, msg.payload)
        except PayloadError:
            return
        with lock:
            states[(state.host, state.index)] = state
            last[0] = time.monotonic()

    bus = Bus(common.broker, "dashboard", common.host_name, common.topics,
              announce_status=False)
    bus.subscribe(common.topics.gpu_pattern("state", common.only_host), on_state, qos=1)
    if not bus.start(wait_s=timeout_s):
        bus.stop()
        raise ConnectionError(
            f"no broker answered at {bus.broker.redacted()}"
            + (f" ({bus.last_connect_error})" if bus.last_connect_error else "")
        )
    last[0] = time.monotonic()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with lock:
            quiet = time.monotonic() - last[0]
        if quiet >= QUIET_S:
            break
        time.sleep(0.05)
    bus.stop()
    return sorted(states.values(), key=lambda s: (s.host, s.index))


def _fmt(value: float | None, unit: str = "", digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}{unit}"


def format_table(states: list[State]) -> str:
    header = ("HOST", "GPU", "NAME", "HEALTH", "ERROR", "TEMP", "UTIL", "MEMORY", "POWER",
              "UPDATED")
    rows = [header]
    for s in states:
        mem = (f"{_fmt(s.memory.used_mb)}/{_fmt(s.memory.total_mb)} MiB"
               if s.memory.total_mb is not None else _fmt(s.memory.used_mb, " MiB"))
        rows.append((
            s.host, str(s.index), (s.name or "-")[:36], s.health, s.error,
            _fmt(s.temperature, " C"), _fmt(s.utilization, " %"), mem,
            _fmt(s.power.draw_w, " W", 1), s.timestamp,
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)


def print_status(common: CommonOptions, timeout_s: float = 2.0, as_json: bool = False,
                 out: TextIO = sys.stdout) -> int:
    try:
        states = collect_states(common, timeout_s)
    except ConnectionError as exc:
        print(f"gpuheal status: {exc}", file=sys.stderr)
        return 2
    if as_json:
        for s in states:
            out.write(s.model_dump_json() + "\n")
        return 0
    if not states:
        print(f"gpuheal status: no GPU state under {common.prefix}/ on the broker",
              file=sys.stderr)
        return 1
    out.write(format_table(states) + "\n")
    return 0
