"""Hostile input at every subscribed topic of every component (hypothesis).

One Mosquitto serves the module; the five components run as real subprocesses
(``python -m gpuheal ...``, simulated GPU, scenario ``healthy``). Hypothesis throws malformed,
oversized and wrongly-typed payloads at every topic a component subscribes to: random bytes,
non-UTF-8, non-JSON, JSON arrays and scalars, NaN/Infinity tokens, huge numbers, deep nesting,
host names with ``/``, ``+``, ``#``, negative and out-of-range indices, a JSON type that is
almost right (``"index": 0.0``, ``"v": true``) and valid-looking messages with one field wrong.

The oracle is the contract, not a copy of it. What each component subscribes to, and with
which model, is asked of the component itself (its service attached to a Bus that notes the
subscriptions). A payload on a topic is then judged by :func:`gpuheal.wire.decode` with that
model and :func:`gpuheal.wire.topic_mismatch` (a topic the contract cannot parse is refused;
an empty payload is a cleared retained topic, never a dead letter); the Bus dead-letters what
they refuse. Two handlers refuse more, and dead-letter it too: the publisher a simulator
command for a GPU it does not simulate, the recorder a row its table cannot hold (its pure
row builder, :func:`recorder.rows.record_of`, says which).

Every message is followed on the same topic by a sentinel that every subscriber refuses; once
the sentinel's dead letters are back, the components have handled the fuzz message, and each
one's dead letters since the previous sentinel must be exactly what the oracle expects. At the
end: every component is still online *and working*, the healer took no action (only
``skipped`` decisions for GPUs it has never seen), no simulator command was sent, no component
logged a traceback, each exits 0, and the dead-letter totals match (the recorder's from its
SQLite ``deadletter`` table, since it does not republish bad input; it also keeps the others').

Messages a consumer would *accept* and act on (a valid sample for the served host, a valid
event for GPU 0...) are not fuzz: they are left out (``assume``), except where acting on them
is harmless (another host's messages, a no-op ``healer/set``, events for GPUs the healer has
never seen, which it may only skip, Home Assistant's birth message).

Poison messages this fuzz found are pinned in tests/test_fuzz_poison.py.
"""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from paho.mqtt.client import topic_matches_sub
from pydantic import BaseModel

from gpuheal.broker import PrivateBroker, read_template, start_local_broker
from gpuheal.models import (
    MAX_TS,
    Action,
    DeadLetter,
    HealerSet,
    SimCommand,
    Status,
)
from gpuheal.mqtt import Bus
from gpuheal.records import MODEL_OF_KIND
from gpuheal.topics import TopicParts, Topics
from gpuheal.wire import MAX_PAYLOAD_BYTES, PayloadError, decode, topic_mismatch
from recorder.rows import record_of
from tests.factories import (
    NOW,
    make_action,
    make_event,
    make_healer_state,
    make_sample,
    make_state,
)
from tests.support import REPO, Collector, Received, Speaker

pytestmark = pytest.mark.timeout(240)

PREFIX = "fz"
HOST = "fzhost"
"""The host the components serve (the healer's and the publisher's own)."""
OTHER = "otherhost"
"""A host no local component speaks for (the analyzer, recorder and dashboard serve every
host)."""
SIM_GPUS = frozenset({0})
"""The simulated GPUs of the publisher (``--gpus 1``)."""
T = Topics(PREFIX)
COMPONENTS = ("publisher", "analyzer", "healer", "recorder", "dashboard")
SYNCED = ("publisher", "analyzer", "healer", "dashboard")
"""Components that publish their dead letters (the recorder stores them in SQLite)."""
SERVE_EVERY_HOST = frozenset({"analyzer", "recorder", "dashboard"})
COMPONENT_ARGS: dict[str, list[str]] = {
    "publisher": ["--source", "sim", "--scenario", "healthy", "--gpus", "1"],
    "analyzer": [],
    "healer": ["--source", "sim", "--state-file", "{tmp}/healer-state.json"],
    "recorder": ["--db", "{tmp}/fuzz.db"],
    "dashboard": ["--port", "0"],
}
FUZZ_EXAMPLES = 160
INT64 = (-(2**63), 2**63 - 1)
KIND_MODEL: dict[str, type[BaseModel]] = {
    **MODEL_OF_KIND, "sim": SimCommand, "healer_set": HealerSet, "ha_status": Status}
"""The contract's model of each topic kind (DESIGN.md's topic table)."""

REJECT, ACCEPT, IGNORE = "reject", "accept", "ignore"


def _broker_packet_limit() -> int:
    """``max_packet_size`` of the local broker (gpuheal/data/mosquitto/local.conf.tmpl)."""
    found = re.search(r"^max_packet_size\s+(\d+)", read_template("local.conf.tmpl"),
                      re.MULTILINE)
    assert found, "local.conf.tmpl sets no max_packet_size"
    return int(found.group(1))


PACKET_LIMIT = _broker_packet_limit()
DELIVERABLE = PACKET_LIMIT - 4096
"""Largest payload that fits a packet with its topic and header (the broker drops bigger)."""


