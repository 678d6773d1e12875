"""Hostile input at every subscribed topic of every component (hypothesis), and no shell.

One open local Mosquitto serves the module; the four components run as real subprocesses
(``python -m gpuheal ...``, simulated GPU, scenario ``healthy``). Hypothesis throws malformed,
oversized and wrongly-typed payloads at every topic a component subscribes to: random bytes,
non-UTF-8, non-JSON, JSON arrays and scalars, NaN/Infinity tokens, huge numbers, very deep
nesting, host names with ``/``, ``+``, ``#``, negative and out-of-range indices, and
valid-looking messages with one field wrong.

What each component should do with each message is decided here, independently of the
components, from the contract: ``gpuheal.models.parse_payload`` plus the topic rules of
DESIGN.md (payload host/index must match the topic's; the healer only serves its own host;
the analyzer only restores from *retained* States; an empty payload on a State topic is a
cleared retained message). Every message is followed on the same topic by a sentinel that
every subscriber rejects; once the sentinel's dead letter is back, the component has handled
the fuzz message, and its dead letters since the previous sentinel must be exactly the
expected ones. At the end: every component is still online *and working*, the healer took
no action (only ``skipped`` decisions for GPUs it has never seen), no simulator command was
sent, and the dead-letter totals match (the recorder's from its SQLite ``deadletter`` table,
since it does not republish bad input).

Messages a consumer would *accept* and act on (a valid sample for the served host, a valid
event for GPU 0...) are not fuzz: they are left out (``assume``), except where acting on
them is harmless (another host's samples and records, no-op ``healer/set``, events for GPUs
the healer has never seen, which it may only skip).

Poison messages this fuzz found are pinned at the end of the file as regression tests: lone
UTF-16 surrogates, nesting beyond the serializer's limit, an oversized status, a sample time
beyond year 9999 (now outside the contract), and a nesting limit that depended on the
caller's stack (now an explicit MAX_JSON_DEPTH in the contract).
"""

from __future__ import annotations

import ast
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from gpuheal.broker import PrivateBroker, start_local_broker
from gpuheal.config import ActuatorsConfig
from gpuheal.models import (
    Action,
    DeadLetter,
    Event,
    HealerSet,
    HealerState,
    Message,
    Sample,
    SimCommand,
    State,
    iso_utc,
)
from gpuheal.options import AnalyzerOptions, CommonOptions, HealerOptions, RecorderOptions
from gpuheal.topics import Topics
from gpuheal.wire import MAX_PAYLOAD_BYTES, PayloadError, decode
from healer.actuators import InvalidIndexError, validate_index
from healer.actuators.commands import CommandActuator
from healer.actuators.dispatch import real_actuators
from healer.actuators.power import (
    PowerActuator,
    jetson_restore_argvs,
    jetson_throttle_argvs,
    smi_query_limits_argv,
    smi_set_limit_argv,
)
from healer.actuators.reset import ResetActuator, smi_compute_apps_argv, smi_reset_argv
from tests.conftest import FIXTURES, REPO
from tests.support import Collector, Received, Speaker, wait_for

pytestmark = pytest.mark.timeout(240)

PREFIX = "fz"
HOST = "fzhost"
"""The host the components serve (the healer's own)."""
OTHER = "otherhost"
"""A host no local component speaks for (the analyzer and the recorder serve every host)."""
SIM_GPUS = frozenset({0})
"""The simulated GPUs of the publisher (``--gpus 1``)."""
T = Topics(PREFIX)
COMPONENTS = ("publisher", "analyzer", "healer", "recorder")
SYNCED = ("publisher", "analyzer", "healer")
"""Components that publish their dead letters (the recorder stores them in SQLite)."""
FUZZ_EXAMPLES = 160
STATUS_VALUES = frozenset({"online", "offline"})
INT64 = (-(2**63), 2**63 - 1)
ISO_RANGE = (-62135596800.0, 253402300799.0)
"""UNIX seconds ``iso_utc`` can format (years 1 to 9999)."""

REJECT, ACCEPT, IGNORE = "reject", "accept", "ignore"


def _broker_packet_limit() -> int:
    """``max_packet_size`` of the local broker (mosquitto/local.conf.tmpl), bytes."""
    text = read_template("local.conf.tmpl")
    found = re.search(r"^max_packet_size\s+(\d+)", text, re.MULTILINE)
    assert found, "local.conf.tmpl sets no max_packet_size"
    return int(found.group(1))


PACKET_LIMIT = _broker_packet_limit()
DELIVERABLE = PACKET_LIMIT - 4096
"""Largest payload that fits a packet with its topic and header (the broker drops bigger)."""


def raw_topic(*levels: str) -> str:
    """A topic ``Topics`` refuses to build (bad index, unknown component): hostile on purpose,
    so it is joined here and only here."""
    return "/".join(levels)


SUBSCRIPTIONS: dict[str, list[str]] = {
    "publisher": [T.gpu_pattern("sim", HOST)],
    "analyzer": [T.gpu_pattern("state"), T.gpu_pattern("sample"), T.ha_status()],
    "healer": [T.gpu_pattern("event", HOST), T.gpu_pattern("state", HOST),
               T.healer_set(HOST)],
    "recorder": [*(T.gpu_pattern(k) for k in ("sample", "state", "event", "action")),
                 T.status_pattern(), T.healer_state_pattern(), T.deadletter_pattern()],
}
"""What each component subscribes to (DESIGN.md: the analyzer and the recorder serve every
host, the healer and the publisher's simulator only their own)."""

FUZZ_TOPICS: list[str] = [
    # publisher: simulator commands
    T.sim(HOST, 0), T.sim(HOST, 3), raw_topic(PREFIX, HOST, "gpu", "-1", "sim"),
    # analyzer (and recorder): samples of every host, retained states, HA birth
    T.sample(HOST, 0), T.sample(OTHER, 0), T.sample(OTHER, 65535),
    raw_topic(PREFIX, OTHER, "gpu", "x", "sample"),
    raw_topic(PREFIX, OTHER, "gpu", "007", "sample"),
    T.state(OTHER, 1), T.ha_status(),
    # healer (and recorder): its host's events and states, operator commands
    T.event(HOST, 0), T.event(HOST, 5), raw_topic(PREFIX, HOST, "gpu", "99999", "event"),
    T.state(HOST, 0), T.state(HOST, 2), T.healer_set(HOST),
    # recorder: everything else it records
    T.action(HOST, 0), T.action(OTHER, 2), T.event(OTHER, 0), T.status(HOST, "healer"),
    T.status(OTHER, "publisher"), raw_topic(PREFIX, OTHER, "bogus", "status"),
    T.healer_state(HOST), T.healer_state(OTHER), T.deadletter("analyzer"),
    T.deadletter("recorder"),
]


def matches(pattern: str, topic: str) -> bool:
    """MQTT topic filter matching (``+`` one level, ``#`` the rest)."""
    pat, top = pattern.split("/"), topic.split("/")
    for i, level in enumerate(pat):
        if level == "#":
            return True
        if i >= len(top) or (level != "+" and level != top[i]):
            return False
    return len(pat) == len(top)


# --- the oracle: what each component must do with a message ----------------------------------
def _parse(model: type[Message], payload: bytes) -> Any:
    try:
        return decode(model, payload)
    except PayloadError:
        return None


def _same_gpu(topic: str, host: str, index: int) -> bool:
    parts = T.parse(topic)
    return parts is not None and (parts.host, parts.index) == (host, index)


def _int64(*values: int | None) -> bool:
    return all(v is None or INT64[0] <= v <= INT64[1] for v in values)


def verdict(component: str, topic: str, payload: bytes, retained: bool = False) -> str | None:
    """``reject`` (a dead letter), ``accept``, ``ignore``, or None when not subscribed."""
    subs = [p for p in SUBSCRIPTIONS[component] if matches(p, topic)]
    if not subs:
        return None
    kind = subs[0].rsplit("/", 1)[-1]
    if component == "publisher":
        cmd = _parse(SimCommand, payload)
        parts = T.parse(topic)
        ok = cmd is not None and parts is not None and parts.index in SIM_GPUS
        return ACCEPT if ok else REJECT
    if component == "analyzer":
        if topic == T.ha_status():
            return IGNORE
        if kind == "state":
            if not retained or not payload:
                return IGNORE
            state = _parse(State, payload)
            ok = state is not None and _same_gpu(topic, state.host, state.index)
            return ACCEPT if ok else REJECT
        sample = _parse(Sample, payload)
        ok = sample is not None and topic == T.sample(sample.host, sample.index)
        return ACCEPT if ok else REJECT
    if component == "healer":
        if kind == "set":
            return ACCEPT if _parse(HealerSet, payload) is not None else REJECT
        if kind == "state" and not payload:
            return IGNORE
        message = _parse(Event if kind == "event" else State, payload)
        ok = message is not None and _same_gpu(topic, message.host, message.index)
        return ACCEPT if ok else REJECT
    return _recorder_verdict(topic, payload)


def _recorder_verdict(topic: str, payload: bytes) -> str:
    parts = T.parse(topic)
    if parts is None:
        return REJECT
    if not payload:
        return IGNORE  # a cleared retained message: nothing to record
    if parts.kind == "status":
        if len(payload) > MAX_PAYLOAD_BYTES:
            return REJECT
        try:
            return ACCEPT if payload.decode("utf-8").strip() in STATUS_VALUES else REJECT
        except UnicodeDecodeError:
            return REJECT
    if parts.kind in ("sample", "state", "event", "action"):
        model = {"sample": Sample, "state": State, "event": Event, "action": Action}[parts.kind]
        m = _parse(model, payload)
        if m is None or not _same_gpu(topic, m.host, m.index):
            return REJECT
        if isinstance(m, Sample) and not _int64(m.seq, m.ecc_uncorrected):
            return REJECT
        if isinstance(m, Action) and not _int64(m.attempt):
            return REJECT
        return ACCEPT
    if parts.kind == "healer_state":
        h = _parse(HealerState, payload)
        ok = (h is not None and h.host == parts.host
              and _int64(h.unresolved_count, h.budget_left, h.budget_per_hour))
        return ACCEPT if ok else REJECT
    if parts.kind == "deadletter":
        d = _parse(DeadLetter, payload)
        return ACCEPT if d is not None and d.component == parts.component else REJECT
    return REJECT