def raw_topic(*levels: str) -> str:
    """A topic ``Topics`` refuses to build (bad index, unknown component): hostile on purpose,
    so it is joined here and only here."""
    return "/".join(levels)


FUZZ_TOPICS: list[str] = [
    # publisher: simulator commands
    T.sim(HOST, 0), T.sim(HOST, 3), raw_topic(PREFIX, HOST, "gpu", "-1", "sim"),
    # analyzer (recorder, dashboard): samples, states, actions, publisher status, HA birth
    T.sample(HOST, 0), T.sample(OTHER, 0), T.sample(OTHER, 65535),
    raw_topic(PREFIX, OTHER, "gpu", "x", "sample"),
    raw_topic(PREFIX, OTHER, "gpu", "007", "sample"),
    T.state(OTHER, 1), T.status(OTHER, "publisher"), T.ha_status(),
    # healer (recorder, dashboard): its host's events and states, operator commands
    T.event(HOST, 0), T.event(HOST, 5), raw_topic(PREFIX, HOST, "gpu", "99999", "event"),
    T.state(HOST, 0), T.state(HOST, 2), T.healer_set(HOST),
    # recorder and dashboard: everything else they record or show
    T.action(HOST, 0), T.action(OTHER, 2), T.event(OTHER, 0), T.status(HOST, "healer"),
    raw_topic(PREFIX, OTHER, "bogus", "status"), T.healer_state(HOST),
    T.healer_state(OTHER), T.deadletter("analyzer"), T.deadletter("recorder"),
]


def component_argv(component: str, tmp: Path, url: str) -> list[str]:
    argv = [sys.executable, "-m", "gpuheal", component, "--broker", url, "--prefix", PREFIX,
            "--host-name", HOST, "--log-level", "INFO"]
    return argv + [a.format(tmp=tmp) for a in COMPONENT_ARGS[component]]


# --- what each component subscribes to: asked of the components ----------------------------
@dataclass(frozen=True)
class Subscription:
    pattern: str
    model: type[BaseModel]


class _NotingBus(Bus):
    """A real Bus, never started, that notes each subscription."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.noted: list[Subscription] = []

    def subscribe(self, pattern: str, model: Any, handler: Any, **kwargs: Any) -> None:
        self.noted.append(Subscription(pattern, model))
        super().subscribe(pattern, model, handler, **kwargs)


@functools.cache
def subscriptions() -> dict[str, tuple[Subscription, ...]]:
    """Every component's subscriptions, from its service built with the fuzz's own argv."""
    from analyzer.service import AnalyzerService
    from dashboard.service import DashboardService
    from gpuheal.cli import build_parser
    from gpuheal.options import (
        AnalyzerOptions,
        CommonOptions,
        DashboardOptions,
        HealerOptions,
        PublisherOptions,
        RecorderOptions,
    )
    from healer.service import HealerService
    from publisher.service import PublisherService
    from recorder.service import Recorder

    services: dict[str, tuple[Any, Callable[[Any], Any]]] = {
        "publisher": (PublisherOptions, PublisherService),
        "analyzer": (AnalyzerOptions, AnalyzerService),
        "healer": (HealerOptions, HealerService),
        "recorder": (RecorderOptions, Recorder),
        "dashboard": (DashboardOptions, DashboardService),
    }
    url = "mqtt://127.0.0.1:9"  # never connected
    parser = build_parser()
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for component, (options, service_of) in services.items():
            args = parser.parse_args(component_argv(component, Path(tmp), url)[3:])
            service = service_of(options.from_args(args, CommonOptions.from_args(args)))
            bus = _NotingBus(url, component, HOST, T)
            try:
                service.attach(bus)
            finally:
                service.stop()
            out[component] = tuple(bus.noted)
    return out


def subscription(component: str, topic: str) -> Subscription | None:
    found = [s for s in subscriptions()[component] if topic_matches_sub(s.pattern, topic)]
    assert len(found) <= 1, (component, topic, found)  # else it would get it twice
    return found[0] if found else None


# --- the oracle: the contract, and what two handlers refuse besides --------------------------
def contract(model: type[BaseModel], topic: str, payload: bytes) -> tuple[str, Any]:
    """The contract's verdict on ``payload`` on ``topic`` (and the message, when valid)."""
    parts = T.parse(topic)
    if parts is None:
        return REJECT, None  # not a topic of ours, though the subscription matched it
    if not payload:
        return IGNORE, None  # a cleared retained topic
    try:
        message = decode(model, payload)
    except PayloadError:
        return REJECT, None
    if topic_mismatch(parts, message) is not None:
        return REJECT, None
    return ACCEPT, message


def handler_refuses(component: str, parts: TopicParts, message: Any) -> bool:
    """A valid message that the component's handler dead-letters all the same."""
    if component == "publisher":
        return parts.index not in SIM_GPUS  # a command for a GPU it does not simulate
    if component == "recorder":
        try:
            record_of(parts, message, NOW)
        except (ValueError, TypeError):  # PayloadError included: e.g. beyond 64-bit integers
            return True
    return False