def verdicts(topic: str, payload: bytes, retained: bool = False) -> dict[str, str]:
    out = {}
    for component in COMPONENTS:
        v = verdict(component, topic, payload, retained)
        if v is not None:
            out[component] = v
    return out


def harmful(topic: str, payload: bytes, v: dict[str, str]) -> bool:
    """A message some component would act on in a way that is not fuzz (see module doc)."""
    parts = T.parse(topic)
    for component, what in v.items():
        if what != ACCEPT:
            continue
        if component == "analyzer" and parts is not None and parts.host == OTHER:
            continue
        if component == "healer":
            cmd = _parse(HealerSet, payload)
            if cmd is not None and (cmd.enabled, cmd.dry_run, cmd.reset_breaker) == \
                    (None, None, None):
                continue
            event = _parse(Event, payload) if parts is not None and parts.kind == "event" \
                else None
            if event is not None and event.index not in SIM_GPUS:
                continue  # a GPU the healer has no State of: it may only skip it
        if component == "recorder" and parts is not None and (
                parts.host == OTHER or (parts.kind == "event" and parts.index not in SIM_GPUS)):
            continue
        return True
    return False


# --- hostile payloads ------------------------------------------------------------------------
NOW = 1_750_000_000.0
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
    deep(50), deep(50, "dict"), deep(300), deep(300, "dict"),
]
RAW_VALUES: list[bytes] = [
    b"NaN", b"Infinity", b"-Infinity", b"1" * 5000, b"-" + b"9" * 5000, b"1e99999",
    b"-1e99999", b"1.8e308", b"01", b"+1", b".5", b"0x10", b"1_000", b"tru", b"nul",
    b"[" * 3000 + b"]" * 3000, b'"\\u0000"', b'"unterminated',
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
    if parts is not None:
        return parts.kind
    return topic.rsplit("/", 1)[-1]


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
    msg: Message = {
        "sample": lambda: Sample(host=host, index=index, source="sim", ts=NOW, seq=1,
                                 temperature_c=50.0, utilization_pct=10.0,
                                 memory_used_mb=1000.0, memory_total_mb=16000.0,
                                 power_draw_w=60.0, power_limit_w=300.0, xids=[],
                                 processes=[{"pid": 1, "name": "ollama", "used_mb": 900.0}]),
        "state": lambda: State(host=host, index=index, health="healthy",
                               timestamp=iso_utc(NOW), ts=NOW, temperature=50.0),
        "event": lambda: Event(event_id="fuzz-event", host=host, index=index,
                               kind="gpu_hang", severity="critical", phase="raised",
                               started_ts=NOW - 40, ts=NOW, message="fuzz",
                               evidence={"utilization_pct": 100.0},
                               recommended_action="reset_gpu"),
        "action": lambda: Action(action_id="fuzz-action", event_id="fuzz-event", host=host,
                                 index=index, action="reset_gpu", status="started", ts=NOW),
        "healer_state": lambda: HealerState(host=host, enabled=True, dry_run=False,
                                            breaker_open=False, budget_left=12,
                                            budget_per_hour=12, ts=NOW),
        "healer_set": lambda: HealerSet(enabled=False),
        "sim": lambda: SimCommand(command="reset", action_id="fuzz-action"),
        "deadletter": lambda: DeadLetter(component=topic.rsplit("/", 1)[-1]
                                         if topic.rsplit("/", 1)[-1] != "deadletter"
                                         else "analyzer",
                                         topic=T.sample(HOST, 0), reason="fuzz",
                                         payload="x", ts=NOW),
    }[kind]()
    data = json.loads(msg.to_json())
    if "index" in data:
        data["index"] = named  # as the topic says, even where no valid message can
    return data


absurd_number = st.one_of(
    st.sampled_from([0, -0.0, -1, 1e308, -1e308, 5e-324, 2**53 + 1, INT64[1], 65535, 1e-9]),
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
                               "extra", "exact_limit", "absurd", "absurd"]))
    key = draw(st.sampled_from(sorted(base)))
    numeric = sorted(k for k, val in base.items()
                     if isinstance(val, int | float) and not isinstance(val, bool) and k != "v")
    if op == "absurd" and numeric:  # the right type, a value no GPU has: often valid
        base[draw(st.sampled_from(numeric))] = draw(absurd_number)
    elif op == "set":
        base[key] = draw(hostile_value)
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
        base["v"] = draw(st.sampled_from([0, 2, "1", 1.5, None, [1]]))
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
@dataclass
class Sent:
    topic: str
    payload: bytes
    retained: bool = False
    delivered: bool = False