def judge(component: str, topic: str, payload: bytes) -> tuple[str | None, Any]:
    """``(verdict, message)``: ``reject`` (a dead letter), ``accept`` or ``ignore``; None when
    the component does not subscribe to ``topic``."""
    sub = subscription(component, topic)
    if sub is None:
        return None, None
    what, message = contract(sub.model, topic, payload)
    parts = T.parse(topic)
    if what == ACCEPT and parts is not None and handler_refuses(component, parts, message):
        return REJECT, None
    return what, message


def verdict(component: str, topic: str, payload: bytes) -> str | None:
    return judge(component, topic, payload)[0]


def verdicts(topic: str, payload: bytes) -> dict[str, str]:
    out = {}
    for component in COMPONENTS:
        v = verdict(component, topic, payload)
        if v is not None:
            out[component] = v
    return out


def harmless(component: str, parts: TopicParts, message: Any) -> bool:
    """An accepted message the component may act on without changing what the test checks."""
    if parts.kind == "ha_status":
        return True  # Home Assistant's birth: discovery is announced again
    if component in SERVE_EVERY_HOST and parts.host == OTHER:
        return True
    if parts.kind == "event" and parts.index not in SIM_GPUS:
        return True  # the healer has no State of that GPU: it may only skip it
    return isinstance(message, HealerSet) and all(
        getattr(message, name) is None for name in HealerSet.model_fields if name != "v")


def harmful(topic: str, payload: bytes) -> bool:
    """A message some component would act on in a way that is not fuzz (see module doc)."""
    parts = T.parse(topic)
    for component in COMPONENTS:
        what, message = judge(component, topic, payload)
        if what == ACCEPT and parts is not None and not harmless(component, parts, message):
            return True
    return False


# --- hostile payloads ------------------------------------------------------------------------
RAW = "@@raw@@"


def deep(n: int, container: str = "list") -> Any:
    """A value nested ``n`` levels deep."""
    value: Any = 1
    for _ in range(n - 1):
        value = [value] if container == "list" else {"a": value}
    return value


HOSTILE_VALUES: list[Any] = [
    None, "", " ", "x" * 4096, -1, INT64[0] - 1, INT64[1] + 1, 2**64, 10**30, 1e308, -1e308,
    5e-324, float("nan"), float("inf"), float("-inf"), True, False, [], {}, [None],
    {"a": None}, "fz/host", "fz+host", "fz#host", "#", "+", "/", "../../etc/passwd",
    "0; reboot", "$(reboot)", "`id`", "-i 0 --gpu-reset", "\u0000", "NaN", "Infinity",
    65535, 65536, 99999, 3.5, "0", "gpu_hang ", "CRITICAL", "\u202eevil",
    "\uff46\uff5a\uff48\uff4f\uff53\uff54",  # fullwidth "fzhost"
    "\ud800", "x\udfffx", "\ud83d",  # lone UTF-16 surrogates (json.dumps writes escapes)
    deep(50), deep(50, "dict"), deep(300), deep(300, "dict"), MAX_TS, MAX_TS + 1, -0.0,
]
RAW_VALUES: list[bytes] = [
    b"NaN", b"Infinity", b"-Infinity", b"1" * 5000, b"-" + b"9" * 5000, b"1e99999",
    b"-1e99999", b"1.8e308", b"01", b"+1", b".5", b"0x10", b"1_000", b"tru", b"nul",
    b"[" * 3000 + b"]" * 3000, b'"\\u0000"', b'"unterminated', b"1.0", b"1e0",
]
RAW_PAYLOADS: list[bytes] = [
    b"", b" ", b"null", b"true", b"0", b"-1", b"[]", b"{}", b'""', b"NaN", b"Infinity",
    b"-Infinity", b'{"v":1', b'{"v":1,}', b"{'v': 1}", b'{"v":1}{"v":1}', b"\x00" * 8,
    b"\xef\xbb\xbf{}", b"\xff\xfe{\x00}\x00", b"1" * 5000, b"[" * 100_000,
    b'{"a":' * 2000 + b"1" + b"}" * 2000, b"[" * 900 + b"]" * 900,
]


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, allow_nan=True).encode()


def topic_kind(topic: str) -> str:
    parts = T.parse(topic)
    return parts.kind if parts is not None else topic.rsplit("/", 1)[-1]


def topic_gpu(topic: str) -> tuple[str, int]:
    """The host and index a message on ``topic`` would name (0 when the topic has none)."""
    parts = T.parse(topic)
    if parts is not None and parts.host is not None:
        return parts.host, parts.index or 0
    levels = topic.split("/")
    return (levels[1] if len(levels) > 1 else HOST), 0