@dataclass(repr=False)
class System:
    broker: PrivateBroker
    workdir: Path
    watch: Collector
    speaker: Speaker
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    ledger: list[Sent] = field(default_factory=list)
    mine: set[tuple[str, bytes]] = field(default_factory=set)
    examples: int = 0

    def __repr__(self) -> str:
        return f"System(broker={self.broker.url}, {len(self.ledger)} sent)"

    # --- publishing, with the ledger ---------------------------------------------------
    def publish(self, topic: str, payload: bytes, retain: bool = False) -> Sent:
        """Publish (QoS 1), note it, and confirm with a sentinel that the broker delivered
        it (or not). Returns the ledger entry."""
        cursor = len(self.watch.messages)
        entry = Sent(topic, payload, retain)
        self.ledger.append(entry)
        self.mine.add((topic, payload))
        self.speaker.send(topic, payload, retain=retain)
        self.sentinel(topic, cursor)
        after = self.watch.snapshot()[cursor:]
        entry.delivered = any(m.topic == topic and m.payload == payload for m in after)
        return entry

    def sentinel(self, topic: str, cursor: int) -> str:
        """A payload every subscriber rejects, on ``topic``; waits until it is delivered
        and every component that publishes dead letters has rejected it."""
        token = uuid.uuid4().hex
        payload = b"\xffsentinel-" + token.encode()
        entry = Sent(topic, payload)
        self.ledger.append(entry)
        self.mine.add((topic, payload))
        self.speaker.send(topic, payload)
        self.watch.wait(lambda ms: any(m.payload == payload for m in ms[cursor:]), 10,
                        f"the sentinel on {topic}")
        entry.delivered = True
        for component in SYNCED:
            if verdict(component, topic, payload) == REJECT:
                self.watch.wait(lambda _m, c=component: any(
                    token in d.payload for d in self.deadletters(c, cursor)), 10,
                    f"{component} rejecting the sentinel on {topic}")
        return token

    # --- what came back ------------------------------------------------------------------
    def foreign(self, start: int = 0) -> list[Received]:
        """Messages the components published (not the ledger's)."""
        return [m for m in self.watch.snapshot()[start:] if (m.topic, m.payload) not in self.mine]

    def deadletters(self, component: str, start: int = 0) -> list[DeadLetter]:
        out = []
        for m in self.foreign(start):
            if m.topic != T.deadletter(component):
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
                       and verdict(component, s.topic, s.payload, s.retained) == REJECT)

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
    """Hostile *retained* States, there before the components start: the analyzer and the
    healer read them once, at subscribe time."""
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


def component_argv(component: str, tmp: Path, url: str) -> list[str]:
    argv = [sys.executable, "-m", "gpuheal", component, "--broker", url, "--prefix", PREFIX,
            "--host-name", HOST, "--log-level", "INFO"]
    return argv + {
        "publisher": ["--source", "sim", "--scenario", "healthy", "--gpus", "1"],
        "analyzer": [],
        "healer": ["--source", "sim", "--state-file", str(tmp / "healer-state.json")],
        "recorder": ["--db", str(tmp / "fuzz.db")],
    }[component]


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    tmp = tmp_path_factory.mktemp("fuzz")
    broker = start_local_broker(tmp / "mosquitto")
    assert broker.port != 1883
    watch = Collector(broker.url, [T.everything(), T.ha_status()]).start()
    speaker = Speaker(broker.url)
    s = System(broker, tmp, watch, speaker)
    try:
        for topic, payload in retained_seeds():
            v = verdicts(topic, payload, retained=True)
            assert ACCEPT not in v.values(), (topic, v)
            entry = Sent(topic, payload, retained=True)
            s.ledger.append(entry)
            s.mine.add((topic, payload))
            speaker.send(topic, payload, retain=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("GPUHEAL_")}
        env["PYTHONUNBUFFERED"] = "1"
        # The recorder first: it must be subscribed before the others' first dead letters.
        for group in (["recorder"], ["healer", "analyzer", "publisher"]):
            for component in group:
                with (tmp / f"{component}.log").open("wb") as log:
                    s.procs[component] = subprocess.Popen(
                        component_argv(component, tmp, broker.url), env=env, cwd=REPO,
                        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
            for component in group:
                try:
                    watch.wait(lambda ms, c=component: any(
                        m.topic == T.status(HOST, c) and m.payload == b"online" for m in ms),
                        30, f"{component} online")
                except AssertionError:
                    s.assert_running()
                    raise
        for entry in s.ledger:  # the collector saw each seed when it was published
            entry.delivered = any(m.topic == entry.topic and m.payload == entry.payload
                                  for m in watch.snapshot())
        # Each component handled its retained seeds before the messages that follow them.
        for topic in (T.sim(HOST, 0), T.sample(OTHER, 0), T.healer_set(HOST)):
            s.sentinel(topic, 0)
        yield s
    finally:
        s.stop_components()
        speaker.close()
        watch.stop()
        broker.stop()


# --- the fuzz ------------------------------------------------------------------------------
def test_fuzz_topics_cover_every_subscription() -> None:
    for component, patterns in SUBSCRIPTIONS.items():
        for pattern in patterns:
            assert any(matches(pattern, t) for t in FUZZ_TOPICS), (component, pattern)
    assert matches("a/+/c", "a/b/c") and not matches("a/+/c", "a/b/d/c")
    assert matches("a/#", "a/b/c") and not matches("a/b", "a/b/c")


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
    (T.sample(OTHER, 65535), _valid_with(T.sample(OTHER, 65535), available=False, ts=-1.0,
                                         temperature_c=None, seq=INT64[1])),
    # valid events for a GPU the healer has no State of, with absurd event times
    (T.event(HOST, 5), _valid_with(T.event(HOST, 5), event_id="far-future", ts=1e308,
                                   started_ts=-1e308)),
    (T.event(HOST, 5), _valid_with(T.event(HOST, 5), event_id="far-past", ts=-1e308)),
    (T.event(HOST, 5), _valid_with(T.event(HOST, 5), event_id="far-past-2", ts=-1e308)),
    # a no-op operator command; a valid record of another host; valid but oversized
    (T.healer_set(HOST), b'{"unknown": 1}'),
    (T.event(OTHER, 0), _valid_with(T.event(OTHER, 0), evidence={"a": [1, {"b": None}]})),
    (T.sample(HOST, 0), _valid_with(T.sample(HOST, 0), name="x" * MAX_PAYLOAD_BYTES)),
    (T.sim(HOST, 3), _valid_with(T.sim(HOST, 3))),  # a valid command for a GPU it lacks
]


MODEL_OF_KIND: dict[str, type[Message]] = {
    "sample": Sample, "state": State, "event": Event, "action": Action,
    "healer_state": HealerState, "healer_set": HealerSet, "sim": SimCommand,
    "deadletter": DeadLetter,
}


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
        required = [name for name, f in MODEL_OF_KIND[topic_kind(topic)].model_fields.items()
                    if f.is_required()]
        if required:
            cases.append((topic, _dumps({k: x for k, x in base.items() if k != required[0]})))
    return cases


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                 HealthCheck.data_too_large, HealthCheck.large_base_example])
@given(case=fuzz_cases)
@example_cases(EXPLICIT_CASES + systematic_cases())
def test_hostile_payloads_are_dead_lettered_never_acted_on(system: System,
                                                           case: tuple[str, bytes]) -> None:
    topic, payload = case
    v = verdicts(topic, payload)
    assume(not harmful(topic, payload, v))
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
    assert not [m for m in s.watch.snapshot()[cursor:] if len(m.payload) > PACKET_LIMIT]
    assert [d for d in s.deadletters("analyzer", cursor) if "sentinel-" not in d.payload] == []


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
    # And working: new samples, new States of the real GPU, dead letters for new bad input.
    cursor = len(s.watch.messages)
    s.watch.wait(lambda ms: any(m.topic == T.sample(HOST, 0) for m in ms[cursor:]), 15,
                 "a new sample from the publisher")
    s.watch.wait(lambda ms: any(m.topic == T.state(HOST, 0) for m in ms[cursor:]), 15,
                 "a new State from the analyzer")
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
    stored = {c: Counter(t for comp, t in rows if comp == c) for c in COMPONENTS}
    assert stored["recorder"] == s.expected("recorder")
    for component in SYNCED:  # the recorder also keeps the others' dead letters
        assert stored[component] == observed[component], component


# --- no shell, and nothing from a payload on a command line ---------------------------------
SOURCE_DIRS = ("gpuheal", "publisher", "analyzer", "healer", "recorder")
FORBIDDEN_CALLS = {("os", "system"), ("os", "popen"), ("subprocess", "getoutput"),
                   ("subprocess", "getstatusoutput")}