def base_message(topic: str) -> dict[str, Any] | None:
    """A valid message for ``topic`` (None for the plain-text status topics)."""
    kind = topic_kind(topic)
    host, named = topic_gpu(topic)
    index = min(named, 65535)
    if kind in ("status", "ha_status"):
        return None
    component = topic.rsplit("/", 1)[-1]
    message = {
        "sample": lambda: make_sample(host=host, index=index, xids=[], processes=[
            {"pid": 1, "name": "ollama", "used_mb": 900.0}]),
        "state": lambda: make_state(host=host, index=index),
        "event": lambda: make_event(host=host, index=index, kind="gpu_hang",
                                    severity="critical"),
        "action": lambda: make_action(make_event(host=host, index=index), action="reset_gpu"),
        "healer_state": lambda: make_healer_state(host=host),
        "healer_set": lambda: HealerSet(enabled=False),
        "sim": lambda: SimCommand(command="reset", action_id="fuzz-action"),
        "deadletter": lambda: DeadLetter(
            component=component if component != "deadletter" else "analyzer",
            topic=T.sample(HOST, 0), reason="fuzz", payload="x", ts=NOW),
    }[kind]()
    data = json.loads(message.to_json())
    if "index" in data:
        data["index"] = named  # as the topic says, even where no valid message can
    return data


def retyped(value: Any) -> list[Any]:
    """Near misses of ``value``'s JSON type (the contract takes JSON types exactly)."""
    if isinstance(value, bool):
        return [int(value), str(value).lower(), [value]]
    if isinstance(value, int):
        return [float(value), str(value), value != 0, [value]]
    if isinstance(value, float):
        return [str(value), [value], {"value": value}]
    if isinstance(value, str):
        return [[value], {"value": value}, 1, value.encode().hex()]
    return [None, "", 0]


absurd_number = st.one_of(
    st.sampled_from([0, -0.0, -1, 1e308, -1e308, 5e-324, 2**53 + 1, INT64[1], 65535, 1e-9,
                     MAX_TS]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.integers(min_value=INT64[0], max_value=INT64[1]),
)
hostile_value = st.one_of(
    st.sampled_from(HOSTILE_VALUES),
    st.integers(),
    st.floats(),
    st.text(max_size=40),
    st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                 lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c,
                                                                      max_size=3),
                 max_leaves=8),
)
_json_value = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=3),
    max_leaves=10,
)
json_non_object = st.one_of(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    st.lists(_json_value, max_size=5),
).map(_dumps)