def _shell_uses(path: Path, root: Path = REPO) -> list[str]:
    """Every ``shell=`` other than ``False``, and every use of the forbidden functions."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    imported: dict[str, tuple[str, str]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in {"os", "subprocess"}:
            for alias in node.names:
                if (node.module, alias.name) in FORBIDDEN_CALLS:
                    imported[alias.asname or alias.name] = (node.module, alias.name)
    for node in ast.walk(tree):
        where = f"{path.relative_to(root)}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.keyword) and node.arg == "shell" and not (
                isinstance(node.value, ast.Constant) and node.value.value is False):
            found.append(f"{where}: shell={ast.unparse(node.value)}")
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and \
                (node.value.id, node.attr) in FORBIDDEN_CALLS:
            found.append(f"{where}: {node.value.id}.{node.attr}")
        if isinstance(node, ast.Name) and node.id in imported:
            found.append(f"{where}: {'.'.join(imported[node.id])}")
    return found


def test_no_shell_anywhere() -> None:
    files = [p for d in SOURCE_DIRS for p in sorted((REPO / d).rglob("*.py"))]
    assert len(files) > 20
    found = [hit for path in files for hit in _shell_uses(path)]
    assert not found, "shell use in the source tree:\n" + "\n".join(found)


def test_the_shell_check_can_fail(tmp_path: Path) -> None:
    sample = tmp_path / "bad.py"
    sample.write_text("import os, subprocess\nfrom os import popen as p\n"
                      "subprocess.run('ls', shell=True)\nos.system('ls')\np('ls')\n"
                      "subprocess.getoutput('ls')\nsubprocess.run(['ls'], shell=False)\n")
    found = _shell_uses(sample, tmp_path)
    assert len(found) == 4, found


HOSTILE_INDEX: list[Any] = [
    "0", "0; reboot", "$(reboot)", "0 --gpu-reset", "-1", -1, 65536, 2**70, 1.0, 0.5, True,
    False, None, b"0", [0], {"index": 0}, float("nan"), "٣",
]


class EvilInt(int):
    """An int whose text is a command: only ``int(...)`` of it may reach an argv."""

    def __str__(self) -> str:
        return "0; reboot"

    __repr__ = __str__

    def __format__(self, spec: str) -> str:
        return "0; reboot"


@pytest.mark.parametrize("bad", HOSTILE_INDEX, ids=[repr(b)[:20] for b in HOSTILE_INDEX])
def test_argv_builders_take_only_a_validated_int_index(bad: Any) -> None:
    with pytest.raises(InvalidIndexError):
        validate_index(bad)
    for build in (lambda i: smi_reset_argv("nvidia-smi", i),
                  lambda i: smi_compute_apps_argv("nvidia-smi", i),
                  lambda i: smi_query_limits_argv("nvidia-smi", i),
                  lambda i: smi_set_limit_argv("nvidia-smi", i, 200)):
        with pytest.raises(InvalidIndexError):
            build(bad)


def test_an_int_subclass_reaches_argv_as_its_plain_value() -> None:
    evil = EvilInt(3)
    assert validate_index(evil) == 3 and type(validate_index(evil)) is int
    for argv in (smi_reset_argv("nvidia-smi", evil), smi_compute_apps_argv("nvidia-smi", evil),
                 smi_query_limits_argv("nvidia-smi", evil),
                 smi_set_limit_argv("nvidia-smi", evil, 200)):
        assert "3" in argv and not any("reboot" in a for a in argv), argv
    with pytest.raises(ValueError):
        smi_set_limit_argv("nvidia-smi", 0, "200; reboot")  # type: ignore[arg-type]
    assert jetson_throttle_argvs("jc", "/s") == [["jc", "--store", "/s"], ["jc", "--fan"]]
    assert jetson_restore_argvs("jc", "/s") == [["jc", "--restore", "/s"]]


HOSTILE_TEXT = "; reboot $(id) `id` | rm -rf / && -i 1 --gpu-reset"


def test_payload_text_never_reaches_a_command_line(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Every real actuator, with params full of payload-derived hostile text: the commands it
    runs hold only configured words, numbers it computed and the validated index."""
    log = tmp_path / "argv.jsonl"
    monkeypatch.setenv("RECORD_ARGV_FILE", str(log))
    monkeypatch.setenv("FAKE_SMI_PIDS", "")
    record = str(FIXTURES / "bin" / "record-argv")
    smi = str(FIXTURES / "healer" / "nvidia-smi")
    config = ActuatorsConfig(
        nvidia_smi=smi, restart_llm_service=[record, "restart", "llm"],
        reset_gpu_session=[record, "restart", "llm"], stop_llm_service=[record, "stop", "llm"],
        stop_gpu_users=[[record, "stop", "users"]], ollama_url="http://127.0.0.1:9",
        http_timeout_s=1.0, command_timeout_s=20.0)
    params = {"action_id": HOSTILE_TEXT, "gpu_name": HOSTILE_TEXT,
              "power_limit_w": HOSTILE_TEXT, "default_power_limit_w": HOSTILE_TEXT,
              "throttle_pct": HOSTILE_TEXT, "argv": [HOSTILE_TEXT], "index": HOSTILE_TEXT}
    actuators = real_actuators(config, nvml=None, jetson=False)
    for action in ("reset_gpu_session", "restart_llm_service", "stop_llm_service",
                   "throttle_gpu", "restore_power_limit", "reset_gpu", "clear_llm_cache"):
        result = actuators.run(action, 0, dict(params))
        assert HOSTILE_TEXT not in json.dumps(result.detail), (action, result.detail)
    for bad in ("0; reboot", -1, 1.0, True):
        for actuator in (PowerActuator(config, nvml=None, jetson=False),
                         ResetActuator(config)):
            action = "reset_gpu" if isinstance(actuator, ResetActuator) else "throttle_gpu"
            assert actuator.run(action, bad, dict(params)).reason == "invalid_index"
    assert CommandActuator(config).run("stop_llm_service", 0, dict(params)).ok
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert calls, "no command ran"
    allowed = {record, smi, "restart", "stop", "llm", "users", "-i", "0", "-pl", "240", "300",
               "--gpu-reset", "--query-compute-apps=pid", "--format=csv,noheader",
               "--query-gpu=power.default_limit,power.min_limit,power.max_limit,power.limit",
               "--format=csv,noheader,nounits"}
    for argv in calls:
        assert set(argv) <= allowed, argv


# --- poison messages found by this fuzz (regression tests), and the open bug ---------------
SURROGATE_EVENT = (b'{"v":1,"event_id":"\\ud800","host":"%s","index":7,"kind":"gpu_hang",'
                   b'"severity":"critical","phase":"raised","started_ts":1,"ts":2,'
                   b'"message":"\\udfff"}')
"""Valid but for its lone UTF-16 surrogate escapes, which no UTF-8 text can hold."""


def test_contract_rejects_lone_surrogates() -> None:
    """Once let through, such a string made make_action_id, model_dump_json and SQLite raise
    later, in the healer's policy thread, the analyzer's handler and the recorder's writer."""
    with pytest.raises(PayloadError, match="surrogate"):
        decode(Event, SURROGATE_EVENT % b"h")
    assert decode(Event, (SURROGATE_EVENT % b"h").replace(b"\\ud800", b"\\u00e9")
                         .replace(b"\\udfff", b"\\ud83d\\ude00")).message == "\U0001f600"


def _thread_component(target: Callable[..., int], opts: Any) -> tuple[threading.Thread,
                                                                       threading.Event]:
    stop = threading.Event()
    thread = threading.Thread(target=target, args=(opts, stop), daemon=True)
    thread.start()
    return thread, stop


def _common(url: str, prefix: str, host: str) -> CommonOptions:
    return CommonOptions(broker=url, prefix=prefix, host_name=host)


def test_healer_survives_an_event_with_a_lone_surrogate(system: System, tmp_path: Path) -> None:
    """It used to stop the healer: make_action_id raised in the policy thread, and then the
    guard-state save in ``run``'s ``finally`` raised too, so the bus was never stopped."""
    from healer.service import run

    prefix, host = "fzx-healer", "xhost"
    t = Topics(prefix)
    opts = HealerOptions(common=_common(system.broker.url, prefix, host), source="sim",
                         state_file=tmp_path / "healer.json")
    with Collector(system.broker.url, f"{prefix}/#") as seen:
        thread, stop = _thread_component(run, opts)
        try:
            seen.wait(lambda ms: any(m.topic == t.status(host, "healer") and
                                     m.payload == b"online" for m in ms), 10, "healer online")
            pub = Speaker(system.broker.url)
            try:
                pub.send(t.event(host, 7), SURROGATE_EVENT % host.encode())
                pub.send(t.healer_set(host), b'{"dry_run": true}')
            finally:
                pub.close()
            seen.wait(lambda ms: any(m.topic == t.healer_state(host) and m.json()["dry_run"]
                                     for m in ms) or not thread.is_alive(), 10,
                      "the healer handling the command after the event")
            assert thread.is_alive(), "the healer died"
            letters = [decode(DeadLetter, m.payload) for m in seen.snapshot()
                       if m.topic == t.deadletter("healer")]
            assert [d.topic for d in letters] == [t.event(host, 7)]
            assert not [m for m in seen.snapshot() if m.topic == t.action(host, 7)]
        finally:
            stop.set()
            thread.join(10)


@pytest.mark.parametrize("poison", ["deep", "surrogate"])
def test_recorder_keeps_storing_after_a_poison_message(system: System, tmp_path: Path,
                                                       poison: str) -> None:
    """It used to kill the recorder's writer thread (status still online, nothing stored or
    acknowledged any more): pydantic's serializer stops at 255 levels while JSON input could
    nest ~1000, and a lone surrogate failed both the row and its dead-letter fallback. Both
    are now outside the contract: stored as dead letters, and the recorder goes on."""
    from recorder.service import run

    prefix, host = f"fzx-rec-{poison}", "xhost"
    t = Topics(prefix)
    db = tmp_path / "rec.db"
    opts = RecorderOptions(common=_common(system.broker.url, prefix, host), db=db,
                           client_id=f"fzx-rec-{uuid.uuid4().hex[:8]}")
    if poison == "deep":
        event = base_message(T.event(HOST, 0))
        assert event is not None
        payload = _dumps({**event, "event_id": "deep", "host": host,
                          "evidence": {"x": deep(300, "dict")}})
        with pytest.raises(PayloadError, match="nested deeper"):  # beyond MAX_JSON_DEPTH
            decode(Event, payload)
    else:
        payload = SURROGATE_EVENT.replace(b'"index":7', b'"index":0') % host.encode()
    thread, stop = _thread_component(run, opts)
    try:
        with Collector(system.broker.url, t.status(host, "recorder")) as seen:
            seen.wait(lambda ms: any(m.payload == b"online" for m in ms), 10, "recorder online")
        pub = Speaker(system.broker.url)
        try:
            pub.send(t.event(host, 0), payload)
            pub.send(t.event(host, 0), b"\xffsentinel-after-poison")
        finally:
            pub.close()

        def rows(sql: str) -> list[Any]:
            try:
                with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
                    return con.execute(sql).fetchall()
            except sqlite3.OperationalError:
                return []

        wait_for(lambda: rows("select 1 from deadletter where payload like "
                              "'%sentinel-after-poison%'"), 10,
                 "the message after the poison in SQLite")
        assert thread.is_alive()
        if poison == "deep":
            assert not rows("select 1 from events where event_id = 'deep'")
            reasons = rows("select reason from deadletter where payload like '%deep%'")
            assert reasons and "nested deeper" in reasons[0][0]
        else:
            reasons = rows("select reason from deadletter where payload like '%ud800%'")
            assert reasons and "surrogate" in reasons[0][0]
    finally:
        stop.set()
        thread.join(15)