@st.composite
def oversized(draw: st.DrawFn, topic: str) -> bytes:
    """Bigger than the contract's limit, small enough for the broker to deliver."""
    size = draw(st.sampled_from([MAX_PAYLOAD_BYTES + 1, MAX_PAYLOAD_BYTES + 4096,
                                 (MAX_PAYLOAD_BYTES + DELIVERABLE) // 2, DELIVERABLE]))
    shape = draw(st.sampled_from(["padded", "spaces", "zeros", "status"]))
    if shape == "padded":
        base = base_message(topic) or {"v": 1}
        head = _dumps({**base, "pad": ""})
        return head[:-3] + b'"' + b"x" * (size - len(head)) + b'"}'
    if shape == "spaces":
        return b" " * (size - 2) + b"{}"
    if shape == "status":
        return b"online" + b" " * (size - 6)
    return b"\x00" * size


@st.composite
def one_field_wrong(draw: st.DrawFn, topic: str) -> bytes:
    """A valid message for ``topic`` with one thing wrong (or, rarely, nothing wrong)."""
    base = base_message(topic)
    if base is None:
        return draw(st.sampled_from([b"online", b"offline", b" online\n", b"ONLINE",
                                     b"online\x00", b"on line", b"\xffonline", b"1",
                                     b'"online"', b"online" * 1000]))
    op = draw(st.sampled_from(["set", "set", "set", "raw", "delete", "mismatch", "version",
                               "extra", "exact_limit", "absurd", "absurd", "retype"]))
    key = draw(st.sampled_from(sorted(base)))
    numeric = sorted(k for k, val in base.items()
                     if isinstance(val, int | float) and not isinstance(val, bool) and k != "v")
    if op == "absurd" and numeric:  # the right type, a value no GPU has: often valid
        base[draw(st.sampled_from(numeric))] = draw(absurd_number)
    elif op == "set":
        base[key] = draw(hostile_value)
    elif op == "retype":
        base[key] = draw(st.sampled_from(retyped(base[key])))
    elif op == "raw":
        base[key] = RAW
        return _dumps(base).replace(f'"{RAW}"'.encode(), draw(st.sampled_from(RAW_VALUES)))
    elif op == "delete":
        del base[key]
    elif op == "mismatch":
        if "host" in base:
            base["host"] = draw(st.sampled_from([OTHER, HOST, "fz/host", "fz+host", "fz#"]))
        if "index" in base:
            base["index"] = draw(st.sampled_from([1, 5, 7, 65535, -1]))
        if "component" in base:
            base["component"] = draw(st.sampled_from(["healer", "recorder", "nobody"]))
    elif op == "version":
        base["v"] = draw(st.sampled_from([0, 2, "1", 1.5, 1.0, True, None, [1]]))
    elif op == "extra":
        base[draw(st.text(max_size=10))] = draw(hostile_value)
    else:
        head = _dumps({**base, "pad": ""})
        size = draw(st.sampled_from([MAX_PAYLOAD_BYTES, MAX_PAYLOAD_BYTES + 1]))
        return head[:-3] + b'"' + b"x" * (size - len(head)) + b'"}'
    try:
        return _dumps(base)
    except ValueError:  # an int beyond Python's digit limit: the raw form instead
        base[key] = RAW
        return _dumps(base).replace(f'"{RAW}"'.encode(), b"9" * 5000)


def payloads(topic: str) -> st.SearchStrategy[bytes]:
    return st.one_of(
        one_field_wrong(topic),
        one_field_wrong(topic),
        st.binary(max_size=300),
        st.binary(min_size=1, max_size=64).map(lambda b: b"\xff" + b),
        st.text(max_size=100).map(str.encode),
        json_non_object,
        st.sampled_from(RAW_PAYLOADS),
        oversized(topic),
    )


fuzz_cases = st.sampled_from(FUZZ_TOPICS).flatmap(
    lambda topic: st.tuples(st.just(topic), payloads(topic)))


# --- the system under fuzz ---------------------------------------------------------------
class Watch(Collector):
    """A Collector that wakes its waiters as each message arrives (no polling)."""

    def __init__(self, url: str, patterns: list[str]) -> None:
        super().__init__(url, patterns)
        self.arrived = threading.Condition()

    def _on_message(self, c: Any, u: Any, msg: Any) -> None:
        super()._on_message(c, u, msg)
        with self.arrived:
            self.arrived.notify_all()

    def since(self, cursor: int) -> list[Received]:
        with self._lock:
            return self.messages[cursor:]

    def until(self, predicate: Callable[[list[Received]], Any], cursor: int,
              timeout_s: float, what: str) -> Any:
        """Wait until ``predicate(messages since cursor)`` holds; fail after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        with self.arrived:
            while True:
                value = predicate(self.since(cursor))
                if value:
                    return value
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
                self.arrived.wait(left)


@dataclass
class Sent:
    topic: str
    payload: bytes
    delivered: bool = False


@dataclass(repr=False)
class System:
    broker: PrivateBroker
    workdir: Path
    watch: Watch
    speaker: Speaker
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    ledger: list[Sent] = field(default_factory=list)
    mine: set[tuple[str, bytes]] = field(default_factory=set)
    examples: int = 0

    def __repr__(self) -> str:
        return f"System(broker={self.broker.url}, {len(self.ledger)} sent)"

    # --- publishing, with the ledger ---------------------------------------------------
    def send(self, topic: str, payload: bytes, retain: bool = False) -> Sent:
        """Publish (QoS 1, acknowledged) and note it."""
        entry = Sent(topic, payload)
        self.ledger.append(entry)
        self.mine.add((topic, payload))
        info = self.speaker.client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(10)
        assert info.is_published(), f"no PUBACK for {len(payload)} bytes on {topic}"
        return entry

    def publish(self, topic: str, payload: bytes) -> Sent:
        """Publish, then confirm with a sentinel that the broker delivered it (or not) and
        every component has handled it."""
        cursor = len(self.watch.messages)
        entry = self.send(topic, payload)
        self.sentinel(topic, cursor)
        entry.delivered = any(m.topic == topic and m.payload == payload
                              for m in self.watch.since(cursor))
        return entry

    def sentinel(self, topic: str, cursor: int) -> str:
        """A payload every subscriber rejects, on ``topic``; waits until it is delivered
        and every component that publishes dead letters has rejected it."""
        token = uuid.uuid4().hex
        payload = b"\xffsentinel-" + token.encode()
        self.send(topic, payload).delivered = True
        self.watch.until(lambda ms: any(m.payload == payload for m in ms), cursor, 10,
                         f"the sentinel on {topic}")
        for component in SYNCED:
            if verdict(component, topic, payload) == REJECT:
                self.watch.until(lambda _m, c=component: any(
                    token in d.payload for d in self.deadletters(c, cursor)), cursor, 10,
                    f"{component} rejecting the sentinel on {topic}")
        return token

    # --- what came back ------------------------------------------------------------------
    def foreign(self, start: int = 0) -> list[Received]:
        """Messages the components published (not the ledger's)."""
        return [m for m in self.watch.since(start) if (m.topic, m.payload) not in self.mine]

    def deadletters(self, component: str, start: int = 0) -> list[DeadLetter]:
        out = []
        topic = T.deadletter(component)
        for m in self.foreign(start):
            if m.topic != topic:
                continue
            letter = decode(DeadLetter, m.payload)  # a malformed one fails the test
            assert letter.component == component, letter
            out.append(letter)
        return out

    def check_no_action_taken(self, start: int = 0) -> None:
        for m in self.foreign(start):
            parts = T.parse(m.topic)
            if parts is None:
                continue
            assert parts.kind != "sim", f"the healer sent a simulator command: {m.text[:300]}"
            if parts.kind == "action":
                action = decode(Action, m.payload)
                assert action.status == "skipped" and action.index not in SIM_GPUS, action

    def expected(self, component: str) -> Counter[str]:
        """Dead letters (by topic) ``component`` owes for everything delivered so far."""
        return Counter(s.topic for s in self.ledger if s.delivered
                       and verdict(component, s.topic, s.payload) == REJECT)

    def log(self, component: str) -> str:
        path = self.workdir / f"{component}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def assert_running(self) -> None:
        for name, proc in self.procs.items():
            assert proc.poll() is None, \
                f"{name} exited with {proc.returncode}:\n{self.log(name)[-3000:]}"

    def stop_components(self) -> dict[str, int]:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        codes = {}
        for name, proc in self.procs.items():
            try:
                codes[name] = proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                codes[name] = proc.wait(5)
        return codes


def retained_seeds() -> list[tuple[str, bytes]]:
    """Hostile *retained* States, there before the components start: the analyzer, the healer,
    the recorder and the dashboard get them once, at subscribe time."""
    good = base_message(T.state(HOST, 1))
    assert good is not None
    bad: list[bytes] = [
        b"\xff\xfe", b"[]", b"null", b"{}", _dumps({**good, "ts": float("nan")}),
        _dumps({**good, "host": "fz/host"}), _dumps({**good, "v": 2}),
        b"[" * 5000, b" " * (MAX_PAYLOAD_BYTES + 1),
        _dumps(good),  # valid, but for GPU 1: on another GPU's topic it is a mismatch
    ]
    topics = [T.state(HOST, i) for i in range(2, 2 + len(bad) // 2)]
    topics += [T.state(OTHER, i) for i in range(2, 2 + len(bad) - len(topics))]
    seeds = list(zip(topics, bad, strict=True))
    seeds.append((raw_topic(PREFIX, HOST, "gpu", "-1", "state"), _dumps(good)))
    return seeds


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    subscriptions()  # before the processes start: 2 cores are shared
    tmp = tmp_path_factory.mktemp("fuzz")
    broker = start_local_broker(tmp / "mosquitto")
    assert broker.port != 1883
    watch = Watch(broker.url, [T.everything(), T.ha_status()])
    watch.start()
    speaker = Speaker(broker.url)
    s = System(broker, tmp, watch, speaker)
    try:
        for topic, payload in retained_seeds():
            v = verdicts(topic, payload)
            assert ACCEPT not in v.values(), (topic, v)
            s.send(topic, payload, retain=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("GPUHEAL_")}
        env["PYTHONUNBUFFERED"] = "1"
        # The recorder first: it must be subscribed before the others' first dead letters.
        for group in (["recorder"], ["healer", "analyzer", "publisher", "dashboard"]):
            for component in group:
                with (tmp / f"{component}.log").open("wb") as log:
                    s.procs[component] = subprocess.Popen(
                        component_argv(component, tmp, broker.url), env=env, cwd=REPO,
                        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
            for component in group:
                try:
                    watch.until(lambda ms, c=component: any(
                        m.topic == T.status(HOST, c) and m.payload == b"online" for m in ms),
                        0, 60, f"{component} online")
                except AssertionError:
                    s.assert_running()
                    raise
        for entry in s.ledger:  # the watch saw each seed when it was published
            entry.delivered = any(m.topic == entry.topic and m.payload == entry.payload
                                  for m in watch.since(0))
        # Each component handled its retained seeds before the messages that follow them.
        for topic in (T.sim(HOST, 0), T.sample(OTHER, 0), T.healer_set(HOST),
                      T.event(OTHER, 0)):
            s.sentinel(topic, 0)
        yield s
    finally:
        s.stop_components()
        speaker.close()
        watch.stop()
        broker.stop()


# --- the fuzz ------------------------------------------------------------------------------
def test_fuzz_topics_cover_every_subscription_with_the_contracts_model() -> None:
    subs = subscriptions()
    assert set(subs) == set(COMPONENTS) and all(subs.values()), subs
    for component, found in subs.items():
        for sub in found:
            hits = [t for t in FUZZ_TOPICS if topic_matches_sub(sub.pattern, t)]
            assert hits, f"no fuzz topic for {component}'s subscription {sub.pattern}"
            for topic in hits:
                parts = T.parse(topic)
                if parts is not None:
                    assert sub.model is KIND_MODEL[parts.kind], (component, topic, sub)
    for topic in FUZZ_TOPICS:
        for component in COMPONENTS:
            subscription(component, topic)  # asserts: at most one of a component's


def example_cases(cases: list[tuple[str, bytes]]) -> Callable[[Any], Any]:
    """Apply ``hypothesis.example`` for each case (they run on every run, before the fuzz)."""
    def apply(fn: Any) -> Any:
        for case in reversed(cases):
            fn = example(case=case)(fn)
        return fn
    return apply


def _valid_with(topic: str, **changes: Any) -> bytes:
    base = base_message(topic)
    assert base is not None
    return _dumps({**base, **changes})


EXPLICIT_CASES: list[tuple[str, bytes]] = [
    # valid, absurd readings for a host nobody here serves: the analyzer must cope
    (T.sample(OTHER, 0), _valid_with(T.sample(OTHER, 0), temperature_c=1e308,
                                     memory_total_mb=0.0, memory_used_mb=-1e308,
                                     utilization_pct=-5e-324, power_limit_w=0.0, seq=0)),
    (T.sample(OTHER, 65535), _valid_with(T.sample(OTHER, 65535), available=False, ts=0.0,
                                         temperature_c=None, seq=INT64[1])),
    # valid for the analyzer and the dashboard, beyond what the recorder's table can hold
    (T.sample(OTHER, 65535), _valid_with(T.sample(OTHER, 65535), seq=INT64[1] + 1)),
    # events for a GPU the healer has no State of, at the edges of the contract's time
    (T.event(HOST, 5), _valid_with(T.event(HOST, 5), event_id="last-second", ts=MAX_TS,
                                   started_ts=0.0)),
    (T.event(HOST, 5), _valid_with(T.event(HOST, 5), event_id="far-future", ts=1e308)),
    (T.event(HOST, 5), _valid_with(T.event(HOST, 5), event_id="before-1970", ts=-1.0)),
    # JSON types exactly: near misses
    (T.event(HOST, 5), _valid_with(T.event(HOST, 5), index=True)),
    (T.sample(OTHER, 0), _valid_with(T.sample(OTHER, 0), index=0.0)),
    (T.sample(OTHER, 0), _valid_with(T.sample(OTHER, 0), seq="3")),
    (T.sample(OTHER, 0), _valid_with(T.sample(OTHER, 0), available="no")),
    (T.state(OTHER, 1), _valid_with(T.state(OTHER, 1), v=True)),
    # a no-op operator command; Home Assistant's birth; a valid record of another host
    (T.healer_set(HOST), b'{"unknown": 1}'),
    (T.ha_status(), b"online"),
    (T.ha_status(), b"ONLINE"),
    (T.event(OTHER, 0), _valid_with(T.event(OTHER, 0), evidence={"a": [1, {"b": None}]})),
    # valid but oversized; a valid command for a GPU the simulator lacks
    (T.sample(HOST, 0), _valid_with(T.sample(HOST, 0), name="x" * MAX_PAYLOAD_BYTES)),
    (T.sim(HOST, 3), _valid_with(T.sim(HOST, 3))),
]


def systematic_cases() -> list[tuple[str, bytes]]:
    """For every fuzz topic, the same one-thing-wrong messages (run on every run): the other
    host, the next index, a host with ``/``, a negative index, NaN, version 2, a required
    field missing, the wrong component."""
    cases: list[tuple[str, bytes]] = []
    for topic in FUZZ_TOPICS:
        base = base_message(topic)
        if base is None:
            cases += [(topic, b"ONLINE"), (topic, b"online\xff"), (topic, b"")]
            continue
        variants: list[dict[str, Any]] = [{"v": 2}]
        if "host" in base:
            variants += [{"host": OTHER if base["host"] == HOST else HOST},
                         {"host": base["host"] + "/x"}]
        if "index" in base:
            variants += [{"index": (base["index"] + 1) % 65536}, {"index": -1}]
        if "ts" in base:
            variants.append({"ts": float("nan")})
        if "component" in base:
            variants.append({"component": "healer"})
        cases += [(topic, _dumps({**base, **change})) for change in variants]
        required = [name for name, f in KIND_MODEL[topic_kind(topic)].model_fields.items()
                    if f.is_required()]
        if required:
            cases.append((topic, _dumps({k: x for k, x in base.items() if k != required[0]})))
    return cases


def test_the_explicit_cases_are_fuzz_and_the_contract_decides_them() -> None:
    """Every explicit case runs (none is left out as harmful), and the verdicts the contract
    gives them are the ones these cases were written for."""
    assert not [case for case in EXPLICIT_CASES + systematic_cases() if harmful(*case)]
    got = [verdicts(*case) for case in EXPLICIT_CASES]
    samples = {"analyzer": ACCEPT, "recorder": ACCEPT}
    assert got[:3] == [samples, samples, {**samples, "recorder": REJECT}]
    assert got[3] == {"healer": ACCEPT, "recorder": ACCEPT, "dashboard": ACCEPT}
    assert got[14] == {"recorder": ACCEPT, "dashboard": ACCEPT}
    assert [set(v.values()) for v in got[4:11]] == [{REJECT}] * 7
    assert got[11:14] == [{"healer": ACCEPT}, {"analyzer": ACCEPT}, {"analyzer": REJECT}]
    assert got[15] == {"analyzer": REJECT, "recorder": REJECT}
    assert got[16] == {"publisher": REJECT}


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                 HealthCheck.data_too_large, HealthCheck.large_base_example])
@given(case=fuzz_cases)
@example_cases(EXPLICIT_CASES + systematic_cases())
def test_hostile_payloads_are_dead_lettered_never_acted_on(system: System,
                                                           case: tuple[str, bytes]) -> None:
    topic, payload = case
    assume(not harmful(topic, payload))
    v = verdicts(topic, payload)
    s = system
    cursor = len(s.watch.messages)
    entry = s.publish(topic, payload)
    s.examples += 1
    assert entry.delivered or len(payload) > DELIVERABLE, \
        f"the broker did not deliver {len(payload)} bytes on {topic}"
    for component in SYNCED:
        got = [d.topic for d in s.deadletters(component, cursor)
               if "sentinel-" not in d.payload]
        want = [topic] if entry.delivered and v.get(component) == REJECT else []
        assert got == want, (
            f"{component} on {topic}: expected {v.get(component)}, dead letters "
            f"{[d.reason for d in s.deadletters(component, cursor)]}, payload "
            f"{payload[:300]!r} ({len(payload)} bytes)")
    s.check_no_action_taken(cursor)


def test_a_packet_over_the_broker_limit_never_reaches_a_component(system: System) -> None:
    s = system
    cursor = len(s.watch.messages)
    big = b"[" + b"0," * ((PACKET_LIMIT + 65536) // 2) + b"0]"
    attacker = Speaker(s.broker.url)
    try:
        attacker.client.publish(T.sample(OTHER, 0), big, qos=0)
        assert attacker.dropped.wait(10), "the broker kept a client that sent too big a packet"
    finally:
        attacker.close()
    s.sentinel(T.sample(OTHER, 0), cursor)
    assert not [m for m in s.watch.since(cursor) if len(m.payload) > PACKET_LIMIT]
    for component in SYNCED:
        assert [d for d in s.deadletters(component, cursor)
                if "sentinel-" not in d.payload] == [], component


def _dashboard_gpu(s: System) -> dict[str, Any]:
    """The dashboard's ``GET /api/gpu`` (its port is in its log: it listens on port 0)."""
    found = re.search(r"dashboard on (http://[^/\s]+)/", s.log("dashboard"))
    assert found, s.log("dashboard")[-2000:]
    with urllib.request.urlopen(f"{found.group(1)}/api/gpu", timeout=10) as reply:
        return json.loads(reply.read())


def test_after_the_fuzz_every_component_works_and_dead_letters_match(
        system: System, request: pytest.FixtureRequest) -> None:
    s = system
    if not any(i.name.startswith("test_hostile_payloads") for i in request.session.items):
        pytest.skip("checks what the fuzz test left behind: run it too")
    s.assert_running()
    assert s.examples >= FUZZ_EXAMPLES // 2, f"only {s.examples} fuzz messages were sent"
    # Still online: the retained status a new subscriber gets.
    with Collector(s.broker.url, T.status_pattern(HOST)) as fresh:
        fresh.wait(lambda ms: {m.topic for m in ms if m.retain and m.payload == b"online"}
                   >= {T.status(HOST, c) for c in COMPONENTS}, 10, "every status online")
    # And working: new samples, new States of the real GPU, shown by the dashboard, dead
    # letters for new bad input.
    cursor = len(s.watch.messages)
    s.watch.until(lambda ms: any(m.topic == T.sample(HOST, 0) for m in ms), cursor, 15,
                  "a new sample from the publisher")
    s.watch.until(lambda ms: any(m.topic == T.state(HOST, 0) for m in ms), cursor, 15,
                  "a new State from the analyzer")
    shown = _dashboard_gpu(s)
    assert shown["available"] and (shown["gpu"]["host"], shown["gpu"]["index"]) == (HOST, 0)
    for topic in (T.sim(HOST, 0), T.sample(HOST, 0), T.event(HOST, 0), T.healer_set(HOST),
                  T.action(OTHER, 0)):
        s.sentinel(topic, cursor)
    s.check_no_action_taken()
    observed = {c: Counter(d.topic for d in s.deadletters(c)) for c in COMPONENTS}
    assert observed["recorder"] == Counter(), "the recorder republished bad input"
    for component in SYNCED:
        assert observed[component] == s.expected(component), component
    crashes = {}
    for component in COMPONENTS:
        log = s.log(component)
        i = log.find("Traceback")
        if i >= 0:
            crashes[component] = log[max(0, i - 600):i + 2500]
    assert not crashes, "\n".join(f"--- {c} logged a traceback:\n{t}" for c, t in
                                   crashes.items())
    codes = s.stop_components()
    assert codes == {c: 0 for c in COMPONENTS}, {c: s.log(c)[-2000:] for c in COMPONENTS}
    with sqlite3.connect(s.workdir / "fuzz.db") as con:
        rows = con.execute("select component, topic from deadletter").fetchall()
        recorded = con.execute("select count(*) from samples where host = ?",
                               (HOST,)).fetchone()[0]
    assert recorded > 0, "the recorder stored no sample of the real GPU"
    stored = {c: Counter(t for comp, t in rows if comp == c) for c in COMPONENTS}
    assert stored["recorder"] == s.expected("recorder")
    for component in SYNCED:  # the recorder also keeps the others' dead letters
        assert stored[component] == observed[component], component