def test_analyzer_dead_letters_a_sample_with_a_lone_surrogate(system: System) -> None:
    """It used to pass the analyzer's parse and then fail in the handler (no dead letter)."""
    from analyzer.service import run

    prefix, host = "fzx-analyzer", "xhost"
    t = Topics(prefix)
    sample = base_message(T.sample(HOST, 0))
    assert sample is not None
    payload = _dumps({**sample, "host": host, "name": "NAME"}).replace(b'"NAME"',
                                                                        b'"\\ud800"')
    opts = AnalyzerOptions(common=_common(system.broker.url, prefix, "analyzerhost"))
    with Collector(system.broker.url, f"{prefix}/#") as seen:
        thread, stop = _thread_component(run, opts)
        try:
            seen.wait(lambda ms: any(m.topic == t.status("analyzerhost", "analyzer") and
                                     m.payload == b"online" for m in ms), 10, "analyzer online")
            pub = Speaker(system.broker.url)
            try:
                pub.send(t.sample(host, 0), payload)
                pub.send(t.sample(host, 0), b"\xffsentinel")
            finally:
                pub.close()
            letters = seen.wait(lambda ms: [m for m in ms if m.topic == t.deadletter("analyzer")
                                            and b"sentinel" in m.payload] and
                                [m for m in ms if m.topic == t.deadletter("analyzer")], 5,
                                "the sentinel's dead letter")
            assert len(letters) == 2, "the surrogate sample was neither used nor dead-lettered"
            assert "surrogate" in decode(DeadLetter, letters[0].payload).reason
        finally:
            stop.set()
            thread.join(10)


def test_recorder_dead_letters_an_oversized_status() -> None:
    """Status payloads are plain text, not models: they need the size limit of their own."""
    from recorder.rows import record_for

    payload = b"online" + b" " * MAX_PAYLOAD_BYTES
    record = record_for(T, T.status(HOST, "healer"), payload, NOW)
    assert record is not None and record.table == "deadletter"
    assert "too large" in record.row["reason"]


def test_analyzer_handles_a_sample_time_beyond_year_9999(system: System) -> None:
    from analyzer.service import run

    prefix, host = "fzx-analyzer-ts", "xhost"
    t = Topics(prefix)
    payload = _valid_with(T.sample(HOST, 0), host=host, ts=-1e308)
    opts = AnalyzerOptions(common=_common(system.broker.url, prefix, "analyzerhost"))
    with Collector(system.broker.url, f"{prefix}/#") as seen:
        thread, stop = _thread_component(run, opts)
        try:
            seen.wait(lambda ms: any(m.topic == t.status("analyzerhost", "analyzer") and
                                     m.payload == b"online" for m in ms), 10, "analyzer online")
            pub = Speaker(system.broker.url)
            try:
                pub.send(t.sample(host, 0), payload)
            finally:
                pub.close()
            seen.wait(lambda ms: [m for m in ms if m.topic in (t.state(host, 0),
                                                                t.deadletter("analyzer"))],
                      3, "a State or a dead letter for the sample")
        finally:
            stop.set()
            thread.join(10)


def _valid_at_stack_depth(payload: bytes, frames: int) -> bool:
    """Whether ``parse_payload`` accepts ``payload`` when called ``frames`` calls deeper."""
    if frames:
        return _valid_at_stack_depth(payload, frames - 1)
    return _parse(Event, payload) is not None


def test_contract_nesting_limit_does_not_depend_on_the_stack() -> None:
    event = base_message(T.event(OTHER, 0))
    assert event is not None

    head = _dumps({**event, "evidence": RAW})
    at = head.index(f'"{RAW}"'.encode())

    def nested(depth: int) -> bytes:  # built as text: json.dumps has the same limit
        return head[:at] + b'{"a":' * depth + b"1" + b"}" * depth + head[at + len(RAW) + 2:]

    low, high = 1, 2000  # the deepest evidence valid from here: binary search
    while low < high:
        mid = (low + high + 1) // 2
        if _valid_at_stack_depth(nested(mid), 0):
            low = mid
        else:
            high = mid - 1
    assert low < 2000
    assert _valid_at_stack_depth(nested(low), 100), \
        f"{low} levels are valid here, and 'not JSON' 100 calls deeper"
